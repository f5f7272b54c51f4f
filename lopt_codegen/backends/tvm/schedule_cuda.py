"""GPU schedule of a pass function: one element (or one partial sum) per thread.

A first schedule (not tuned; no GPU on the build machines): every stage's spatial loops
are fused and spread over blocks of THREADS threads; partial sums run serially per thread
over a fixed row range (deterministic, no atomics); the MLP stages and the per-element
values live in the local memory of the thread that stores them. Kernels are shape-generic.
"""
from __future__ import annotations

from tvm import s_tir

from .schedule_llvm import blocks_of, reduction_block
from .signature import PassSignature
from .stages import PassFunction

THREADS = 256


def _bind(sch: s_tir.Schedule, loops: list):
    blocks, threads = sch.split(sch.fuse(*loops), [None, THREADS])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")
    return threads


def schedule_cuda(pf: PassFunction, sig: PassSignature) -> s_tir.Schedule:
    # Reductions keep their init inside (TVM lowers it to `if r == 0`): decompose_reduction
    # needs affine bindings, which fused loops over symbolic sizes are not.
    sch = s_tir.Schedule(pf.func)
    for name, has in (("P", pf.has_p), ("Q", pf.has_q)):
        if has:
            *spatial, _ = sch.get_loops(reduction_block(sch, name))
            _bind(sch, spatial)
    if pf.has_e:
        e_blocks, o_blocks = blocks_of(sch, "E", len(sig.outputs)), blocks_of(sch, "O", len(sig.outputs))
        thread = _bind(sch, sch.get_loops(e_blocks[0]))
        for o in o_blocks:
            sch.reverse_compute_at(o, thread)
        for e in e_blocks:
            sch.set_scope(e, 0, "local")
        for name in reversed(pf.mlp_blocks):   # consumers first
            blk = sch.get_sblock(name)
            sch.compute_at(blk, thread)
            sch.set_scope(blk, 0, "local")
    return sch
