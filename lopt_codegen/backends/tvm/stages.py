"""The TensorIR function of one pass, built from its signature with TE stages:

  P  partial sums over axis X (tensor means and the row/col means over X):
     P[t, a, b, y, c] = sum of the element values over row chunk t of X
  Q  partial sums over axis Y: Q[a, x, b, c, l] = sum over q of e(a, x, b, q*L + l, c)
  M  (CPU) tensor means: M[t, a, l] = sum over row chunk t of X, b, c and q of
     e(a, x, b, q*L + l, c)
  E  every element value the pass stores (accumulators, the new parameter), computed
     together into per-tile buffers, then
  O  stored into the outputs.
On the GPU, E and O index the elements flat, in two kernels: E over the whole tiles of
THREADS elements (no bounds checks) and T over the tail (batched.py offsets its pointers).
The partials are finished in a fixed order (deterministic, no atomics). Outputs
alias inputs (in place); that is safe because P, Q and M run before E, and each tile of E
reads all it needs before O writes that tile.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import tvm_ffi
from tvm import te, tirx

from ...ir.mlp_fold import MlpFold
from ...ir.nodes import LEAVES, Level, Node, topo_order
from .batched import OPAQUE_ZERO
from .mlp_stages import AlongAxes, build_mlp_stages
from .printer import F32, ElementPrinter, expanded_sizes
from .signature import PassSignature
from .view import LANES, ROW_LANES, ROWS_PER_BLOCK, THREADS, WARP, padded


@dataclass
class PassFunction:
    func: tirx.PrimFunc
    has_p: bool
    has_q: bool
    has_e: bool
    tile_blocks: list[str]   # stages computed per tile before E (own values, the MLP), producers first
    sum_blocks: dict[str, list[str]] = field(default_factory=dict)   # P, Q, M -> their own values' stages
    offsets: dict[str, tirx.PrimExpr] = field(default_factory=dict)   # buffer -> first element (batched.py)
    periodic_blocks: dict[str, list[str]] = field(default_factory=dict)   # P, Q, M, E -> their periodic values' stages
    has_m: bool = False


# bfloat16 travels as its bits (uint16) and is converted here: TVM 0.27's own bfloat16
# legalization reads the bits as integers inside these fused kernels (tests check it).
def storage_dtype(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def to_float32(value: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    if dtype == "bfloat16":
        return tirx.reinterpret(F32, value.astype("uint32") << tirx.const(16, "uint32"))
    return value if dtype == F32 else value.astype(F32)


def from_float32(value: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    if dtype == "bfloat16":   # round to nearest even, NaN stays NaN (as torch rounds)
        bits = tirx.reinterpret("uint32", value)
        odd = (bits >> tirx.const(16, "uint32")) & tirx.const(1, "uint32")
        rounded = ((bits + tirx.const(0x7FFF, "uint32") + odd) >> tirx.const(16, "uint32")).astype("uint16")
        return tirx.Select(tirx.isnan(value), tirx.const(0x7FC0, "uint16"), rounded)
    return value if dtype == F32 else value.astype(dtype)


def _sum_reducer() -> te.CommReducer:
    return te.comm_reducer(lambda x, y: [a + b for a, b in zip(x, y)],
                           lambda *dtypes: [tirx.const(0, d) for d in dtypes], name="sums")


def _reduce(exprs: list, axis) -> object:
    return te.sum(exprs[0], axis=axis) if len(exprs) == 1 else _sum_reducer()(tuple(exprs), axis=axis)


def _as_list(stage) -> list[te.Tensor]:
    """te.compute returns a tensor for one output, a tuple for several."""
    return list(stage) if isinstance(stage, (list, tuple)) else [stage]


class _Inputs:
    """The placeholders of a pass, in argument order, and how the printer reads them.
    `flat` (GPU element kernels): the element buffers are 1-D, `flat` = (count, start):
    elements start .. start + count of the tensor (batched.py offsets their pointers),
    read at the flat index; only row/col values take the 5-D index."""

    def __init__(self, sig: PassSignature, dims: tuple, flat: tuple | None = None):
        self.sig = sig
        self.dims = dims   # View.kernel_dims
        self.flat = flat
        element = (flat[0],) if flat is not None else dims
        dtype = {"param": sig.param_dtype, "grad": sig.grad_dtype}
        self.dtype = {name: dtype[name] for name in sig.leaves}
        self.leaf = {name: te.placeholder(element, storage_dtype(dtype[name]), name) for name in sig.leaves}
        self.acc = {key: te.placeholder(element, F32, f"{key[0]}{key[1]}") for key in sig.accumulators}
        self.small = {id(n): te.placeholder((n.channels, *sig.view.kernel_small_dims(n.level, dims)), F32,
                                            f"{n.op}_{n.level.label}{k}") for k, n in enumerate(sig.small)}
        self.periodic: dict[int, te.Tensor] = {}   # folded views: values without Y, repeated (periodic)
        self.periodic_names: list[str] = []        # their blocks, since the last take_periodic
        self.scalars = te.placeholder((sig.scalar_count,), F32, "scalars") if sig.scalar_nodes else None
        self.own: dict[int, list[te.Tensor]] = {}   # values in stages of their own (own_stages)
        self.own_names = itertools.count()   # block names must be unique in a pass
        # Values more than one of the kernel's values read (ElementPrinter._factors)
        roots = [*sig.output_nodes.values(), *(r for r, _ in sig.x_sums + sig.y_sums + sig.m_sums),
                 *([sig.mlp] if sig.mlp is not None else [])]
        uses = Counter(id(a) for n in topo_order(roots) for a in n.args)
        self.shared = {k for k, count in uses.items() if count > 1}
        self.mlp = None
        if sig.mlp is not None:
            shapes = MlpFold.of(sig.mlp).layer_shapes(sig.mlp.attrs[0])
            self.mlp = [te.placeholder(s, F32, f"mlp{k}") for k, s in enumerate(shapes)]

    def arguments(self) -> list[te.Tensor]:
        args = [*self.leaf.values(), *self.acc.values(), *self.small.values()]
        return args + ([self.scalars] if self.scalars is not None else []) + (self.mlp or [])

    def printer(self, index: tuple, mlp_output: te.Tensor | None = None, padded: bool = False,
                shifted: bool = False) -> ElementPrinter:
        """The element printer at `index` (flat: the 1-D index); `padded`: index runs over
        the padded Y extent (View.element_y), so loads clamp y to the last real element,
        or, `shifted`, a row's last vector holds its last LANES elements (shifted_last)."""
        sig = self.sig
        at = index
        if padded and sig.view.padded_y:
            a, x, b, y, c = index
            at = (a, x, b, (shifted_last if shifted else clamped)(y, self.dims[3]), c)

        def small_index(shape) -> tuple:
            full = _unravel(self.flat[1] + index[0], self.dims[1:]) if self.flat is not None else at
            return tuple(0 if isinstance(n, tirx.IntImm) and n.value == 1 else i for i, n in zip(full, shape))

        def load(node: Node, c: int):
            if id(node) in self.own:
                return self.own[id(node)][c][index]
            if id(node) in sig.stored or (node.op == "state" and node.level == Level.ELEMENT):
                return self.acc[(sig.stored.get(id(node)) or node.attrs[0], c)][at]
            if node.level <= Level.TENSOR:
                return self.scalars[sig.scalars[id(node)] + c]
            if node.level < Level.ELEMENT:
                buf = self.small[id(node)]
                if sig.view.folded and int(buf.shape[5]) > 1:   # a value without Y: read in periods
                    a, x, b, _, _ = small_index(buf.shape[1:])
                    return self._periodic(node)[(c, a, x, b, tirx.floormod(at[3], LANES * sig.view.period))]
                return buf[(c, *small_index(buf.shape[1:]))]
            return to_float32(self.leaf[node.op][at], self.dtype[node.op])

        read_mlp = None if mlp_output is None else (lambda c: mlp_output[(c, *index)])
        return ElementPrinter(load, set(sig.stored) | set(self.own), read_mlp, self.shared)

    def _periodic(self, node: Node) -> te.Tensor:
        """A folded kernel's value without Y along a row's folded axis: its C values
        repeated LANES times. A vector of LANES elements starts at a multiple of LANES, so
        its values are one contiguous load here (at the element's index modulo LANES x C)
        where the C-periodic pattern would be a gather. Computed per row where it is read."""
        if id(node) not in self.periodic:
            buf = self.small[id(node)]
            channels, a, x, b, _, period = buf.shape
            name = f"R{next(self.own_names)}"
            self.periodic[id(node)] = te.compute(
                (channels, a, x, b, LANES * period),
                lambda k, a, x, b, i: buf[k, a, x, b, 0, tirx.floormod(i, period)], name=name)
            self.periodic_names.append(name)
        return self.periodic[id(node)]

    def take_periodic(self) -> list[str]:
        """The blocks of the periodic values read since the last call (then forgotten, so
        that the next stage computes its own where it reads them)."""
        names = self.periodic_names
        self.periodic, self.periodic_names = {}, []
        return names

    def own_stages(self, roots: list[Node], dims: tuple, mlp_output: te.Tensor | None = None,
                   shifted: bool = False) -> list[str]:
        """Stages over `dims` for the values under `roots` whose inlined expressions would
        grow past printer.EXPANDED_LIMIT, producers first; their block names. Printers read
        them from their buffers, which the schedule computes per tile where they are read.
        CPU only: TVM's CUDA C printer writes Lets as local variables without simplifying
        them, so the GPU kernels keep them (and their registers)."""
        if self.sig.view.gpu:
            return []

        def is_read(node: Node) -> bool:
            return (node.op in LEAVES or node.op == "mlp" or node.level < Level.ELEMENT
                    or id(node) in self.sig.stored or id(node) in self.own)

        names = []
        for node in expanded_sizes(roots, is_read)[1]:
            name = f"V{next(self.own_names)}"
            self.own[id(node)] = _as_list(te.compute(dims, lambda *i: [
                self.printer(i, mlp_output, padded=True, shifted=shifted).expr(node, c)
                for c in range(node.channels)], name=name))
            names += [name] if node.channels == 1 else [f"{name}_v{c}" for c in range(node.channels)]
        return names


def _along_axes(sig: PassSignature, dims: tuple, element_y: int | tirx.PrimExpr) -> AlongAxes | None:
    """Where the MLP's first layer takes features constant along Y or X as per-row and
    per-column sums (mlp_stages.AlongAxes): CPU kernels vectorized along Y. In a folded
    kernel (dims: Y x C as one axis) a value without Y repeats along the row with period
    C; its row sums too, so they are laid out LANES x C per row (as _Inputs._periodic's).
    The column sums span the element stages' Y (`element_y`: padded to whole vectors), the
    padding's lanes those of the last real column, so that a vector of them is one load
    (clamped per lane, each vector's sums were gathered a lane at a time: small_fc_lopt on
    100x60, 32 sums a vector, took 1.6x the time an element of 64x128)."""
    view = sig.view
    if view.gpu or not view.vector_y or view.x_axis is None:
        return None

    def constant(node: Node, axis: int) -> bool:
        extent = view.kernel_small_dims(node.level, dims)[axis]
        return node.level < Level.ELEMENT and isinstance(extent, int) and extent == 1
    A, X, B, Y, C = dims
    col_at = lambda i: (i[0], 0, i[2], i[3], i[4])  # noqa: E731
    col_point = col_at if view.whole_vectors else lambda i: (i[0], 0, i[2], clamped(i[3], Y), i[4])  # noqa: E731
    if view.folded:   # (B = C = 1 in the kernel's dims)
        every = LANES * view.period
        return AlongAxes(lambda n: constant(n, 3), lambda n: constant(n, 1), (A, X, 1, 1, every), (A, 1, 1, Y, 1),
                         lambda i: (i[0], i[1], 0, 0, tirx.floormod(i[3], every)), col_at,
                         lambda j: (j[0], j[1], 0, j[4], 0), col_point)
    return AlongAxes(lambda n: constant(n, 3), lambda n: constant(n, 1), (A, X, B, 1, C), (A, 1, B, element_y, C),
                     lambda i: (i[0], i[1], i[2], 0, i[4]), col_at, lambda j: j, col_point)


def clamped(y: tirx.PrimExpr, extent) -> tirx.PrimExpr:
    """y where y < extent, else extent - 1: a padded Y's index (View.element_y). As a
    `likely` condition, which the loop partitioning (build.CPU_PASS_LOWERING) splits
    off: the whole vectors before it then load contiguously, the last vector alone a
    lane at a time (min(y, extent - 1) had every vector gathered: Adam on a (50257,)
    tensor 2x the time of LLVM's own vectorization of its scalar loop)."""
    return tirx.Select(tirx.likely(y < extent), y, extent - 1)


def shifted_last(y: tirx.PrimExpr, extent: int) -> tirx.PrimExpr:
    """The element that position y of a padded Y holds where each vector of LANES loads
    contiguously (extent >= LANES): the last vector the row's last LANES elements, of
    which those an earlier vector holds count once (_along_y's mask)."""
    return tirx.min(tirx.floordiv(y, LANES) * LANES, extent - LANES) + tirx.floormod(y, LANES)


def _masked(inside: tirx.PrimExpr, value: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Select(inside, value, tirx.const(0, F32))


def _sums_padded(sig: PassSignature) -> bool:
    """Whether the CPU sums along Y (Q, M) run over the element stages' Y padded to whole
    vectors (View.element_y; loads clamped or shifted), the padding masked out (_along_y)."""
    return sig.lanes > 1 and not sig.view.folded and sig.view.padded_y


def _summed_y(sig: PassSignature, Y) -> int | tirx.PrimExpr:
    """The Y extent of the CPU sums along Y: padded where _sums_padded."""
    return sig.view.element_y if _sums_padded(sig) else Y


def _sums_shifted(sig: PassSignature) -> bool:
    """Whether the padded sums (_sums_padded) load each vector whole: rows of LANES or more
    elements (shifted_last; clamped lanes are loaded one at a time: VeLO's tensor means on
    100 x 60 took 2.7x the time an element of 96 x 96)."""
    return _sums_padded(sig) and sig.view.kernel_dims()[3] >= LANES


def _along_y(inputs: _Inputs, sig: PassSignature, index: tuple, Y) -> Callable[[Node, int], tirx.PrimExpr]:
    """The value of a sum's operand at `index`, 0 where y is past Y (or, shifted, at an
    element an earlier vector holds). A printer each (its Let variables are defined once
    per expression)."""
    y, shifted = index[3], _sums_shifted(sig)
    if not _sums_padded(sig):
        return lambda node, ch: inputs.printer(index, padded=True).expr(node, ch)
    counted = shifted_last(y, Y) >= tirx.floordiv(y, LANES) * LANES if shifted else y < Y
    return lambda node, ch: _masked(counted, inputs.printer(index, padded=True, shifted=shifted).expr(node, ch))


def _x_sums(inputs: _Inputs, sig: PassSignature) -> list[te.Tensor]:
    """P: CPU, [chunks, A, B, Y, C], a fixed split of X into sig.chunks row ranges.
    CUDA: [T, A*B*Y*C padded], T row chunks (T bound from P's shape, View.gpu_chunks), each
    summed by ROW_LANES threads per column that take rows in turn (row = (t*per + i) *
    ROW_LANES + j; rows past X count 0), then across those threads. Flat columns keep
    the loops affine, which the GPU schedule needs."""
    A, X, B, Y, C = inputs.dims
    if not sig.view.gpu:
        rows = X // sig.chunks
        r = te.reduce_axis((0, rows), "r")
        return _as_list(te.compute((sig.chunks, A, B, Y, C), lambda t, a, b, y, c: _reduce(
            [inputs.printer((a, t * rows + r, b, y, c)).expr(node.args[0], ch) for node, ch in sig.x_sums], r),
            name="P"))
    T = tirx.Var("T", "int32")
    per = tirx.indexdiv(X + ROW_LANES * T - 1, ROW_LANES * T)
    i = te.reduce_axis((0, per), "i")
    columns = A * B * Y * C

    def thread_sums(j, t, w):   # w: a column, flat over (a, b, y, c)
        row = (t * per + i) * ROW_LANES + j
        a, b, y, c = _unravel(tirx.min(w, columns - 1), (B, Y, C))
        at = (a, tirx.min(row, X - 1), b, y, c)
        inside = tirx.all(row < X, w < columns)
        return _reduce([_masked(inside, inputs.printer(at).expr(node.args[0], ch)) for node, ch in sig.x_sums], i)
    shape = (ROW_LANES, T, padded(columns, WARP))
    return _across_threads(te.compute(shape, thread_sums, name="P_threads"), "P")


def _unravel(flat: tirx.PrimExpr, inner: tuple) -> tuple:
    """The index of `flat` over axes whose inner sizes are `inner` (all non-negative, so
    truncating division: plain / and % in CUDA). One more index than `inner`."""
    out = []
    for n in reversed(inner):
        out.append(tirx.truncmod(flat, n))
        flat = tirx.truncdiv(flat, n)
    return (flat, *reversed(out))


def _across_threads(partials: te.Tensor | tuple, name: str) -> list[te.Tensor]:
    """name[...] = the sum over the leading (thread) axis of the per-thread partial sums,
    in thread order. Staged as <name>_threads (each thread's sum, in registers), then
    <name>_lanes (all of them in shared memory) for the schedule. TVM's own cross-thread
    reduction does not take sums of this many outputs."""
    partials = _as_list(partials)
    lanes = _as_list(te.compute(partials[0].shape, lambda *i: [p[i] for p in partials], name=f"{name}_lanes"))
    k = te.reduce_axis((0, lanes[0].shape[0]), "k")
    return _as_list(te.compute(lanes[0].shape[1:], lambda *i: _reduce([p[(k, *i)] for p in lanes], k), name=name))


def _y_sums(inputs: _Inputs, sig: PassSignature) -> list[te.Tensor]:
    """Q: CPU, [A, X, B, C, lanes], sig.lanes interleaved partial sums per row (folded:
    summed as Q_rows over the folded axis, then laid out so).
    CUDA: [A*X*B*C padded, 1], one sum per row: the WARP threads of a warp take its elements
    in turn, then their partials are added in lane order."""
    A, X, B, Y, C = inputs.dims
    if not sig.view.gpu:
        L = sig.lanes
        if sig.view.folded:   # Q_rows[a, x, b, l*C + c]: over each row's folded axis, in vectors
            period = sig.view.period   # the tensor's C (the kernel's dims have C = 1)
            q = te.reduce_axis((0, Y // (L * period)), "q")
            rows = _as_list(te.compute((A, X, B, L * period), lambda a, x, b, i: _reduce(
                [inputs.printer((a, x, b, q * L * period + i, 0)).expr(node.args[0], ch) for node, ch in sig.y_sums],
                q), name="Q_rows"))
            return _as_list(te.compute((A, X, B, period, L), lambda a, x, b, c, l: [r[a, x, b, l * period + c]
                                                                                  for r in rows], name="Q"))
        q = te.reduce_axis((0, _summed_y(sig, Y) // L), "q")

        def row_sums(a, x, b, c, l):
            value = _along_y(inputs, sig, (a, x, b, q * L + l, c), Y)
            return _reduce([value(node.args[0], ch) for node, ch in sig.y_sums], q)
        return _as_list(te.compute((A, X, B, C, L), row_sums, name="Q"))
    i = te.reduce_axis((0, tirx.indexdiv(Y + WARP - 1, WARP)), "i")
    rows = A * X * B * C

    def thread_sums(k, r, _):   # r: a row, flat over (a, x, b, c)
        y = i * WARP + k
        a, x, b, c = _unravel(tirx.min(r, rows - 1), (X, B, C))
        at = (a, x, b, tirx.min(y, Y - 1), c)
        inside = tirx.all(y < Y, r < rows)
        return _reduce([_masked(inside, inputs.printer(at).expr(node.args[0], ch)) for node, ch in sig.y_sums], i)
    return _across_threads(te.compute((WARP, padded(rows, ROWS_PER_BLOCK), 1), thread_sums, name="Q_threads"), "Q")


def _m_sums(inputs: _Inputs, sig: PassSignature) -> list[te.Tensor]:
    """M: CPU, [chunks, A, lanes]: each tensor mean's sums over row chunk t of X (P's
    split) and all of b and c, in sig.lanes interleaved lanes along Y (one vector a
    channel, which a row's loop keeps in a register)."""
    A, X, B, Y, C = inputs.dims
    L, rows, vectors = sig.lanes, X // sig.chunks, _summed_y(sig, Y) // sig.lanes
    axes = [te.reduce_axis((0, n), name) for n, name in ((rows, "r"), (B, "b"), (C, "c"), (vectors, "q"))]
    r, b, c, q = axes

    def chunk_sums(t, a, l):
        value = _along_y(inputs, sig, (a, t * rows + r, b, q * L + l, c), Y)
        return _reduce([value(node.args[0], ch) for node, ch in sig.m_sums], axes)
    return _as_list(te.compute((sig.chunks, A, L), chunk_sums, name="M"))


# A pass's kernels on the GPU, in launch order: the sums over X and over Y, then the
# element values over the whole tiles of THREADS elements (E, no bounds checks) and over
# the rest (T, the tail: under one tile).
KERNELS = ("P", "Q", "E", "T")


def _element_range(dims: tuple, kernel: str) -> tuple:
    """(count, start) of the flat elements that GPU element kernel E or T covers."""
    n = math.prod(dims)
    whole = tirx.indexdiv(n, THREADS) * THREADS
    return (whole, 0) if kernel == "E" else (n - whole, whole)


def build_pass_function(sig: PassSignature, kernel: str | None = None) -> PassFunction:
    """The pass as one function; `kernel` (one of KERNELS): only that stage, with the
    same arguments (the other stages' outputs stay as unused placeholders), so that it
    is one GPU kernel, and every kernel of a pass takes the same pointer table."""
    elements = kernel in ("E", "T")
    dims = sig.view.kernel_dims()
    flat = _element_range(dims, kernel) if elements and sig.view.gpu else None
    inputs = _Inputs(sig, dims, flat)
    A, X, B, Y, C = dims
    sums_inputs = _Inputs(sig, dims) if flat is not None else inputs   # the sums' shapes (unused stages)
    stages: dict[str, list[te.Tensor]] = {}
    sum_blocks = {}
    periodic_blocks = {}
    for name, sums, stage in (("P", sig.x_sums, _x_sums), ("Q", sig.y_sums, _y_sums), ("M", sig.m_sums, _m_sums)):
        if sums:
            sum_dims = dims if name == "P" else (A, X, B, _summed_y(sig, Y), C)   # (Q, M: over the padding too)
            sum_blocks[name] = sums_inputs.own_stages([node.args[0] for node, _ in sums], sum_dims,
                                                      shifted=name != "P" and _sums_shifted(sig))
            stages[name] = stage(sums_inputs, sig)
            periodic_blocks[name] = sums_inputs.take_periodic()
            sums_inputs.own.clear()   # computed where this stage reads them, so for it alone
    casts = [sig.param_dtype if name == "param" else F32 for name, _ in sig.outputs]
    mlp = None
    scalars: list[tirx.Var] = []   # scalar parameters (batched.py binds them)
    tile_blocks: list[str] = []
    periodic_extra: list[str] = []
    if sig.outputs and (kernel is None or elements):
        # The element stages (E and the MLP) run over the padded Y extent; O stores real Y.
        element_y = Y if sig.view.vectors else sig.view.element_y or Y
        element_dims = (flat[0],) if flat is not None else (A, X, B, element_y, C)
        if sig.mlp is not None:
            along = _along_axes(sig, dims, element_y)
            features = [feat for feat, _, _, _ in MlpFold.of(sig.mlp).element_parts
                        if along is None or not (along.y_const(feat) or along.x_const(feat))]
            tile_blocks += inputs.own_stages(features, element_dims)
            reread = None
            if not sig.view.gpu:   # (vectors run along Y: the offset is the same for all lanes)
                reread = lambda i: tirx.bitwise_and(i[1] + i[3] // LANES, OPAQUE_ZERO)  # noqa: E731
                scalars.append(OPAQUE_ZERO)
            mlp = build_mlp_stages(sig.mlp, element_dims, inputs.mlp, lambda i: inputs.printer(i, padded=True), along,
                                   reread)
            tile_blocks += mlp.block_names()
            if mlp.row_sums is not None:   # per row, where the schedule computes periodic values
                periodic_extra.append(mlp.row_sums.op.name)
        mlp_out = mlp.output if mlp is not None else None
        tile_blocks += inputs.own_stages(list(sig.output_nodes.values()), element_dims, mlp_out)
        E = te.compute(element_dims, lambda *i: [inputs.printer(i, mlp_out, padded=True).expr(sig.output_nodes[name], c)
                                                 for name, c in sig.outputs], name="E")
        E = _as_list(E)
        stored_dims = element_dims if flat is not None else (A, X, B, Y, C)
        O = te.compute(stored_dims, lambda *i: [from_float32(e[i], dt) for e, dt in zip(E, casts)], name="O")
        stages["E"] = _as_list(O)
        periodic_blocks["E"] = inputs.take_periodic() + periodic_extra
    elif sig.outputs:   # another kernel of the pass: the outputs only as arguments
        stages["E"] = [te.placeholder((A, X, B, Y, C), storage_dtype(dt), f"O_unused{k}") for k, dt in enumerate(casts)]
    built = {name for name in stages if kernel is None or name == kernel or (name == "E" and elements)}
    outputs = []
    for name, tensors in stages.items():
        outputs += tensors if name in built else [te.placeholder(t.shape, t.dtype, f"{name}_unused{k}")
                                                  for k, t in enumerate(tensors)]
    func = te.create_prim_func(inputs.arguments() + outputs + scalars)
    offsets = {}
    if kernel == "T" and flat is not None:   # the tail's element buffers start past the whole tiles
        offsets = {buf.name: flat[1] for buf in func.params
                   if len(buf.shape) == 1 and tvm_ffi.structural_equal(buf.shape[0], flat[0])}
    return PassFunction(func, "P" in built, "Q" in built, "E" in built, tile_blocks, sum_blocks, offsets,
                        periodic_blocks, has_m="M" in built)
