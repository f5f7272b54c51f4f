"""The IR: one small dataflow node type (tinygrad-style), every value tagged with a
level (how many values per tensor) and a channel count.

Levels, from coarse to fine (a rank >= 2 tensor has factored axes d0, d1; `batch` is
the remaining axes, so for a 2-D tensor it holds one value):
    step     one value per step, shared by all tensors (hyperparameters, t, time features)
    tensor   one value per parameter tensor (means, network outputs)
    batch    one per index of the non-factored axes
    row      one per index of all axes but d0 (Adafactor row statistics)
    col      one per index of all axes but d1
    element  one per parameter entry
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Container


class Level(IntEnum):
    STEP = 0
    TENSOR = 1
    BATCH = 2
    ROW = 3
    COL = 4
    ELEMENT = 5

    @property
    def label(self) -> str:
        return self.name.lower()


def join(a: Level, b: Level) -> Level:
    """The level of a value computed from values at levels a and b (broadcasting)."""
    if {a, b} == {Level.ROW, Level.COL}:
        return Level.ELEMENT
    return max(a, b)


# Leaves: where values come from.
LEAVES = {
    "const",          # attrs: channel values
    "grad",           # the raw gradient, element level
    "param",          # p before this step, element level
    "hyper",          # attrs: (name,) a per-group hyperparameter
    "step",           # t, the step counter starting at 0
    "shape",          # attrs: a shape fact (shape_facts.py), e.g. ("numel",) or ("size", k)
    "state",          # attrs: (accumulator,) its value before this step
    "loss_features",  # the loss buffer's features
    "skip_step",      # 1 when this step is skipped (grad.nonfinite: skip), else 0
    "net_out",        # attrs: (name,) a per-tensor output of the network
}
UNARY = {"neg", "exp", "log", "sqrt", "rsqrt", "tanh", "abs", "sign", "relu", "sigmoid", "zero_nonfinite"}
BINARY = {"add", "sub", "mul", "div", "pow", "min", "max", "lt", "le", "gt", "ge", "eq", "ne"}
TERNARY = {"where"}
REDUCE = {"mean": None, "mean_d0": "d0", "mean_d1": "d1"}  # op -> the factored axis it removes
STRUCTURAL = {
    "concat",   # channels of all args, in order
    "channel",  # attrs: (index,) one channel of the arg
    "mlp",      # args: (features,); attrs: (sizes, activation); weights bound at run time
}


@dataclass(frozen=True, eq=False)
class Node:
    """An immutable IR value. Nodes are interned by `Graph.make`, so structurally equal
    nodes are the same object (common subexpressions are shared)."""

    op: str
    args: tuple["Node", ...]
    attrs: tuple
    level: Level
    channels: int
    _key: tuple = field(repr=False, compare=False, default=())

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.level.label}, ch={self.channels}, attrs={self.attrs})"


def reduced_level(op: str, level: Level) -> Level:
    """The level after a reduction; None where the reduction is not defined."""
    if op == "mean":
        return Level.TENSOR if level >= Level.TENSOR else level
    axis = REDUCE[op]
    # Removing d0 from element gives row; from col gives batch; row/batch have no d0.
    table = {"d0": {Level.ELEMENT: Level.ROW, Level.COL: Level.BATCH},
             "d1": {Level.ELEMENT: Level.COL, Level.ROW: Level.BATCH}}[axis]
    return table.get(level, level)


def level_shape(shape: tuple[int, ...], level: Level, axes: tuple[int, int] | None) -> list[int]:
    """The shape of a value at `level` for a parameter of `shape`: the parameter's rank,
    with size 1 on the axes the level lacks (state and the backends use this layout)."""
    if level == Level.ELEMENT:
        return list(shape)
    if level in (Level.STEP, Level.TENSOR):
        return [1] * len(shape)
    dropped = {Level.ROW: {axes[0]}, Level.COL: {axes[1]}, Level.BATCH: set(axes)}[level]
    return [1 if i in dropped else n for i, n in enumerate(shape)]


def reachable(roots: list[Node], descend: Callable[[Node], bool]) -> list[Node]:
    """Every node reachable from roots through the args of nodes that `descend` accepts
    (each once, in a fixed depth-first order)."""
    seen: set[int] = set()
    out: list[Node] = []
    stack = list(roots)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        out.append(n)
        if descend(n):
            stack.extend(n.args)
    return out


def topo_order(roots: list[Node], known: Container[int] = ()) -> list[Node]:
    """Every node reachable from roots, each after its args (iterative DFS); the args of
    nodes whose id is in `known` (values already at hand) are not visited for them."""
    seen: set[int] = set()
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if id(node) not in known:
            stack.extend((a, False) for a in reversed(node.args) if id(a) not in seen)
    return order


class Graph:
    """A node factory that interns nodes (hash-consing) so shared work is computed once."""

    def __init__(self) -> None:
        self._nodes: dict[tuple, Node] = {}

    def make(self, op: str, args: tuple[Node, ...], attrs: tuple, level: Level, channels: int) -> Node:
        # The level is part of the key: a leaf such as state("fr") is row-level in one
        # variant and element-level in the other.
        key = (op, tuple(id(a) for a in args), attrs, level, channels)
        node = self._nodes.get(key)
        if node is None:
            node = Node(op, args, attrs, level, channels, key)
            self._nodes[key] = node
        return node
