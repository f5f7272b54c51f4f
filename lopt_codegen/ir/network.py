"""A spec's per-tensor network in the IR: its body checked (channels, weight references)
and turned into plain nested tuples (JSON-able, in program.json) that
backends/network_program.py runs with torch over all tensors of a step at once.

Every value is a row of channels per tensor ("rows", (T, C)) or one row shared by all
tensors ("shared", (1, C): numbers, weights, reductions over the tensors). The loss
buffer is the same language over one shared row: its state, the step's `loss`.
Subexpressions of numbers and hyperparameters alone are folded in float64 on the host
("fold"), as Python would compute them.

    statements   ("set", var, expr)
    expressions  ("var", name) | ("const", values) | ("weight", group, key)
                 | ("linear", expr, group, layer) | ("project", expr, group, key)
                 | ("concat", (exprs...)) | ("slice", expr, start, count)
                 | ("over_tensors", "max" | "mean" | "sum", expr) | ("max_channels", expr)
                 | ("full", count, expr) | ("hyper", name) | ("fold", expr) | ("op", name, (args...))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..spec.errors import Mark, SpecError
from ..spec.expr import Assign, Call, Expr, Name, Num, Text, whole_number
from ..spec.model import Network
from .tensor_function import ELEMENTWISE_BINARY, ELEMENTWISE_CALLS, ELEMENTWISE_UNARY

# Functions of a network body beyond the element-wise ones (a table the language
# reference prints).
NETWORK_FUNCTIONS = {
    "linear(v, \"group:layer\")": "the layer's weight (out, in) times v, plus its bias: torch.nn.Linear",
    "project(v, \"group:key\")": "v's channels contracted with the weight's first axis (in, ...): "
                                 "rows of prod(...) channels (mixing banks of weights)",
    "weight(\"group:key\")": "the weight's values as one shared row",
    "concat(a, b, ...)": "channels side by side",
    "slice(v, start, count)": "count channels from start",
    "max_over_tensors(v)": "the largest value of each channel over all tensors of the step: a shared row",
    "mean_over_tensors(v)": "the mean of each channel over all tensors of the step: a shared row",
    "sum_over_tensors(v)": "the sum of each channel over all tensors of the step (a global gradient norm): "
                           "a shared row",
    "max_channels(v)": "the largest of v's channels: one channel",
    "full(count, value)": "count channels of one value",
}


@dataclass(frozen=True)
class NetworkIR:
    state: dict[str, tuple[tuple, int]]    # name -> (initial value, channels)
    body: tuple
    outputs: dict[str, int]                # name -> channels
    mlp: tuple[tuple, ...]                 # w0, b0, w1, b1, ... as rows of out*in / out channels
    groups: tuple[str, ...]                # the weight groups it reads


Shapes = Callable[[str, Mark], dict[str, tuple[int, ...]]]   # group -> its keys' shapes


class _Checker:
    def __init__(self, shapes: Shapes, hypers: set[str] = frozenset()):
        self.shapes, self.hypers = shapes, hypers
        self.groups: set[str] = set()

    def folded(self, e: Expr, scope: dict[str, tuple[str, int]]) -> tuple[tuple, str, int]:
        """expr(), with a subexpression of numbers and hyperparameters alone marked for folding."""
        ir, kind, channels = self.expr(e, scope)
        return (("fold", ir) if _constant(ir) and ir[0] != "const" else ir), kind, channels

    def weight(self, ref: Expr, suffix: str = "") -> tuple[str, str, tuple[int, ...]]:
        if not isinstance(ref, Text) or ref.value.count(":") != 1:
            raise SpecError(ref.mark, 'a weight is named "group:key", e.g. "rnn:lstm.linear"')
        group, key = ref.value.split(":")
        shapes = self.shapes(group, ref.mark)
        if key + suffix not in shapes:
            raise SpecError(ref.mark, f"weight group '{group}' has no '{key + suffix}'")
        self.groups.add(group)
        return group, key, shapes[key + suffix]

    def expr(self, e: Expr, scope: dict[str, tuple[str, int]]) -> tuple[tuple, str, int]:
        """(IR, kind, channels)."""
        if isinstance(e, Num):
            return ("const", e.values), "shared", len(e.values)
        if isinstance(e, Name):
            if e.name in self.hypers and e.name not in scope:
                return ("hyper", e.name), "shared", 1
            if e.name not in scope:
                raise SpecError(e.mark, f"unknown name '{e.name}' in the network; known here: "
                                f"{', '.join(scope)} (pass other values as network inputs)")
            return ("var", e.name), *scope[e.name]
        if isinstance(e, Text):
            raise SpecError(e.mark, "a text is a weight reference: pass it to linear, project or weight")
        assert isinstance(e, Call)
        f, args = e.func, e.args
        if f == "weight":
            self.arity(e, 1)
            group, key, shape = self.weight(args[0])
            return ("weight", group, key), "shared", math.prod(shape)
        if f in ("linear", "project"):
            self.arity(e, 2)
            x, kind, channels = self.folded(args[0], scope)
            if f == "linear":
                group, key, shape = self.weight(args[1], ".weight")
                self.weight(args[1], ".bias")
                if len(shape) != 2:
                    raise SpecError(args[1].mark, f"{key}.weight is {len(shape)}-D; a linear layer's is (out, in)")
                n_in, n_out = shape[1], shape[0]
            else:
                group, key, shape = self.weight(args[1])
                n_in, n_out = shape[0], math.prod(shape[1:])
            if channels != n_in:
                raise SpecError(e.mark, f"{f}(): '{group}:{key}' takes {n_in} channels, the value has {channels}")
            return (f, x, group, key), kind, n_out
        if f == "concat":
            parts = [self.folded(a, scope) for a in args]
            kind = "rows" if any(k == "rows" for _, k, _ in parts) else "shared"
            return ("concat", tuple(ir for ir, _, _ in parts)), kind, sum(c for _, _, c in parts)
        if f == "slice":
            self.arity(e, 3)
            x, kind, channels = self.expr(args[0], scope)
            start, count = (_whole(a, "slice(v, start, count) takes whole numbers") for a in args[1:])
            if start < 0 or count < 1 or start + count > channels:
                raise SpecError(e.mark, f"slice({start}, {count}) is outside the value's {channels} channels")
            return ("slice", x, start, count), kind, count
        if f in ("max_over_tensors", "mean_over_tensors", "sum_over_tensors"):
            self.arity(e, 1)
            x, _, channels = self.folded(args[0], scope)
            return ("over_tensors", f.split("_")[0], x), "shared", channels
        if f == "max_channels":
            self.arity(e, 1)
            x, kind, _ = self.folded(args[0], scope)
            return ("max_channels", x), kind, 1
        if f == "full":
            self.arity(e, 2)
            count = _whole(args[0], "full(count, value) takes a whole number of channels")
            value, kind, channels = self.folded(args[1], scope)
            if channels != 1 or count < 1:
                raise SpecError(e.mark, "full(count, value): a count >= 1 and a single value")
            return ("full", count, value), kind, count
        if f == "clip":
            self.arity(e, 3)
            lo = Call(e.mark, "max", args[:2])
            return self.expr(Call(e.mark, "min", (lo, args[2])), scope)
        expected = 1 if f in ELEMENTWISE_UNARY else 2 if f in ELEMENTWISE_BINARY else 3 if f == "where" else None
        if expected is None:
            known = sorted(ELEMENTWISE_CALLS | {n.split("(")[0] for n in NETWORK_FUNCTIONS})
            raise SpecError(e.mark, f"unknown function '{f}' in the network; known: {', '.join(known)}")
        self.arity(e, expected)
        parts = [self.expr(a, scope) for a in args]
        if not _constant(("op", f, tuple(ir for ir, _, _ in parts))):   # fold the constant operands
            parts = [(("fold", ir) if _constant(ir) and ir[0] != "const" else ir, k, c) for ir, k, c in parts]
        counts = {c for _, _, c in parts if c != 1}
        if len(counts) > 1:
            raise SpecError(e.mark, f"channel mismatch in {f}: operands have "
                            f"{', '.join(str(c) for _, _, c in parts)} channels")
        kind = "rows" if any(k == "rows" for _, k, _ in parts) else "shared"
        return ("op", f, tuple(ir for ir, _, _ in parts)), kind, counts.pop() if counts else 1

    @staticmethod
    def arity(e: Call, n: int) -> None:
        if len(e.args) != n:
            raise SpecError(e.mark, f"{e.func}() takes {n} argument{'s' if n != 1 else ''}, got {len(e.args)}")


def _constant(ir: tuple) -> bool:
    """Built from numbers and hyperparameters alone (folded in float64)."""
    if ir[0] in ("const", "hyper"):
        return True
    return ir[0] == "op" and all(_constant(a) for a in ir[2])


def _whole(e: Expr, message: str) -> int:
    n = whole_number(e)
    if n is None:
        raise SpecError(e.mark, message)
    return n


def check_network(net: Network, x_channels: int, shapes: Shapes, mlp_shapes: list[tuple[int, ...]] | None) -> NetworkIR:
    """The network's IR, checked: every weight it reads exists with fitting shapes, the
    state keeps its channels, and (mlp_shapes: the MLP's w0, b0, ... shapes) each MLP
    weight has the channels its layer needs."""
    c = _Checker(shapes)
    state = {}
    for name, init in net.state.items():
        ir, kind, channels = c.folded(init, {})
        state[name] = (ir, channels)
    scope: dict[str, tuple[str, int]] = {"x": ("rows", x_channels), **{n: ("rows", ch) for n, (_, ch) in state.items()}}
    body = []
    for st in net.body:
        if not isinstance(st, Assign):
            raise SpecError(st.mark, "a network body is assignments: `name = expression`")
        ir, kind, channels = c.folded(st.value, scope)
        if st.target == "x":
            raise SpecError(st.mark, "'x' is the network's input; assign to a new name")
        if st.target in state and channels != state[st.target][1]:
            raise SpecError(st.mark, f"state '{st.target}' has {state[st.target][1]} channels; this value has {channels}")
        scope[st.target] = ("rows", channels) if st.target in state else (kind, channels)
        body.append(("set", st.target, ir))
    outputs = {}
    for name in net.outputs:
        if name not in scope:
            raise SpecError(net.mark, f"network output '{name}' is never set in its body")
        outputs[name] = scope[name][1]
    mlp = []
    if mlp_shapes is not None:
        if len(net.mlp) != len(mlp_shapes):
            raise SpecError(net.mark, f"network.mlp gives {len(net.mlp)} weights; the MLP needs {len(mlp_shapes)} "
                            "(w0, b0, w1, b1, ...)")
        for e, shape in zip(net.mlp, mlp_shapes):
            ir, _, channels = c.folded(e, scope)
            if channels != math.prod(shape):
                raise SpecError(e.mark, f"this MLP weight has {channels} channels; its layer needs {list(shape)} = "
                                f"{math.prod(shape)}")
            mlp.append(ir)
    elif net.mlp:
        raise SpecError(net.mark, "network.mlp gives MLP weights, but the spec's mlp does not take them "
                        "(mlp.weights: network)")
    return NetworkIR(state, tuple(body), outputs, tuple(mlp), tuple(sorted(c.groups)))


def check_loss_buffer(state_exprs: dict[str, Expr], body: tuple, mark: Mark, hyperparameters: set[str]) -> NetworkIR:
    """The loss buffer: state (one shared row each), a body over `loss` (the step's
    loss), the state and hyperparameters, that sets `loss_features`."""
    c = _Checker(lambda group, m: {}, hyperparameters)
    state = {}
    for name, init in state_exprs.items():
        ir, _, channels = c.folded(init, {})
        state[name] = (ir, channels)
    scope: dict[str, tuple[str, int]] = {"loss": ("shared", 1), **{n: ("shared", ch) for n, (_, ch) in state.items()}}
    out = []
    for st in body:
        if not isinstance(st, Assign):
            raise SpecError(st.mark, "a loss buffer body is assignments: `name = expression`")
        if st.target == "loss":
            raise SpecError(st.mark, "'loss' is the step's loss; assign to a new name")
        ir, kind, channels = c.folded(st.value, scope)
        if kind == "rows":
            raise SpecError(st.mark, "the loss buffer has one row for the whole step")
        if st.target in state and channels != state[st.target][1]:
            raise SpecError(st.mark, f"state '{st.target}' has {state[st.target][1]} channels; this value has {channels}")
        scope[st.target] = (kind, channels)
        out.append(("set", st.target, ir))
    if "loss_features" not in scope:
        raise SpecError(mark, "the loss buffer's body must set `loss_features` (the spec's expressions read it)")
    return NetworkIR(state, tuple(out), {"loss_features": scope["loss_features"][1]}, (), ())


def network_cost(ir: NetworkIR, shapes: dict[str, dict[str, tuple[int, ...]]]) -> tuple[int, int, int]:
    """The multiply-adds of one step of the network, from its linear and project layers
    (its body and its MLP weights), per tensor and once for the step; and the floats of
    the weights it reads. `shapes`: its weights' (group -> key -> shape)."""
    rows = {"x", *ir.state}   # (the names whose values have a row per tensor)
    read: set[tuple[str, str]] = set()

    def cost(e: tuple) -> tuple[bool, int, int]:   # (a row per tensor?, per tensor, once)
        kind = e[0]
        if kind == "var":
            return e[1] in rows, 0, 0
        if kind == "weight":
            read.add((e[1], e[2]))
        if kind in ("const", "weight", "fold", "hyper"):
            return False, 0, 0
        if kind in ("linear", "project"):
            per_row, each, once = cost(e[1])
            keys = [f"{e[3]}.weight", f"{e[3]}.bias"] if kind == "linear" else [e[3]]
            read.update((e[2], k) for k in keys)
            macs = math.prod(shapes[e[2]][keys[0]])
            return per_row, each + macs * per_row, once + macs * (not per_row)
        if kind == "over_tensors":
            return (False, *cost(e[2])[1:])
        parts = [cost(a) for a in (e[1] if kind == "concat" else e[2] if kind == "op" else
                                   [e[2]] if kind == "full" else [e[1]])]
        return any(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)

    each = once = 0
    for _, name, expr in ir.body:
        per_row, e, o = cost(expr)
        if per_row:
            rows.add(name)
        each, once = each + e, once + o
    for expr in ir.mlp:
        _, e, o = cost(expr)
        each, once = each + e, once + o
    return each, once, sum(math.prod(shapes[g][k]) for g, k in read)
