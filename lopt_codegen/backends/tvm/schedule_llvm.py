"""CPU schedule of a pass function: parallel over the outer axes (a large tensor,
View.parallel_within; a group of small ones runs in parallel over its tensors instead,
batched.py), vectorized along axis Y (View.element_y: padded to whole vectors; loads
strided by C when axes follow Y, as a conv kernel's 3x3 does, unless View.folded)."""
from __future__ import annotations

import math

from tvm import s_tir, tirx

from .signature import ROW_CHUNKS, PassSignature
from .stages import PassFunction
from .view import LANES

# Per-tile buffers: on LLVM "global" small constant-size buffers go on the stack, while
# "local" ones call TVM's workspace allocator once per tile (measured 2.4x slower).
_TILE_SCOPE = "global"


def blocks_of(sch: s_tir.Schedule, name: str, outputs: int) -> list:
    """A stage's blocks: a multi-output compute has one per output (<name>_v0, ...)."""
    return [sch.get_sblock(name)] if outputs == 1 else [sch.get_sblock(f"{name}_v{k}") for k in range(outputs)]


def reduction_block(sch: s_tir.Schedule, name: str):
    """A reduction stage's one block (named <name>_v0 when it has several outputs)."""
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return sch.get_sblock(f"{name}_v0")


UNIT_BLOCK = 4   # output units computed together: each input vector loaded feeds this many FMAs


def _block_units(sch: s_tir.Schedule, unit, inner=None) -> None:
    """Split the unit loop by UNIT_BLOCK and unroll the block (after `inner`, if given),
    so LLVM keeps UNIT_BLOCK accumulators in registers and reuses each input load."""
    if int(sch.get(unit).extent) % UNIT_BLOCK:
        return
    _, block = sch.split(unit, [None, UNIT_BLOCK])
    if inner is not None:
        sch.reorder(inner, block)
    sch.unroll(block)


def _schedule_tiles(sch: s_tir.Schedule, names: list[str], anchor, vectorized: bool) -> None:
    """Every stage before E (values of their own, the MLP's) computed per tile (or
    element) at `anchor`, into tile buffers [unit, lane]; reductions over units outside
    the vectorized lanes."""
    for name in reversed(names):   # consumers first: each lands before its consumer
        blk = sch.get_sblock(name)
        sch.compute_at(blk, anchor)
        sch.set_scope(blk, 0, _TILE_SCOPE)
        # [unit,] [lane,] [r]: compute_at drops a loop of one (a layer of one unit; per element)
        inner = _loops_under(sch, blk, anchor)
        if name.startswith("S"):
            r = inner[-1]
            if vectorized:
                lane = inner[-2]
                sch.reorder(r, lane)
                sch.vectorize(lane)
                if len(inner) == 3:
                    _block_units(sch, inner[0], inner=r)
            sch.decompose_reduction(blk, r)
        elif vectorized:
            sch.vectorize(inner[-1])
            if name.startswith("H") and len(inner) == 2:
                _block_units(sch, inner[0])


def _loops_under(sch: s_tir.Schedule, blk, anchor) -> list:
    """The loops of `blk` inside `anchor` (after compute_at)."""
    loops = sch.get_loops(blk)
    depth = [sch.get_sref(loop).same_as(sch.get_sref(anchor)) for loop in loops].index(True)
    return loops[depth + 1:]


def _own_values_at(sch: s_tir.Schedule, names: list[str], anchor) -> None:
    """The stages of a sum's own values (stages.py) computed under `anchor` of the sum,
    vectorized when that leaves them one vector."""
    for name in reversed(names):   # consumers first
        blk = sch.get_sblock(name)
        sch.compute_at(blk, anchor)
        sch.set_scope(blk, 0, _TILE_SCOPE)
        inner = _loops_under(sch, blk, anchor)
        if inner:
            loop = sch.fuse(*inner) if len(inner) > 1 else inner[0]
            extent = sch.get(loop).extent
            if isinstance(extent, tirx.IntImm) and extent.value == LANES:
                sch.vectorize(loop)


def _rows_in_one_loop(sch: s_tir.Schedule, chunk_blocks: list, row_blocks: list, chunks: int,
                      parallel: bool) -> None:
    """P's, M's, Q's and E's nests (those given) in one loop over the rows: a row's sums,
    then its outputs, which read the row again from the cache, where a loop over the
    tensor each read it two or three times from memory (VeLO's second pass moved 56 B
    an element, not its plan's 36). With P or M (chunk_blocks), the rows as their chunks
    of rows (t, a, r; they sum per chunk): (a, x) otherwise. The tensor's own loops over
    them fused and parallel where they are (View.parallel_within). The sums stay first:
    E may write the inputs they read (in place). Done before the stages under them are
    scheduled: TVM parallelizes only a loop whose blocks are still whole."""
    nests = []
    for blk in chunk_blocks:
        loops = sch.get_loops(blk)
        if sch.get(blk).name_hint.startswith("P"):   # t, a, b, y, c over r
            t, a, b, y, c, r = loops
            sch.reorder(t, a, r, b, y, c)
        else:   # M: t, a, r, b, c, q, l (reordered by schedule_llvm)
            t, a, r = loops[:3]
        nests.append((t, a, r))
    for blk in row_blocks:
        a, x = sch.get_loops(blk)[:2]
        if not chunk_blocks:
            nests.append((a, x))
            continue
        t, r = sch.split(x, [chunks, None])
        sch.reorder(t, a)
        nests.append((t, a, r))
    # Fused only to be parallel: over symbolic sizes, a fused loop's divisions index the
    # tile buffers, which TVM's LLVM codegen simplified for minutes inside NaN-tested
    # Selects (164 s for one generic kernel, 0.6 s unfused).
    if parallel:
        nests = [(sch.fuse(*nest[:2]), *nest[2:]) for nest in nests]
    merged = nests[0]
    for nest in nests[1:]:
        merged = tuple(sch.merge(mine, theirs) for mine, theirs in zip(merged, nest))
    if parallel:
        sch.parallel(merged[0])


def schedule_llvm(pf: PassFunction, sig: PassSignature) -> s_tir.Schedule:
    sch = s_tir.Schedule(pf.func)
    row_blocks = ([reduction_block(sch, "Q_rows" if sig.view.folded else "Q")] if pf.has_q else []) + \
        ([blocks_of(sch, "E", len(sig.outputs))[0]] if pf.has_e else [])
    if pf.has_q and sig.view.folded:   # Q's copy of each row's Q_rows, at the row (before the
        # loops are merged, after which TVM's regions took the whole of Q_rows at every row)
        for copy in blocks_of(sch, "Q", len(sig.y_sums)):
            sch.reverse_compute_at(copy, sch.get_loops(row_blocks[0])[1])
    m_block = reduction_block(sch, "M") if pf.has_m else None
    if m_block is not None:   # per row, one vector a channel along it (lanes innermost); its own
        # values before the rows' loops merge, after which TVM computed them for the whole
        # tensor at every vector
        t, a, l, r, b, c, q = sch.get_loops(m_block)
        sch.reorder(t, a, r, b, c, q, l)
        if sig.lanes > 1:
            sch.vectorize(l)
        _own_values_at(sch, pf.sum_blocks.get("M", []), q)
    p_block = reduction_block(sch, "P") if pf.has_p else None
    if p_block is not None and sig.view.parallel_within and sig.chunks != ROW_CHUNKS:
        # Fewer chunks (rows a prime, 50257 say: one) split unevenly across the cores, or
        # not at all: P keeps a loop of its own, the rows' loop all the cores (and tensor
        # means are not in M: PassSignature.means_in_m).
        _rows_in_one_loop(sch, [p_block], [], sig.chunks, True)
        p_block = None
    chunk_blocks = [b for b in (p_block, m_block) if b is not None]
    if chunk_blocks or row_blocks:
        _rows_in_one_loop(sch, chunk_blocks, row_blocks, sig.chunks, sig.view.parallel_within)

    def periodic_at(stage: str, loop) -> None:
        for name in reversed(pf.periodic_blocks.get(stage, [])):   # consumers first (Hr reads them)
            blk = sch.get_sblock(name)
            sch.compute_at(blk, loop)
            sch.set_scope(blk, 0, _TILE_SCOPE)

    if m_block is not None:
        r = sch.get_loops(m_block)[-5]   # r, b, c, q, l innermost (chunks and rows: _rows_in_one_loop's)
        periodic_at("M", r)
        sch.decompose_reduction(m_block, r)
    if pf.has_p:
        blk = reduction_block(sch, "P")
        *_, r, b, y, c = sch.get_loops(blk)   # (chunks and rows: _rows_in_one_loop's)
        inner = c
        if sig.view.fixed_y and math.prod(sig.view.dims[2:]) % LANES == 0:
            inner, lanes = sch.split(sch.fuse(b, y, c), [None, LANES])
            sch.vectorize(lanes)
        _own_values_at(sch, pf.sum_blocks.get("P", []), inner)
        periodic_at("P", r)
        sch.decompose_reduction(blk, r)   # after vectorize (TVM_NOTES.md)
    if pf.has_q and sig.view.folded:   # Q_rows per row, in vectors over LANES x C; then Q
        blk = reduction_block(sch, "Q_rows")
        *rows, b, i, q = sch.get_loops(blk)   # (rows: _rows_in_one_loop's)
        sch.reorder(b, q, i)
        row = rows[-1]
        vector, lanes = sch.split(i, [None, LANES])
        sch.vectorize(lanes)
        _own_values_at(sch, pf.sum_blocks.get("Q", []), vector)
        for k in range(len(sig.y_sums)):
            sch.set_scope(blk, k, _TILE_SCOPE)
        periodic_at("Q", row)
        sch.decompose_reduction(blk, q)
    elif pf.has_q:
        blk = reduction_block(sch, "Q")
        *_, b, c, l, q = sch.get_loops(blk)
        sch.reorder(b, c, q, l)
        if sig.lanes > 1:
            sch.vectorize(l)
        _own_values_at(sch, pf.sum_blocks.get("Q", []), q)
        sch.decompose_reduction(blk, q)
    if pf.has_e:
        # E (all values, into tile buffers) then O (the stores), per vector tile: every
        # input of a tile is read before any output (which may alias it) is written.
        e_blocks = blocks_of(sch, "E", len(sig.outputs))
        o_blocks = blocks_of(sch, "O", len(sig.outputs))
        *rows, b, y, c = sch.get_loops(e_blocks[0])
        row = rows[-1]
        vectorized = sig.view.vector_y
        if vectorized:   # vectors along Y (strided loads when C > 1), b and c outside
            sch.reorder(b, c, y)
            y, lanes = sch.split(y, [None, LANES])
            sch.vectorize(lanes)
        for o in o_blocks:
            sch.reverse_compute_at(o, y if vectorized else c)
            # Stores in vectors where Y is whole vectors (padded Y: a predicated scalar loop).
            if vectorized and sig.view.whole_vectors:
                sch.vectorize(sch.get_loops(o)[-1])
        for e in e_blocks:
            sch.set_scope(e, 0, _TILE_SCOPE)
        _schedule_tiles(sch, pf.tile_blocks, y if vectorized else c, vectorized)
        periodic_at("E", row)
    return sch
