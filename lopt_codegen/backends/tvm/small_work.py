"""The torch side of a TVM step for a group of same-shape tensors: their small values
computed together (group_values.py), each tensor's kernel arguments and partial-sum
buffers as rows of per-group buffers, the partial sums finished together, and the MLP's
first layer folded per tensor."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..base import StepBatch, TensorTask, checked_accumulator
from ..group_values import GroupValues
from .printer import MlpFold
from .signature import PassSignature
from .view import ROWS_PER_BLOCK, WARP, View, padded

ALIGNMENT = 64   # bytes; TVM's kernels load and store buffers as 64-byte aligned


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
    n = math.prod(shape)
    per = ALIGNMENT // torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(count, -(-n // per) * per, dtype=dtype, device=device)
    return buf[:, :n].view(count, *shape)


def _storage(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 as its bits, the way the kernels take it (stages.storage_dtype)."""
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


def pointer_table(own: list[list[int]], rows: list[torch.Tensor], outputs: list[list[int]]) -> torch.Tensor:
    """int64 [tensors, arguments] of data pointers (tvm/batched.py): each tensor's own
    inputs, the rows of the [tensors, ...] buffers (by arithmetic: a few torch calls per
    buffer, not one per tensor), then its own outputs."""
    count = len(own)
    index = torch.arange(count, dtype=torch.int64).unsqueeze(1)
    row_pointers = [r.data_ptr() + index * (r.stride(0) * r.element_size()) for r in rows]
    return torch.cat([torch.tensor(own, dtype=torch.int64).reshape(count, -1), *row_pointers,
                      torch.tensor(outputs, dtype=torch.int64).reshape(count, -1)], 1)


@dataclass
class KeptArgs:
    """A pass's kernel arguments for one group, kept from step to step: the [tensors, ...]
    row buffers (small values, scalars, MLP weights, partial sums; refilled in place each
    step) and the pointer table over them and the tensors' own data, in the kernels'
    memory. The table is rebuilt only when a tensor's data moved (on the GPU it then
    stays in device memory; no copy per step)."""

    rows: list[torch.Tensor] = field(default_factory=list)
    own: tuple[list[list[int]], list[list[int]]] | None = None   # the tensors' pointers in `table`
    table: torch.Tensor | None = None


class GroupStep(GroupValues):
    """A group's step through the TVM kernels: each tensor's kernel arguments and
    outputs, and the reductions finished from the kernels' partial sums."""

    def __init__(self, tasks: list[TensorTask], batch: StepBatch, view: View):
        super().__init__(tasks, batch)
        self.view = view
        self._elements: dict[tuple[int, str, int], torch.Tensor] = {}
        self._bases: dict[int, dict[str, tuple[int, int] | None]] = {}   # _bases_of's, per tensor
        self._copies: list[torch.Tensor] = []   # _table_with_copies'

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

    # --- kernel arguments ------------------------------------------------------------
    def kernel_args(self, sig: PassSignature, kept: KeptArgs) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]],
                                                                      list[torch.Tensor], list[torch.Tensor]]:
        """The pass's pointer table for the group (on the kernels' device), the (original,
        aligned copy) pairs of outputs to write back after the kernel, and its P and Q
        partial-sum buffers ([tensors, ...] each, finished by finish_sums)."""
        count = len(self)
        values = [self.dense(n).reshape(count, n.channels, *self.view.small_dims(n.level)) for n in sig.small]
        if sig.scalar_nodes:
            values.append(torch.cat([self.dense(n).reshape(count, -1) for n in sig.scalar_nodes], 1))
        if sig.mlp is not None:
            values += self._fold_mlp(sig.mlp)
        p_shape, q_shape = self._sum_shapes(sig)
        shapes = [tuple(v.shape) for v in values] + [(count, *p_shape)] * len(sig.x_sums) \
            + [(count, *q_shape)] * len(sig.y_sums)
        device = self.tasks[0].param.device
        if [tuple(r.shape) for r in kept.rows] != shapes:
            kept.rows = [empty_rows(s[0], s[1:], device=device) for s in shapes]
            kept.own = None
        for row, value in zip(kept.rows, values):
            row.copy_(value)
        sums = kept.rows[len(values):]
        p, q = sums[:len(sig.x_sums)], sums[len(sig.x_sums):]
        own = self._own_pointers(sig)
        if own is None:   # a misaligned or strided tensor: aligned copies, a table for this step only
            table, back = self._table_with_copies(sig, kept.rows)
        else:
            if own != kept.own:
                kept.table, kept.own = pointer_table(own[0], kept.rows, own[1]).to(device), own
            table, back = kept.table, []
        if self.view.gpu:   # the sums as laid out on the CPU, without the padding
            A, X, B, Y, C = self.view.dims
            p = [x[:, :, :A * B * Y * C].reshape(count, -1, A, B, Y, C) for x in p]
            q = [x[:, :A * X * B * C].reshape(count, A, X, B, C, 1) for x in q]
        return table, back, p, q

    def _own_pointers(self, sig: PassSignature) -> tuple[list[list[int]], list[list[int]]] | None:
        """Each tensor's input and output pointers as the pass takes them, from its tensors'
        data pointers; None when one is misaligned or strided (it needs a copy)."""
        names = [(leaf, 0) for leaf in sig.leaves] + sig.accumulators + sig.outputs
        needed = {name for name, _ in names}
        pointers = []
        for t in range(len(self)):
            bases = self._bases_of(t, needed)
            if bases is None:
                return None
            pointers.append([bases[name][0] + c * bases[name][1] for name, c in names])
        split = len(sig.leaves) + len(sig.accumulators)
        return [row[:split] for row in pointers], [row[split:] for row in pointers]

    def _bases_of(self, t: int, names: set[str]) -> dict[str, tuple[int, int]] | None:
        """Tensor t's (data pointer, bytes per channel) of `names` (param, grad,
        accumulators), read once per step; None unless all are dense and aligned."""
        bases = self._bases.setdefault(t, {})
        task = self.tasks[t]
        for name in names - bases.keys():
            if name in ("param", "grad"):   # a param is contiguous (unsupported_reason)
                x = task.param if name == "param" else task.grad
                bases[name] = (x.data_ptr(), 0) if x.is_contiguous() else None
            else:
                acc = checked_accumulator(task, name, "TVM")
                bases[name] = (acc.data_ptr(), acc.stride(0) * acc.element_size() if acc.shape[0] > 1 else 0)
        if any(bases[n] is None or bases[n][0] % ALIGNMENT or bases[n][1] % ALIGNMENT for n in names):
            return None
        return bases

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
        return pointer_table(own, rows, outputs).to(self.tasks[0].param.device), back

    def _sum_shapes(self, sig: PassSignature) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The kernel's P and Q buffers of one tensor (stages.py: _x_sums, _y_sums)."""
        A, X, B, Y, C = self.view.dims
        if not self.view.gpu:
            return (sig.chunks, A, B, Y, C), (A, X, B, C, sig.lanes)
        return (self.view.gpu_chunks(), padded(A * B * Y * C, WARP)), (padded(A * X * B * C, ROWS_PER_BLOCK), 1)

    def _fold_mlp(self, mlp) -> list[torch.Tensor]:
        """Per tensor: W1' = W1[:, element columns] * scale; b1' = b1 + W1[:, folded columns] @ values."""
        fold = MlpFold.of(mlp)
        count = len(self)
        w1, b1, *rest = self.ev.mlp_weights   # each with a leading tensor axis
        columns = []
        for _, scale, col, ch in fold.element_parts:
            w = w1[:, :, col:col + ch]
            columns.append(w if scale is None else w * self.dense(scale).reshape(count, 1, -1))
        bias = b1
        for part, col in fold.bias_parts:
            values = self.dense(part).reshape(count, part.channels, 1)
            bias = bias + (w1[:, :, col:col + part.channels] @ values).squeeze(-1)
        return [torch.cat(columns, 2), bias, *rest]

    # --- after a kernel --------------------------------------------------------------
    def finish_sums(self, sig: PassSignature, p: list[torch.Tensor], q: list[torch.Tensor]) -> None:
        """Completes the reductions from the kernels' partial sums (fixed order)."""
        count = len(self)
        X, Y = self.view.dims[1], self.view.dims[3]
        parts: dict[int, list[torch.Tensor]] = {}
        for (r, _), partial in zip(sig.x_sums, p):
            total = partial.reshape(count, -1).sum(1) / self.view.numel if r.op == "mean" else partial.sum(1) / X
            parts.setdefault(id(r), []).append(total)
        for (r, _), partial in zip(sig.y_sums, q):
            parts.setdefault(id(r), []).append(partial.sum(-1) / Y)
        for r, _ in sig.x_sums + sig.y_sums:
            if id(r) not in self.memo:
                value = torch.stack(parts[id(r)], 1).reshape(count, r.channels, *self.level_shape(r.level))
                self.finish(r, value)
