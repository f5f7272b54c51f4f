"""A steady-state step makes no tensor from host data (torch.tensor, pinned copies): on a
GPU it then copies nothing from the host, which capturing the step in a CUDA graph needs.
Checked here on the CPU, for the host side of every compiled path: the cuda backend
(its kept launch tables and buffers), the TVM backend with the torch small work (what
its CUDA groups run) and with the compiled one; constants and hyperparameters come from
per-device caches. The steps stay right (against the reference). On the CPU this cannot
see a host tensor made another way and moved (VeLO's loss-buffer decays, now cached):
tests/test_gpu_backends.py captures and replays a step on a device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHAPES
from lopt_codegen.backends.tvm import TvmBackend
from test_cuda_backend import MAKERS

BACKENDS = {"cuda": {}, "tvm, torch small work": {"compiled_small_work": False}, "tvm": {}}


def _refuse(*args, **kwargs):
    raise AssertionError("a tensor made from host data inside a steady-state step")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(MAKERS))
def test_steady_state_step_makes_no_tensor_from_host_data(name, backend, monkeypatch):
    rng = np.random.default_rng(5)
    start = [torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=np.float32)) for s in SHAPES]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt, opt_ref = MAKERS[name](ours, backend.split(",")[0]), MAKERS[name](ref, "reference")
    if BACKENDS[backend]:
        opt.backend = TvmBackend(type(opt).program, **BACKENDS[backend])
    # A captured step reads fixed memory: the gradients and the loss are written in place.
    for p, q in zip(ours, ref):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    loss = torch.zeros(())
    for step in range(3):
        for p, q in zip(ours, ref):
            g = torch.from_numpy(np.asarray(rng.standard_normal(p.shape), dtype=np.float32))
            p.grad.copy_(g)
            q.grad.copy_(g)
        loss.fill_(1.0 / (step + 1))
        opt_ref.step(loss=loss)
        if step == 2:   # the first steps made the state, the caches and the tables
            monkeypatch.setattr(torch, "tensor", _refuse)
            monkeypatch.setattr(torch.Tensor, "pin_memory", _refuse)
        opt.step(loss=loss)
        monkeypatch.undo()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)
