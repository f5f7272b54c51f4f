"""What one planned pass needs from memory and what it produces, as flat slots.

A compiled pass reads, per element: the gradient, the parameter, element accumulators
(their old value, or the new one stored by an earlier pass) and "small" values (row,
col, batch, tensor and step level, computed between passes). It writes element
accumulators, the element-level arguments of reductions, and the new parameter.

The MLP's first layer is folded per tensor (DESIGN: small work, not the kernel; see
MlpFold), so the element function feeds only element features to the MLP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...ir.mlp_fold import MlpFold
from ...ir.nodes import LEAVES, REDUCE, Level, Node, topo_order
from ...ir.plan import Pass, Plan
from ...ir.program import VariantGraph
from ..torch_ops import BINARY as _BINARY, UNARY as _UNARY


@dataclass(frozen=True)
class Slot:
    """One float read per element: `kind` is grad, param, acc (an element accumulator,
    `name`) or small (channel `channel` of the coarser-level value `node`)."""

    kind: str
    node: Node | None = None
    channel: int = 0
    name: str = ""


@dataclass
class PassLayout:
    variant: str
    index: int
    accs: list[str]                                   # element accumulators touched
    inputs: list[Slot] = field(default_factory=list)
    acc_writes: list[tuple[str, Node]] = field(default_factory=list)
    tensor_reductions: list[Node] = field(default_factory=list)   # element args of mean
    line_reductions: list[Node] = field(default_factory=list)     # element args of mean_d0/d1
    reduce_nodes: list[Node] = field(default_factory=list)        # finished after the pass
    writes_param: bool = False
    new_param: Node | None = None
    mlp: Node | None = None
    fold: MlpFold | None = None                       # how the MLP's input splits (with mlp)

    @property
    def name(self) -> str:
        return f"{self.variant}_pass{self.index + 1}"

    @property
    def small_slots(self) -> list[Slot]:
        return [s for s in self.inputs if s.kind == "small"]

    @property
    def needs_index(self) -> bool:
        return any(s.node.level in (Level.BATCH, Level.ROW, Level.COL) for s in self.small_slots)

    def element_bytes(self, param_size: int = 4, grad_size: int = 4) -> float:
        """Memory traffic per element that the pass cannot avoid (to rate its bandwidth):
        its element inputs once, its accumulator and parameter writes, and its row/col
        partial sums (a float per 32 elements each way and channel, for C = 1). Small
        values and MLP weights are read once per tensor or cached: not counted."""
        sizes = {"grad": grad_size, "param": param_size, "acc": 4}
        reads = sum(sizes[s.kind] for s in self.inputs if s.kind != "small")
        writes = 4 * sum(n.channels for _, n in self.acc_writes) + (param_size if self.writes_param else 0)
        return reads + writes + 2 * 4 / 32 * sum(n.channels for n in self.line_reductions)


def constant_value(node: Node) -> torch.Tensor | None:
    """The float32 channel values of a node built from constants only (folded into the
    source as literals, computed with the reference's own ops), else None."""
    if node.op == "const":
        return torch.tensor(node.attrs, dtype=torch.float32)
    if not node.args or node.op in REDUCE or node.op in LEAVES or node.op in ("mlp", "channel", "call"):
        return None
    args = [constant_value(a) for a in node.args]
    if any(a is None for a in args):
        return None
    if node.op in _UNARY:
        return _UNARY[node.op](args[0])
    if node.op in _BINARY:
        return _BINARY[node.op](args[0], args[1])
    if node.op == "where":
        return torch.where(args[0] != 0, args[1], args[2])
    if node.op == "concat":
        return torch.cat(args)
    return None


def layout_pass(variant: str, graph: VariantGraph, p: Pass) -> PassLayout:
    element_accs = [n for n, node in graph.accumulators.items() if node.level == Level.ELEMENT]
    layout = PassLayout(variant, p.index, accs=[], reduce_nodes=list(p.reduce_nodes))
    layout.acc_writes = [(n, graph.accumulators[n]) for n in element_accs if n in p.writes]
    for r in p.reduce_nodes:
        target = layout.tensor_reductions if r.op == "mean" else layout.line_reductions
        if all(a is not r.args[0] for a in target):
            target.append(r.args[0])
    layout.writes_param = "param" in p.writes
    roots = [n for _, n in layout.acc_writes] + layout.tensor_reductions + layout.line_reductions
    if layout.writes_param:
        layout.new_param = graph.new_param
        roots.append(graph.new_param)

    # Walk the element work of the pass, stopping at stored values, coarser values and
    # folded MLP parts, to find the slots it reads.
    seen: set[int] = set()
    stack = list(roots)
    frontier: list[Node] = []
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if id(n) in p.stored or n.level != Level.ELEMENT or not n.args:
            frontier.append(n)
            continue
        if n.op == "mlp":
            layout.mlp, layout.fold = n, MlpFold.of(n)
            stack.extend(x for x, _, _, _ in layout.fold.element_parts)
            continue
        stack.extend(n.args)
    acc_names: list[str] = []
    for n in sorted(frontier, key=_slot_order):
        if constant_value(n) is not None:
            continue
        if id(n) in p.stored or n.op == "state" and n.level == Level.ELEMENT:
            name = p.stored.get(id(n)) or n.attrs[0]
            acc_names.append(name)
            layout.inputs += [Slot("acc", n, c, name) for c in range(n.channels)]
        elif n.op in ("grad", "param"):
            layout.inputs.append(Slot(n.op, n))
        elif n.level < Level.ELEMENT:
            layout.inputs += [Slot("small", n, c) for c in range(n.channels)]
        else:
            raise ValueError(f"cuda backend: element-level leaf '{n.op}' is not supported")
    layout.accs = sorted(set(acc_names) | {n for n, _ in layout.acc_writes}, key=element_accs.index)
    return layout


def _slot_order(n: Node) -> tuple:
    """A deterministic slot order (the generated source must not change run to run)."""
    kinds = {"grad": 0, "param": 1, "state": 2}
    return (kinds.get(n.op, 3), int(n.level), n.op, str(n.attrs), n.channels, _node_key(n))


def _node_key(n: Node) -> str:
    return repr([(m.op, m.attrs, int(m.level), m.channels) for m in topo_order([n])])


def layout_plan(variant: str, graph: VariantGraph, plan: Plan) -> list[PassLayout]:
    return [layout_pass(variant, graph, p) for p in plan.passes]
