"""Program <-> JSON. The generated package ships its Program as `program.json`, so the
runtime never re-reads the YAML: backends consume the IR only."""
from __future__ import annotations

import json
from typing import Any

from .nodes import Graph, Level, Node, topo_order
from .program import MlpInfo, Program, VariantGraph
from ..weights.layouts import Derived
from .network import NetworkIR
from .tensor_function import FunctionIR

FORMAT = 1


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


def program_to_json(program: Program) -> str:
    roots: dict[str, dict[str, Node | None]] = {}
    all_roots: list[Node] = []
    for v, graph in program.variants.items():
        named = {f"acc:{k}": n for k, n in graph.accumulators.items()}
        named.update(new_param=graph.new_param, network_input=graph.network_input)
        roots[v] = named
        all_roots += [n for n in named.values() if n is not None]
    all_roots += [test for _, test in program.routes if test is not None]
    order = topo_order(all_roots)
    index = {id(n): i for i, n in enumerate(order)}
    doc = {
        "format": FORMAT,
        "name": program.name, "class_name": program.class_name, "description": program.description,
        "spec_sha256": program.spec_sha256, "hyperparameters": program.hyperparameters,
        "factored_axes": program.factored_axes,
        "nodes": [[n.op, [index[id(a)] for a in n.args], _lists(n.attrs), n.level.label, n.channels] for n in order],
        "variants": {v: {k: (index[id(n)] if n is not None else None) for k, n in named.items()}
                     for v, named in roots.items()},
        "state_levels": {a: {v: [lv.label, ch] for v, (lv, ch) in per.items()} for a, per in program.state_levels.items()},
        "tensor_functions": {n: {"args": list(f.args), "body": _lists(f.body)} for n, f in program.tensor_functions.items()},
        "routes": [[name, None if test is None else index[id(test)]] for name, test in program.routes],
        "mlp": None if program.mlp is None else {
            "sizes": list(program.mlp.sizes), "activation": program.mlp.activation,
            "outputs": list(program.mlp.outputs), "weight_group": program.mlp.weight_group,
            "layers": list(program.mlp.layers)},
        "network": _network_doc(program.network),
        "loss_buffer": _network_doc(program.loss_buffer),
        "weight_groups": {g: {k: list(s) for k, s in keys.items()} for g, keys in program.weight_groups.items()},
        "weight_ignore": {g: list(p) for g, p in program.weight_ignore.items()},
        "weight_layouts": {g: {k: {"from": list(d.sources), "axis": d.axis, "transpose": d.transpose}
                               for k, d in keys.items()} for g, keys in program.weight_layouts.items()},
        "builtin_weights": program.builtin_weights,
        "weight_hub": program.weight_hub,
    }
    # One node per line keeps the file diffable and reviewable.
    nodes = doc.pop("nodes")
    text = json.dumps(doc, indent=1)
    node_lines = ",\n".join("  " + json.dumps(n) for n in nodes)
    return text[:-2] + ',\n "nodes": [\n' + node_lines + "\n ]\n}\n"


def _network_doc(net: NetworkIR | None) -> dict | None:
    if net is None:
        return None
    return {"state": {n: {"init": _lists(init), "channels": ch} for n, (init, ch) in net.state.items()},
            "body": _lists(net.body), "outputs": net.outputs, "mlp": _lists(net.mlp), "groups": list(net.groups)}


def _network(doc: dict | None) -> NetworkIR | None:
    if doc is None:
        return None
    return NetworkIR({n: (_tuples(s["init"]), s["channels"]) for n, s in doc["state"].items()}, _tuples(doc["body"]),
                     dict(doc["outputs"]), _tuples(doc["mlp"]), tuple(doc["groups"]))


def program_from_json(text: str) -> Program:
    doc = json.loads(text)
    if doc.get("format") != FORMAT:
        raise ValueError(f"program.json has format {doc.get('format')}, this lopt_codegen reads {FORMAT}: "
                         "re-run lopt-compile")
    graph = Graph()
    nodes: list[Node] = []
    for op, args, attrs, level, channels in doc["nodes"]:
        nodes.append(graph.make(op, tuple(nodes[i] for i in args), _tuples(attrs), Level[level.upper()], channels))

    def get(i: int | None) -> Node | None:
        return None if i is None else nodes[i]

    variants = {}
    for v, named in doc["variants"].items():
        accs = {k[4:]: nodes[i] for k, i in named.items() if k.startswith("acc:")}
        variants[v] = VariantGraph(accs, nodes[named["new_param"]], get(named["network_input"]))
    mlp = doc["mlp"]
    return Program(
        name=doc["name"], class_name=doc["class_name"], description=doc["description"],
        spec_sha256=doc["spec_sha256"], hyperparameters=doc["hyperparameters"],
        factored_axes=doc["factored_axes"], variants=variants,
        state_levels={a: {v: (Level[lv.upper()], ch) for v, (lv, ch) in per.items()}
                      for a, per in doc["state_levels"].items()},
        tensor_functions={n: FunctionIR(n, tuple(f["args"]), _tuples(f["body"]))
                          for n, f in doc.get("tensor_functions", {}).items()},
        routes=tuple((name, get(i)) for name, i in doc.get("routes", [])),
        mlp=None if mlp is None else MlpInfo(tuple(mlp["sizes"]), mlp["activation"], tuple(mlp["outputs"]),
                                             mlp["weight_group"], tuple(mlp["layers"])),
        network=_network(doc["network"]),
        loss_buffer=_network(doc["loss_buffer"]),
        weight_groups={g: {k: tuple(s) for k, s in keys.items()} for g, keys in doc["weight_groups"].items()},
        weight_ignore={g: tuple(p) for g, p in doc["weight_ignore"].items()},
        weight_layouts={g: {k: Derived(tuple(d["from"]), d["axis"], d["transpose"]) for k, d in keys.items()}
                        for g, keys in doc.get("weight_layouts", {}).items()},
        builtin_weights=doc["builtin_weights"], weight_hub=doc.get("weight_hub", {}),
    )
