"""A steady CPU step replayed. Between two training steps usually nothing the host side
decides on changes: the same tensors at the same addresses, the same state, the same
hyperparameters. A step then repeats the last one's calls: the same compiled functions
on the same pointer tables, the same copies of step counts and small accumulators. A
step that finds its key (`step_key`) equal to the last step's runs the ops recorded
then (`StepRecord`), without the Python that found them: 2 groups of Adam spent ~80 us
a step there against ~5 us in their kernels' calls on tiny tensors.

The key holds everything the host side reads: each tensor's param and gradient (address,
dtype, shape, layout), its state values (address, dtype, strides), its hyperparameters,
route and factored axes, and the shared MLP weights (object, version, address). The
kernels read through addresses; the recorded copies hold the tensors they read, so
that no other tensor can take their addresses while the record lives. Hyperparameters
and shape facts are written to the kept leaves only when they change, MLP weights only
when they were written to; the record is therefore only ever the last step's (any step
not replayed drops it first), so that what it did not record is still in place. Steps with a network, a loss, a skip flag, tensor functions, shards,
non-CPU tensors or the reference's fallback are not recorded."""
from __future__ import annotations

from typing import Callable

import torch

from ..base import StepBatch


def step_key(batch: StepBatch, with_calls: set[str]) -> tuple | None:
    """What a replay of the last step needs unchanged (see the module's doc); None for a
    step that is never recorded."""
    if batch.network is not None or batch.loss_features is not None or batch.skip_step is not None:
        return None
    key: list = []
    for task in batch.tasks:
        p, g = task.param, task.grad
        if not p.is_cpu or task.shard is not None or task.variant in with_calls:
            return None
        key += (p.data_ptr(), p.dtype, p.shape, p.is_contiguous(), g.data_ptr(), g.dtype, g.is_contiguous(),
                task.hyper, task.variant, task.axes)
        for value in task.state.values():
            if isinstance(value, torch.Tensor):
                key += (value.data_ptr(), value.dtype, value.stride())
    key += [(id(w), w._version, w.data_ptr()) for w in batch.mlp_weights or ()]
    return tuple(key)


class StepRecord:
    """The ops a step ran (zero-argument calls, in order), kept for replay unless a part
    of the step could not be recorded (`invalidate`)."""

    def __init__(self, key: tuple):
        self.key = key
        self.ops: list[Callable[[], object]] = []
        self.valid = True

    def invalidate(self) -> None:
        self.valid = False

    def replay(self) -> None:
        for op in self.ops:
            op()


def copy_stacked(dst: torch.Tensor, sources: list[torch.Tensor]) -> None:
    """dst <- the sources stacked (one: as it is), in dst's shape."""
    dst.copy_(sources[0].reshape(dst.shape) if len(sources) == 1 else torch.stack(sources).reshape(dst.shape))
