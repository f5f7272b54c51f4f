"""The reference backend against the independent numpy oracle (tests/oracle.py, a plain
transcription of shared/ALGORITHMS.md): small_fc_lopt and VeLO, random weights, random
gradients, every shape of the matrix, 12 steps, 1e-5 relative error on the updates. The
TVM and CUDA (host build) backends are checked against the same oracle."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from conftest import SHAPES
from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO
from oracle import SMALL_FC_SHAPES, VELO_MLP_SHAPES, VELO_RNN_SHAPES, SmallFcLoptOracle, VeLOOracle

STEPS = 12
RTOL = 1e-5


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.uniform(-1, 1, s) / np.sqrt(s[-1])).astype(np.float32) for k, s in shapes.items()}


def as_torch(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in weights.items()}


def compare(make_opt: Callable, oracle_step: Callable, seed: int) -> float:
    """Run ours and the oracle for STEPS steps on the same random gradients and compare
    each step's update of each tensor. The allowed error is RTOL of the update plus the
    float32 rounding of p that both make when they write p - lr * step. Returns the
    worst relative error seen."""
    rng = np.random.default_rng(seed)
    start = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in SHAPES]
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in start]
    opt = make_opt(params)
    expected = [p.copy() for p in start]
    worst = 0.0
    for step in range(STEPS):
        grads = [np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0), dtype=np.float32) for s in SHAPES]
        loss = float(2.0 / (step + 1) + rng.uniform(0, 0.1))
        before = [p.detach().numpy().copy() for p in params]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step(loss=loss)
        new_expected = oracle_step(expected, grads, loss)
        for shape, p, b, e_before, e in zip(SHAPES, params, before, expected, new_expected):
            d_ours, d_ref = p.detach().numpy() - b, e - e_before
            scale = float(np.abs(d_ref).max())
            rounding = 2 * float(np.finfo(np.float32).eps) * max(float(np.abs(e).max()), float(np.abs(b).max()))
            err = float(np.abs(d_ours - d_ref).max())
            assert scale > 0, f"the oracle's update is zero for shape {shape} at step {step}"
            assert err <= RTOL * scale + rounding, (
                f"shape {shape}, step {step}: max error {err:.3g}, update scale {scale:.3g}")
            worst = max(worst, (err - rounding) / scale)
        expected = new_expected
    return worst


@pytest.mark.parametrize("backend", ["reference", "tvm", "cuda"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_small_fc_lopt_matches_oracle(weight_decay, backend):
    weights = seeded_weights(SMALL_FC_SHAPES, seed=1)
    # Updates ~ lr * 0.01: lr 30 makes them as large as the params, so an error of RTOL
    # of the update is not hidden below the params' float32 rounding.
    lr = 30.0
    oracle = SmallFcLoptOracle(weights, lr=lr, weight_decay=weight_decay)
    worst = compare(lambda ps: SmallFcLopt(ps, lr=lr, weight_decay=weight_decay, weights={"mlp": as_torch(weights)},
                                           backend=backend),
                    lambda params, grads, loss: oracle.step(params, grads), seed=2)
    assert worst <= RTOL


@pytest.mark.parametrize("backend", ["reference", "tvm", "cuda"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_velo_matches_oracle(weight_decay, backend):
    mlp, rnn = seeded_weights(VELO_MLP_SHAPES, seed=4), seeded_weights(VELO_RNN_SHAPES, seed=5)
    lr = 300.0  # VeLO's step is ~1e-3 * |p|; see above
    oracle = VeLOOracle(mlp, rnn, num_steps=40, lr=lr, weight_decay=weight_decay)
    worst = compare(lambda ps: VeLO(ps, lr=lr, weight_decay=weight_decay, num_steps=40,
                                    weights={"mlp": as_torch(mlp), "rnn": as_torch(rnn)}, backend=backend),
                    oracle.step, seed=6)
    assert worst <= RTOL
