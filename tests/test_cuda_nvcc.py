"""The committed generated/<name>/<name>.cu of every built-in spec, and the kernels of
every spec in specs/examples/, compile with nvcc for sm_80 and sm_90 (no GPU needed),
every pass has its kernel, and ptxas reports no register spills. Skipped only where
nvcc is not installed."""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT
from lopt_codegen.backends.cuda.build import DEFAULT_ARCHS, KernelReport, ptxas_report
from lopt_codegen.backends.cuda.render import render_cuda

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                                reason="needs nvcc (the CUDA toolkit)")
NAMES = ("small_fc_lopt", "velo", "adam", "elo", "mulo", "celo2", "elo_celo2")


@pytest.fixture(scope="session")
def reports() -> dict[str, list[KernelReport]]:
    """nvcc runs once per spec, all in parallel (each is mostly single-threaded)."""
    def compile_one(name: str) -> list[KernelReport]:
        with open(os.path.join(ROOT, "generated", name, f"{name}.cu")) as f:
            return ptxas_report(f.read(), DEFAULT_ARCHS)

    with ThreadPoolExecutor(len(NAMES)) as pool:
        return dict(zip(NAMES, pool.map(compile_one, NAMES)))


@pytest.mark.parametrize("name", NAMES)
def test_every_pass_compiles_for_each_arch(name, programs, reports):
    layouts = render_cuda(programs[name], name).layouts
    expected = {f"{L.name}_kernel" for ls in layouts.values() for L in ls}
    for arch in DEFAULT_ARCHS:
        found = {k for k in expected if any(k in r.kernel and r.arch == arch for r in reports[name])}
        assert found == expected, f"{name} {arch}: kernels missing from ptxas's report: {expected - found}"


@pytest.mark.parametrize("name", NAMES)
def test_no_register_spills(name, reports):
    for r in reports[name]:
        assert r.spill_stores == 0 and r.spill_loads == 0, (
            f"{name} {r.kernel} on {r.arch}: {r.spill_stores} B spill stores, {r.spill_loads} B spill loads "
            f"({r.registers} registers)")
        assert r.registers <= 255


EXAMPLES = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "specs", "examples")) if f.endswith(".yaml"))


@pytest.fixture(scope="session")
def example_reports() -> dict[str, tuple[set[str], list[KernelReport]]]:
    """specs/examples/: each pass's kernel name and nvcc's report, all in parallel."""
    from lopt_codegen.ir import lower_spec
    from lopt_codegen.spec import load_spec

    def compile_one(name: str) -> tuple[set[str], list[KernelReport]]:
        rendered = render_cuda(lower_spec(load_spec(os.path.join(ROOT, "specs", "examples", f"{name}.yaml"))), name)
        kernels = {f"{L.name}_kernel" for ls in rendered.layouts.values() for L in ls}
        return kernels, ptxas_report(rendered.source, DEFAULT_ARCHS)

    with ThreadPoolExecutor(len(EXAMPLES)) as pool:
        return dict(zip(EXAMPLES, pool.map(compile_one, EXAMPLES)))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_kernels_compile_without_spills(name, example_reports):
    expected, reports = example_reports[name]
    for arch in DEFAULT_ARCHS:
        found = {k for k in expected if any(k in r.kernel and r.arch == arch for r in reports)}
        assert found == expected, f"{name} {arch}: kernels missing from ptxas's report: {expected - found}"
    for r in reports:
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.registers <= 255, (name, r)


def test_nvcc_build_links_loads_and_its_host_drivers_match_reference():
    """The GPU build path (tvm_ffi.cpp with nvcc, linked against cudart) works without a
    GPU, and the host drivers in that very binary (nvcc's host compile of the shared
    element code) match the reference on CPU tensors."""
    import torch

    from generated.adam import cuda_binding
    from test_cuda_backend import RTOL, run_both, _adam

    module = cuda_binding.load("sm_90")
    assert all(getattr(module, f"{n}_cuda") is not None for ns in cuda_binding.PASSES.values() for n in ns)

    def make(ps, backend, decay=0.0):
        opt = _adam(ps, backend, decay)
        if backend == "cuda":
            opt.backend._modules["cpu"] = module   # run CPU tensors through the nvcc binary
        return opt

    for step, shape, d_ours, d_ref, before, after in run_both(make, torch.float32, 31):
        rounding = 2 * 1.2e-7 * max(float(before.abs().max()), float(after.abs().max()))
        assert float((d_ours - d_ref).abs().max()) <= RTOL * float(d_ref.abs().max()) + rounding, (shape, step)


def test_mlp_over_48_kb_of_shared_memory_opts_in(tmp_path):
    """Weights staged in shared memory past the default 48 KB need the kernel's opt-in,
    or the launch fails; the built-in specs stay under it (8 KB). (Rendered only: nvcc
    takes over a minute on this fully unrolled 39-128-96-2 MLP.)"""
    from lopt_codegen.ir import lower_spec
    from lopt_codegen.spec import load_spec

    text = open(os.path.join(ROOT, "specs", "small_fc_lopt.yaml")).read()
    for old, new in [("sizes: [39, 32, 32, 2]", "sizes: [39, 128, 96, 2]"), ("weight: [32, 39]", "weight: [128, 39]"),
                     ("input.bias: [32]", "input.bias: [128]"), ("weight: [32, 32]", "weight: [96, 128]"),
                     ("linear_0.bias: [32]", "linear_0.bias: [96]"), ("weight: [2, 32]", "weight: [2, 96]")]:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "wide.yaml").write_text(text)
    rendered = render_cuda(lower_spec(load_spec(tmp_path / "wide.yaml")), "wide")
    mlp_passes = [L.name for ls in rendered.layouts.values() for L in ls if L.mlp is not None]
    assert mlp_passes
    for name in mlp_passes:
        assert f"cudaFuncSetAttribute({name}_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize" in rendered.source
    assert "cudaFuncSetAttribute" not in render_cuda(lower_spec(load_spec(os.path.join(ROOT, "specs", "small_fc_lopt.yaml"))),
                                                     "small_fc_lopt").source
