"""Compiling pass functions and caching them: in memory per process, on disk across
processes (lopt_codegen/backends/build_cache.py), keyed by everything the binary
depends on: the spec, the compiler's own source, the pass, view, dtypes, target and
TVM version. CPU kernels are built by TVM's LLVM backend, one module per pass (each call
covers a group of tensors; its parallel loops run on torch's OpenMP threads, threads.py);
CUDA kernels are exported by TVM as CUDA C++ and built with nvcc, one module per tensor
kind (each kernel launched once for a group of tensors)."""
from __future__ import annotations

import hashlib
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

import tvm

from ...ir.program import Program
from ..build_cache import DEFAULT_CACHE, BuildCache
from ..cuda.build import CUDA_FLAGS, cuda_home, nvcc_library
from .batched import batch_over_tensors
from .schedule_cuda import schedule_cuda
from .schedule_llvm import schedule_llvm
from .signature import PassSignature
from .small_function import SmallSignature, build_small_function
from .stages import KERNELS, build_pass_function
from .threads import use_torch_threads
from .view import THREADS

_PACKAGE = Path(__file__).resolve().parents[2]   # lopt_codegen/


@lru_cache(maxsize=1)
def compiler_version() -> str:
    """A hash of the sources that decide what a kernel computes (IR and this backend),
    so a changed compiler never loads a stale binary."""
    h = hashlib.sha256()
    for folder in ("ir", "backends/tvm"):
        for path in sorted((_PACKAGE / folder).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def llvm_target(cores: int | None = None) -> tvm.target.Target:
    # "native" silently means generic x86-64 (4x slower): name the CPU (TVM_NOTES.md).
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                              "num-cores": cores or os.cpu_count() or 1})


def pass_key(program: Program, variant: str, sig: PassSignature, target: tvm.target.Target | str) -> dict:
    return {"spec": program.spec_sha256, "compiler": compiler_version(), "tvm": tvm.__version__,
            "variant": variant, "pass": sig.index, "x_axis": sig.view.x_axis,
            "view": ("vectors" if sig.view.vectors else "symbolic") if sig.view.symbolic else list(sig.view.dims),
            "parallel_within": sig.view.parallel_within, "short_rows": sig.view.pad_short_rows,
            "param_dtype": sig.param_dtype, "grad_dtype": sig.grad_dtype, "target": str(target)}


# TVM's TIR common-subexpression pass emits a variable before its definition on the MLP
# stages (InternalError "used before definition"); LLVM does the CSE anyway.
LOWERING = {"tirx.disable_cse_tir": True}
# CPU pass kernels: loops with a `likely` condition (a padded row's clamp, stages.clamped)
# split where it holds, constant extents too (the other kernels: the same code, built in
# the same time).
CPU_PASS_LOWERING = {**LOWERING, "s_tir.LoopPartition": {"partition_const_loop": True}}


def compile_pass(sig: PassSignature, target: tvm.target.Target) -> tvm.runtime.Module:
    """The CPU kernel of a pass, over a group of tensors (batched.py)."""
    func = batch_over_tensors(schedule_llvm(build_pass_function(sig), sig).mod["main"],
                              parallel=not sig.view.parallel_within)
    with tvm.transform.PassContext(config=CPU_PASS_LOWERING):
        return tvm.compile(tvm.IRModule({"main": func}), target=target)


_LOADED: dict[str, Callable] = {}   # this process's loaded kernels, by cache key
LlvmSignature = PassSignature | SmallSignature


def _llvm_job(program: Program, variant: str, sig: LlvmSignature, target: tvm.target.Target
              ) -> tuple[dict, Callable[[], tvm.runtime.Module]]:
    """The cache key of a CPU kernel (a pass's, or a tensor kind's shape-generic small
    function, small_function.py) and the function that compiles it."""
    if isinstance(sig, PassSignature):
        return pass_key(program, variant, sig, target), lambda: compile_pass(sig, target)
    key = {"spec": program.spec_sha256, "compiler": compiler_version(), "tvm": tvm.__version__,
           "variant": variant, "small": sig.name, "x_axis": sig.x_axis, "means_over_y": sig.means_over_y,
           "means_in_m": sig.means_in_m, "plain": sig.plain,
           "target": str(target)}

    def compile_small() -> tvm.runtime.Module:
        with tvm.transform.PassContext(config=LOWERING):
            return tvm.compile(tvm.IRModule({"main": build_small_function(sig)}), target=target)
    return key, compile_small


def _export(compile_func: Callable[[], tvm.runtime.Module]) -> Callable[[Path], None]:
    return lambda path: compile_func().export_library(str(path))


def load_kernel(program: Program, variant: str, sig: LlvmSignature, target: tvm.target.Target,
                cache: BuildCache = DEFAULT_CACHE) -> Callable:
    """A CPU kernel from the cache (compiled and stored when missing), loaded once per
    process, its parallel loops on torch's threads."""
    key, compile_func = _llvm_job(program, variant, sig, target)
    name = repr(sorted(key.items()))
    if name not in _LOADED:
        def load(path: Path) -> Callable:
            module = tvm.runtime.load_module(str(path))
            use_torch_threads(path)
            return module["main"]

        _LOADED[name] = cache.get("tvm-llvm", key, "kernel.so", _export(compile_func), load)
    return _LOADED[name]


def kernel_built(program: Program, variant: str, sig: LlvmSignature, target: tvm.target.Target,
                 cache: BuildCache = DEFAULT_CACHE) -> bool:
    """Whether load_kernel would find it loaded or in the cache (no compile)."""
    key, _ = _llvm_job(program, variant, sig, target)
    return repr(sorted(key.items())) in _LOADED or cache.has("tvm-llvm", key, "kernel.so")


def build_kernel(program: Program, variant: str, sig: LlvmSignature, target: tvm.target.Target,
                 cache: BuildCache = DEFAULT_CACHE) -> None:
    """Compiles a CPU kernel into the cache, without loading it: safe on a background
    thread (load_kernel loads it on the step's thread)."""
    key, compile_func = _llvm_job(program, variant, sig, target)
    cache.get("tvm-llvm", key, "kernel.so", _export(compile_func), lambda path: path)


def cuda_kernel_names(sig: PassSignature) -> list[str]:
    """The functions of a pass in its CUDA module, in launch order: one per kernel."""
    has = {"P": bool(sig.x_sums), "Q": bool(sig.y_sums), "E": bool(sig.outputs), "T": bool(sig.outputs)}
    return [f"pass{sig.index}_{k}" for k in KERNELS if has[k]]


def gpu_kernel_functions(sig: PassSignature, bind: bool = True) -> dict[str, tvm.tirx.PrimFunc]:
    """The pass's GPU kernels (cuda_kernel_names), each over a group of tensors: over
    blockIdx.z, or (bind=False, schedule_cuda) with no thread bound, for a CPU build."""
    funcs = {}
    for name in cuda_kernel_names(sig):
        pf = build_pass_function(sig, name[-1])
        kernel = schedule_cuda(pf, sig, bind).mod["main"]
        funcs[name] = batch_over_tensors(kernel, gpu=bind, offsets=pf.offsets).with_attr("global_symbol", name)
    return funcs


def cuda_source(sigs: list[PassSignature], arch: str) -> str:
    """One CUDA C++ translation unit with a kernel and a TVM-FFI host wrapper per kernel of
    each pass (cuda_kernel_names), each launched once for a group of same-shape tensors
    (batched.py), for `arch` (e.g. "sm_90"). No GPU is needed: TVM emits source, and
    nvcc builds it."""
    import tvm.support.nvcc  # noqa: F401 - registers TVM's CUDA compile hooks
    from tvm.backend.cuda.host import export_cuda_host

    funcs = {name: func for sig in sigs for name, func in gpu_kernel_functions(sig).items()}
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "cuda_host"})
    with target, tvm.transform.PassContext(config=LOWERING):
        built = tvm.compile(tvm.IRModule(funcs), target=target)
    # TVM writes __launch_bounds__(threads); with that alone ptxas (CUDA 13) caps the
    # unrolled MLP kernels at 80 registers for occupancy and spills. ", 1" (one block
    # per SM at least) lets it use what they need (small_fc_lopt's apply: 95, no spills).
    return re.sub(r"__launch_bounds__\((\d+)\)", r"__launch_bounds__(\1, 1)", export_cuda_host(built.mod))


def cuda_kernels_key(program: Program, variant: str, sigs: list[PassSignature], arch: str) -> dict:
    """pass_key of a module holding all passes of a tensor kind, for nvcc and `arch`."""
    key = pass_key(program, variant, sigs[0], f"cuda {arch}")
    del key["pass"]
    return {**key, "passes": [s.index for s in sigs], "cuda_home": cuda_home(), "nvcc_flags": CUDA_FLAGS}


def cuda_kernels_path(program: Program, variant: str, sigs: list[PassSignature], arch: str,
                      cache: BuildCache = DEFAULT_CACHE) -> Path:
    """The nvcc-built library of a tensor kind's CUDA passes (functions pass0, pass1, ...)
    in the cache, built when missing. Needs nvcc, not a GPU."""
    def build(path: Path) -> None:
        nvcc_library(cuda_source(sigs, arch), f"lopt_tvm_{program.name}_{variant}", (arch,), path)

    return cache.get("tvm-cuda", cuda_kernels_key(program, variant, sigs, arch), "kernels.so", build,
                     lambda path: path)


_LOADED_CUDA: dict[str, object] = {}   # this process's loaded CUDA modules, by path


def load_cuda_kernels(program: Program, variant: str, sigs: list[PassSignature], arch: str,
                      cache: BuildCache = DEFAULT_CACHE) -> list[Callable]:
    """The CUDA passes of one tensor kind, loaded (shape-generic: one build for all sizes);
    each runs its kernels in order: pass(table, *shape vars)."""
    import tvm_ffi

    path = str(cuda_kernels_path(program, variant, sigs, arch, cache))
    if path not in _LOADED_CUDA:
        _LOADED_CUDA[path] = tvm_ffi.load_module(path)
    module = _LOADED_CUDA[path]
    return [in_order({name: getattr(module, name) for name in cuda_kernel_names(s)}) for s in sigs]


def in_order(kernels: dict[str, Callable]) -> Callable:
    """One callable that runs a pass's kernels (by cuda_kernel_names) one after the other
    on its arguments (table, A, X, B, Y, C[, T]), leaving out an element kernel with no
    element to cover (CUDA refuses a launch of zero blocks): the whole tiles' below
    THREADS elements, the tail's at a multiple of THREADS."""
    def run(table, *dims) -> None:
        n = math.prod(dims[:5])
        for name, kernel in kernels.items():
            if not ((name.endswith("_E") and n < THREADS) or (name.endswith("_T") and n % THREADS == 0)):
                kernel(table, *dims)
    return run
