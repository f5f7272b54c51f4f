"""Pass planning: cut each variant's graph at global reductions and fuse the element
work between two cuts into one pass over the tensor.

A node's *phase* is the number of full passes over the tensor that must finish before
it can be computed: a reduction of an element-level value needs one more pass than its
input. Element work is recomputed in every pass that needs it (features are never
written to memory); only accumulators are stored, each in the last pass that still
reads its previous value (so in-place updates are safe).
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


def _phases(graph: VariantGraph) -> dict[int, int]:
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
        else:
            phase[id(node)] = max(phase[id(a)] for a in node.args)
    return phase


def _needed(roots: list[Node], stored: dict[int, str]) -> list[Node]:
    """Element nodes a pass computes for its roots; stops at stored accumulators and at
    coarser values (computed between passes)."""
    return reachable(roots, lambda n: id(n) not in stored and n.level == Level.ELEMENT)


def plan_variant(variant: str, graph: VariantGraph) -> Plan:
    phase = _phases(graph)
    accs = graph.accumulators
    # A tensor function's element-level result is written by the function, before the
    # first pass that reads it: a stored value from then on, computed by no pass.
    results = {name: n for name, n in accs.items() if n.op == "call"}
    element_accs = {name: n for name, n in accs.items() if n.level == Level.ELEMENT and name not in results}
    write_pass = {name: phase[id(n)] for name, n in element_accs.items()}
    calls = [n for n in topo_order(graph.roots()) if n.op == "call" and any(a.level == Level.ELEMENT for a in n.args)]
    reductions = [n for n in topo_order(graph.roots()) if n.op in REDUCE and n.args[0].level == Level.ELEMENT]
    last = max([phase[id(graph.new_param)], *write_pass.values()])

    def pass_roots(k: int) -> list[Node]:
        roots = [r.args[0] for r in reductions if phase[id(r.args[0])] == k]
        roots += [n for name, n in element_accs.items() if write_pass[name] == k]
        return roots + ([graph.new_param] if k == last else [])

    def stored_in(k: int) -> dict[int, str]:
        out = {id(n): name for name, n in element_accs.items() if write_pass[name] < k}
        out.update({id(n): name for name, n in results.items() if phase[id(n)] <= k})
        return out

    # Delay each accumulator's write to the last pass that reads its previous value.
    while True:
        changed = False
        for k in range(last + 1):
            for n in _needed(pass_roots(k), stored_in(k)):
                if n.op == "state" and n.attrs[0] in write_pass and write_pass[n.attrs[0]] < k:
                    write_pass[n.attrs[0]] = k
                    changed = True
        if not changed:
            break

    passes: list[Pass] = []
    between: list[dict[str, int]] = []
    network_after = None
    waiting: list[Node] = []   # calls not yet given to a pass
    for k in range(last + 1):
        waiting += [c for c in calls if phase[id(c)] == k]
        roots = pass_roots(k)
        if not roots:
            continue
        stored = stored_in(k)
        p = Pass(len(passes), roots=roots, stored=stored, calls=waiting,
                 reduce_nodes=[r for r in reductions if phase[id(r.args[0])] == k])
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
        p.writes.update({name: n.channels for name, n in element_accs.items() if write_pass[name] == k})
        if k == last:
            p.writes["param"] = 1
        p.small_inputs = sorted(set(p.small_inputs))
        passes.append(p)
        small: dict[str, int] = {}
        for n in topo_order(graph.roots()):
            if n.args and n.level < Level.ELEMENT and phase[id(n)] == k + 1 and n.op not in REDUCE:
                small[n.level.label] = small.get(n.level.label, 0) + 1
        between.append(small)
        if graph.network_input is not None and phase[id(graph.network_input)] == k + 1:
            network_after = p.index
    waiting += [c for c in calls if phase[id(c)] > last]
    return Plan(variant, passes, between, network_after, waiting)


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
