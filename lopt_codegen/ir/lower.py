"""Spec -> Program: resolve names, inline functions, check levels and channels, and
build one interned dataflow graph per tensor variant (factored / unfactored)."""
from __future__ import annotations

import hashlib

from ..spec.errors import Mark, SpecError
from ..spec.expr import Call, Expr, Name, Num, whole_number
from ..spec.model import Route, Spec, Variants
from ..spec.names import BUILTIN_NAMES, FUNCTIONS, PARAMETER_VALUES, SHAPE_FACTS
from .nodes import BINARY, REDUCE, UNARY, Graph, Level, Node, join, reduced_level, topo_order
from .program import VARIANTS, MlpInfo, Program, VariantGraph, mlp_weight_shapes, variant_name
from .scratch import scratch_values
from .network import NetworkIR, check_loss_buffer, check_network
from .tensor_function import FunctionIR, check_call
from .validate_weights import check_weight_layout, group_shapes

# sum(x) is mean(x) times a count: the backends reduce only means.
_SUMS = {"sum": ("mean", "numel"), "sum_d0": ("mean_d0", "size_d0"), "sum_d1": ("mean_d1", "size_d1")}


class _Lowerer:
    """Lowers the expressions of one spec for one variant into one Graph."""

    def __init__(self, spec: Spec, variant: str, graph: Graph, pending: frozenset[str] = frozenset(),
                 layouts: dict[tuple, tuple[Level, int]] | None = None):
        self.spec, self.variant, self.g = spec, variant, graph
        self.resolved: dict[str, Node] = {}
        self.resolving: list[str] = []
        self.inlining: list[str] = []   # the spec's functions being inlined, outermost first
        self.mlp_outputs: dict[str, Node] | None = None
        self.states: dict[str, Node] = {}
        self.tensor_functions: dict[str, FunctionIR] = {}
        self.network: NetworkIR | None = None
        self.loss: NetworkIR | None = None
        self._network_inputs: list[Node] | None = None
        # Accumulators whose state layout a trial lowering is inferring (state_node):
        # their old value stands in as a step-level placeholder.
        self.pending = pending
        self.layouts = {} if layouts is None else layouts   # (name, pending) -> the state's (level, channels)

    # --- node construction with level/channel rules -------------------------------
    def const(self, values: tuple[float, ...]) -> Node:
        return self.g.make("const", (), values, Level.STEP, len(values))

    def op(self, name: str, args: tuple[Node, ...], mark: Mark) -> Node:
        if name == "pow" and _constant(args[0]) is None:
            reduced = self.cheaper_power(args[0], _constant(args[1]), mark)
            if reduced is not None:
                return reduced
        channels = 1
        for a in args:
            if a.channels != 1 and channels not in (1, a.channels):
                detail = ", ".join(str(x.channels) for x in args)
                raise SpecError(mark, f"channel mismatch in {name}: operands have {detail} channels; "
                                "channels broadcast only when equal or 1")
            channels = max(channels, a.channels)
        level = Level.STEP
        for a in args:
            level = join(level, a.level)
        return self.g.make(name, args, (), level, channels)

    def cheaper_power(self, x: Node, exponent: float | None, mark: Mark) -> Node | None:
        """x ** exponent without pow where the exponent is one of the usual few: the CPU
        kernels call libm's powf a lane at a time (small_fc_lopt's `(fr + 1e-6) ** -0.5`:
        48 calls per 16 elements; its first pass on tensors of rank < 2 took 5x the time),
        where rsqrt, sqrt, a multiply or a divide are vector instructions."""
        if exponent == 0.5:
            return self.op("sqrt", (x,), mark)
        if exponent == -0.5:
            return self.op("rsqrt", (x,), mark)
        if exponent == 1.0:
            return x
        if exponent == 2.0:
            return self.op("mul", (x, x), mark)
        if exponent == -1.0:
            return self.op("div", (self.const((1.0,)), x), mark)
        return None

    def reduce(self, name: str, arg: Node, mark: Mark) -> Node:
        if REDUCE[name] is not None and self.variant == "unfactored" and arg.level > Level.TENSOR:
            raise SpecError(mark, f"{name} needs a factored tensor (rank >= 2), but this expression is "
                            "also used for tensors of rank < 2; give it `factored:` and `unfactored:` variants")
        return self.g.make(name, (arg,), (), reduced_level(name, arg.level), arg.channels)

    # --- names ---------------------------------------------------------------------
    def name(self, expr: Name, scope: dict[str, Node]) -> Node:
        n = expr.name
        if n in scope:
            return scope[n]
        if n in self.resolved:
            return self.resolved[n]
        if n in self.resolving:
            cycle = " -> ".join(self.resolving[self.resolving.index(n):] + [n])
            raise SpecError(expr.mark, f"cycle in definitions: {cycle}")
        self.resolving.append(n)
        try:
            node = self._resolve(expr)
        finally:
            self.resolving.pop()
        self.resolved[n] = node
        return node

    def _resolve(self, expr: Name) -> Node:
        n, spec = expr.name, self.spec
        if n == "grad":
            raw = self.g.make("grad", (), (), Level.ELEMENT, 1)
            # Under `skip` the values of a skipped step are thrown away; zeroed, they stay finite.
            return self.op("zero_nonfinite", (raw,), expr.mark) if spec.nonfinite in ("zero", "skip") else raw
        if n == "g":
            return self.single(self.lower(spec.grad), spec.grad.mark, "the gradient expression")
        if n == "p":
            return self.g.make("param", (), (), Level.ELEMENT, 1)
        if n == "t":
            return self.g.make("step", (), (), Level.STEP, 1)
        if n in SHAPE_FACTS:
            if n in ("size_d0", "size_d1") and self.variant == "unfactored":
                raise SpecError(expr.mark, f"{n} is the size of a factored axis, but this expression is also "
                                "used for unfactored tensors; give it `factored:` and `unfactored:` variants")
            return self.shape_fact((n,))
        if n in PARAMETER_VALUES:   # per tensor, filled in by the runtime like a group value
            return self.g.make("hyper", (), (n,), Level.STEP, 1)
        if n == "loss_features":
            if spec.loss_buffer is None:
                raise SpecError(expr.mark, "loss_features needs a `loss_buffer` section")
            return self.g.make("loss_features", (), (), Level.STEP, self.loss_ir().outputs["loss_features"])
        if n in spec.hyperparameters:
            return self.g.make("hyper", (), (n,), Level.STEP, 1)
        if n in spec.accumulators:
            return self.accumulator(n, expr.mark)
        if n in spec.derived:
            return self.lower(self.pick(spec.derived[n], n, expr.mark))
        if spec.mlp is not None and n in spec.mlp.outputs:
            return self.mlp_output(n)
        if spec.network is not None and n in spec.network.outputs:
            if self.network is None and self._network_inputs is not None:
                raise SpecError(expr.mark, f"'{n}' is an output of the network, which its own inputs cannot read")
            return self.g.make("net_out", (), (n,), Level.TENSOR, self.network_ir().outputs[n])
        raise SpecError(expr.mark, f"unknown name '{n}'; known names: {', '.join(self.known_names())}")

    def known_names(self) -> list[str]:
        spec = self.spec
        names = [*BUILTIN_NAMES, *spec.hyperparameters, *spec.accumulators, *spec.derived,
                 *(spec.mlp.outputs if spec.mlp is not None else ())]
        if spec.network is not None:
            names += list(spec.network.outputs)
        return names

    def pick(self, variants: Variants, name: str, mark: Mark) -> Expr:
        expr = variants.get(self.variant)
        if expr is None:
            rank = "rank >= 2" if self.variant == "factored" else "rank < 2"
            raise SpecError(mark, f"'{name}' has no `{self.variant}` variant, but it is used for "
                            f"{self.variant} tensors ({rank}); define one at {variants.mark}")
        return expr

    def single(self, node: Node, mark: Mark, what: str) -> Node:
        if node.channels != 1:
            raise SpecError(mark, f"{what} must have 1 channel, it has {node.channels}")
        return node

    def shape_fact(self, fact: tuple) -> Node:
        return self.g.make("shape", (), fact, Level.TENSOR, 1)

    # --- accumulators, MLP ---------------------------------------------------------
    def state_node(self, name: str, mark: Mark) -> Node:
        """The accumulator's value before this step. Its level and channels are those of
        its rule, found by a trial lowering in which this old value is a step-level
        placeholder (a rule may read it: `momentum * prev(buf) + g`); at least one value
        per tensor, since state is kept per tensor."""
        if name in self.pending:
            return self.g.make("state", (), (name,), Level.STEP, 1)
        if name not in self.states:
            key = (name, self.pending)
            if key not in self.layouts:   # shared by the trials: each (name, pending) once
                acc = self.spec.accumulators[name]
                trial = _Lowerer(self.spec, self.variant, Graph(), self.pending | {name}, self.layouts)
                rule = trial.lower(self.pick(acc.rule, name, mark))
                channels = len(acc.decays) if acc.ema is not None else rule.channels
                self.layouts[key] = (max(rule.level, Level.TENSOR), channels)
            self.states[name] = self.g.make("state", (), (name,), *self.layouts[key])
        return self.states[name]

    def accumulator(self, name: str, mark: Mark) -> Node:
        """The accumulator's value after this step (its old value on a skipped step)."""
        state = self.state_node(name, mark)
        if name in self.pending:
            return state
        return self.unless_skipped(state, self.updated(name, state, mark), mark)

    def unless_skipped(self, old: Node, new: Node, mark: Mark) -> Node:
        """`new`, or under grad.nonfinite: skip, `old` on a step that is skipped."""
        if self.spec.nonfinite != "skip":
            return new
        return self.op("where", (self.g.make("skip_step", (), (), Level.STEP, 1), old, new), mark)

    def updated(self, name: str, state: Node, mark: Mark) -> Node:
        acc = self.spec.accumulators[name]
        if acc.update is not None:
            new = self.lower(self.pick(acc.update, name, mark))
            if new is state:
                raise SpecError(acc.update.mark, f"the update of '{name}' is prev({name}): it never changes")
            if new.level > state.level or new.channels not in (1, state.channels):
                raise SpecError(acc.update.mark, f"the update of '{name}' is {new.level.label}-level with "
                                f"{new.channels} channel(s), but its old value is {state.level.label}-level with "
                                f"{state.channels}: accumulators that read each other's old values must agree")
            return new
        x = self.lower(self.pick(acc.ema, name, mark))
        decays = []
        for d in acc.decays:
            node = self.single(self.lower(d), d.mark, "a decay")
            if node.level != Level.STEP:
                raise SpecError(d.mark, "a decay must be a number or depend only on hyperparameters and t")
            value = _constant(node)
            if value is not None and not 0.0 <= value <= 1.0:
                raise SpecError(d.mark, f"a decay is between 0 and 1 (acc <- b acc + (1 - b) x); this one is {value:g}")
            decays.append(node)
        k = len(decays)
        if x.channels not in (1, k):
            raise SpecError(acc.ema.mark, f"accumulator '{name}' has {k} decays but its expression has "
                            f"{x.channels} channels; expected 1 or {k}")
        decay = decays[0] if k == 1 else self.g.make("concat", tuple(decays), (), Level.STEP, k)
        one = self.const((1.0,))
        return self.op("add", (self.op("mul", (decay, state), mark),
                               self.op("mul", (self.op("sub", (one, decay), mark), x), mark)), mark)

    def mlp_output(self, name: str) -> Node:
        if self.mlp_outputs is None:
            self.mlp_outputs = {}  # set before lowering features: a use inside them is a cycle
            spec = self.spec
            feats = []
            eps = self.const((spec.norm_eps,))
            for e in spec.normalized:
                x = self.lower(e)
                square = self.op("mul", (x, x), e.mark)
                if spec.normalize_over == "factored_axes" and self.variant == "factored":
                    second_moment = self.reduce("mean_d0", self.reduce("mean_d1", square, e.mark), e.mark)
                else:
                    second_moment = self.reduce("mean", square, e.mark)
                feats.append(self.op("mul", (x, self.op("rsqrt", (self.op("add", (second_moment, eps), e.mark),),
                                                        e.mark)), e.mark))
            feats += [self.lower(e) for e in spec.raw_features]
            total = sum(f.channels for f in feats)
            if total != spec.mlp.sizes[0]:
                raise SpecError(spec.mlp.mark, f"the features have {total} channels but mlp.sizes[0] is "
                                f"{spec.mlp.sizes[0]}")
            inputs = self.g.make("concat", tuple(feats), (), Level.ELEMENT, total)
            out = self.g.make("mlp", (inputs,), (spec.mlp.sizes, spec.mlp.activation), Level.ELEMENT,
                              spec.mlp.sizes[-1])
            for i, o in enumerate(spec.mlp.outputs):
                self.mlp_outputs[o] = self.g.make("channel", (out,), (i,), Level.ELEMENT, 1)
        if name not in self.mlp_outputs:
            raise SpecError(self.spec.mlp.mark, f"the MLP output '{name}' is used by its own features")
        return self.mlp_outputs[name]

    # --- expressions ---------------------------------------------------------------
    def lower(self, expr: Expr, scope: dict[str, Node] | None = None) -> Node:
        scope = scope or {}
        if isinstance(expr, Num):
            return self.const(expr.values)
        if isinstance(expr, Name):
            return self.name(expr, scope)
        assert isinstance(expr, Call)
        f = expr.func
        if f in self.spec.functions:
            fn = self.spec.functions[f]
            self.arity(expr, len(fn.args))
            args = {a: self.lower(x, scope) for a, x in zip(fn.args, expr.args)}
            if f in self.inlining:
                chain = " -> ".join([*self.inlining[self.inlining.index(f):], f])
                raise SpecError(expr.mark, f"function '{f}' calls itself ({chain}): functions are inlined where "
                                "they are called, so they cannot recurse")
            self.inlining.append(f)
            try:
                return self.lower(fn.body, args)
            finally:
                self.inlining.pop()
        if f in self.spec.tensor_functions:
            return self.tensor_call(expr, scope)
        if f not in FUNCTIONS and f not in UNARY | BINARY:
            known = sorted(set(FUNCTIONS) | set(self.spec.functions))
            raise SpecError(expr.mark, f"unknown function '{f}'; known functions: {', '.join(known)}")
        if f in FUNCTIONS:
            self.arity(expr, FUNCTIONS[f].arity)
        if f == "prev":
            arg = expr.args[0]
            if not (isinstance(arg, Name) and arg.name in self.spec.accumulators):
                raise SpecError(expr.mark, f"prev() takes an accumulator name "
                                f"({', '.join(self.spec.accumulators) or 'this spec has none'})")
            return self.state_node(arg.name, arg.mark)
        if f == "size":
            return self.shape_fact(("size", self.axis_index(expr.args[0])))
        if f == "channel":
            x, k = self.lower(expr.args[0], scope), whole_number(expr.args[1])
            if k is None or not 0 <= k < x.channels:
                raise SpecError(expr.args[1].mark, f"channel(x, k): k is a whole number from 0 to {x.channels - 1} "
                                f"(x has {x.channels} channel{'s' if x.channels != 1 else ''})")
            return x if x.channels == 1 else self.g.make("channel", (x,), (k,), x.level, 1)
        args = tuple(self.lower(a, scope) for a in expr.args)
        if f in REDUCE:
            return self.reduce(f, args[0], expr.mark)
        if f in _SUMS:
            mean, count = _SUMS[f]
            return self.op("mul", (self.reduce(mean, args[0], expr.mark),
                                   self.name(Name(expr.mark, count), {})), expr.mark)
        if f == "clip":
            return self.op("min", (self.op("max", args[:2], expr.mark), args[2]), expr.mark)
        return self.op(f, args, expr.mark)

    def tensor_call(self, expr: Call, scope: dict[str, Node]) -> Node:
        """A call of a tensor function: a `call` node, element-level when the function
        returns a parameter-shaped value, else tensor-level."""
        fn = self.spec.tensor_functions[expr.func]
        self.arity(expr, len(fn.args))
        args, kinds = [], []
        for e in expr.args:
            node = self.single(self.lower(e, scope), e.mark, "a tensor function's argument")
            if node.level not in (Level.ELEMENT, Level.TENSOR, Level.STEP):
                raise SpecError(e.mark, f"a tensor function takes parameter-shaped values and single numbers "
                                f"per tensor; this argument is {node.level.label}-level")
            args.append(node)
            kinds.append("element" if node.level == Level.ELEMENT else "scalar")
        ir, kind = check_call(fn, tuple(kinds), set(self.spec.hyperparameters), self.variant == "factored")
        self.tensor_functions[fn.name] = ir
        level = Level.ELEMENT if kind == "element" else Level.TENSOR
        return self.g.make("call", tuple(args), (fn.name,), level, 1)

    def axis_index(self, arg: Expr) -> int:
        axis = whole_number(arg)
        if axis is None:
            raise SpecError(arg.mark, "size() takes an axis number, e.g. size(0) or size(-1)")
        return axis

    def arity(self, expr: Call, n: int) -> None:
        if len(expr.args) != n:
            raise SpecError(expr.mark, f"{expr.func}() takes {n} argument{'s' if n != 1 else ''}, "
                            f"got {len(expr.args)}")

    # --- the whole step ------------------------------------------------------------
    def build(self) -> VariantGraph:
        spec = self.spec
        accs = {}
        for name, acc in spec.accumulators.items():
            if acc.rule.get(self.variant) is not None:
                accs[name] = self.name(Name(acc.mark, name), {})
        step = self.single(self.lower(spec.step), spec.step.mark, "update.step")
        p, lr, wd = (self.name(Name(spec.step.mark, n), {}) for n in ("p", "lr", "weight_decay"))
        m = spec.step.mark
        if spec.lr_scale is not None:   # this tensor's learning rate, for the step and the decay
            scale = self.single(self.lower(spec.lr_scale), spec.lr_scale.mark, "update.lr_scale")
            if scale.level > Level.TENSOR:
                raise SpecError(spec.lr_scale.mark, "update.lr_scale is one value per tensor; reduce it with mean()")
            lr = self.op("mul", (lr, scale), m)
        if spec.weight_decay == "after_step":
            p1 = self.op("sub", (p, self.op("mul", (lr, step), m)), m)
            new_p = self.op("sub", (p1, self.op("mul", (self.op("mul", (lr, wd), m), p1), m)), m)
        elif spec.weight_decay == "decoupled":
            new_p = self.op("sub", (p, self.op("mul", (lr, self.op("add", (step, self.op("mul", (wd, p), m)), m)), m)), m)
        else:
            new_p = self.op("sub", (p, self.op("mul", (lr, step), m)), m)
        new_p = self.unless_skipped(p, new_p, m)
        network_input = None
        if spec.network is not None:
            network_input = self.network_input()
            self.network_ir()
        if spec.loss_buffer is not None:
            self.loss_ir()
        graph = VariantGraph(accs, new_p, network_input)
        return VariantGraph({**accs, **scratch_values(graph)}, new_p, network_input)

    def network_input(self) -> Node:
        if self._network_inputs is None:
            self._network_inputs = []   # set first: an output read by the inputs is a cycle
            parts = []
            for e in self.spec.network.inputs:
                node = self.lower(e)
                if node.level > Level.TENSOR:
                    raise SpecError(e.mark, f"a network input must be one value per tensor, but this one is "
                                    f"{node.level.label}-level; reduce it with mean()")
                parts.append(node)
            self._network_inputs = parts
        parts = self._network_inputs
        return self.g.make("concat", tuple(parts), (), Level.TENSOR, sum(x.channels for x in parts))

    def network_ir(self) -> NetworkIR:
        """The network, checked against its input width and the weights it reads."""
        if self.network is None:
            spec = self.spec
            mlp = spec.mlp
            mlp_shapes = None if mlp is None or mlp.weight_group is not None else mlp_weight_shapes(mlp.sizes)
            width = self.network_input().channels
            self.network = check_network(spec.network, width, self.weight_shapes, mlp_shapes)
        return self.network

    def loss_ir(self) -> NetworkIR:
        if self.loss is None:
            lb = self.spec.loss_buffer
            self.loss = check_loss_buffer(lb.state, lb.body, lb.mark, set(self.spec.hyperparameters))
        return self.loss

    def weight_shapes(self, group: str, mark: Mark) -> dict[str, tuple[int, ...]]:
        if group not in self.spec.weights.groups:
            raise SpecError(mark, f"weight group '{group}' is not declared under weights.groups "
                            f"(declared: {', '.join(self.spec.weights.groups) or 'none'})")
        return group_shapes(self.spec, group, self.spec.marks.get("weights", mark))


_ROUTE_LEAVES = {"const", "hyper", "shape"}


_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "min": min, "max": max}


def _constant(node: Node) -> float | None:
    """The value of a one-channel node built from numbers and arithmetic alone, else None."""
    try:
        if node.op == "const" and node.channels == 1:
            return float(node.attrs[0])
        if node.op == "neg":
            value = _constant(node.args[0])
            return None if value is None else -value
        if node.op in _FOLD:
            a, b = (_constant(x) for x in node.args)
            return None if a is None or b is None else float(_FOLD[node.op](a, b))
    except (ArithmeticError, ValueError, TypeError):
        return None
    return None


def _route_test(spec: Spec, route: Route, graph: Graph) -> Node | None:
    """A route's `when`: one value per tensor from its shape, per-group values and numbers."""
    if route.when is None:
        return None
    lowerer = _Lowerer(spec, "unfactored", graph)
    try:
        node = lowerer.single(lowerer.lower(route.when), route.when.mark, f"routes.{route.name}.when")
    except SpecError as exc:   # said for expressions with variants, which a `when` has not
        if "factored" in exc.message:
            raise SpecError(exc.mark, f"routes.{route.name}.when is decided before a tensor is factored: use "
                            "ndim, numel, size(k) instead of factored-axis values") from None
        raise
    for n in topo_order([node]):
        if not n.args and n.op not in _ROUTE_LEAVES:
            raise SpecError(route.when.mark, f"routes.{route.name}.when decides by the shape (ndim, numel, "
                            "size(k), fan_in...), hyperparameters (flags set per param group) and numbers; "
                            f"it reads {n.op}")
    return node


def lower_spec(spec: Spec) -> Program:
    """Lower a validated spec to its Program, checking everything a spec can get wrong."""
    check_weight_layout(spec)
    variants, state_levels, tensor_functions = {}, {}, {}
    network = loss = None
    graph = Graph()  # shared, so work common to variants and routes is one node
    for route in spec.routes or (None,):
        for v in VARIANTS:
            if v == "factored" and spec.factored_axes is None:
                continue  # without a factored-axes rule every tensor is unfactored
            lowerer = _Lowerer(route.spec if route else spec, v, graph)
            key = variant_name(route.name if route else None, v)
            variants[key] = variant = lowerer.build()
            tensor_functions.update(lowerer.tensor_functions)
            if network is not None and lowerer.network != network:
                raise SpecError(spec.network.mark, f"the network's inputs differ between kinds of tensors ({key} "
                                "has other channels): every tensor gives the network the same row")
            network = network or lowerer.network
            loss = loss or lowerer.loss
            for name, node in variant.accumulators.items():
                state = lowerer.states.get(name, node)   # a scratch value's own layout
                state_levels.setdefault(name, {})[key] = (state.level, state.channels)
    routes = tuple((r.name, _route_test(spec, r, graph)) for r in spec.routes)
    return Program(
        name=spec.name, class_name=spec.class_name, description=spec.description,
        spec_sha256=hashlib.sha256(spec.source.encode()).hexdigest(),
        hyperparameters=dict(spec.hyperparameters), factored_axes=spec.factored_axes,
        variants=variants, state_levels=state_levels, tensor_functions=tensor_functions, routes=routes,
        mlp=None if spec.mlp is None else MlpInfo(spec.mlp.sizes, spec.mlp.activation, spec.mlp.outputs,
                                                  spec.mlp.weight_group, spec.mlp.layers),
        network=network,
        loss_buffer=loss,
        weight_groups=spec.weights.groups, weight_ignore=spec.weights.ignore, weight_layouts=spec.weights.layouts,
        builtin_weights=spec.weights.builtin, weight_hub=dict(spec.weights.hub),
    )
