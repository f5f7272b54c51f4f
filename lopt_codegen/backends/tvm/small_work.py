"""The host side of a TVM step for a group of same-shape tensors: each tensor's kernel
arguments and partial-sum buffers as rows of per-group buffers kept across steps, and
the small work between passes, either as compiled functions over those rows
(small_function.py; CPU) or in torch (CUDA): the small values computed together
(group_values.py), the partial sums finished together, and the MLP's first layer
folded per tensor."""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import Callable

import numpy as np
import torch

from ...ir.mlp_fold import MlpFold
from ...ir.nodes import Level, Node
from ..base import StepBatch, TensorTask, checked_accumulator
from ..group_values import GroupValues
from ..sharded_groups import RankSums
from .batched import ALIGNMENT
from .replay import StepRecord, copy_stacked, stacked_into
from .signature import PassSignature
from .small_function import SmallSignature
from .view import ROWS_PER_BLOCK, WARP, View, padded


def aligned(tensors: list[torch.Tensor], written: bool) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The tensors, with an aligned copy in place of each misaligned one (a view into a
    bigger buffer, e.g. a bucketed gradient), and the (original, copy) pairs to write back."""
    out, back = [], []
    for t in tensors:
        if t.data_ptr() % ALIGNMENT == 0:
            out.append(t)
        else:
            copy = t.clone(memory_format=torch.contiguous_format)
            out.append(copy)
            if written:
                back.append((t, copy))
    return out, back


def empty_rows(count: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """[count, *shape] whose rows each start on an ALIGNMENT boundary (rows padded)."""
    return empty_rows_each([(count, *shape)], dtype, device)[0]


def empty_rows_each(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """empty_rows of each [count, *shape] in `shapes`, views of one allocation (a group's
    kept buffers are made together: one allocation where one each took most of the time
    making them at a first step). Each is one as_strided view, where slicing and viewing
    took four torch calls a buffer (VeLO's first step on GPT-2 makes 651: 6-10 -> 4-6 ms)."""
    per = ALIGNMENT // dtype.itemsize
    widths = [-(-math.prod(s[1:]) // per) * per for s in shapes]
    buf = torch.empty(sum(s[0] * w for s, w in zip(shapes, widths)), dtype=dtype, device=device)
    out, start = [], 0
    for s, w in zip(shapes, widths):
        out.append(buf.as_strided(s, (w, *(math.prod(s[k + 1:]) for k in range(1, len(s)))), start))
        start += s[0] * w
    return out


def _storage(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 as its bits, the way the kernels take it (stages.storage_dtype)."""
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


def row_pointers(count: int, rows: list[torch.Tensor]) -> torch.Tensor:
    """int64 [count tensors, buffers]: where each tensor's row of each [tensors, ...]
    buffer starts (by arithmetic over all the buffers at once: one torch call per buffer
    took most of a first step's host time on GPT-2's groups)."""
    starts = torch.tensor([r.data_ptr() for r in rows], dtype=torch.int64)
    steps = torch.tensor([r.stride(0) * r.element_size() for r in rows], dtype=torch.int64)
    return starts + torch.arange(count, dtype=torch.int64).unsqueeze(1) * steps


def pointer_table(own: list[list[int]], rows: torch.Tensor, outputs: list[list[int]]) -> torch.Tensor:
    """int64 [tensors, arguments] of data pointers (tvm/batched.py): each tensor's own
    inputs, its rows of the [tensors, ...] buffers (row_pointers), then its own outputs."""
    count = len(own)
    return torch.cat([torch.tensor(own, dtype=torch.int64).reshape(count, -1), rows,
                      torch.tensor(outputs, dtype=torch.int64).reshape(count, -1)], 1)


@dataclass
class KeptArgs:
    """A pass's kernel arguments for one group, kept from step to step: the [tensors, ...]
    row buffers (small values, scalars, MLP weights, partial sums; refilled in place each
    step) and the pointer table over them and the tensors' own data, in the kernels'
    memory. The table is rebuilt only when a tensor's data moved (on the GPU it then
    stays in device memory; no copy per step)."""

    rows: list[torch.Tensor] = field(default_factory=list)
    rows_of: tuple[PassSignature, int] | None = None   # (signature, tensors) `rows` were made for
    values: int = 0   # the first `values` rows hold small values, the rest partial sums
    bases: list[list[tuple[int, int]]] | None = None   # the tensors' bases (_tensor_bases) `table` holds
    table: torch.Tensor | None = None
    # row_pointers(rows), kept with them: a new gradient each step (as backward gives)
    # rebuilds the table, and this part took most of it (0.8 ms a step on GPT-2's groups)
    row_table: torch.Tensor | None = None


@dataclass
class KeptSmall:
    """A small function's own row buffers (MLP layer 1 in; outputs other than a pass's
    values) and its pointer table, rebuilt only when a buffer it points into moved."""

    rows: list[torch.Tensor] = field(default_factory=list)
    layout: list[torch.Tensor] = field(default_factory=list)   # the row buffers `table` points into
    table: torch.Tensor | None = None

    def table_over(self, rows: list[torch.Tensor]) -> torch.Tensor:
        # Row buffers are the group's own and never moved: the same ones, the same pointers.
        if len(rows) != len(self.layout) or any(a is not b for a, b in zip(rows, self.layout)):
            self.table = row_pointers(rows[0].shape[0], rows)
            self.layout = rows
        return self.table


@dataclass
class GroupKept:
    """Everything a group keeps across steps: each pass's arguments and, where the small
    work is compiled, the leaves and state rows and each small function's buffers."""

    passes: dict[int, KeptArgs] = field(default_factory=dict)
    small: dict[str, KeptSmall] = field(default_factory=dict)
    leaves: torch.Tensor | None = None
    written: dict[int, object] = field(default_factory=dict)   # id(leaf) -> what its columns hold
    leaf_nodes: list[Node] | None = None   # the leaves `leaves` holds (every small function's list)
    leaf_columns: dict[int, torch.Tensor] = field(default_factory=dict)   # id(leaf) -> its columns of `leaves`
    # id(leaf) -> its columns as a numpy array (write_hyper: a fill_ took ~50 us from cold caches, numpy's ~10)
    leaf_arrays: dict[int, np.ndarray] = field(default_factory=dict)
    hyper_seen: dict[str, float] | None = None   # the hyperparameters `leaves` holds, where all tensors share them
    states: dict[str, torch.Tensor] = field(default_factory=dict)   # small accumulator -> its rows
    # small accumulator -> (its rows, the row views that are the tasks' states): _state_rows
    state_views: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=dict)
    # id(accumulator) -> GroupStep._checked_base's (which holds it), as checked at an
    # earlier step: checked again when its data pointer, strides or dtype changed
    checked: dict[int, tuple] = field(default_factory=dict)
    base_names: list[str] | None = None   # param, grad and the accumulators the passes read or write
    kernels: list | None = None   # the group's kernels, once they are its best (TvmBackend._group_kernels)
    view: View | None = None      # the kernels' view of its tensors
    # small function or pass's later layers -> (the shared MLP weights and the rows that
    # hold them, (their ids, the weights' versions and pointers)): _copy_mlp_weights
    mlp_copied: dict[str, tuple[list[torch.Tensor], tuple]] = field(default_factory=dict)


@dataclass
class SmallKernel:
    sig: SmallSignature
    func: Callable


def _rows(kept: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """`kept` if it has these shapes, else new aligned row buffers of them."""
    if [tuple(r.shape) for r in kept] == shapes:
        return kept
    return empty_rows_each(shapes)


_HYPER = attrgetter("hyper")


def write_hyper(kept: GroupKept, tasks: list[TensorTask], nodes: list[Node]) -> None:
    """The leaves' columns of hyperparameters `nodes` (one value a tensor), where the
    tasks' values are not those written last (all tensors' from one dict equal to the one
    written last: none to check; else a tuple per node: 3 us a group and name)."""
    hypers = list(map(_HYPER, tasks))
    shared = hypers[0]
    if hypers.count(shared) != len(hypers):   # (equal dicts: one object each, mostly)
        shared = None
    elif kept.hyper_seen == shared:
        return
    for node in nodes:
        name = node.attrs[0]
        written = (shared[name],) if shared is not None else tuple([t.hyper[name] for t in tasks])
        if kept.written.get(id(node)) != written:
            column = kept.leaf_arrays[id(node)]
            column[...] = written[0] if shared is not None else np.reshape(written, column.shape)
            kept.written[id(node)] = written
    kept.hyper_seen = dict(shared) if shared is not None else None


class GroupStep(GroupValues):
    """A group's step through the TVM kernels: each tensor's kernel arguments and
    outputs, and the reductions finished from the kernels' partial sums. With `small`
    (CPU groups), the small work runs as compiled functions (small_function.py) that
    read the partial sums and write the kernels' row buffers directly; else (CUDA) it is
    evaluated in torch (group_values.py)."""

    def __init__(self, tasks: list[TensorTask], batch: StepBatch, view: View, kept: GroupKept,
                 sigs: list[PassSignature], small: dict[str, SmallKernel] | None = None,
                 ranks: RankSums | None = None, record: StepRecord | None = None):
        super().__init__(tasks, batch, ranks)
        self.view, self.kept, self.small = view, kept, small
        self.record = record   # the step's ops, for its replay (replay.py)
        self._pass_sigs = {s.index: s for s in sigs}
        self._elements: dict[tuple[int, str, int], torch.Tensor] = {}
        self._bases: list[dict[str, tuple[int, int]]] | None = None   # _tensor_bases'
        self._bases_read = False
        self._copies: list[torch.Tensor] = []   # _table_with_copies'
        self._filled: set[int] = set()   # leaves and states read this step
        self._as_rows: set[str] = set()   # small accumulators whose states are their rows this step (_state_rows)

    def element(self, t: int, name: str, channel: int = 0) -> torch.Tensor:
        """Tensor t's param, grad or accumulator channel viewed as the kernels' dims; made
        once per step and shared by the passes. The kernels get bare data pointers
        (batched.py), so each must be a dense float32 (state) block on the right device."""
        key = (t, name, channel)
        if key not in self._elements:
            task = self.tasks[t]
            if name == "param":   # contiguous: unsupported_reason sends others to the reference
                self._elements[key] = _storage(task.param.detach().view(self.view.dims))
            elif name == "grad":   # only read: a strided or misaligned gradient is copied once per step
                grad = task.grad
                if not grad.is_contiguous() or grad.data_ptr() % ALIGNMENT:
                    grad = grad.clone(memory_format=torch.contiguous_format)
                self._elements[key] = _storage(grad.view(self.view.dims))
            else:
                for c, x in enumerate(checked_accumulator(task, name, "TVM").unbind(0)):
                    self._elements[(t, name, c)] = x.view(self.view.dims)
        return self._elements[key]

    def do(self, op: Callable[[], object]) -> None:
        """Runs one of the step's ops (a compiled call or a copy) and records it for the
        step's replay."""
        op()
        if self.record is not None:
            self.record.ops.append(op)

    def unrecorded(self) -> None:
        """This step did work its record cannot replay: no replay of it."""
        if self.record is not None:
            self.record.invalidate()

    # --- kernel arguments ------------------------------------------------------------
    def kernel_args(self, sig: PassSignature) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]],
                                                      list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The pass's pointer table for the group (on the kernels' device), the (original,
        aligned copy) pairs of outputs to write back after the kernel, and its P, Q and M
        partial-sum buffers ([tensors, ...] each, finished by finish_sums)."""
        count = len(self)
        kept = self.kept.passes.get(sig.index) or self.kept.passes.setdefault(sig.index, KeptArgs())
        device = self.tasks[0].param.device
        if kept.rows_of is None or kept.rows_of[0] is not sig or kept.rows_of[1] != count:   # (the view is fixed)
            p_shape, q_shape, m_shape = self._sum_shapes(sig)
            values = self._value_shapes(sig)
            shapes = values + [(count, *p_shape)] * len(sig.x_sums) + [(count, *q_shape)] * len(sig.y_sums) \
                + [(count, *m_shape)] * len(sig.m_sums)
            kept.rows = empty_rows_each(shapes, device=device)
            kept.bases, kept.row_table = None, row_pointers(count, kept.rows)
            kept.rows_of, kept.values = (sig, count), len(values)
        if self.small is None:
            self.unrecorded()
            for row, value in zip(kept.rows, self._small_values(sig)):
                row.copy_(value)
        else:
            self._fill_values(sig, kept.rows[:kept.values])
        sums, x, y = kept.rows[kept.values:], len(sig.x_sums), len(sig.y_sums)
        p, q, m = sums[:x], sums[x:x + y], sums[x + y:]
        bases = self._tensor_bases()
        if bases is None:   # a misaligned or strided tensor: aligned copies, a table for this step only
            self.unrecorded()
            table, back = self._table_with_copies(sig, kept.rows)
            kept.bases = None
        else:
            if bases != kept.bases:
                own = self._own_pointers(sig, bases)
                kept.table, kept.bases = pointer_table(own[0], kept.row_table, own[1]).to(device), bases
            if self.record is not None and "grad" in sig.leaves:   # (own pointers first: leaves, in order)
                self.record.grads_in(kept, sig.leaves.index("grad"), self.tasks)
            table, back = kept.table, []
        if self.view.gpu:   # the sums as laid out on the CPU, without the padding
            A, X, B, Y, C = self.view.dims
            p = [x[:, :, :A * B * Y * C].reshape(count, -1, A, B, Y, C) for x in p]
            q = [x[:, :A * X * B * C].reshape(count, A, X, B, C, 1) for x in q]
        return table, back, p, q, m

    def _value_shapes(self, sig: PassSignature) -> list[tuple[int, ...]]:
        """The [tensors, ...] shapes of the pass's small values, scalars and MLP weights."""
        count = len(self)
        shapes = [(count, n.channels, *self.view.small_dims(n.level)) for n in sig.small]
        if sig.scalar_nodes:
            shapes.append((count, sig.scalar_count))
        if sig.mlp is not None:
            shapes += [(count, *s) for s in MlpFold.of(sig.mlp).layer_shapes(sig.mlp.attrs[0])]
        return shapes

    def _small_values(self, sig: PassSignature) -> list[torch.Tensor]:
        """The pass's small values, scalars and MLP weights, evaluated in torch."""
        count = len(self)
        values = [self.dense(n).reshape(count, n.channels, *self.view.small_dims(n.level)) for n in sig.small]
        if sig.scalar_nodes:
            values.append(torch.cat([self.dense(n).reshape(count, -1) for n in sig.scalar_nodes], 1))
        if sig.mlp is not None:
            values += self.fold_mlp(MlpFold.of(sig.mlp))
        return values

    # --- compiled small work ---------------------------------------------------------
    def _fill_values(self, sig: PassSignature, rows: list[torch.Tensor]) -> None:
        """The pass's value rows (_value_shapes) from its small function: the values, the
        scalars and the MLP's folded first layer; its later layers are copied as given."""
        computed = len(sig.small) + bool(sig.scalar_nodes) + (2 if sig.mlp is not None else 0)
        self._run_small(f"pass{sig.index}", rows[:computed])
        if sig.mlp is not None:
            self._copy_mlp_weights(f"pass{sig.index} later layers", rows[computed:], 2)

    def _run_small(self, name: str, outputs: list[torch.Tensor], sums: list[torch.Tensor] = ()) -> None:
        """Calls small function `name` on the group, writing into `outputs` ([tensors, ...]
        row buffers, in its output order; none: a pass with no small inputs, no call);
        `sums`: a finish function's partial sums."""
        if not outputs:
            return
        small = self.small[name]
        sig, kept = small.sig, self.kept.small.get(name) or self.kept.small.setdefault(name, KeptSmall())
        count = len(self)
        self._fill_leaves(sig.columns)
        states = [self._state_rows(n) for n in sig.states]
        finished = [self.kept.small[f"finish{index}"].rows[k] for _, index, k in sig.finished]
        mlp_in = []
        if sig.mlp is not None:
            kept.rows = _rows(kept.rows, [(count, *shape) for shape in self.ev.mlp_shapes()[:2]])
            self._copy_mlp_weights(name, kept.rows, 0)
            mlp_in = kept.rows
        table = kept.table_over([self.kept.leaves, *states, *sums, *finished, *mlp_in, *outputs])
        first = self._pass_sigs[0]   # the layout of every pass's sums (the view's)
        self.do(partial(small.func, table, *self.view.dims, first.chunks, first.lanes))

    def _copy_mlp_weights(self, name: str, rows: list[torch.Tensor], first: int) -> None:
        """rows[i] <- the MLP's weight list from `first` on, one row per tensor. Skipped where
        the rows hold them already: the spec's shared weights, not written since (the same
        tensors, versions and pointers; held in `kept`, so no new tensor can take their
        place): six copies a group took a fifth of Adam's step on a 1M matrix."""
        sources = self.ev.shared_mlp[first:first + len(rows)] if self.ev.shared_mlp is not None else None
        if sources is not None:   # (the rows are the group's own, never moved: compared as objects)
            held = [*sources, *rows]
            # (ids of objects `kept` holds: no other object can have them)
            seen = (tuple(map(id, held)), [(w._version, w.data_ptr()) for w in sources])
            last = self.kept.mlp_copied.get(name)
            if last is not None and last[1] == seen:
                return
        self.kept.mlp_copied.pop(name, None)
        weights = self.ev.mlp_weights[first:first + len(rows)]
        if sources is not None:
            torch._foreach_copy_(rows, weights)
            self.kept.mlp_copied[name] = (held, seen)
        else:   # (per-tensor weights, views of the network's outputs: copied every step, NetworkCall)
            self.do(partial(torch._foreach_copy_, rows, weights))

    def _fill_leaves(self, columns: list[Node]) -> None:
        """The leaves row's columns that are known by now (network outputs: after it ran).
        Hyperparameters are written only when they changed, shape facts once."""
        count, kept = len(self), self.kept
        total = sum(n.channels for n in columns)
        if kept.leaves is None or kept.leaf_nodes is not columns or tuple(kept.leaves.shape) != (count, max(1, total)):
            kept.leaves, kept.written, kept.leaf_nodes = empty_rows(count, (max(1, total),)), {}, columns
            starts = itertools.accumulate([n.channels for n in columns], initial=0)
            kept.leaf_columns = {id(n): kept.leaves[:, start:start + n.channels] for n, start in zip(columns, starts)}
            kept.leaf_arrays = {k: column.numpy() for k, column in kept.leaf_columns.items()}
            kept.hyper_seen = None
        hyper = []
        for node in columns:
            key = id(node)
            if key in self._filled or node.op == "net_out" and not self.ev.net_out:
                continue
            column = kept.leaf_columns[key]
            if node.op == "step":   # the counts as they are (ev.leaf's conversions took 10 us a group)
                self.do(stacked_into(column, [t.state["step"] for t in self.tasks]))
            elif node.op == "hyper":
                hyper.append(node)
            elif node.op == "shape":
                if kept.written.get(key) != "shape":
                    column.copy_(self.ev.leaf(node).reshape(-1, node.channels))
                    kept.written[key] = "shape"
            else:   # a value of this step
                value = self.ev.leaf(node).reshape(-1, node.channels)
                if node.op == "net_out":   # (a view of the network's outputs, which a replay writes: NetworkCall)
                    self.do(partial(torch.Tensor.copy_, column, value))
                else:
                    column.copy_(value)
                    if node.op == "loss_features" and self.record is not None:
                        self.record.loss_in(column)
                    else:
                        self.unrecorded()
                kept.written[key] = None
            self._filled.add(key)
        if hyper:
            write_hyper(kept, self.tasks, hyper)
            if self.record is not None:   # (a replay's values may be new: a schedule's)
                self.record.hyper_in(partial(write_hyper, kept, self.tasks, hyper))

    def _state_rows(self, node: Node) -> torch.Tensor:
        """A small accumulator's values before this step, as [tensors, channels, *small dims]."""
        shape, name = (len(self), node.channels, *self.view.small_dims(node.level)), node.attrs[0]
        rows = self.kept.states.get(name)
        if rows is None or tuple(rows.shape) != shape:
            rows = self.kept.states[name] = empty_rows(shape[0], shape[1:])
        if id(node) not in self._filled:
            self._filled.add(id(node))
            held = self.kept.state_views.get(name)
            if held is not None and held[0] is rows and all(map(operator.is_, (t.state[name] for t in self.tasks),
                                                                held[1])):
                self._as_rows.add(name)
                return rows
            states = [t.state[name] for t in self.tasks]
            if not all(s.dtype == rows.dtype and s.device == rows.device for s in states):
                self.do(stacked_into(rows, states))   # (kept as they are, copied every step)
                return rows
            # The states become the rows' views, as a network's (SpecNetwork.state_rows): a
            # step then copies nothing in and one copy out (write_small_accumulators), where
            # stacking 20 tensors and writing them back took ~45 us a group and state.
            copy_stacked(rows, states)
            views = [row.view(s.shape) for row, s in zip(rows.unbind(0), states)]
            for task, view in zip(self.tasks, views):
                task.state[name] = view
            self.kept.state_views[name] = (rows, views)
            self._as_rows.add(name)
            self.ev.batch.replaced_states.append(name)
        return rows

    def _small_outputs(self, name: str, nodes: list[Node], sums: list[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Small function `name`'s values of `nodes`, as [tensors, channels, *level shape]."""
        kept = self.kept.small.get(name) or self.kept.small.setdefault(name, KeptSmall())
        count = len(self)
        shapes = [(count, n.channels, *self.view.small_dims(n.level)) for n in nodes]
        kept.rows = _rows(kept.rows, shapes)
        self._run_small(name, kept.rows, sums)
        return [r.reshape(count, n.channels, *self.level_shape(n.level)) for r, n in zip(kept.rows, nodes)]

    def network_input(self, node: Node) -> None:
        """Compiled small work: the network's input, computed now into the rows of its small
        function (GroupValues.dense reads them; a replay's NetworkCall too)."""
        if self.small is None:
            self.unrecorded()   # (evaluated in torch when the network reads it)
        else:
            self.finish(node, self._small_outputs("network", [node])[0])

    def write_small_accumulators(self, accumulators: dict[str, Node]) -> None:
        if self.small is None:
            self.unrecorded()
            super().write_small_accumulators(accumulators)
            return
        small = {name: n for name, n in accumulators.items() if n.level < Level.ELEMENT}
        if not small:
            return
        values = self._small_outputs("accumulators", list(small.values()))
        computed = self.kept.small["accumulators"].rows   # (values' rows as computed: [tensors, *small dims])
        into, out = [], []
        for name, value, rows in zip(small, values, computed):
            if name in self._as_rows and self.kept.states[name].shape == rows.shape:
                into.append(self.kept.states[name])   # (the states are the rows: _state_rows)
                out.append(rows)
            else:
                into += [t.state[name] for t in self.tasks]
                out += value.unbind(0)
        # One copy for all of them: a call took about 2 us a group and accumulator (VeLO's
        # four on 200 small tensors: 1.6 ms a step)
        self.do(partial(torch._foreach_copy_, into, out))

    def _own_pointers(self, sig: PassSignature, bases: list[list[tuple[int, int]]]) \
            -> tuple[list[list[int]], list[list[int]]]:
        """Each tensor's input and output pointers as the pass takes them, from its bases
        (_tensor_bases)."""
        index = {name: i for i, name in enumerate(self.kept.base_names)}
        slots = [(index[leaf], 0) for leaf in sig.leaves]
        slots += [(index[name], c) for name, c in sig.accumulators + sig.outputs]
        pointers = [[row[i][0] + c * row[i][1] for i, c in slots] for row in bases]
        split = len(sig.leaves) + len(sig.accumulators)
        return [row[:split] for row in pointers], [row[split:] for row in pointers]

    def _tensor_bases(self) -> list[list[tuple[int, int]]] | None:
        """Each tensor's (data pointer, bytes per channel) of everything the passes read
        and write (kept.base_names: param, grad, accumulators), read once per step; None
        unless all are dense and aligned."""
        if self._bases_read:
            return self._bases
        self._bases_read = True
        kept = self.kept
        if kept.base_names is None:
            sigs = self._pass_sigs.values()
            kept.base_names = ["param", "grad", *sorted({name for s in sigs for name, _ in s.accumulators + s.outputs}
                                                        - {"param", "grad"})]
        names, checked = kept.base_names[2:], kept.checked
        if len(checked) > 2 * len(self) * len(names):   # accumulators replaced (a load_state_dict)
            checked.clear()
        bases = []
        for task in self.tasks:
            grad, param, state = task.grad, task.param, task.state   # a param is contiguous (unsupported_reason)
            param_at, grad_at = param.data_ptr(), grad.data_ptr()
            if (param_at | grad_at) % ALIGNMENT or not grad.is_contiguous():
                return None
            row = [(param_at, 0), (grad_at, 0)]
            for name in names:
                acc = state[name]
                at, seen = acc.data_ptr(), checked.get(id(acc))
                # `.data = ...` keeps the object: the pointer and the strides are compared too
                if seen is None or seen[1] != at or seen[2] != acc.stride() or seen[3] != acc.dtype:
                    seen = checked[id(acc)] = self._checked_base(task, name)
                if seen[4] is None:
                    return None
                row.append((at, seen[4]))
            bases.append(row)
        self._bases = bases
        return bases

    @staticmethod
    def _checked_base(task: TensorTask, name: str) -> tuple[torch.Tensor, int, tuple, torch.dtype, int | None]:
        """Accumulator `name` checked (checked_accumulator), as (the accumulator, its data
        pointer, strides, dtype, bytes per channel or None where misaligned). Checked only
        where new or changed: every step took a sixth of Adam's time outside the kernels
        on 200 small tensors (3.7 -> 3.1 ms a step)."""
        acc = checked_accumulator(task, name, "TVM")
        per_channel = acc.stride(0) * acc.element_size() if acc.shape[0] > 1 else 0
        aligned = not (acc.data_ptr() % ALIGNMENT or per_channel % ALIGNMENT)
        return acc, acc.data_ptr(), acc.stride(), acc.dtype, per_channel if aligned else None

    def _table_with_copies(self, sig: PassSignature, rows: list[torch.Tensor]) \
            -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The pointer table over aligned copies of the misaligned tensors (and the
        (original, copy) pairs of outputs to write back)."""
        own, outputs, back = [], [], []
        for t in range(len(self)):
            inputs = aligned([self.element(t, leaf) for leaf in sig.leaves]
                             + [self.element(t, *a) for a in sig.accumulators], written=False)[0]
            written, copies = aligned([self.element(t, name, c) for name, c in sig.outputs], written=True)
            self._copies += inputs + written   # alive until the step ends: the table points into them
            own.append([x.data_ptr() for x in inputs])
            outputs.append([x.data_ptr() for x in written])
            back += copies
        return pointer_table(own, row_pointers(len(self), rows), outputs).to(self.tasks[0].param.device), back

    def _sum_shapes(self, sig: PassSignature) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The kernel's P, Q and M buffers of one tensor (stages.py: _x_sums, _y_sums, _m_sums)."""
        A, X, B, Y, C = self.view.dims
        if not self.view.gpu:
            return (sig.chunks, A, B, Y, C), (A, X, B, C, sig.lanes), (sig.chunks, A, sig.lanes)
        return (self.view.gpu_chunks(), padded(A * B * Y * C, WARP)), (padded(A * X * B * C, ROWS_PER_BLOCK), 1), ()

    # --- after a kernel --------------------------------------------------------------
    def finish_sums(self, sig: PassSignature, p: list[torch.Tensor], q: list[torch.Tensor],
                    m: list[torch.Tensor]) -> None:
        """Completes the reductions from the kernels' partial sums (fixed order). Compiled
        small work finishes them in its own function, into the rows its later functions read."""
        if self.small is not None:
            finish = self.small.get(f"finish{sig.index}")
            if finish is not None:
                self._small_outputs(finish.sig.name, finish.sig.values, p + q + m)
            return
        self.unrecorded()
        count = len(self)
        parts: dict[int, list[torch.Tensor]] = {}
        for (r, _), partial in zip(sig.x_sums, p):
            parts.setdefault(id(r), []).append(partial.reshape(count, -1).sum(1) if r.op == "mean" else partial.sum(1))
        for (r, _), partial in zip(sig.y_sums, q):
            parts.setdefault(id(r), []).append(partial.reshape(count, -1).sum(1) if r.op == "mean" else partial.sum(-1))
        for (r, _), partial in zip(sig.m_sums, m):
            parts.setdefault(id(r), []).append(partial.reshape(count, -1).sum(1))
        for r in {id(r): r for r, _ in sig.x_sums + sig.y_sums + sig.m_sums}.values():
            if id(r) not in self.memo:
                self.finish_sum(r, torch.stack(parts[id(r)], 1).reshape(count, r.channels, *self.level_shape(r.level)))

    def no_sums(self, sig: PassSignature) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The P, Q and M sums of a rank that holds no rows of the group's tensors (FSDP2's
        last ranks may hold none): zeros, laid out as finish_sums reads them."""
        A, X, B, Y, C = self.view.dims
        zeros = lambda *shape: torch.zeros(len(self), *shape, device=self.tasks[0].param.device)  # noqa: E731
        return ([zeros(1, A, B, Y, C) for _ in sig.x_sums], [zeros(A, X, B, C, 1) for _ in sig.y_sums],
                [zeros(1, A, 1) for _ in sig.m_sums])
