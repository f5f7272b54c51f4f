"""backend="auto": each tensor on the fastest kernels its device has.

CPU tensors run TVM's kernels (the reference when TVM does not import). CUDA tensors run
the cuda backend's kernels: both CUDA backends passed the same parity and CUDA-graph
tests on an H200, and the cuda backend's were as fast or faster on every spec (VeLO at
100M parameters: 11.4 ms against TVM's 30.0 ms; benchmarks/gpu_results.md). What neither
can take runs on the reference, with one warning saying why.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from functools import cached_property

from ..ir.program import Program
from .base import Backend, StepBatch, TensorTask
from .cuda import CudaBackend
from .cuda.backend import unsupported_reason as cuda_unsupported_reason
from .reference import ReferenceBackend


def _cpu_backend(program: Program) -> Backend:
    try:
        from .tvm import TvmBackend   # imports TVM (about a second): only when built
    except ImportError as e:
        warnings.warn(f"{program.class_name}: the TVM backend is unavailable ({e}); CPU tensors use the slow "
                      "reference backend. Install apache-tvm (pip install -e .) for compiled kernels.",
                      RuntimeWarning, stacklevel=4)
        return ReferenceBackend(program)
    return TvmBackend(program)


class AutoBackend(Backend):
    name = "auto"

    def __init__(self, program: Program):
        super().__init__(program)
        self.cpu = _cpu_backend(program)   # also sends what TVM cannot take to the reference
        self.replays_steps = self.cpu.replays_steps
        self.reference = ReferenceBackend(program)
        self._warned: set[str] = set()

    @cached_property
    def cuda(self) -> Backend:
        """Made at the first CUDA tensor: CPU-only training never plans or renders its kernels."""
        return CudaBackend(self.program)

    def step(self, batch: StepBatch) -> None:
        parts: dict[str, list[TensorTask]] = {"cpu": [], "cuda": [], "reference": []}
        for task in batch.tasks:
            if task.param.device.type != "cuda":
                parts["cpu"].append(task)
            elif (reason := cuda_unsupported_reason(task)) is None:
                parts["cuda"].append(task)
            else:
                self._warn_once(reason)
                parts["reference"].append(task)
        used = [name for name, tasks in parts.items() if tasks]
        if batch.network is not None and len(used) > 1:
            # The network couples all tensors of a step: one backend must run them all.
            self._warn_once("a step with a network over tensors that need different backends runs them all "
                            "on the reference")
            self.reference.step(batch)
            return
        for name in used:
            getattr(self, name).step(batch if len(used) == 1 else replace(batch, tasks=parts[name]))

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{self.program.class_name}: {reason}; using the reference backend for it",
                          RuntimeWarning, stacklevel=4)
