"""Learned optimizers with seeded meta-weights run 100 training steps with finite loss."""
from __future__ import annotations

import pytest
import torch

from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO


def train(make_opt, steps=100):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x = torch.randn(128, 8)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    opt = make_opt(model.parameters(), steps)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss.detach())
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("make_opt", [
    lambda params, steps: SmallFcLopt(params, lr=0.1, weights="random", seed=0),
    lambda params, steps: VeLO(params, lr=0.1, num_steps=steps, weights="random", seed=0),
], ids=["small_fc_lopt", "velo"])
def test_hundred_steps_with_finite_loss(make_opt):
    losses, model = train(make_opt)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] != losses[0], "the parameters never moved"
