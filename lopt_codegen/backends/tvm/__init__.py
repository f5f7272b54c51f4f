"""The TVM TensorIR backend: one compiled kernel per pass of the plan (LLVM for CPUs)."""
import os

# TVM's worker threads spin after each parallel kernel by default; between kernels torch
# runs its own threads on the same cores, and the spinning slowed torch's ops up to 30x
# (measured on 2 cores). Set before TVM's thread pool starts; a user's value wins.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

from .backend import TvmBackend, prebuild, unsupported_reason

__all__ = ["TvmBackend", "prebuild", "unsupported_reason"]
