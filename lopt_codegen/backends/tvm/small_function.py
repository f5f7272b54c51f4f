"""The small work of a step as TensorIR functions: every value coarser than an element
(tensor, batch, row and col statistics, step scalars) that a consumer needs, computed
from the IR for one tensor and run over a group of same-shape tensors through a pointer
table (batched.py), in one call per group and consumer.

Consumers: after each pass that reduces, its reductions finished from the kernel's
partial sums P / Q (stages.py), in a fixed order (deterministic, as the sums themselves);
each pass's inputs (its row/col values, its scalars and its MLP's folded first layer,
W1' = W1[:, element columns] * scale and b1' = b1 + W1[:, folded columns] @ values); the
network's input; and the small accumulators' new values. A function reads:

  leaves    [columns]  per-tensor scalar leaves (hyperparameters, step, shape facts, loss
                       features, network outputs), filled by the host
  states    [channels, *small dims] the small accumulators before this step
  sums      (finish functions) the pass's partial sums
  finished  [channels, *small dims] reductions finished after earlier passes
  W1, b1    the MLP's first layer as given (shared or from the network)

Every node becomes one stage (a multi-output compute over its channels); concat and
channel are only re-indexing. The functions are shape-generic (A, X, B, Y, C and the
sums' row chunks K and lanes L are arguments), so one build serves every shape of a
tensor kind; `plain` ones are built for A = B = C = 1 (matrices, flat tensors), where a
row's or column's values are contiguous and their loops run in whole vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import tvm
from tvm import s_tir, te, tirx

from ...ir.mlp_fold import MlpFold
from ...ir.nodes import REDUCE, Level, Node, reachable, topo_order
from ...ir.program import VariantGraph
from .batched import batch_over_tensors
from .printer import F32, expanded_sizes, op_expr
from .schedule_llvm import reduction_block
from .signature import PassSignature
from .stages import _as_list, _reduce
from .view import LANES, View

LANE_SUMS = "mean_Q_lanes"   # the stage of Q's tensor means per lane (_SmallStages._lane_sums)

COLUMN_LEAVES = ("hyper", "step", "shape", "loss_features", "skip_step", "net_out")   # one value per tensor

Channel = Callable[[tuple], "tirx.PrimExpr"]   # one channel of a value, at a 5-D index


@dataclass
class SmallSignature:
    """What one small function reads and writes (no TVM object: a cached build binds
    without compile-time work). Buffers, in table order: leaves, states, sums, finished,
    then (with an MLP) W1 and b1 in, then the values, the scalars and W1', b1' out."""

    name: str                     # "finish<k>", "pass<k>", "network" or "accumulators"
    x_axis: str | None
    columns: list[Node]           # the leaves row: these nodes' channels, in order
    states: list[Node]            # small state leaves read
    sums: list[tuple[Node, int, str, int]] = field(default_factory=list)   # (reduction, channel, P|Q|M, its index)
    finished: list[tuple[Node, int, int]] = field(default_factory=list)     # (reduction, its pass, its output there)
    values: list[Node] = field(default_factory=list)
    scalars: list[Node] = field(default_factory=list)
    mlp: Node | None = None
    means_over_y: bool = False    # (finish functions) tensor means from Q, not P (PassSignature's)
    means_in_m: bool = False      # (finish functions) tensor means from M (PassSignature's)
    # Built for A = B = C = 1 (they still take all five sizes). Over any sizes, LLVM made a
    # row value's loop over X (stride B x C) gathers and scatters: VeLO's small functions
    # on GPT-2, 2.2 -> 0.6 ms a step.
    plain: bool = False

    @property
    def column_count(self) -> int:
        return sum(n.channels for n in self.columns)

    @property
    def empty(self) -> bool:
        return not (self.values or self.scalars or self.mlp is not None)


def column_leaves(graph: VariantGraph) -> list[Node]:
    """The per-tensor scalar leaves of a variant, in a fixed order (the leaves row)."""
    return [n for n in topo_order(graph.roots()) if n.op in COLUMN_LEAVES and n.level < Level.ELEMENT]


def reductions(sig: PassSignature) -> list[Node]:
    """The reductions a pass's partial sums give, each once, in order."""
    return list({id(r): r for r, _ in sig.x_sums + sig.y_sums + sig.m_sums}.values())


def is_plain(dims: tuple) -> bool:
    """Whether a tensor of view dims (A, X, B, Y, C) takes the plain small functions."""
    return dims[0] == dims[2] == dims[4] == 1


def small_signatures(graph: VariantGraph, sigs: list[PassSignature], plain: bool) -> list[SmallSignature]:
    """The small functions of a tensor kind (sigs: its pass kernels): the finish of each
    pass that reduces, each pass's inputs, the network input's and the small
    accumulators'; `plain`: SmallSignature's."""
    columns = column_leaves(graph)
    reduced_by = {id(r): (s.index, k) for s in sigs for k, r in enumerate(reductions(s))}
    out = []

    def consumer(name: str, values: list[Node], scalars: list[Node] = (), mlp: Node | None = None) -> None:
        roots = [*values, *scalars]
        if mlp is not None:
            fold = MlpFold.of(mlp)
            roots += [s for _, s, _, _ in fold.element_parts if s is not None] + [p for p, _ in fold.bias_parts]
        reached = _reached(roots)
        states = [n for n in reached if n.op == "state"]
        finished = [(r, *reduced_by[id(r)]) for r in reached if r.op in REDUCE and r.args[0].level == Level.ELEMENT]
        out.append(SmallSignature(name, sigs[0].view.x_axis, columns, states, finished=finished,
                                  values=list(values), scalars=list(scalars), mlp=mlp, plain=plain))

    for s in sigs:
        if s.x_sums or s.y_sums or s.m_sums:
            sums = [(r, c, "P", k) for k, (r, c) in enumerate(s.x_sums)]
            sums += [(r, c, "Q", k) for k, (r, c) in enumerate(s.y_sums)]
            sums += [(r, c, "M", k) for k, (r, c) in enumerate(s.m_sums)]
            out.append(SmallSignature(f"finish{s.index}", s.view.x_axis, columns, [], sums, values=reductions(s),
                                      means_over_y=s.means_over_y, means_in_m=s.means_in_m, plain=plain))
        consumer(f"pass{s.index}", s.small, s.scalar_nodes, s.mlp)
    if graph.network_input is not None:
        consumer("network", [graph.network_input])
    small_accumulators = [n for n in graph.accumulators.values() if n.level < Level.ELEMENT]
    if small_accumulators:
        consumer("accumulators", small_accumulators)
    return out


def _reached(roots: list[Node]) -> list[Node]:
    """The small nodes the roots are computed from, down to leaves and the reductions of
    element values (finished from partial sums), in a fixed order."""
    return reachable(roots, lambda n: not (n.op in REDUCE and n.args[0].level == Level.ELEMENT))


def _is_one(n) -> bool:
    return isinstance(n, int) and n == 1 or isinstance(n, tirx.IntImm) and n.value == 1


def _broadcast(index: tuple, shape) -> tuple:
    """The index into a value of `shape` read at `index` (0 on its size-1 axes)."""
    return tuple(0 if _is_one(n) else i for i, n in zip(index, shape))


def _chain(select: tirx.PrimExpr, values: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """values[select] for an index expression (all values are in-bounds reads)."""
    out = values[-1]
    for k in range(len(values) - 2, -1, -1):
        out = tirx.Select(select == k, values[k], out)
    return out


class _SmallStages:
    def __init__(self, sig: SmallSignature):
        self.sig = sig
        self.sizes = tuple(tirx.Var(n, "int32") for n in "AXBYC")   # the arguments
        one, (_, X, _, Y, _) = tirx.const(1, "int32"), self.sizes
        self.dims = (one, X, one, Y, one) if sig.plain else self.sizes
        self.K, self.L = tirx.Var("K", "int32"), tirx.Var("L", "int32")
        self.view = View((1, 1, 1, 1, 1), sig.x_axis)
        A, X, B, Y, C = self.dims
        self.leaves = te.placeholder((max(1, sig.column_count),), F32, "leaves")
        self.column, start = {}, 0   # id(leaf) -> its first column
        for n in sig.columns:
            self.column[id(n)] = start
            start += n.channels
        self.states = {id(n): te.placeholder((n.channels, *self.shape(n.level)), F32, f"state_{n.attrs[0]}")
                       for n in sig.states}
        self.sums = {}
        for r, c, kind, k in sig.sums:
            shape = {"P": (self.K, A, B, Y, C), "Q": (A, X, B, C, self.L), "M": (self.K, A, self.L)}[kind]
            self.sums[(id(r), c)] = (kind, te.placeholder(shape, F32, f"{kind}{k}"))
        self.finished = {id(r): te.placeholder((r.channels, *self.shape(r.level)), F32, f"finished{k}_pass{p}")
                         for r, p, k in sig.finished}
        self.mlp_in = []
        if sig.mlp is not None:
            sizes = sig.mlp.attrs[0]
            self.mlp_in = [te.placeholder((sizes[1], sizes[0]), F32, "W1"), te.placeholder((sizes[1],), F32, "b1")]
        self.memo: dict[int, list[Channel]] = {}
        self.stages: dict[int, tuple[Node, str]] = {}   # id(node) -> it and its elementwise stage's name
        self._tensor_sum_stages: dict[str, dict[tuple[int, int], te.Tensor]] = {}   # _tensor_sums

    def shape(self, level: Level) -> tuple:
        return self.view.small_dims(level, self.dims)

    def channels(self, node: Node) -> list[Channel]:
        got = self.memo.get(id(node))
        if got is None:
            got = self.memo[id(node)] = self._channels(node)
        return got

    def _channels(self, node: Node) -> list[Channel]:
        op = node.op
        if op == "const":
            return [lambda i, v=v: tirx.const(float(v), F32) for v in node.attrs]
        if op in COLUMN_LEAVES:
            start = self.column[id(node)]
            return [lambda i, k=start + c: self.leaves[k] for c in range(node.channels)]
        if op == "state" or id(node) in self.finished:
            buf = self.states[id(node)] if op == "state" else self.finished[id(node)]
            return [lambda i, c=c: buf[(c, *_broadcast(i, buf.shape[1:]))] for c in range(node.channels)]
        if op == "concat":
            return [f for a in node.args for f in self.channels(a)]
        if op == "channel":
            return [self.channels(node.args[0])[node.attrs[0]]]
        if op in REDUCE:
            return self._finished(node) if node.args[0].level == Level.ELEMENT else self._reduction(node)
        args = [self.channels(a) for a in node.args]

        def compute(*i):
            return [op_expr(op, [a[c if len(a) > 1 else 0](i) for a in args]) for c in range(node.channels)]
        name = f"{op}_{node.level.label}{len(self.stages)}"   # (unique: inlined by name)
        self.stages[id(node)] = (node, name)
        return self._loads(te.compute(self.shape(node.level), compute, name=name))

    @staticmethod
    def _loads(stage, scale: tirx.PrimExpr | None = None) -> list[Channel]:
        """Each output of a stage as a channel (divided by `scale`: a mean's count)."""
        def load(t: te.Tensor) -> Channel:
            return lambda i: t[_broadcast(i, t.shape)] if scale is None else t[_broadcast(i, t.shape)] / scale
        return [load(t) for t in _as_list(stage)]

    def inlined(self) -> set[str]:
        """The blocks of the elementwise stages to inline into the stages that read them
        (a block a channel: te names them <stage>_v<channel>): those whose expression,
        with its producers inlined, stays under printer.EXPANDED_LIMIT (one that would not
        keeps its stage, so no expression grows without bound where a value is read many
        times)."""
        def is_read(node: Node) -> bool:   # (concat, channel: their args' channels themselves)
            return id(node) not in self.stages and node.op not in ("concat", "channel")
        kept = {id(n) for n in expanded_sizes([node for node, _ in self.stages.values()], is_read)[1]}
        names = set()
        for key, (node, name) in self.stages.items():
            if key not in kept:
                names.update([name] if node.channels == 1 else [f"{name}_v{c}" for c in range(node.channels)])
        return names

    def _reduction(self, node: Node) -> list[Channel]:
        """A mean of a small value over the axes its result lacks (none: itself)."""
        arg = node.args[0]
        inner, outer = self.shape(arg.level), self.shape(node.level)
        axes = {k: te.reduce_axis((0, inner[k]), f"r{k}") for k in range(5) if not _is_one(inner[k]) and _is_one(outer[k])}
        if not axes:
            return self.channels(arg)
        count = 1
        for k in axes:
            count = count * inner[k]
        values = self.channels(arg)
        stage = te.compute(outer, lambda *i: _reduce([f(tuple(axes.get(k, i[k]) for k in range(5))) for f in values],
                                                     list(axes.values())), name=f"{node.op}_{arg.level.label}")
        return self._loads(stage, count.astype(F32))

    def _finished(self, node: Node) -> list[Channel]:
        """A mean of element values from the partial sums of the pass that reduced it:
        P[k, a, b, y, c] (sums over row chunk k of X), Q[a, x, b, c, l] (lane l's sums over Y);
        a tensor mean from either, or from M[k, a, l], all summed."""
        A, X, B, Y, C = self.dims
        out = []
        for c in range(node.channels):
            kind, buf = self.sums[(id(node), c)]
            if node.op == "mean":
                count = A.astype("int64") * X * B * Y * C
                out += self._loads(self._tensor_sums(kind)[(id(node), c)], count.astype(F32))
                continue
            if kind == "P":
                k = te.reduce_axis((0, self.K), "k")
                count = X
                stage = te.compute(self.shape(node.level), lambda a, x, b, y, cc: te.sum(buf[k, a, b, y, cc], k),
                                   name="mean_X")
            else:
                lane = te.reduce_axis((0, self.L), "l")
                count = Y
                stage = te.compute(self.shape(node.level), lambda a, x, b, y, cc: te.sum(buf[a, x, b, cc, lane], lane),
                                   name="mean_Y")
            out += self._loads(stage, count.astype(F32))
        return out

    def _tensor_sums(self, kind: str) -> dict[tuple[int, int], te.Tensor]:
        """The sums of every tensor mean's partial sums P (or Q), by (reduction, channel), in
        one stage: a loop whose sums are independent, so the CPU overlaps their additions.
        (A loop each is a chain of dependent additions: VeLO's finish0 over 6 tensors of
        384x1536, 16 such means, took 2.4 ms.) Each sum's order is the same either way."""
        if kind not in self._tensor_sum_stages:
            keys = [(id(r), c) for r, c, k, _ in self.sig.sums if k == kind and r.op == "mean"]
            if kind == "Q" and self.sig.means_over_y:
                stage = self._lane_sums(keys)
            else:
                A, X, B, Y, C = self.dims
                extents = {"P": (self.K, A, B, Y, C), "Q": (A, X, B, C, self.L), "M": (self.K, A, self.L)}[kind]
                r = [te.reduce_axis((0, n), f"r{k}") for k, n in enumerate(extents)]
                stage = te.compute((1, 1, 1, 1, 1), lambda *_: _reduce([self.sums[key][1][tuple(r)] for key in keys],
                                                                      r), name=f"mean_{kind}")
            self._tensor_sum_stages[kind] = dict(zip(keys, _as_list(stage)))
        return self._tensor_sum_stages[kind]

    @property
    def lane_sums(self) -> bool:
        """Whether the outputs took Q's tensor means per lane (LANE_SUMS; after arguments())."""
        return self.sig.means_over_y and "Q" in self._tensor_sum_stages

    def _lane_sums(self, keys: list[tuple[int, int]]) -> te.Tensor | tuple:
        """Tensor means from Q where its lanes are LANES (PassSignature.means_over_y): each
        lane summed over the rows (LANE_SUMS, vectorized by build_small_function), then the
        lanes in order."""
        A, X, B, _, C = self.dims
        r = [te.reduce_axis((0, n), f"r{k}") for k, n in enumerate((A, X, B, C))]
        lanes = _as_list(te.compute((LANES,), lambda l: _reduce([self.sums[key][1][(*r, l)] for key in keys], r),
                                    name=LANE_SUMS))
        lane = te.reduce_axis((0, LANES), "lane")
        return te.compute((1, 1, 1, 1, 1), lambda *_: _reduce([x[lane] for x in lanes], lane), name="mean_Q")

    # --- outputs ---------------------------------------------------------------------
    def value(self, node: Node, k: int) -> te.Tensor:
        values = self.channels(node)
        return te.compute((node.channels, *self.shape(node.level)),
                          lambda c, *i: _chain(c, [f(i) for f in values]), name=f"value{k}")

    def scalars(self) -> te.Tensor:
        values = [f((0,) * 5) for n in self.sig.scalars for f in self.channels(n)]
        return te.compute((len(values),), lambda j: _chain(j, values), name="scalars")

    def folded_mlp(self) -> list[te.Tensor]:
        """W1' [H, features], b1' [H] (MlpFold), as the apply pass takes them."""
        fold = MlpFold.of(self.sig.mlp)
        w1, b1 = self.mlp_in
        H = w1.shape[0]

        # Each feature's column of W1 and its scale, once a tensor; an entry of W1' is then
        # a load and a multiply. (The entry as a chain of Selects over the parts, which LLVM
        # made masked gathers at every entry: small_fc_lopt's pass-2 function on 200 small
        # tensors 0.87 -> 0.60 ms.)
        columns, scales = [], []
        for _, scale, col, ch in fold.element_parts:
            values = [g((0,) * 5) for g in self.channels(scale)] if scale is not None else [tirx.const(1.0, F32)]
            columns += [tirx.const(col + j, "int32") for j in range(ch)]
            scales += [values[j if len(values) > 1 else 0] for j in range(ch)]
        scale_of = te.compute((fold.features,), lambda f: _chain(f, scales), name="W1_scales")

        def column(h, f):
            return w1[h, _chain(f, columns)] * scale_of[f]

        def bias(h):
            out = b1[h]
            for part, col in fold.bias_parts:
                values = self.channels(part)
                total = w1[h, col] * values[0]((0,) * 5)
                for j in range(1, part.channels):
                    total = total + w1[h, col + j] * values[j]((0,) * 5)
                out = out + total
            return out
        return [te.compute((H, fold.features), column, name="W1_folded"), te.compute((H,), bias, name="b1_folded")]

    def arguments(self) -> list[te.Tensor]:
        sig = self.sig
        outputs = [self.value(n, k) for k, n in enumerate(sig.values)]
        if sig.scalars:
            outputs.append(self.scalars())
        if sig.mlp is not None:
            outputs += self.folded_mlp()
        return [self.leaves, *self.states.values(), *(b for _, b in self.sums.values()), *self.finished.values(),
                *self.mlp_in, *outputs]


def build_small_function(sig: SmallSignature) -> tirx.PrimFunc:
    """The small function over a group: main(table[tensors, buffers], A, X, B, Y, C, K, L),
    the loop over the tensors parallel."""
    stages = _SmallStages(sig)
    sizes = [*stages.sizes, stages.K, stages.L]
    func = te.create_prim_func(stages.arguments())
    func = _long_axis_innermost(_inlined(func, sizes, stages.inlined()), sizes)
    if stages.lane_sums:
        func = _vectorized_lane_sums(func, sizes)
    return batch_over_tensors(func, parallel=True, shape_vars=sizes)


def _inlined(func: tirx.PrimFunc, sizes: list[tirx.Var], names: set[str]) -> tirx.PrimFunc:
    """The stages `names` inlined into the stages that read them (consumers first). Each
    stage wrote a buffer of its value for every row (and column) of the tensor, which
    the next read back: VeLO's small work on ResNet-18's convolutions, whose rows are X x
    C, took 5.2 ms of a 46 ms step; inlined, 2.3. (Inlining copies a Let into each
    reader: ConvertSSA names the copies apart.)"""
    sch = s_tir.Schedule(tirx.PrimFunc([*func.params, *sizes], func.body, attrs=func.attrs))
    for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))):
        if sch.get(block).name_hint in names:
            sch.compute_inline(block)
    inlined = tirx.PrimFunc(list(func.params), sch.mod["main"].body, attrs=func.attrs)
    return tirx.transform.ConvertSSA()(tvm.IRModule({"main": inlined}))["main"]


def _long_axis_innermost(func: tirx.PrimFunc, sizes: list[tirx.Var]) -> tirx.PrimFunc:
    """Each stage's loop over X (a row value's) or Y (a column value's) innermost, where
    te's order puts it outside the loops over B and C (mostly of one step): an inner loop
    LLVM can vectorize. On GPT-2's matrices, one thread: VeLO's pass-2 function 2.86 ->
    1.44 ms, pass-1 1.20 -> 0.59, accumulators 0.79 -> 0.41. Not the partial sums' stages
    (a sum over their chunks K or lanes L: 0.45 -> 0.47 ms in VeLO's finish0)."""
    _, X, _, Y, _, K, L = sizes
    sch = s_tir.Schedule(tirx.PrimFunc([*func.params, *sizes], func.body, attrs=func.attrs))
    extent = lambda loop, of: any(sch.get(loop).extent.same_as(v) for v in of)  # noqa: E731
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        long = [loop for loop in loops if extent(loop, (X, Y))]
        if len(long) == 1 and not loops[-1].same_as(long[0]) and not any(extent(loop, (K, L)) for loop in loops):
            try:
                sch.reorder(*[loop for loop in loops if not loop.same_as(long[0])], long[0])
            except s_tir.ScheduleError:   # (a stage the schedule cannot reorder runs as te made it)
                continue
    return tirx.PrimFunc(list(func.params), sch.mod["main"].body, attrs=func.attrs)


def _vectorized_lane_sums(func: tirx.PrimFunc, sizes: list[tirx.Var]) -> tirx.PrimFunc:
    """LANE_SUMS with its lanes innermost, as one vector: a vector add per row and channel.
    (Scheduled with the sizes as parameters, which a schedule needs defined; then without,
    as batch_over_tensors takes a function of buffers.)"""
    buffers = list(func.params)
    sch = s_tir.Schedule(tirx.PrimFunc([*buffers, *sizes], func.body, attrs=func.attrs))
    blk = reduction_block(sch, LANE_SUMS)
    lane, *rows = sch.get_loops(blk)
    sch.reorder(*rows, lane)
    sch.vectorize(lane)
    sch.decompose_reduction(blk, rows[0])   # after vectorize (TVM_NOTES.md)
    return tirx.PrimFunc(buffers, sch.mod["main"].body, attrs=func.attrs)
