"""Which graph a parameter follows: its route (the first whose `when` holds for its shape
and its group's values) and whether it is factored. Decided on the host, once per shape
and group values."""
from __future__ import annotations

import torch

from ..backends.torch_ops import BINARY, UNARY
from ..ir.nodes import Node, topo_order
from ..ir.program import Program, variant_name
from ..ir.shape_facts import shape_fact


def _value(node: Node, shape: tuple[int, ...], hyper: dict[str, float]) -> torch.Tensor:
    """A route test's value, in float64 on the CPU (its leaves: numbers, shape facts, hyperparameters)."""
    if node.op == "const":
        return torch.tensor(node.attrs[0], dtype=torch.float64)
    if node.op == "shape":
        return torch.tensor(shape_fact(node.attrs, shape, None), dtype=torch.float64)
    if node.op == "hyper":
        return torch.tensor(float(hyper[node.attrs[0]]), dtype=torch.float64)
    args = [_value(a, shape, hyper) for a in node.args]
    if node.op == "where":
        return torch.where(args[0] != 0, args[1], args[2])
    return UNARY[node.op](args[0]) if node.op in UNARY else BINARY[node.op](args[0], args[1])


class Router:
    def __init__(self, program: Program):
        self.program = program
        tests = [t for _, t in program.routes if t is not None]
        self.hyper_names = sorted({n.attrs[0] for n in topo_order(tests) if n.op == "hyper"})
        self._chosen: dict[tuple, str | None] = {}

    def variant(self, shape: tuple[int, ...], factored: bool, hyper: dict[str, float]) -> str:
        kind = "factored" if factored else "unfactored"
        if not self.program.routes:
            return kind
        key = (shape, tuple(float(hyper[n]) for n in self.hyper_names))
        if key not in self._chosen:
            self._chosen[key] = next((name for name, test in self.program.routes
                                      if test is None or float(_value(test, shape, hyper)) != 0), None)
        route = self._chosen[key]
        if route is None:
            values = ", ".join(f"{n}={v}" for n, v in zip(self.hyper_names, key[1]))
            raise ValueError(f"{self.program.class_name}: a parameter of shape {shape}{' with ' + values if values else ''} "
                             f"takes none of the routes ({', '.join(n for n, _ in self.program.routes)}); "
                             "set the flags its param group needs, or give the spec a route without `when`")
        return variant_name(route, kind)
