"""IR -> C++: one rule per op (mirroring the op tables of backends/reference.py), used to
print each pass's element function. The printed function is `__host__ __device__`, so
the CUDA kernels and the CPU host build run the very same math.

Every value is float32; a node with k channels becomes k scalar variables, and an
operand with one channel broadcasts over the others (as in the reference).
"""
from __future__ import annotations

import numpy as np

from ...ir.nodes import Level, Node
from .passes import PassLayout, constant_value

UNARY = {
    "neg": "(-{0})", "exp": "expf({0})", "log": "logf({0})", "sqrt": "sqrtf({0})", "rsqrt": "lopt_rsqrt({0})",
    "tanh": "tanhf({0})", "abs": "fabsf({0})", "sign": "lopt_sign({0})", "relu": "lopt_relu({0})",
    "sigmoid": "lopt_sigmoid({0})", "zero_nonfinite": "lopt_zero_nonfinite({0})",
}
BINARY = {
    "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
    "pow": "powf({0}, {1})", "min": "lopt_min({0}, {1})", "max": "lopt_max({0}, {1})",
    "lt": "({0} < {1} ? 1.0f : 0.0f)", "le": "({0} <= {1} ? 1.0f : 0.0f)", "gt": "({0} > {1} ? 1.0f : 0.0f)",
    "ge": "({0} >= {1} ? 1.0f : 0.0f)", "eq": "({0} == {1} ? 1.0f : 0.0f)", "ne": "({0} != {1} ? 1.0f : 0.0f)",
}
ACTIVATIONS = {"relu": "lopt_relu", "tanh": "tanhf", "sigmoid": "lopt_sigmoid"}


def literal(value: float) -> str:
    """The shortest C++ float literal that round-trips the float32 value."""
    if not np.isfinite(value):
        raise ValueError(f"cuda backend: non-finite constant {value} in the spec")
    text = str(np.float32(value))
    if "." not in text and "e" not in text:
        text += ".0"
    return f"({text}f)" if text.startswith("-") else f"{text}f"


def mlp_weight_count(sizes: tuple[int, ...]) -> int:
    return sum(o * i + o for i, o in zip(sizes, sizes[1:]))


class ElementPrinter:
    """Prints the element function of one pass as a list of C++ statements."""

    def __init__(self, layout: PassLayout):
        self.layout = layout
        self.lines: list[str] = []
        self.names: dict[int, list[str]] = {}
        self.count = 0
        for k, slot in enumerate(layout.inputs):
            self.names.setdefault(id(slot.node), [""] * slot.node.channels)[slot.channel] = f"in[{k}]"

    def channel(self, node: Node, c: int) -> str:
        names = self.names[id(node)]
        return names[c if len(names) > 1 else 0]

    def emit(self, node: Node) -> None:
        if id(node) in self.names:
            return
        const = constant_value(node)
        if const is not None:
            self.names[id(node)] = [literal(float(v)) for v in const]
            return
        if node.op == "concat":
            self.names[id(node)] = [self.channel(a, c) for a in node.args for c in range(a.channels)]
            return
        if node.op == "channel":
            self.names[id(node)] = [self.channel(node.args[0], node.attrs[0])]
            return
        if node.op == "mlp":
            self.emit_mlp(node)
            return
        if node.op in UNARY:
            rule, arity = UNARY[node.op], 1
        elif node.op in BINARY:
            rule, arity = BINARY[node.op], 2
        elif node.op == "where":
            rule, arity = "({0} != 0.0f ? {1} : {2})", 3
        else:
            raise ValueError(f"cuda backend: no C++ rule for op '{node.op}' ({node.level.label} level)")
        assert len(node.args) == arity
        names = []
        for c in range(node.channels):
            var = f"t{self.count}" + (f"_{c}" if node.channels > 1 else "")
            expr = rule.format(*(self.channel(a, c) for a in node.args))
            self.lines.append(f"const float {var} = {expr};")
            names.append(var)
        self.lines[-node.channels] += f"  // {node.op}"
        self.count += 1
        self.names[id(node)] = names

    def emit_mlp(self, node: Node) -> None:
        """The MLP with the first layer folded per tensor: weights come from `w` as
        [W0 (out, in), b0, W1, b1, ...] with W0 over the element inputs only."""
        sizes, activation = node.attrs
        inputs = [self.channel(x, c if x.channels > 1 else 0)
                  for x, _, _, channels in self.layout.fold.element_parts for c in range(channels)]
        dims = (len(inputs), *sizes[1:])
        act = ACTIVATIONS[activation]
        self.lines.append(f"// MLP {' -> '.join(map(str, dims))} ({activation}); layer 0 folded per tensor")
        self.lines.append(f"float a0[{dims[0]}] = {{{', '.join(inputs)}}};")
        offset = 0
        for i, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
            last = i == len(dims) - 2
            bias = offset + n_in * n_out
            self.lines += [
                f"float a{i + 1}[{n_out}];",
                "LOPT_UNROLL",
                f"for (int j = 0; j < {n_out}; ++j) {{",
                f"  float s = w[{bias} + j];",
                "LOPT_UNROLL",
                f"  for (int k = 0; k < {n_in}; ++k) s += w[{offset} + j * {n_in} + k] * a{i}[k];",
                f"  a{i + 1}[j] = {'s' if last else f'{act}(s)'};",
                "}",
            ]
            offset = bias + n_out
        self.names[id(node)] = [f"a{len(dims) - 1}[{c}]" for c in range(dims[-1])]

    def outputs(self) -> list[tuple[str, str]]:
        """(what, C++ value) per output float, in the order of PassLayout's outputs."""
        L = self.layout
        out = []
        for name, node in L.acc_writes:
            out += [(f"{name}[{c}]", self.channel(node, c)) for c in range(node.channels)]
        for kind, nodes in (("mean", L.tensor_reductions), ("line mean", L.line_reductions)):
            for j, node in enumerate(nodes):
                out += [(f"{kind} arg {j}[{c}]", self.channel(node, c)) for c in range(node.channels)]
        if L.writes_param:
            out.append(("new p", self.channel(L.new_param, 0)))
        return out

    def print(self) -> tuple[list[str], list[tuple[str, str]]]:
        L = self.layout
        roots = [n for _, n in L.acc_writes] + L.tensor_reductions + L.line_reductions
        roots += [L.new_param] if L.writes_param else []
        for node in _element_order(roots, L):
            self.emit(node)
        return self.lines, self.outputs()


def _element_order(roots: list[Node], layout: PassLayout) -> list[Node]:
    """Element nodes in dependency order, not entering slots or folded MLP parts."""
    slot_ids = {id(s.node) for s in layout.inputs}
    order: list[Node] = []
    seen: set[int] = set()

    def visit(n: Node) -> None:
        if id(n) in seen:
            return
        seen.add(id(n))
        if id(n) not in slot_ids and n.level == Level.ELEMENT:
            args = [x for x, _, _, _ in layout.fold.element_parts] if n.op == "mlp" else n.args
            for a in args:
                visit(a)
        order.append(n)

    for r in roots:
        visit(r)
    return order


def print_element_function(layout: PassLayout) -> tuple[list[str], list[tuple[str, str]]]:
    """(statements, outputs) of the element function of a pass."""
    return ElementPrinter(layout).print()

