"""Pass planning: cut each variant's graph at global reductions and fuse the element
work between two cuts into one pass over the tensor.

A node's *phase* is the number of full passes over the tensor that must finish before
it can be computed: a reduction of an element-level value needs one more pass than its
input. Element work is recomputed in every pass that needs it (features are never
written to memory); only accumulators are stored, each in the last pass that still
reads its previous value (so in-place updates are safe). A reduction runs in the
earliest pass that can compute it, unless a later one, still early enough for its
users, already reads everything it reads: there it costs no memory traffic (VeLO's
means of the new accumulators go to the pass that writes them, and the pass before it
reads only the gradient and the parameter).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .mlp_fold import MlpFold
from .nodes import LEAVES, REDUCE, Level, Node, reachable, topo_order
from .program import Program, VariantGraph, is_factored

_REDUCTION_NAMES = {"mean": "tensor means", "mean_d0": "row means (over d0)", "mean_d1": "col means (over d1)"}


@dataclass
class Pass:
    index: int
    reads: dict[str, int] = field(default_factory=dict)    # stored value -> channels per element
    writes: dict[str, int] = field(default_factory=dict)
    small_inputs: list[str] = field(default_factory=list)  # row/col/tensor/step values read
    reductions: list[str] = field(default_factory=list)
    ops: int = 0          # elementwise operations per element (one per channel)
    macs: int = 0         # MLP multiply-adds per element (_element_macs)
    nodes: list[Node] = field(default_factory=list)          # element nodes computed
    roots: list[Node] = field(default_factory=list)          # what the pass must produce
    reduce_nodes: list[Node] = field(default_factory=list)   # reductions finished after it
    stored: dict[int, str] = field(default_factory=dict)     # id(node) -> accumulator read back
    calls: list[Node] = field(default_factory=list)          # tensor functions run before the pass

    @property
    def bytes_per_element(self) -> int:
        return 4 * (sum(self.reads.values()) + sum(self.writes.values()))


@dataclass
class Plan:
    variant: str
    passes: list[Pass]
    between: list[dict[str, int]]   # small work after each pass: level -> node count
    network_after: int | None       # the network runs after this pass (index)
    calls_after: list[Node] = field(default_factory=list)   # tensor functions run after the last pass


def _phases(graph: VariantGraph, placed: dict[int, int] | None = None) -> dict[int, int]:
    """Each node's phase; `placed`: id(reduction) -> the pass it runs in, where later
    than the earliest (_placed_reductions)."""
    placed = placed or {}
    phase: dict[int, int] = {}
    # The network input goes first so its phase is known when its outputs (net_out) appear.
    first = [graph.network_input] if graph.network_input is not None else []
    for node in topo_order(first + graph.roots()):
        if node.op == "net_out":
            phase[id(node)] = phase[id(graph.network_input)]
        elif not node.args:
            phase[id(node)] = 0
        elif node.op in REDUCE or node.op == "call":
            # Both need their element-level arguments over the whole tensor first.
            whole = any(a.level == Level.ELEMENT for a in node.args)
            phase[id(node)] = max(phase[id(a)] for a in node.args) + (1 if whole else 0)
            if id(node) in placed:
                phase[id(node)] = placed[id(node)] + 1
        else:
            phase[id(node)] = max(phase[id(a)] for a in node.args)
    return phase


def _needed(roots: list[Node], stored: dict[int, str]) -> list[Node]:
    """Element nodes a pass computes for its roots; stops at stored accumulators and at
    coarser values (computed between passes)."""
    return reachable(roots, lambda n: id(n) not in stored and n.level == Level.ELEMENT)


class _Passes:
    """Which pass computes what, for one set of phases: reductions of element values run
    in the pass before their phase, accumulators are written in the last pass that reads
    their previous value, the new parameter in the last pass."""

    def __init__(self, graph: VariantGraph, phase: dict[int, int]):
        self.graph, self.phase = graph, phase
        accs = graph.accumulators
        # A tensor function's element-level result is written by the function, before the
        # first pass that reads it: a stored value from then on, computed by no pass.
        self.results = {name: n for name, n in accs.items() if n.op == "call"}
        self.element_accs = {name: n for name, n in accs.items()
                             if n.level == Level.ELEMENT and name not in self.results}
        self.write_pass = {name: phase[id(n)] for name, n in self.element_accs.items()}
        order = topo_order(graph.roots())
        self.calls = [n for n in order if n.op == "call" and any(a.level == Level.ELEMENT for a in n.args)]
        self.reductions = [n for n in order if n.op in REDUCE and n.args[0].level == Level.ELEMENT]
        self.last = max([phase[id(graph.new_param)], *self.write_pass.values()])
        self._delay_writes()

    def reduced_in(self, k: int) -> list[Node]:
        return [r for r in self.reductions if self.phase[id(r)] - 1 == k]

    def roots(self, k: int, reductions: bool = True) -> list[Node]:
        roots = [r.args[0] for r in self.reduced_in(k)] if reductions else []
        roots += [n for name, n in self.element_accs.items() if self.write_pass[name] == k]
        return roots + ([self.graph.new_param] if k == self.last else [])

    def stored_in(self, k: int) -> dict[int, str]:
        out = {id(n): name for name, n in self.element_accs.items() if self.write_pass[name] < k}
        out.update({id(n): name for name, n in self.results.items() if self.phase[id(n)] <= k})
        return out

    def _delay_writes(self) -> None:
        """Each accumulator's write delayed to the last pass that reads its previous value."""
        changed = True
        while changed:
            changed = False
            for k in range(self.last + 1):
                for n in _needed(self.roots(k), self.stored_in(k)):
                    if n.op == "state" and self.write_pass.get(n.attrs[0], k) < k:
                        self.write_pass[n.attrs[0]] = k
                        changed = True

    def reads(self, roots: list[Node], k: int) -> set[str] | None:
        """The stored values and leaves pass k reads for `roots`; None where they need an
        accumulator's previous value after the pass that overwrites it."""
        stored, out = self.stored_in(k), set()
        for n in _needed(roots, stored):
            if id(n) in stored:
                out.add(stored[id(n)])
            elif n.op in LEAVES and n.level == Level.ELEMENT:
                if n.op == "state" and self.write_pass.get(n.attrs[0], k) < k:
                    return None
                out.add(n.attrs[0] if n.op == "state" else n.op)
        return out


def _latest_phases(passes: _Passes) -> dict[int, int]:
    """id(node) -> the latest phase each value may have without moving any element
    work, tensor function or the network: for element values, the first pass that
    computes them; for small values, that of their first user. A reduction placed later
    may not exceed it."""
    graph, phase, last = passes.graph, passes.phase, passes.last
    latest: dict[int, int] = {}

    def bound(node: Node, value: int) -> None:
        latest[id(node)] = min(latest.get(id(node), last + 1), value)

    for name, n in passes.element_accs.items():
        bound(n, passes.write_pass[name])
    bound(graph.new_param, last)
    first = [graph.network_input] if graph.network_input is not None else []
    if first:
        bound(graph.network_input, phase[id(graph.network_input)])
    for node in reversed(topo_order(first + graph.roots())):   # users before their arguments
        own = latest.get(id(node), last + 1)   # (small accumulators: after the last pass)
        for a in node.args:
            if node.op == "call":   # its arguments stay where they are
                bound(a, phase[id(a)])
            elif node.op in REDUCE and a.level == Level.ELEMENT:
                bound(a, phase[id(node)] - 1)
            else:
                bound(a, own)
    return latest


def _placed_reductions(passes: _Passes) -> dict[int, int]:
    """id(reduction) -> its pass, where later than its earliest: the first pass, still
    before its first use, that reads everything it reads for its other work anyway."""
    latest = _latest_phases(passes)
    last_pass = lambda r: min(latest.get(id(r), passes.last + 1) - 1, passes.last)  # noqa: E731
    span = {id(r): (passes.phase[id(r)] - 1, last_pass(r)) for r in passes.reductions}
    fixed = [r for r in passes.reductions if span[id(r)][1] <= span[id(r)][0]]
    placed: dict[int, int] = {}
    for r in passes.reductions:
        first, last = span[id(r)]
        if last <= first:
            continue
        # What pass k reads anyway: for its writes and the reductions that cannot move.
        for k in range(first, last + 1):
            anyway = passes.reads(passes.roots(k, reductions=False)
                                  + [s.args[0] for s in fixed if passes.phase[id(s)] - 1 == k], k) or set()
            reads = passes.reads([r.args[0]], k)
            if reads is not None and reads <= anyway:
                if k != first:
                    placed[id(r)] = k
                break
    return placed


def plan_variant(variant: str, graph: VariantGraph) -> Plan:
    passes = _Passes(graph, _phases(graph))
    placed = _placed_reductions(passes)
    if placed:
        passes = _Passes(graph, _phases(graph, placed))
    phase, last = passes.phase, passes.last
    plan_passes: list[Pass] = []
    between: list[dict[str, int]] = []
    network_after = None
    waiting: list[Node] = []   # calls not yet given to a pass
    for k in range(last + 1):
        waiting += [c for c in passes.calls if phase[id(c)] == k]
        roots = passes.roots(k)
        if not roots:
            continue
        stored = passes.stored_in(k)
        p = Pass(len(plan_passes), roots=roots, stored=stored, calls=waiting, reduce_nodes=passes.reduced_in(k))
        waiting = []
        for n in _needed(roots, stored):
            if id(n) in stored:
                p.reads[stored[id(n)]] = n.channels
            elif n.level != Level.ELEMENT:
                if n.op not in ("const", "hyper", "step"):
                    p.small_inputs.append(f"{n.op}:{n.level.label}")
            elif n.op in LEAVES:
                label = n.attrs[0] if n.op == "state" else n.op
                p.reads[label] = n.channels
            else:
                p.nodes.append(n)
                if n.op == "mlp":
                    p.macs += _element_macs(n)
                    p.ops += sum(n.attrs[0][1:-1])  # activations
                elif n.op not in ("concat", "channel"):
                    p.ops += n.channels
        for op, label in _REDUCTION_NAMES.items():
            channels = [r.channels for r in p.reduce_nodes if r.op == op]
            if channels:
                p.reductions.append(f"{label}: {sum(channels)} channels")
        p.writes.update({name: n.channels for name, n in passes.element_accs.items() if passes.write_pass[name] == k})
        if k == last:
            p.writes["param"] = 1
        p.small_inputs = sorted(set(p.small_inputs))
        plan_passes.append(p)
        small: dict[str, int] = {}
        for n in topo_order(graph.roots()):
            if n.args and n.level < Level.ELEMENT and phase[id(n)] == k + 1 and n.op not in REDUCE:
                small[n.level.label] = small.get(n.level.label, 0) + 1
        between.append(small)
        if graph.network_input is not None and phase[id(graph.network_input)] == k + 1:
            network_after = p.index
    waiting += [c for c in passes.calls if phase[id(c)] > last]
    return Plan(variant, plan_passes, between, network_after, waiting)


def _element_macs(mlp: Node) -> int:
    """The MLP's multiply-adds per element: its first layer over the element-level
    features only (inputs at tensor level fold into its bias; at row, column or batch
    level they enter once per row or column), then its other layers."""
    sizes = mlp.attrs[0]
    features = sum(ch for feat, _, _, ch in MlpFold.of(mlp).element_parts if feat.level == Level.ELEMENT)
    return features * sizes[1] + sum(a * b for a, b in zip(sizes[1:], sizes[2:]))


def plan_program(program: Program) -> dict[str, Plan]:
    return {v: plan_variant(v, g) for v, g in program.variants.items()}


def plan_to_dict(plans: dict[str, Plan]) -> dict:
    return {v: {"passes": [{"reads": p.reads, "writes": p.writes, "reductions": p.reductions,
                            "bytes_per_element": p.bytes_per_element, "ops_per_element": p.ops,
                            "macs_per_element": p.macs, **({"tensor_functions_before": [c.attrs[0] for c in p.calls]}
                                                           if p.calls else {})} for p in plan.passes],
                "network_after_pass": plan.network_after}
            for v, plan in plans.items()}


def _call_names(calls: list[Node]) -> str:
    return ", ".join(c.attrs[0] for c in calls)


def explain(program: Program) -> str:
    lines = [f"{program.name} ({program.class_name}): plan of one step"]
    for v, plan in plan_program(program).items():
        rank = "rank >= 2" if is_factored(v) else "rank < 2" if program.factored_axes else "any rank"
        lines.append(f"\n{v} tensors ({rank}): {len(plan.passes)} element pass(es)")
        for p, small in zip(plan.passes, plan.between):
            fmt = lambda d: ", ".join(f"{k}({c})" for k, c in d.items()) or "-"  # noqa: E731
            if p.calls:
                lines.append(f"  tensor functions (per group of same-shape tensors): {_call_names(p.calls)}")
            lines.append(f"  pass {p.index + 1}: reads {fmt(p.reads)}; writes {fmt(p.writes)}")
            lines.append(f"          {p.bytes_per_element} B/element (fp32), {p.ops} ops + {p.macs} MACs/element")
            if p.reductions:
                lines.append(f"          reduces: {'; '.join(p.reductions)}")
            if small:
                lines.append("          then small work: " + ", ".join(f"{c} {lv}-level op(s)" for lv, c in small.items()))
            if plan.network_after == p.index:
                lines.append("          then the network over all tensors")
        if plan.calls_after:
            lines.append(f"  then tensor functions: {_call_names(plan.calls_after)}")
    return "\n".join(lines) + "\n"
