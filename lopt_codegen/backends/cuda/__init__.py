"""The Jinja-templated CUDA backend: IR -> C++ element functions -> one source that
builds for the GPU (nvcc) and for the host (C++), both through tvm_ffi.cpp."""
from .backend import CudaBackend

__all__ = ["CudaBackend"]
