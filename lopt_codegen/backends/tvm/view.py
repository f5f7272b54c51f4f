"""The canonical index space of a tensor inside the TVM kernels.

A contiguous tensor of any rank is viewed, without copying, as 5-D [A, X, B, Y, C]:
for a factored tensor X and Y are its two factored axes (X the lower-numbered one) and
A, B, C the products of the axes before, between and after them; row, col and batch
values then have size 1 on the axes they lack. An unfactored tensor is flat and viewed
as [1, N/16, 1, 16, 1] so its tensor means vectorize, or, N not a multiple of 16, as one
row [1, 1, 1, N, 1], which a kernel built for its shape runs in vectors over N padded
(View.element_y; as [1, N, 1, 1, 1] small_fc_lopt's MLP ran a lane at a time on a
(50257,) bias: 5.7x the time of (50256,)). On the GPU [1, N/32, 1, 32, 1], a warp's width
(or [1, N/16, 1, 16, 1], [1, N, 1, 1, 1]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tvm import tirx

from ...ir.nodes import Level

LANES = 16   # floats per vector in the element loops (two AVX2 / one AVX-512 register)
# A pass whose MLP takes at least this many multiply-adds an element runs rows shorter
# than LANES / 2 in vectors too (View.pad_short_rows): small_fc_lopt's (1600) on a conv's
# stem, rows of 7, took 3.56 ms a lane at a time, 0.76 padded; VeLO's (100) gained
# nothing and its passes without an MLP lost up to a third.
SHORT_ROWS_MACS = 512
SYMBOLIC_BELOW = 4096   # smaller tensors share one shape-generic (scalar) kernel
# ... except, from this many elements, a tensor whose shape-generic kernel would run a lane
# at a time (rows not whole vectors) where a pass's MLP is heavy (SHORT_ROWS_MACS): its own
# kernel runs vectors (element_y). small_fc_lopt's 20 (33,) biases took 0.43 ms a step on
# the scalar kernel (650 ns an element); a step on one (1000,) bias 1.11 -> 0.35 ms on its
# own kernels, a build of ~2 s in the background.
OWN_LANES_FROM = 2 * LANES
# CPU: a tensor with fewer elements is too little work to split across cores; its group's
# kernel runs whole tensors on each core instead (View.parallel_within).
PARALLEL_WITHIN_FROM = 1 << 16
ROW_CHUNKS = 16   # at most this many row chunks of axis-X partial sums (PassSignature.chunks)
WARP = 32         # CUDA: threads of a warp (the contiguous lanes of a reduction)
ROW_LANES = 8     # CUDA: threads summing rows of one column tile of the axis-X partial sums
ROWS_PER_BLOCK = 8   # CUDA: rows of the axis-Y sums per thread block (a warp each)
GPU_BLOCKS = 1024   # CUDA: blocks that fill a big GPU (132 SMs x 8 blocks of 256 threads)
THREADS = 256     # CUDA: threads per block of the element kernels (one element each)


def padded(n, tile: int):
    """n (an int or a size expression) rounded up to a multiple of tile: the GPU sums'
    outputs have whole tiles, so each thread block's shared buffer has a constant size
    (the host slices the padding off)."""
    return (n + tile - 1) // tile * tile


@dataclass(frozen=True)
class View:
    dims: tuple[int, int, int, int, int]   # A, X, B, Y, C
    x_axis: str | None                     # "d0" or "d1": the factored axis at X; None: unfactored
    symbolic: bool = False                 # the kernel is built for any dims (one build, slower)
    gpu: bool = False                      # a CUDA kernel (always symbolic)
    # CPU: each tensor's loops run in parallel; else the loop over a group's tensors does
    parallel_within: bool = False
    # (symbolic, CPU) for tensors with A = B = C = 1 and Y a multiple of LANES (matrices,
    # flat tensors): only X and Y / LANES vary, so the element loops vectorize as in a
    # kernel built for one shape (VeLO's apply pass on 8192x384: 260 ms unvectorized)
    vectors: bool = False
    # (built for the shape, CPU) Rows of 2 to LANES / 2 - 1 elements run padded to a vector
    # (element_y), for a pass whose MLP makes lanes wasted cheaper than lanes run one at a time
    pad_short_rows: bool = False

    def generic(self) -> "View":
        """The shape-generic view: vectorized over Y where the dims allow (`vectors`). A
        tensor that splits its loops across the cores keeps doing so where its rows also
        split into ROW_CHUNKS chunks: its kernel is built for X = ROW_CHUNKS x R
        (kernel_dims), so the chunks' loop needs no bounds checks (a tensor per core left
        GPT-2's embedding, a quarter of its elements, on one core of two)."""
        a, x, b, y, c = self.dims
        vectors = not self.gpu and a == b == c == 1 and y % LANES == 0
        return replace(self, symbolic=True, vectors=vectors,
                       parallel_within=self.parallel_within and vectors and x % ROW_CHUNKS == 0)

    def fully_generic(self) -> "View":
        """The shape-generic view for any dims (one build for all tensors of a kind)."""
        return replace(self.generic(), vectors=False, parallel_within=False)

    def size_args(self, dims: tuple) -> tuple:
        """What a kernel built for this view takes as its size arguments, for a tensor of
        `dims`: none (built for its shape), (X, Y / LANES) or (X / ROW_CHUNKS, Y / LANES)
        (`vectors`, parallel_within) or all five."""
        if not self.symbolic:
            return ()
        if self.vectors:
            return (dims[1] // ROW_CHUNKS if self.parallel_within else dims[1], dims[3] // LANES)
        return tuple(dims)

    def gpu_chunks(self) -> int:
        """CUDA: the row chunks of the axis-X partial sums (blockIdx.y): enough blocks to
        fill a GPU, with each thread summing 16+ rows. From the dims only, so the order of
        every sum is fixed by the shape, never by the device."""
        a, x, b, y, c = self.dims
        column_blocks = a * -(-(b * y * c) // WARP)
        return max(1, min(-(-x // (ROW_LANES * 16)), -(-GPU_BLOCKS // column_blocks)))

    def kernel_dims(self) -> tuple:
        """The dims a kernel is built for: the sizes (`folded`: Y x C as one axis), or
        variables bound at call time (V: the vectors along Y of a `vectors` view; R: its
        rows per chunk where parallel_within)."""
        if self.vectors:
            rows = tirx.Var("R", "int32") * ROW_CHUNKS if self.parallel_within else tirx.Var("X", "int32")
            return (1, rows, 1, tirx.Var("V", "int32") * LANES, 1)
        if self.symbolic:
            return tuple(tirx.Var(n, "int32") for n in "AXBYC")
        a, x, b, y, c = self.dims
        return (a, x, b, y * c, 1) if self.folded else self.dims

    @property
    def folded(self) -> bool:
        """(built for the shape, CPU) Axes after Y (C > 1: a conv kernel's 3x3), none
        between X and Y, and Y whole vectors. The kernel takes each row's Y x C elements
        as one axis (kernel_dims), so its loops vectorize over contiguous memory instead
        of loading every C-th float (3x slower per element on a 512x512x3x3 conv). Values
        without Y (col, batch) repeat along that axis with period C; kernel_small_dims."""
        _, _, b, y, c = self.dims
        return not self.symbolic and c > 1 and b == 1 and y % LANES == 0

    @property
    def period(self) -> int:
        """Folded: the period of a value without Y along a row's folded axis (C); else 1."""
        return self.dims[4] if self.folded else 1

    @property
    def fixed_y(self) -> bool:
        """Whether the kernel knows Y's vectors: built for the shape, or `vectors` (Y = V x LANES)."""
        return self.vectors or not self.symbolic

    @property
    def vector_y(self) -> bool:
        """Whether the element stages run in vectors along Y (View.element_y)."""
        return self.vectors or self.element_y is not None

    @property
    def element_y(self) -> int | None:
        """The Y extent of a specialized kernel's element stages (None: not vectorized):
        Y when it is a multiple of LANES, else Y padded up to one (the extra lanes
        recompute the last real element and are never stored). Not for Y < LANES / 2,
        where padding wastes over half of every vector, unless pad_short_rows (Y >= 2)."""
        if self.symbolic:
            return None
        y = self.kernel_dims()[3]
        if y < (2 if self.pad_short_rows else LANES // 2):
            return None
        return -(-y // LANES) * LANES

    @property
    def padded_y(self) -> bool:
        """Whether the element stages run past Y (element_y pads it)."""
        return self.element_y is not None and self.element_y != self.kernel_dims()[3]

    @property
    def whole_vectors(self) -> bool:
        """Whether the element stages' Y is whole vectors (element_y pads none)."""
        return self.vectors or (self.element_y is not None and self.element_y == self.kernel_dims()[3])

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    def small_dims(self, level: Level, dims: tuple | None = None) -> tuple:
        """The dims of a value at `level` (1 on the axes that level lacks), out of `dims`
        (default: the sizes)."""
        a, x, b, y, c = dims if dims is not None else self.dims
        if level <= Level.TENSOR:
            return (1, 1, 1, 1, 1)
        dropped = {Level.ROW: {"d0"}, Level.COL: {"d1"}, Level.BATCH: {"d0", "d1"}}.get(level, set())
        y_axis = {"d0": "d1", "d1": "d0"}.get(self.x_axis or "")
        return (a, 1 if self.x_axis in dropped else x, b, 1 if y_axis in dropped else y, c)

    def kernel_small_dims(self, level: Level, dims: tuple) -> tuple:
        """small_dims over the kernel's dims (kernel_dims): in a folded kernel a value
        without Y keeps its C (as the last axis), one with Y has it folded in."""
        a, x, b, y, c = self.small_dims(level, dims)
        return (a, x, b, y, self.period) if self.folded and level > Level.TENSOR and y == 1 else (a, x, b, y, c)

    def reduced_axis(self, op: str) -> str:
        """Which view axis ("X" or "Y") a row/col mean sums over."""
        removed = "d0" if op == "mean_d0" else "d1"
        return "X" if removed == self.x_axis else "Y"


def view_of(shape: tuple[int, ...], axes: tuple[int, int] | None, gpu: bool = False) -> View:
    """The view of a tensor of `shape` (axes: its factored axes d0, d1, or None); gpu: for
    the CUDA kernels (shape-generic)."""
    n = math.prod(shape)
    if axes is None:
        if not gpu and n % LANES:   # one row, padded to whole vectors where built for its shape
            return View((1, 1, 1, n, 1), None)
        lanes = next(w for w in ((WARP, LANES, 1) if gpu else (LANES,)) if n % w == 0)
        return View((1, n // lanes, 1, lanes, 1), None, symbolic=gpu, gpu=gpu)
    lo, hi = sorted(axes)
    dims = (math.prod(shape[:lo]), shape[lo], math.prod(shape[lo + 1:hi]), shape[hi], math.prod(shape[hi + 1:]))
    return View(dims, "d0" if axes[0] == lo else "d1", symbolic=gpu, gpu=gpu)
