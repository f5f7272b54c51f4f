"""The torch side of a TVM step for one tensor: the row/col/tensor/step-level values
between passes (the reference backend's per-op rules on small tensors), finishing the
kernels' partial sums, binding kernel arguments, and folding the MLP's first layer."""
from __future__ import annotations

import torch

from ...ir.nodes import Level, Node, level_shape
from ..base import StepBatch, TensorTask
from ..reference import TensorEvaluator
from ..small_values import SmallValues
from .printer import MlpFold
from .signature import PassSignature
from .view import View

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


def _storage(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 as its bits, the way the kernels take it (stages.storage_dtype)."""
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


def step_key(task: TensorTask) -> tuple:
    """Tensors with equal keys share their step-level values (time features, ...)."""
    return task.param.dim(), tuple(sorted(task.hyper.items())), float(task.state["step"])


class TensorStep(SmallValues):
    """One tensor's step through the TVM kernels: its small values, kernel arguments
    and outputs, and the reductions finished from the kernels' partial sums."""

    def __init__(self, task: TensorTask, batch: StepBatch, view: View, step_values: dict[int, torch.Tensor]):
        super().__init__(TensorEvaluator(task, batch), step_values)
        self.task, self.view = task, view
        self.shape = tuple(task.param.shape)

    def _dense(self, node: Node) -> torch.Tensor:
        shape = level_shape(self.shape, node.level, self.task.axes)
        return self.get(node).expand(node.channels, *shape)

    # --- kernel arguments ------------------------------------------------------------
    def arguments(self, sig: PassSignature, mlp_weights: list[torch.Tensor] | None) -> list[torch.Tensor]:
        task, dims = self.task, self.view.dims
        args = [_storage((task.param.detach() if leaf == "param" else task.grad).view(dims)) for leaf in sig.leaves]
        args += [task.state[name][c].view(dims) for name, c in sig.accumulators]
        args += [self._dense(n).reshape(n.channels, *self.view.small_dims(n.level)).contiguous() for n in sig.small]
        if sig.scalar_nodes:
            args.append(torch.cat([self._dense(n).reshape(-1) for n in sig.scalar_nodes]))
        if sig.mlp is not None:
            args += self._fold_mlp(sig.mlp, mlp_weights)
        return args

    def _fold_mlp(self, mlp: Node, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """W1' = W1[:, element columns] * scale; b1' = b1 + W1[:, folded columns] @ values."""
        fold = MlpFold.of(mlp)
        w1, b1 = weights[0], weights[1]
        columns = []
        for _, scale, col, ch in fold.element_parts:
            w = w1[:, col:col + ch]
            columns.append(w if scale is None else w * self._dense(scale).reshape(-1))
        bias = b1.clone()
        for part, col in fold.bias_parts:
            bias += w1[:, col:col + part.channels] @ self._dense(part).reshape(-1)
        return [torch.cat(columns, 1).contiguous(), bias, *[w.contiguous() for w in weights[2:]]]

    def outputs(self, sig: PassSignature) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(P partials, Q partials, element outputs: views of the parameter and state)."""
        A, X, B, Y, C = self.view.dims
        p = [torch.empty(sig.chunks, A, B, Y, C) for _ in sig.x_sums]
        q = [torch.empty(A, X, B, C, sig.lanes) for _ in sig.y_sums]
        e = [_storage((self.task.param.detach() if name == "param" else self.task.state[name][c]).view(self.view.dims))
             for name, c in sig.outputs]
        return p, q, e

    # --- after a kernel --------------------------------------------------------------
    def finish_sums(self, sig: PassSignature, p: list[torch.Tensor], q: list[torch.Tensor]) -> None:
        """Completes the reductions from the kernels' partial sums (fixed order)."""
        A, X, B, Y, C = self.view.dims
        parts: dict[int, list[torch.Tensor]] = {}
        for (r, _), partial in zip(sig.x_sums, p):
            total = partial.sum() / self.view.numel if r.op == "mean" else partial.sum(0) / X
            parts.setdefault(id(r), []).append(total)
        for (r, _), partial in zip(sig.y_sums, q):
            parts.setdefault(id(r), []).append(partial.sum(-1) / Y)
        for r, _ in sig.x_sums + sig.y_sums:
            if id(r) not in self.memo:
                shape = level_shape(self.shape, r.level, self.task.axes)
                self.finish(r, torch.stack(parts[id(r)]).reshape(r.channels, *shape))

    def write_small_accumulators(self, accumulators: dict[str, Node]) -> None:
        """Row/col/tensor-level accumulators, after everything that reads their old value."""
        new = {name: self.get(node) for name, node in accumulators.items() if node.level < Level.ELEMENT}
        for name, value in new.items():
            self.task.state[name].copy_(value)
