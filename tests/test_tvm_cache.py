"""Compiled TVM kernels in the on-disk cache: a second process loads without compiling,
two processes compiling the same kernel at once both succeed, a corrupted file is rebuilt;
lopt-compile pre-builds the CPU kernels and (with nvcc) the CUDA ones."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lopt_codegen.backends.tvm.backend as tvm_backend
import lopt_codegen.backends.tvm.build as tvm_build
from conftest import ROOT
from generated.adam import Adam
from lopt_codegen.backends.build_cache import BuildCache
from lopt_codegen.backends.tvm import TvmBackend
from lopt_codegen.backends.tvm.backend import generic_signatures
from lopt_codegen.backends.tvm.build import load_cuda_kernels
from lopt_codegen.cli import run

# One Adam step on a fixed tensor in a fresh process; prints what the cache did.
SCRIPT = """
import json, torch
from generated.adam import Adam
from lopt_codegen.backends.build_cache import DEFAULT_CACHE
from lopt_codegen.backends.tvm.threads import omp_launcher
omp_launcher()   # its own cache entry, found or built first: the counts are the kernel's
hits, builds = DEFAULT_CACHE.hits, DEFAULT_CACHE.builds
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(40, 24))
p.grad = torch.randn(40, 24)
opt = Adam([p], lr=0.1, backend="tvm")
opt.backend.specialize_from = 0
opt.step()
print(json.dumps({"hits": DEFAULT_CACHE.hits - hits, "builds": DEFAULT_CACHE.builds - builds,
                  "sum": float(p.detach().double().sum())}))
"""


def _start(cache: Path) -> subprocess.Popen:
    env = dict(os.environ, LOPT_CACHE_DIR=str(cache), PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_loads_without_compiling(tmp_path):
    first = _result(_start(tmp_path))
    second = _result(_start(tmp_path))
    # Two functions: the pass kernel and its small work (small_function.py).
    assert (first["builds"], first["hits"]) == (2, 0)
    assert (second["builds"], second["hits"]) == (0, 2)
    assert second["sum"] == first["sum"]


def test_two_processes_compiling_the_same_kernel_both_succeed(tmp_path):
    a, b = _start(tmp_path), _start(tmp_path)
    results = [_result(a), _result(b)]
    assert sum(r["builds"] for r in results) == 2   # each function built once, by either process
    assert all(r["builds"] + r["hits"] == 2 for r in results)
    assert results[0]["sum"] == results[1]["sum"]


def test_corrupted_kernel_file_is_rebuilt(tmp_path):
    first = _result(_start(tmp_path))
    kernel = sorted((tmp_path / "tvm-llvm").glob("*/kernel.so"))[0]
    kernel.write_bytes(kernel.read_bytes()[:1000])   # a truncated write
    again = _result(_start(tmp_path))
    assert (again["builds"], again["hits"]) == (1, 1)
    assert again["sum"] == first["sum"]


def test_cli_prebuilds_the_shape_generic_kernels_that_stand_in_at_the_first_step(tmp_path, monkeypatch):
    env = dict(os.environ, LOPT_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "lopt_codegen.cli", "--backend", "tvm", "--out", str(tmp_path / "gen"),
           os.path.join(ROOT, "specs", "adam.yaml")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # (f32, bf16, f16) x 1 pass x (any size, vectors: View.vectors, vectors split across the
    # cores), and the pass's small function
    assert "10 shape-generic TVM CPU kernels for Adam" in done.stdout
    assert len(list((tmp_path / "cache" / "tvm-llvm").glob("*/kernel.so"))) == 10

    # A new model's first step runs on them, building nothing first: a tensor that splits
    # across the cores (rows in chunks), one that runs whole per core, one without vectors.
    gate = threading.Event()
    monkeypatch.setattr(tvm_backend, "build_kernel", lambda *args: gate.wait(60))   # its own kernels: held
    monkeypatch.setattr(tvm_build, "_LOADED", {})
    cache = BuildCache(tmp_path / "cache")
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 80), (80,), (3, 5)]]
    opt = Adam(params, lr=0.1, backend="tvm")
    opt.backend = TvmBackend(Adam.program, cache=cache, parallel_within_from=64, background=True)
    for p in params:
        p.grad = torch.randn(p.shape)
    try:
        opt.step()
        views = {k.sig.view for ks in opt.backend._kernels.values() for k in ks}
        assert cache.builds == 0 and cache.hits > 0
        assert {(v.symbolic, v.vectors, v.parallel_within) for v in views} == \
            {(True, True, True), (True, True, False), (True, False, False)}
    finally:
        gate.set()
        opt.backend.builds.wait()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cli_prebuilds_cuda_kernels_that_the_backend_loads(tmp_path, programs):
    """--target cuda builds with nvcc (no GPU); the backend's lookup then hits those
    modules, which load here and check their arguments (a CPU pointer table is refused)."""
    env = dict(os.environ, LOPT_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "lopt_codegen.cli", "--backend", "tvm", "--target", "cuda", "--arch", "sm_90",
           "--out", str(tmp_path / "gen"), os.path.join(ROOT, "specs", "adam.yaml")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "3 shape-generic TVM CUDA (sm_90) kernels for Adam" in done.stdout
    assert len(list((tmp_path / "tvm-cuda").glob("*/kernels.so"))) == 3
    cache = BuildCache(tmp_path)
    sig = generic_signatures(programs["adam"], "float32", gpu=True)["unfactored"][0]
    (kernel,) = load_cuda_kernels(programs["adam"], "unfactored", [sig], "sm_90", cache)
    assert (cache.hits, cache.builds) == (1, 0)
    table = torch.zeros(1, len(sig.leaves) + len(sig.accumulators) + 1 + 6 + len(sig.outputs), dtype=torch.int64)
    with pytest.raises(ValueError, match="device_type on argument #0"):   # the pointer table must be on the GPU
        kernel(table, 1, 2, 1, 16, 1)


def test_cli_rejects_a_malformed_or_misplaced_arch(tmp_path, capsys):
    assert run(["--backend", "tvm", "--target", "cuda", "--arch", "90", "--out", str(tmp_path),
                os.path.join(ROOT, "specs", "adam.yaml")]) == 2
    assert "--arch 90: expected a CUDA arch like sm_80" in capsys.readouterr().err
    assert run(["--backend", "tvm", "--arch", "sm_90", "--out", str(tmp_path), os.path.join(ROOT, "specs", "adam.yaml")]) == 2
    assert "--arch goes with --backend tvm --target cuda" in capsys.readouterr().err
    assert not (tmp_path / "adam").exists()   # nothing written
