"""One CPU kernel call for a whole group of same-shape tensors: a pass function (built
for one tensor) wrapped in a loop over a table of data pointers.

    main(table: int64[tensors, buffers], *shape vars)
        for t in range(tensors):
            <each buffer of the pass function declared on the pointer table[t, k]>
            <the pass function's body>

The tensors of a group live in separate allocations (the user's parameters and
gradients), so they cannot be one concatenated buffer without copies; a table of
pointers needs none. A step then costs one call per group and pass instead of one per
tensor and pass (a Python loop and the FFI conversion of ~20 tensors each); each
tensor runs its own parallel loops inside the call (a large one), or the loop over the
tensors is parallel (small ones: `parallel`).
"""
from __future__ import annotations

import tvm
from tvm import tirx


# An int32 that is 0 at run time, which LLVM cannot know: the sign bits of a tensor's
# first pointer (a user-space address, below 2^62). A pass function takes it as a scalar
# parameter, bound here per tensor (mlp_stages.py: weights read in the loop).
OPAQUE_ZERO = tirx.Var("opaque_zero", "int32")
SHAPE_VARS = "AXRBYCVT"   # View.kernel_dims, then the row chunks of a GPU kernel's sums
ALIGNMENT = 64   # bytes; the kernels load and store each buffer of the table as 64-byte aligned


def _shape_vars(buffers: list) -> list[tirx.Var]:
    """The symbolic sizes of a shape-generic function (A, X, B, Y, C and, in GPU kernels
    that sum over X, T; X (or R) and V for a View.vectors one), in that order; none for a
    function built for one shape."""
    found: dict[str, tirx.Var] = {}
    for buf in buffers:
        for dim in buf.shape:
            for var in tirx.analysis.undefined_vars(dim) if not isinstance(dim, tirx.IntImm) else []:
                found.setdefault(var.name, var)
    if found and not (set("AXBYC") <= set(found) <= set("AXBYCT") or set(found) in ({"X", "V"}, {"R", "V"})):
        raise ValueError(f"expected the shape variables A, X, B, Y, C (and T), X and V, or R and V; "
                         f"got {sorted(found)}")
    return [found[n] for n in SHAPE_VARS if n in found]


def batch_over_tensors(func: tirx.PrimFunc, gpu: bool = False, parallel: bool = False,
                       offsets: dict[str, tirx.PrimExpr] | None = None,
                       shape_vars: list[tirx.Var] | None = None) -> tirx.PrimFunc:
    """`func` (whose parameters are buffers, and OPAQUE_ZERO where it reads it) over a
    table of pointers: parameters
    (table, *shape vars); row t of the table holds, in func's parameter order, the data
    pointers of tensor t's buffers (64-byte aligned, as func assumes). gpu: func is one
    GPU kernel and the loop over tensors is its blockIdx.z (the table in device memory):
    one launch for the group. parallel: the CPU loop over the tensors is split across the
    cores (func has no parallel loop of its own then). offsets: buffer name -> the element
    of the tensor at which that buffer starts (a GPU tail kernel's element buffers).
    shape_vars: the size arguments, in place of those found in the buffers' shapes."""
    buffers = [p for p in func.params if not p.same_as(OPAQUE_ZERO)]
    tensors = tirx.Var("tensors", "int32")
    table = tirx.decl_buffer((tensors, len(buffers)), "int64", "table")
    t = tirx.Var("t", "int32")
    declare = []
    for k, buf in enumerate(buffers):
        ptr = tirx.Var(f"{buf.name}_ptr", "handle")
        address = tirx.BufferLoad(table, [t, tirx.const(k, "int32")])
        if offsets and buf.name in offsets:
            address = address + offsets[buf.name].astype("int64") * (buf.dtype.bits // 8)
        declare.append(tirx.LetStmt(ptr, tirx.reinterpret("handle", address)))
        declare.append(tirx.DeclBuffer(buf, data=ptr))
    if len(buffers) < len(func.params):
        first_pointer = tirx.BufferLoad(table, [t, tirx.const(0, "int32")])
        declare.append(tirx.LetStmt(OPAQUE_ZERO, (first_pointer >> tirx.const(62, "int64")).astype("int32")))
    if gpu:
        over = tirx.IterVar(tvm.ir.Range(0, tensors), t, tirx.IterVar.ThreadIndex, "blockIdx.z")
        body = tirx.For(t, 0, tensors, tirx.ForKind.THREAD_BINDING, tirx.SeqStmt([*declare, func.body]),
                        thread_binding=over)
    else:
        kind = tirx.ForKind.PARALLEL if parallel else tirx.ForKind.SERIAL
        body = tirx.For(t, 0, tensors, kind, tirx.SeqStmt([*declare, func.body]))
    sizes = shape_vars if shape_vars is not None else _shape_vars(buffers)
    return tirx.PrimFunc([table, *sizes], body, attrs=func.attrs)
