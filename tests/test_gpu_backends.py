"""The compiled backends on CUDA tensors (cuda: the Jinja kernels; tvm: TVM's CUDA
kernels, both built with nvcc) against the reference backend on the CPU: every built-in
spec, every shape, 12 steps, 1e-5 relative error of the updates; bf16 params;
bitwise-deterministic reruns (skipped without a GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHAPES
from test_cuda_backend import MAKERS, RTOL, STEPS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def run(name: str, device: str, backend: str, dtype: torch.dtype, seed: int = 21):
    """Per step and tensor (float32, on the CPU): (update, p before, p after)."""
    rng = np.random.default_rng(seed)
    params = [torch.nn.Parameter(torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=np.float32))
                                 .to(device=device, dtype=dtype)) for s in SHAPES]
    opt = MAKERS[name](params, backend)
    history = []
    for step in range(STEPS):
        loss = torch.tensor(float(2.0 / (step + 1) + rng.uniform(0, 0.1)), device=device)
        before = [p.detach().float().cpu().clone() for p in params]
        for p, s in zip(params, SHAPES):
            g = np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0), dtype=np.float32)
            p.grad = torch.from_numpy(g).to(device=device, dtype=dtype)
        opt.step(loss=loss)
        after = [p.detach().float().cpu().clone() for p in params]
        history.append([(a - b, b, a) for a, b in zip(after, before)])
    if backend == "tvm":   # its CUDA kernels ran (no fallback to the reference for any tensor)
        assert opt.backend._kernels and all(key[-1] is not None for key in opt.backend._kernels)
        assert not opt.backend._warned, opt.backend._warned
    return history


BACKENDS = ["cuda", "tvm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_gpu_matches_reference(name, backend):
    ours, ref = run(name, "cuda", backend, torch.float32), run(name, "cpu", "reference", torch.float32)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for shape, (d_ours, _, _), (d_ref, before, after) in zip(SHAPES, a, b):
            scale = float(d_ref.abs().max())
            # both write p - lr * step in float32: allow that rounding (2 ulp of p) on top
            rounding = 2 * float(np.finfo(np.float32).eps) * max(float(before.abs().max()), float(after.abs().max()))
            err = float((d_ours - d_ref).abs().max())
            assert err <= RTOL * scale + rounding, (
                f"{backend} {name} shape {shape}, step {step}: error {err:.3g}, update {scale:.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["small_fc_lopt", "adam"])
def test_gpu_bf16_params(name, backend):
    ours, ref = run(name, "cuda", backend, torch.bfloat16), run(name, "cpu", "reference", torch.bfloat16)
    ulp = float(torch.finfo(torch.bfloat16).eps)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for shape, (d_ours, _, after), (d_ref, _, _) in zip(SHAPES, a, b):
            err = float((d_ours - d_ref).abs().max())
            assert err <= ulp * float(after.abs().max()) + 1e-6, (
                f"{backend} {name} bf16 shape {shape}, step {step}: {err:.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_reruns_are_bitwise_identical(backend):
    """Reductions are partials summed in a fixed order: no atomics."""
    first, second = run("velo", "cuda", backend, torch.float32), run("velo", "cuda", backend, torch.float32)
    for a, b in zip(first, second):
        for (_, _, p), (_, _, q) in zip(a, b):
            assert torch.equal(p, q)
