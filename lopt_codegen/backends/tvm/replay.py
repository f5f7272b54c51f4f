"""A steady CPU step replayed. Between two training steps usually nothing the host side
decides on changes: the same tensors at the same addresses, the same state, the same
hyperparameters. A step then repeats the last one's calls: the same compiled functions
on the same pointer tables, the same copies of step counts and small accumulators. A
step that finds its key (`step_key`) equal to the last step's runs the ops recorded
then (`StepRecord`), without the Python that found them: 2 groups of Adam spent ~80 us
a step there against ~5 us in their kernels' calls on tiny tensors.

The key holds everything the host side reads: each tensor's param (address, dtype, shape,
layout) and gradient (dtype, layout, alignment), its state values (address, dtype,
strides), its hyperparameters, route and factored axes, and the shared MLP weights
(object, version, address). The kernels read through addresses; the recorded copies hold
the tensors they read, so that no other tensor can take their addresses while the
record lives. Gradients are the exception: backward after zero_grad() makes new ones,
most steps at new addresses, so a replay writes the new addresses into the recorded
pointer tables (`StepRecord.grads_in`) instead of finding the step again. Hyperparameters
and shape facts are written to the kept leaves only when they change, MLP weights only
when they were written to; the record is therefore only ever the last step's (any step
not replayed drops it first), so that what it did not record is still in place. Steps with a network, a loss, a skip flag, tensor functions, shards,
non-CPU tensors or the reference's fallback are not recorded."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..base import StepBatch, TensorTask

from .batched import ALIGNMENT

if TYPE_CHECKING:
    from .small_work import KeptArgs


def step_key(batch: StepBatch, with_calls: set[str]) -> tuple[tuple, list[int]] | None:
    """What a replay of the last step needs unchanged (see the module's doc), and the
    gradients' addresses; None for a step that is never recorded."""
    if batch.network is not None or batch.loss_features is not None or batch.skip_step is not None:
        return None
    key: list = []
    grads = []
    for task in batch.tasks:
        p, g = task.param, task.grad
        if not p.is_cpu or task.shard is not None or task.variant in with_calls:
            return None
        at = g.data_ptr()
        grads.append(at)
        key += (p.data_ptr(), p.dtype, p.shape, p.is_contiguous(), g.dtype, g.is_contiguous(), at % ALIGNMENT == 0,
                task.hyper, task.variant, task.axes)
        for value in task.state.values():
            if isinstance(value, torch.Tensor):
                key += (value.data_ptr(), value.dtype, value.stride())
    key += [(id(w), w._version, w.data_ptr()) for w in batch.mlp_weights or ()]
    return tuple(key), grads


class StepRecord:
    """The ops a step ran (zero-argument calls, in order), kept for replay unless a part
    of the step could not be recorded (`invalidate`); and where its pointer tables hold
    gradients' addresses."""

    def __init__(self, key: tuple, grads: list[int], tasks: list[TensorTask]):
        self.key, self.grads = key, grads
        self.ops: list[Callable[[], object]] = []
        self.valid = True
        # (a pass's kept arguments, its table as an array (a column written in 0.4 us, by
        # torch in 5), the table's gradient column, its rows' tasks in the step)
        self._grad_columns: list[tuple[KeptArgs, np.ndarray, int, list[int]]] = []
        self._position = {id(t): i for i, t in enumerate(tasks)}   # (while recording)

    def invalidate(self) -> None:
        self.valid = False

    def grads_in(self, kept: KeptArgs, column: int, tasks: list[TensorTask]) -> None:
        """Column `column` of kept.table holds the gradients of `tasks`, one a row."""
        self._grad_columns.append((kept, kept.table.numpy(), column, [self._position[id(t)] for t in tasks]))

    def recorded(self) -> None:
        self._position = {}

    def replay(self, grads: list[int]) -> None:
        """The step again, on gradients at `grads` (the step's, in order)."""
        if grads != self.grads:
            for kept, table, column, rows in self._grad_columns:
                table[:, column] = [grads[i] for i in rows]
                kept.bases = None   # (the table no longer holds what the normal path kept)
            self.grads = grads
        for op in self.ops:
            op()


def copy_stacked(dst: torch.Tensor, sources: list[torch.Tensor]) -> None:
    """dst <- the sources stacked (one: as it is), in dst's shape."""
    dst.copy_(sources[0].reshape(dst.shape) if len(sources) == 1 else torch.stack(sources).reshape(dst.shape))
