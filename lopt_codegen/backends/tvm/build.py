"""Compiling pass functions and caching them: in memory per process, on disk across
processes (lopt_codegen/backends/build_cache.py), keyed by everything the binary
depends on: the spec, the compiler's own source, the pass, view, dtypes, target and
TVM version."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

import tvm

from ...ir.program import Program
from ..build_cache import DEFAULT_CACHE, BuildCache
from .schedule_llvm import schedule_llvm
from .signature import PassSignature
from .stages import build_pass_function

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


def pass_key(program: Program, variant: str, sig: PassSignature, target: tvm.target.Target) -> dict:
    return {"spec": program.spec_sha256, "compiler": compiler_version(), "tvm": tvm.__version__,
            "variant": variant, "pass": sig.index, "view": "symbolic" if sig.view.symbolic else list(sig.view.dims), "x_axis": sig.view.x_axis,
            "param_dtype": sig.param_dtype, "grad_dtype": sig.grad_dtype, "target": str(target)}


def compile_pass(sig: PassSignature, target: tvm.target.Target) -> tvm.runtime.Module:
    sch = schedule_llvm(build_pass_function(sig), sig)
    # TVM's TIR common-subexpression pass emits a variable before its definition on the
    # MLP stages (InternalError "used before definition"); LLVM does the CSE anyway.
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        return tvm.compile(sch.mod, target=target)


_LOADED: dict[str, Callable] = {}   # this process's loaded kernels, by cache key


def load_pass_kernel(program: Program, variant: str, sig: PassSignature, target: tvm.target.Target,
                     cache: BuildCache = DEFAULT_CACHE) -> Callable:
    key = pass_key(program, variant, sig, target)
    name = repr(sorted(key.items()))
    if name not in _LOADED:
        def build(path: Path) -> None:
            compile_pass(sig, target).export_library(str(path))

        _LOADED[name] = cache.get("tvm-llvm", key, "kernel.so", build,
                                  lambda path: tvm.runtime.load_module(str(path))["main"])
    return _LOADED[name]
