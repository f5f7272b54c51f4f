"""Scratch values: the full-size arguments and results of tensor functions, which the
passes write and read like accumulators while a step runs."""
from __future__ import annotations

from .nodes import Level, Node, topo_order
from .program import SCRATCH_PREFIX, VariantGraph


def scratch_values(graph: VariantGraph) -> dict[str, Node]:
    """Full-size values that tensor functions read and write, kept like accumulators
    (SCRATCH_PREFIX names, never saved): each element-level argument other than the
    gradient (written by the pass that computes it; the parameter too, as a call may run
    after the pass that updates it), and each element-level result (written by the
    function; later passes read it)."""
    out: dict[str, Node] = {}
    seen: set[int] = set()
    for node in topo_order(graph.roots()):
        if node.op != "call":
            continue
        for arg in node.args:
            if arg.level == Level.ELEMENT and arg.op != "grad" and id(arg) not in seen:
                seen.add(id(arg))
                out[f"{SCRATCH_PREFIX}{len(out)}"] = arg
        if node.level == Level.ELEMENT:
            out[f"{SCRATCH_PREFIX}{len(out)}"] = node
    return out
