"""GPU schedule of one kernel of a pass (shape-generic; stages.py builds its CUDA form,
batched.py launches it once for a group of tensors, over blockIdx.z).

  P  (sums over X) a block per (row chunk, column tile of WARP): threadIdx.x along the
     columns (coalesced loads), ROW_LANES threads (threadIdx.y) per column each summing
     its rows in a register; the partials go to shared memory and each column's are
     added in lane order; one partial per chunk, finished in torch.
  Q  (sums over Y) a warp per row (ROWS_PER_BLOCK rows per block): each thread sums
     every WARP-th element in a register, then the 32 partials are added in lane order.
  E  one element per thread over the whole tiles of THREADS elements (no bounds
     checks), T the same over the rest (one tile, guarded); both index the elements
     flat (stages.py), the per-element values and the MLP's layers (unrolled) stay in
     the thread's registers, the MLP weights are staged in shared memory once per block.
No float atomics: every sum has one order, fixed by the shape.

`bind=False` binds no thread, keeps default memory scopes and leaves the MLP's stages
unscheduled: the sums' loop structure then builds for the CPU, so tests run it against
the reference here.
"""
from __future__ import annotations

from tvm import s_tir

from .schedule_llvm import blocks_of, reduction_block
from .signature import PassSignature
from .stages import PassFunction
from .view import ROWS_PER_BLOCK, THREADS, WARP


class _Binder:
    """Thread binding and memory scopes, or nothing of either (bind=False)."""

    def __init__(self, sch: s_tir.Schedule, bind: bool):
        self.sch, self.on = sch, bind

    def __call__(self, loop, thread: str) -> None:
        if self.on:
            self.sch.bind(loop, thread)

    def scope(self, block, buffers: int, scope: str) -> None:
        if self.on:
            for k in range(buffers):
                self.sch.set_scope(block, k, scope)


def _across_threads(sch: s_tir.Schedule, bind: _Binder, name: str, outputs: int, block_threads: list[str],
                    lane_thread: str) -> None:
    """Stage `name` adds, in lane order, the partials of its threads of `lane_thread`
    (stages.py _across_threads): each thread sums its share in registers
    (<name>_threads) and leaves it in shared memory (<name>_lanes)."""
    blk = reduction_block(sch, name)
    *outer, _ = sch.get_loops(blk)
    for loop, thread in zip(outer, block_threads):   # before compute_at: bind checks the loop's subtree
        bind(loop, thread)
    lanes = blocks_of(sch, f"{name}_lanes", outputs)
    for block in lanes:
        sch.compute_at(block, outer[-1])
        bind.scope(block, 1, "shared")
    lane_loops = [sch.get_loops(block)[len(outer)] for block in lanes]
    lane = sch.merge(*lane_loops) if len(lane_loops) > 1 else lane_loops[0]   # one loop: the partials go under it
    bind(lane, lane_thread)
    partials = reduction_block(sch, f"{name}_threads")
    sch.compute_at(partials, lane)
    bind.scope(partials, outputs, "local")
    # The sum in registers, stored once: every thread of `lane_thread` runs this part
    # and stores the same value (a sum in global memory would race between them).
    column = sch.get_sref(outer[-1])
    for k in range(outputs):
        store = sch.cache_write(blk, k, "local" if bind.on else "global")
        # the first store lands after the loop nest, later ones next to the first
        if not any(sch.get_sref(loop).same_as(column) for loop in sch.get_loops(store)):
            sch.reverse_compute_at(store, outer[-1])


def _schedule_x_sums(sch: s_tir.Schedule, bind: _Binder, outputs: int) -> None:
    _, w, _ = sch.get_loops(reduction_block(sch, "P"))
    sch.split(w, [None, WARP])
    _across_threads(sch, bind, "P", outputs, ["blockIdx.y", "blockIdx.x", "threadIdx.x"], "threadIdx.y")


def _schedule_y_sums(sch: s_tir.Schedule, bind: _Binder, outputs: int) -> None:
    r, _, _ = sch.get_loops(reduction_block(sch, "Q"))
    sch.split(r, [None, ROWS_PER_BLOCK])
    _across_threads(sch, bind, "Q", outputs, ["blockIdx.x", "threadIdx.y"], "threadIdx.x")


def _buffer_name(region) -> str:
    return region.source.name   # a read region's source is its buffer


def _stage_weights(sch: s_tir.Schedule, bind: _Binder, tile_blocks: list[str], block_loop) -> None:
    """Each MLP weight buffer copied into shared memory once per thread block, by all of
    its threads (TVM adds the barrier before the first read)."""
    for name in tile_blocks:
        blk = sch.get_sblock(name)
        for k, region in enumerate(sch.get(blk).reads):
            if _buffer_name(region).startswith("mlp"):
                copy = sch.cache_read(blk, k, "shared" if bind.on else "global")
                sch.compute_at(copy, block_loop)
                inner = sch.get_loops(copy)[1:] or [sch.add_unit_loop(copy)]   # a 1-element buffer has none
                _, thread = sch.split(sch.fuse(*inner), [None, THREADS])
                bind(thread, "threadIdx.x")


def schedule_cuda(pf: PassFunction, sig: PassSignature, bind: bool = True) -> s_tir.Schedule:
    # Reductions keep their init inside (TVM lowers it to `if i == 0`): decompose_reduction
    # needs affine bindings, which fused loops over symbolic sizes are not.
    sch = s_tir.Schedule(pf.func)
    binder = _Binder(sch, bind)
    if pf.has_p:
        _schedule_x_sums(sch, binder, len(sig.x_sums))
    if pf.has_q:
        _schedule_y_sums(sch, binder, len(sig.y_sums))
    if pf.has_e:
        e_blocks, o_blocks = blocks_of(sch, "E", len(sig.outputs)), blocks_of(sch, "O", len(sig.outputs))
        blocks, thread = sch.split(sch.fuse(*sch.get_loops(e_blocks[0])), [None, THREADS])
        binder(blocks, "blockIdx.x")
        binder(thread, "threadIdx.x")
        for o in o_blocks:
            sch.reverse_compute_at(o, thread)
        for e in e_blocks:
            binder.scope(e, 1, "local")
        if bind:   # the MLP per thread, in registers, weights in shared memory. (Left unscheduled
            # in the CPU build: LLVM takes ~90 s over this loop nest without the GPU's scopes.)
            for name in reversed(pf.tile_blocks):   # consumers first
                blk = sch.get_sblock(name)
                sch.compute_at(blk, thread)
                binder.scope(blk, 1, "local")
            _stage_weights(sch, binder, pf.tile_blocks, blocks)
            for name in pf.tile_blocks:   # unrolled: the layers' units index registers, not a stack array
                for loop in sch.get_loops(sch.get_sblock(name))[2:]:
                    sch.unroll(loop)
    return sch
