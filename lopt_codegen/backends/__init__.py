"""Backends turn a Program into a step. Only `reference` (eager torch) exists so far;
compiled backends register here and `auto` prefers them when they are available."""
from __future__ import annotations

from ..ir.program import Program
from .base import Backend, StepBatch, TensorTask
from .cuda import CudaBackend
from .reference import ReferenceBackend

BACKENDS: dict[str, type[Backend]] = {"reference": ReferenceBackend, "cuda": CudaBackend}


def select_backend(program: Program, name: str) -> Backend:
    if name == "auto":
        name = "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; available: auto, {', '.join(BACKENDS)}")
    return BACKENDS[name](program)


__all__ = ["Backend", "BACKENDS", "StepBatch", "TensorTask", "select_backend"]
