"""A steady CPU step replayed. Between two training steps usually nothing the host side
decides on changes: the same tensors at the same addresses, the same state. A step then
repeats the last one's calls: the same compiled functions on the same pointer tables,
the same copies of step counts and small accumulators. A step of the same task
generation as the last step (runtime/steady.py: the same tasks, params, state and
routes) and the same shared MLP weights (object, version, address) runs the ops
recorded then (`StepRecord`), without the Python that found them: 2 groups of Adam spent
~80 us a step there against ~5 us in their kernels' calls on tiny tensors.

The kernels read through addresses; the recorded copies hold the tensors they read, so
that no other tensor can take their addresses while the record lives. What a
generation leaves free to change is written before the ops run: gradients (backward
after zero_grad() makes new ones, most steps at new addresses) into the recorded
pointer tables (`StepRecord.grads_in`), and hyperparameter values that changed (an LR
schedule's, every step) into the leaves the small functions read
(`StepRecord.hyper_in`), and the loss's features into theirs (`StepRecord.loss_in`).
A network runs again as one recorded op (`NetworkCall`) that writes its outputs into
the tensors the recorded copies after it read. Shape facts are written to the kept
leaves once, shared MLP weights only when they were written to; the record is therefore
only ever the last step's (any step not replayed drops it first), so that what it did
not record is still in place. Steps with a skip flag, tensor functions, shards, non-CPU
tensors or the reference's fallback are not recorded."""
from __future__ import annotations

from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ...ir.nodes import Node
from ..base import StepBatch, TensorTask
from ..group_values import GroupValues, NetworkOut, run_network_over_groups

from .batched import ALIGNMENT

if TYPE_CHECKING:
    from .small_work import KeptArgs

_GRAD = attrgetter("grad")


def step_key(batch: StepBatch) -> tuple | None:
    """What a replay of the last step needs unchanged (see the module's doc); None for a
    step of tasks without a generation (not the optimizer's)."""
    if batch.generation is None:
        return None
    # (the network object: the optimizer's for the device, held by the record's ops)
    return (batch.generation, id(batch.network),
            *[(id(w), w._version, w.data_ptr()) for w in batch.mlp_weights or ()])


def recordable(batch: StepBatch, with_calls: set[str]) -> bool:
    """Whether the step's tasks are all of a kind a record replays."""
    return all(t.param.is_cpu and t.shard is None and t.variant not in with_calls for t in batch.tasks)


def _grad_addresses(tasks: list[TensorTask]) -> list[int]:
    return list(map(torch.Tensor.data_ptr, map(_GRAD, tasks)))


class StepRecord:
    """The ops a step ran (zero-argument calls, in order), kept for replay unless a part
    of the step could not be recorded (`invalidate`); where its pointer tables hold
    gradients' addresses, and what writes hyperparameter values where its ops read them."""

    def __init__(self, key: tuple, batch: StepBatch):
        self.key, self.hyper = key, batch.hyper_values
        self.grads = _grad_addresses(batch.tasks)
        self.ops: list[Callable[[], object]] = []
        self.valid = True
        # (a pass's kept arguments, its table as an array (a column written in 0.4 us, by
        # torch in 5), the table's gradient column, its rows' tasks in the step)
        self._grad_columns: list[tuple[KeptArgs, np.ndarray, int, list[int]]] = []
        self._hyper_writes: list[Callable[[], object]] = []
        self._loss_columns: list[torch.Tensor] = []
        self._position = {id(t): i for i, t in enumerate(batch.tasks)}   # (while recording)

    def invalidate(self) -> None:
        self.valid = False

    def grads_in(self, kept: KeptArgs, column: int, tasks: list[TensorTask]) -> None:
        """Column `column` of kept.table holds the gradients of `tasks`, one a row."""
        self._grad_columns.append((kept, kept.table.numpy(), column, [self._position[id(t)] for t in tasks]))

    def hyper_in(self, write: Callable[[], object]) -> None:
        """`write()` writes the tasks' hyperparameter values (as they are then) where the
        ops read them."""
        self._hyper_writes.append(write)

    def loss_in(self, column: torch.Tensor) -> None:
        """`column` ([tensors, channels]) holds the step's loss features in every row."""
        self._loss_columns.append(column)

    def recorded(self) -> None:
        self._position = {}

    def gradients(self, batch: StepBatch) -> list[int] | None:
        """The addresses of the batch's gradients (its tasks those of the recorded step);
        None where one is not aligned as the kernels read it (no replay)."""
        grads = _grad_addresses(batch.tasks)
        return None if grads != self.grads and any(at % ALIGNMENT for at in grads) else grads

    def replay(self, batch: StepBatch, grads: list[int]) -> None:
        """The step again on the batch's gradients (at `grads`) and hyperparameter values."""
        if grads != self.grads:
            for kept, table, column, rows in self._grad_columns:
                table[:, column] = [grads[i] for i in rows]
                kept.bases = None   # (the table no longer holds what the normal path kept)
            self.grads = grads
        if batch.hyper_values != self.hyper:
            for write in self._hyper_writes:
                write()
            self.hyper = batch.hyper_values
        for column in self._loss_columns:
            column.copy_(batch.loss_features.reshape(1, -1))
        for op in self.ops:
            op()


def copy_stacked(dst: torch.Tensor, sources: list[torch.Tensor]) -> None:
    """dst <- the sources stacked (one: as it is), in dst's shape."""
    dst.copy_(sources[0].reshape(dst.shape) if len(sources) == 1 else torch.stack(sources).reshape(dst.shape))


def stacked_into(dst: torch.Tensor, sources: list[torch.Tensor]) -> Callable[[], object]:
    """An op that writes the sources stacked into dst: one copy from a strided view where
    there is one source or they are evenly spaced views of one tensor (the step counts,
    runtime/step_counts.py: a stack of 20 took ~25 us), else one numpy gather where they
    are elements of one tensor, else copy_stacked. The copy is numpy's where both are
    float32 (CPU): from cold caches, as after a step's kernels, torch's took ~50 us,
    numpy's ~15."""
    view = sources[0] if len(sources) == 1 else _evenly_spaced(sources)
    if view is not None:
        try:
            view = view.view(dst.shape)
        except RuntimeError:   # (a view of another shape needs a copy: a snapshot)
            view = None
    if view is None:
        gathered = _elements_of_one_base(dst, sources)
        return partial(copy_stacked, dst, sources) if gathered is None else gathered
    if _numpy_copies(dst, view):
        return partial(np.copyto, dst.numpy(), view.numpy())
    return partial(torch.Tensor.copy_, dst, view)


def _numpy_copies(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_cpu and not t.requires_grad for t in tensors)


def _elements_of_one_base(dst: torch.Tensor, sources: list[torch.Tensor]) -> Callable[[], object] | None:
    """An op that gathers the sources, one element each of one contiguous base (step
    counts of a group whose tensors are not evenly spaced among the step's: ResNet-18's
    groups, 16 stacks and copies of 38 us a step), into dst by one numpy indexing; None
    where they are not such elements."""
    base = sources[0]._base
    if base is None or not base.is_contiguous() or dst.numel() != len(sources) or \
            any(s._base is not base or s.numel() != 1 for s in sources) or not _numpy_copies(dst, base, *sources):
        return None
    at = np.array([s.storage_offset() - base.storage_offset() for s in sources]).reshape(dst.shape)
    return partial(_take, dst.numpy(), base.numpy().reshape(-1), at)


def _take(dst: np.ndarray, flat: np.ndarray, at: np.ndarray) -> None:
    dst[...] = flat[at]


def _evenly_spaced(views: list[torch.Tensor]) -> torch.Tensor | None:
    """The views as one [len, *shape] view of their common base, where they are views of
    one base alike in shape and strides at evenly spaced offsets; else None."""
    first, base = views[0], views[0]._base
    if base is None or len(views) < 2:
        return None
    offsets = [v.storage_offset() for v in views]
    step = offsets[1] - offsets[0]
    if step <= 0 or any(v._base is not base or v.shape != first.shape or v.stride() != first.stride() for v in views) \
            or any(b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    return base.as_strided((len(views), *first.shape), (step, *first.stride()), offsets[0])


class NetworkCall:
    """The network's call over a step's groups (run_network_over_groups) as an op of its
    record: its outputs and MLP weights are kept, and a replay writes its own into
    them, where the copies recorded after the call read them."""

    def __init__(self, batch: StepBatch, groups: list[GroupValues], inputs: list[Node]):
        self.batch, self.groups, self.inputs = batch, groups, inputs
        self.kept: NetworkOut | None = None

    def __call__(self) -> None:
        # A replay's groups hold their rows of the kept tensors since the recorded call
        # (taking them again: 14 slices of VeLO's, from cold caches).
        run_network_over_groups(self.batch, self.groups, self.inputs, self._hold, take=self.kept is None)

    def _hold(self, out: NetworkOut) -> NetworkOut:
        outputs, mlp = out
        if self.kept is None:   # (copies: an output may be a view of a kept constant, a shared row)
            own = lambda v: v.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # noqa: E731
            self.kept = ({k: own(v) for k, v in outputs.items()}, [own(w) for w in mlp])
        else:
            torch._foreach_copy_([*self.kept[0].values(), *self.kept[1]], [*map(outputs.get, self.kept[0]), *mlp])
        return self.kept
