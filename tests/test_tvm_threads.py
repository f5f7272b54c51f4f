"""The TVM CPU kernels' parallel loops run on torch's OpenMP threads (threads.py), and
their results do not depend on the thread count or on how a group is split across cores."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tvm

from conftest import ROOT
from generated.velo import VeLO
from lopt_codegen.backends.build_cache import BuildCache
from lopt_codegen.backends.tvm import TvmBackend
from lopt_codegen.backends.tvm.backend import generic_signatures
from lopt_codegen.backends.tvm.build import llvm_target, load_pass_kernel

SHAPES = [(33, 40), (5, 8, 9), (1000,), (33, 40)]   # factored, 3-D, flat; a group of two


def _loaded_kernel_libraries() -> list[str]:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if line.endswith("/kernel.so")})


def test_loaded_kernels_launch_on_openmp_not_tvms_pool(tmp_path, programs):
    program = programs["adam"]
    sig = generic_signatures(program, "float32")["unfactored"][0]
    load_pass_kernel(program, "unfactored", sig, llvm_target(), BuildCache(tmp_path))
    libraries = _loaded_kernel_libraries()   # this one, and any other this process loaded
    assert libraries
    tvm_pool = ctypes.cast(ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"))
                           .TVMBackendParallelLaunch, ctypes.c_void_p).value
    for library in libraries:
        slot = ctypes.c_void_p.in_dll(ctypes.CDLL(library), "__TVMBackendParallelLaunch").value
        assert slot not in (None, tvm_pool), library


def _run_velo(parallel_within_from: int, threads: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = VeLO(params, lr=300.0, weights="random", num_steps=40, backend="tvm")
    opt.backend = TvmBackend(VeLO.program, specialize_from=0, parallel_within_from=parallel_within_from)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** -step
            opt.step(loss=1.0 / (step + 1))
    finally:
        torch.set_num_threads(before)
    views = {k.sig.view.parallel_within for ks in opt.backend._kernels.values() for k in ks}
    assert views == {parallel_within_from == 0}
    return [p.detach().clone() for p in params]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_results_do_not_depend_on_threads_or_parallel_split():
    """The sums' order is fixed by the shape (row chunks), never by the threads: bitwise
    the same results on 1 and 2 threads, split within each tensor or across the group."""
    runs = [_run_velo(within, threads) for within in (0, 1 << 30) for threads in (1, 2)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_a_compiler_without_openmp_gets_a_clear_error_and_no_cache_entry(tmp_path):
    script = ("from lopt_codegen.backends.tvm.threads import omp_launcher\n"
              "try:\n    omp_launcher()\nexcept RuntimeError as exc:\n    print(str(exc).splitlines()[0])\n")
    env = dict(os.environ, LOPT_CACHE_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "install a compiler with OpenMP support" in out.stdout, out.stderr
    assert not list(tmp_path.rglob("launch.so"))
