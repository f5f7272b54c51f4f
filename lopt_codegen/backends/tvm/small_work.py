"""The torch side of a TVM step for a group of same-shape tensors: their small values
computed together (group_values.py), each tensor's kernel arguments and partial-sum
buffers as rows of per-group buffers, the partial sums finished together, and the MLP's
first layer folded per tensor."""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x [count, ...] copied so that each row x[t] is contiguous and aligned for a kernel."""
    out = empty_rows(x.shape[0], tuple(x.shape[1:]), x.dtype, x.device)
    out.copy_(x)
    return out


def _storage(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 as its bits, the way the kernels take it (stages.storage_dtype)."""
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


@dataclass
class KernelArgs:
    """A pass's arguments for a group: each tensor's own tensors (inputs first, outputs
    last) around [tensors, ...] buffers whose row t is tensor t's (small values, scalars,
    MLP weights, partial sums; rows 64-byte aligned). `write_back`: (original, aligned
    copy) of outputs that were misaligned."""

    inputs: list[list[torch.Tensor]]
    rows: list[torch.Tensor]
    outputs: list[list[torch.Tensor]]
    write_back: list[tuple[torch.Tensor, torch.Tensor]]

    def pointer_table(self) -> torch.Tensor:
        """int64 [tensors, arguments] of data pointers (tvm/batched.py): row pointers by
        arithmetic, so a group costs a few torch calls per buffer, not one per tensor."""
        count = len(self.inputs)
        index = torch.arange(count, dtype=torch.int64).unsqueeze(1)

        def own(tensors: list[list[torch.Tensor]]) -> torch.Tensor:
            width = len(tensors[0])
            return torch.tensor([[x.data_ptr() for x in row] for row in tensors], dtype=torch.int64).reshape(count, width)

        rows = [r.data_ptr() + index * (r.stride(0) * r.element_size()) for r in self.rows]
        return torch.cat([own(self.inputs), *rows, own(self.outputs)], 1)

    def finish(self) -> None:
        for original, copy in self.write_back:
            original.copy_(copy)


class GroupStep(GroupValues):
    """A group's step through the TVM kernels: each tensor's kernel arguments and
    outputs, and the reductions finished from the kernels' partial sums."""

    def __init__(self, tasks: list[TensorTask], batch: StepBatch, view: View):
        super().__init__(tasks, batch)
        self.view = view
        self._elements: dict[tuple[int, str, int], torch.Tensor] = {}

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
    def kernel_args(self, sig: PassSignature) -> tuple[KernelArgs, list[torch.Tensor], list[torch.Tensor]]:
        """The pass's arguments for every tensor of the group, and its P and Q partial-sum
        buffers ([tensors, ...] each, finished by finish_sums)."""
        count = len(self)
        rows = [aligned_rows(self.dense(n).reshape(count, n.channels, *self.view.small_dims(n.level)))
                for n in sig.small]
        if sig.scalar_nodes:
            rows.append(aligned_rows(torch.cat([self.dense(n).reshape(count, -1) for n in sig.scalar_nodes], 1)))
        if sig.mlp is not None:
            rows += [aligned_rows(w) for w in self._fold_mlp(sig.mlp)]
        p_shape, q_shape = self._sum_shapes(sig)
        device = self.tasks[0].param.device
        p = [empty_rows(count, p_shape, device=device) for _ in sig.x_sums]
        q = [empty_rows(count, q_shape, device=device) for _ in sig.y_sums]
        args = KernelArgs([], rows + p + q, [], [])
        for t in range(count):
            inputs = [self.element(t, leaf) for leaf in sig.leaves] + [self.element(t, *a) for a in sig.accumulators]
            args.inputs.append(aligned(inputs, written=False)[0])
            outputs, back = aligned([self.element(t, name, c) for name, c in sig.outputs], written=True)
            args.outputs.append(outputs)
            args.write_back += back
        if self.view.gpu:   # the sums as laid out on the CPU, without the padding
            A, X, B, Y, C = self.view.dims
            p = [x[:, :, :A * B * Y * C].reshape(count, -1, A, B, Y, C) for x in p]
            q = [x[:, :A * X * B * C].reshape(count, A, X, B, C, 1) for x in q]
        return args, p, q

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
