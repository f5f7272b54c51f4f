"""Runs a tensor function (ir/tensor_function.py) with torch over a group of same-shape
tensors at once: every value has a leading tensor axis T, so Newton-Schulz over a group
is one chain of batched matrix products. Every backend calls it (the reference with
T = 1): the one executor of tensor-level programs. Nothing is read back to the host:
loop counts and branch tests depend only on numbers, hyperparameters and the shape."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..ir.shape_facts import shape_fact
from ..ir.tensor_function import FunctionIR
from .torch_ops import BINARY as _BINARY, UNARY as _UNARY

Value = torch.Tensor | float


@dataclass
class GroupEnv:
    """What a body can read besides its arguments, for a group of T tensors."""

    shape: tuple[int, ...]
    axes: tuple[int, int] | None
    count: int                                  # T
    device: torch.device
    hyper: Callable[[str], torch.Tensor]        # name -> (T,) float32 on the group's device
    hyper_floats: Callable[[str], list[float]]  # name -> the T values on the host
    step: Callable[[], torch.Tensor]            # t, (T,)


class _Return(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


def _aligned(a: Value, b: Value) -> tuple[Value, Value]:
    """Trailing size-1 axes on the value with fewer axes: (T,) scalars broadcast over (T, ...)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() != b.dim():
        if a.dim() < b.dim():
            a = a.reshape(*a.shape, *[1] * (b.dim() - a.dim()))
        else:
            b = b.reshape(*b.shape, *[1] * (a.dim() - b.dim()))
    return a, b


class _Runner:
    def __init__(self, fn: FunctionIR, args: list[torch.Tensor], env: GroupEnv):
        self.fn, self.args, self.env = fn, args, env
        self.vars: dict[str, Value] = {}

    def run(self) -> torch.Tensor:
        try:
            self.block(self.fn.body)
        except _Return as done:
            return done.value
        raise RuntimeError(f"tensor function {self.fn.name} returned nothing")   # lowering forbids it

    def block(self, body: tuple) -> None:
        for st in body:
            kind = st[0]
            if kind == "set":
                self.vars[st[1]] = self.expr(st[2])
            elif kind == "loop":
                for _ in range(self.loop_count(st[1])):
                    self.block(st[2])
            elif kind == "if":
                self.block(st[2] if self.expr(st[1]) != 0 else st[3])
            else:
                value = self.expr(st[1])
                if not isinstance(value, torch.Tensor):   # numbers and shape facts alone
                    value = torch.full((self.env.count,), value, dtype=torch.float32, device=self.env.device)
                raise _Return(value)

    def loop_count(self, count: tuple) -> int:
        if count[0] == "const":
            return int(count[1])
        values = set(self.env.hyper_floats(count[1]))
        if len(values) != 1 or not float(next(iter(values))).is_integer() or next(iter(values)) < 0:
            raise ValueError(f"tensor function {self.fn.name}: the loop count {count[1]} must be one whole number "
                             f">= 0 for all tensors of a shape; got {sorted(values)}")
        return int(values.pop())

    def expr(self, e: tuple) -> Value:
        kind = e[0]
        if kind == "const":
            return e[1]
        if kind == "arg":
            return self.args[e[1]]
        if kind == "var":
            return self.vars[e[1]]
        if kind == "hyper":
            return self.env.hyper(e[1])
        if kind == "step":
            return self.env.step()
        if kind == "shape":
            return shape_fact(e[1:], self.env.shape, self.env.axes)
        return self.op(e[1], [self.expr(a) for a in e[2]])

    def op(self, name: str, args: list[Value]) -> Value:
        if name in ("rows", "cols"):   # from the shape: no host read
            return float(args[0].shape[-2 if name == "rows" else -1])
        if not any(isinstance(a, torch.Tensor) for a in args):   # numbers and shape facts: on the host
            return float(self.op(name, [torch.tensor(a, dtype=torch.float64) for a in args]))
        if name == "matrices":
            return self.matrices(args[0])
        if name == "unmatrices":
            return self.unmatrices(args[0])
        if name == "matrix":
            x = args[0]
            rows = self.env.shape[0] if self.env.shape else 1
            return x.reshape(x.shape[0], rows, -1)
        if name == "unmatrix":
            x, rows = args[0], self.env.shape[0] if self.env.shape else 1
            if tuple(x.shape[1:]) != (rows, math.prod(self.env.shape) // rows):
                raise ValueError(f"tensor function {self.fn.name}: unmatrix() takes the {rows} x "
                                 f"{math.prod(self.env.shape) // rows} matrix of a parameter of shape {self.env.shape}, "
                                 f"got {tuple(x.shape[1:])} (a transpose not undone?)")
            return x.reshape(x.shape[0], *self.env.shape)
        if name == "transpose":
            return args[0].transpose(-1, -2)
        if name == "matmul":
            return torch.matmul(args[0], args[1])
        if name in ("norm", "sum", "mean"):
            return self.reduce(name, *args)
        if name in ("norm_each", "sum_each", "mean_each"):   # per matrix of a batch
            x, kind = args[0], name[:-len("_each")]
            if kind == "norm":
                return torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
            return x.sum((-2, -1), keepdim=True) if kind == "sum" else x.mean((-2, -1), keepdim=True)
        if name == "where":
            c, a = _aligned(args[0], args[1])
            c, b = _aligned(c, args[2])
            a, b = _aligned(a, b)
            return torch.where(torch.as_tensor(c) != 0, a, b)
        if name in _UNARY:
            return _UNARY[name](args[0])
        # A number as a 0-D CPU tensor: torch passes it to a device's kernels as a scalar
        # (no host-to-device copy).
        a, b = (x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float32) for x in _aligned(*args))
        return _BINARY[name](a, b)

    def _matrix_axes(self) -> tuple[int, int]:
        """The factored axes of the group's tensors, lower first, counting the leading T."""
        lo, hi = sorted(self.env.axes)
        return lo + 1, hi + 1

    def matrices(self, x: torch.Tensor) -> torch.Tensor:
        """(T, *shape) -> (T, B, R, C): the matrices over the factored axes (R the lower-
        numbered one), one per index of the other axes."""
        lo, hi = self._matrix_axes()
        moved = x.movedim((lo, hi), (-2, -1))
        return moved.reshape(x.shape[0], -1, *moved.shape[-2:])

    def unmatrices(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._matrix_axes()
        shape = self.env.shape
        rest = [n for i, n in enumerate(shape) if i + 1 not in (lo, hi)]
        if tuple(x.shape[-2:]) != (shape[lo - 1], shape[hi - 1]):
            raise ValueError(f"tensor function {self.fn.name}: unmatrices() takes the {shape[lo - 1]} x "
                             f"{shape[hi - 1]} matrices of a parameter of shape {shape}, got "
                             f"{tuple(x.shape[-2:])} (a transpose not undone?)")
        return x.reshape(x.shape[0], *rest, *x.shape[-2:]).movedim((-2, -1), (lo, hi))

    @staticmethod
    def reduce(name: str, x: torch.Tensor, axis: float | None = None) -> torch.Tensor:
        if axis is None:
            flat = x.reshape(x.shape[0], -1)
            if name == "norm":
                return torch.linalg.vector_norm(flat, dim=1)
            return flat.sum(1) if name == "sum" else flat.mean(1)
        dim = x.dim() - 2 + int(axis) % 2
        if name == "norm":
            return torch.linalg.vector_norm(x, dim=dim, keepdim=True)
        return x.sum(dim, keepdim=True) if name == "sum" else x.mean(dim, keepdim=True)


def run_tensor_function(fn: FunctionIR, args: list[torch.Tensor], env: GroupEnv) -> torch.Tensor:
    """The function's result for the group: (T, *shape) or (T,). args: parameter-shaped
    values as (T, *shape), single numbers as (T,)."""
    out = _Runner(fn, args, env).run()
    if out.dim() == 1 and out.shape[0] == 1 and env.count > 1:   # shared by the group
        out = out.expand(env.count)
    return out
