"""The small work between a compiled backend's passes: a tensor's values at levels
coarser than element, computed with the reference evaluator's own per-op rules and
memoized. Reductions of element values come from the kernels (`finish`)."""
from __future__ import annotations

import torch

from ..ir.nodes import REDUCE, Level, Node
from .reference import TensorEvaluator


class SmallValues:
    def __init__(self, evaluator: TensorEvaluator):
        self.ev = evaluator
        self.memo: dict[int, torch.Tensor] = {}

    def get(self, node: Node) -> torch.Tensor:
        """The value in the reference layout [channels, *shape with 1s]."""
        value = self.memo.get(id(node))
        if value is not None:
            return value
        whole = node.op in REDUCE or node.op == "call"   # these need element values: a pass or run_calls
        if node.level == Level.ELEMENT or (whole and any(a.level == Level.ELEMENT for a in node.args)):
            raise RuntimeError(f"{node} is computed by a pass that has not run yet")
        value = self.ev.leaf(node) if not node.args else self.ev.apply(node, [self.get(a) for a in node.args])
        self.memo[id(node)] = value
        return value

    def finish(self, node: Node, value: torch.Tensor) -> None:
        self.memo[id(node)] = value
