"""Backends turn a Program into a step: `reference` (eager torch, any device, the oracle),
`tvm` (compiled TensorIR kernels) and `cuda` (Jinja-templated CUDA C++, whose host build
runs CPU tensors). `auto` (auto.py) runs CPU tensors on tvm and CUDA tensors on cuda,
and says why when it falls back to the reference."""
from __future__ import annotations

from typing import Callable

from ..ir.program import Program
from .base import Backend, StepBatch, TensorTask
from .reference import ReferenceBackend


def _tvm() -> type[Backend]:
    from .tvm import TvmBackend   # imports TVM (about a second): only when asked for
    return TvmBackend


def _cuda() -> type[Backend]:
    from .cuda import CudaBackend
    return CudaBackend


BACKENDS: dict[str, Callable[[], type[Backend]]] = {"reference": lambda: ReferenceBackend, "tvm": _tvm,
                                                    "cuda": _cuda}


def select_backend(program: Program, name: str) -> Backend:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown backend '{name}'; available: auto, {', '.join(BACKENDS)}")
    if name != "auto":
        return BACKENDS[name]()(program)
    from .auto import AutoBackend
    return AutoBackend(program)


__all__ = ["Backend", "BACKENDS", "StepBatch", "TensorTask", "select_backend"]
