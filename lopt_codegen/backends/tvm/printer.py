"""IR element nodes -> TIR expressions, one rule per op (the TVM twin of the reference
backend's op tables; no optimizer math lives here).

A printer serves one output expression of one kernel stage: `load(node, channel)` says
how a leaf, a stored accumulator or a coarser (row/col/tensor/step) value is read at the
current element. Shared subexpressions are Let-bound so they are computed once. The MLP
is not printed here: its layers are stages of their own (mlp_stages.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from tvm import tirx

from ...ir.nodes import LEAVES, Level, Node

F32 = "float32"
_NAMES = itertools.count()   # Let variables need unique names across a module


def _f(v: float) -> tirx.PrimExpr:
    return tirx.const(float(v), F32)


def _flag(cond: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Select(cond, _f(1), _f(0))


_UNARY: dict[str, Callable] = {
    "neg": lambda x: -x,
    "exp": tirx.exp, "log": tirx.log, "sqrt": tirx.sqrt,
    # tirx.rsqrt is miscompiled in vectorized tuple reductions (tests/test_tvm_backend.py)
    "rsqrt": lambda x: _f(1) / tirx.sqrt(x),
    "tanh": tirx.tanh,
    "abs": tirx.abs,
    "sign": lambda x: tirx.Select(x > _f(0), _f(1), tirx.Select(x < _f(0), _f(-1), _f(0))),
    "relu": lambda x: tirx.max(x, _f(0)),
    "sigmoid": tirx.sigmoid,
    "zero_nonfinite": lambda x: tirx.Select(tirx.isfinite(x), x, _f(0)),
}
_BINARY: dict[str, Callable] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": tirx.power, "min": tirx.min, "max": tirx.max,
    "lt": lambda a, b: _flag(a < b), "le": lambda a, b: _flag(a <= b),
    "gt": lambda a, b: _flag(a > b), "ge": lambda a, b: _flag(a >= b),
    "eq": lambda a, b: _flag(a == b), "ne": lambda a, b: _flag(a != b),
}
ACTIVATIONS: dict[str, Callable] = {"relu": _UNARY["relu"], "tanh": tirx.tanh, "sigmoid": tirx.sigmoid}


@dataclass(frozen=True)
class MlpFold:
    """How the MLP input concat splits: element features enter layer 1 through
    W1' = W1[:, cols] * s (s a tensor/step-level scale, or 1); parts at tensor/step
    level are folded into its bias. Computed once per tensor per step in torch."""

    element_parts: tuple[tuple[Node, Node | None, int, int], ...]  # (feature, scale, column, channels)
    bias_parts: tuple[tuple[Node, int], ...]                       # (value, column)

    @staticmethod
    def of(mlp: Node) -> "MlpFold":
        concat = mlp.args[0]
        parts = concat.args if concat.op == "concat" else (concat,)
        element, bias, col = [], [], 0
        for part in parts:
            if part.level <= Level.TENSOR:
                bias.append((part, col))
            elif part.op == "mul" and min(a.level for a in part.args) <= Level.TENSOR:
                x, s = sorted(part.args, key=lambda a: a.level, reverse=True)
                element.append((x, s, col, part.channels))
            else:
                element.append((part, None, col, part.channels))
            col += part.channels
        return MlpFold(tuple(element), tuple(bias))

    @property
    def features(self) -> int:
        return sum(ch for _, _, _, ch in self.element_parts)

    def layer_shapes(self, sizes: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Shapes of [W1', b1', W2, b2, ...] as the kernels take them."""
        sizes = (self.features, *sizes[1:])
        return [s for i in range(len(sizes) - 1) for s in ((sizes[i + 1], sizes[i]), (sizes[i + 1],))]


class ElementPrinter:
    def __init__(self, load: Callable[[Node, int], tirx.PrimExpr], stored: set[int],
                 mlp_output: Callable[[int], tirx.PrimExpr] | None = None):
        self.load, self.stored = load, stored   # stored: ids of accumulators read from memory
        self.mlp_output = mlp_output            # channel -> the MLP stage's output here
        self.memo: dict[int, list] = {}
        self.lets: list[tuple[tirx.Var, tirx.PrimExpr]] = []

    def bind(self, value: tirx.PrimExpr, name: str = "t") -> tirx.PrimExpr:
        if isinstance(value, (tirx.Var, tirx.FloatImm, tirx.IntImm)):
            return value
        var = tirx.Var(f"{name}{next(_NAMES)}", F32)
        self.lets.append((var, value))
        return var

    def wrap(self, expr: tirx.PrimExpr) -> tirx.PrimExpr:
        """`expr` inside every Let bound so far."""
        for var, value in reversed(self.lets):
            expr = tirx.Let(var, value, expr)
        return expr

    def expr(self, node: Node, channel: int) -> tirx.PrimExpr:
        """One channel of `node` as a closed expression."""
        return self.wrap(self.channel(node, channel))

    def channel(self, node: Node, c: int) -> tirx.PrimExpr:
        values = self.emit(node)
        return values[c if len(values) > 1 else 0]

    def emit(self, node: Node) -> list:
        got = self.memo.get(id(node))
        if got is None:
            got = self._emit(node)
            self.memo[id(node)] = got
        return got

    def _emit(self, node: Node) -> list:
        op = node.op
        if op == "const":
            return [_f(v) for v in node.attrs]
        if op in LEAVES or node.level < Level.ELEMENT or id(node) in self.stored:
            return [self.load(node, c) for c in range(node.channels)]
        if op in _UNARY:
            return [self.bind(_UNARY[op](x)) for x in self.emit(node.args[0])]
        if op in _BINARY:
            a, b = node.args
            return [self.bind(_BINARY[op](self.channel(a, c), self.channel(b, c))) for c in range(node.channels)]
        if op == "where":
            cond, a, b = node.args
            return [self.bind(tirx.Select(self.channel(cond, c) != _f(0), self.channel(a, c), self.channel(b, c)))
                    for c in range(node.channels)]
        if op == "concat":
            return [self.channel(a, c) for a in node.args for c in range(a.channels)]
        if op == "channel":
            return [self.emit(node.args[0])[node.attrs[0]]]
        if op == "mlp":
            if self.mlp_output is None:
                raise NotImplementedError("TVM backend: the MLP may only feed stored values, not a reduction")
            return [self.mlp_output(c) for c in range(node.channels)]
        raise NotImplementedError(f"TVM backend: no rule for element-level op '{op}'")
