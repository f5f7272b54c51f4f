"""The TVM TensorIR backend: one compiled kernel per pass of the plan (LLVM for CPUs)."""
from .backend import TvmBackend, prebuild, unsupported_reason

__all__ = ["TvmBackend", "prebuild", "unsupported_reason"]
