"""The generated Adam (an MLP with analytic weights) trains a model exactly like
torch.optim.Adam: the end-to-end proof that specs, IR, backend and runtime agree."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from generated.adam import Adam


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, 6, 6, generator=gen)
    y = x[:, 0].mean(dim=(1, 2)).unsqueeze(1) * 3 - x[:, 1, 0, 0].unsqueeze(1)
    return x, y


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_tracks_torch_adam_for_200_steps(weight_decay):
    ours_model = make_model()
    ref_model = copy.deepcopy(ours_model)
    ours = Adam(ours_model.parameters(), lr=3e-3, weight_decay=weight_decay)
    ref = torch.optim.Adam(ref_model.parameters(), lr=3e-3, weight_decay=weight_decay, foreach=False)
    x, y = make_data()
    losses = []
    for _ in range(200):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        scale = q.abs().max().item()
        assert (p - q).abs().max().item() <= 1e-5 * scale, "generated Adam drifted from torch.optim.Adam"
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_update_matches_per_step_on_odd_shapes():
    """Parameter by parameter, each step's update matches torch's to 1e-5 relative."""
    torch.manual_seed(3)
    shapes = [(), (7,), (5, 3), (3, 5), (2, 3, 4), (3, 3, 2, 2)]
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours, ref = Adam(ours_p, lr=0.01), torch.optim.Adam(ref_p, lr=0.01, foreach=False)
    for _ in range(12):
        before = [p.detach().clone() for p in ref_p]
        for p, q in zip(ours_p, ref_p):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q, b in zip(ours_p, ref_p, before):
            d_ours, d_ref = p.detach() - b, q.detach() - b
            # A difference of two params cannot be finer than their float32 rounding.
            rounding = 2 * torch.finfo(torch.float32).eps * b.abs().max()
            assert (d_ours - d_ref).abs().max() <= 1e-5 * d_ref.abs().max() + rounding
            p.data.copy_(q.detach())  # keep both on the same trajectory


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_step_counts_through_unset_grads_checkpoints_and_replaced_counts(backend):
    """Each tensor's t, as torch.optim.Adam counts it (its bias correction reads it):
    CPU counts are views into one buffer (runtime/step_counts.py), made again when a
    gradient is left unset, a checkpoint is loaded or a count is replaced."""
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(s, generator=gen) for s in [(5, 3), (7,), (4, 4)]]
    ours_params = [torch.nn.Parameter(p.clone()) for p in start]
    ref_params = [torch.nn.Parameter(p.clone()) for p in start]
    ours = Adam(ours_params, lr=0.1, backend=backend)
    ref = torch.optim.Adam(ref_params, lr=0.1, foreach=False)
    saved = {}

    def before(step: int, opt, params) -> None:
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        if step == 2:
            params[2].grad = None
        if step == 4:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            saved[id(opt)] = buffer.getvalue()
        if step == 6:
            opt.load_state_dict(torch.load(io.BytesIO(saved[id(opt)]), weights_only=False))
        if step == 7:
            opt.state[params[0]]["step"] = torch.tensor(10.0)

    for step in range(9):
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            before(step, opt, params)
            opt.step()
        counts = [float(ours.state[p]["step"]) for p in ours_params]
        assert counts == [float(ref.state[p]["step"]) for p in ref_params], f"step {step}"
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert counts == [12.0, 7.0, 6.0]
    assert len({ours.state[p]["step"].untyped_storage().data_ptr() for p in ours_params}) == 1
