"""The reference backend on CUDA tensors matches it on the CPU (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("make", [
    lambda ps: SmallFcLopt(ps, lr=0.1, weights="random"),
    lambda ps: VeLO(ps, lr=1.0, num_steps=20, weights="random"),
], ids=["small_fc_lopt", "velo"])
def test_cuda_matches_cpu(make):
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (7,), (5, 3), (4, 4), (2, 3, 4), (3, 3, 2, 2)]
    cpu = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu, opt_gpu = make(cpu), make(gpu)
    for step in range(5):
        for p, q in zip(cpu, gpu):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.cuda()
        opt_cpu.step(loss=torch.tensor(1.0 / (step + 1)))
        opt_gpu.step(loss=torch.tensor(1.0 / (step + 1), device="cuda"))
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
