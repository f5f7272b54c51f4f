"""The PyLO zoo as specs (issue "The PyLO zoo as specs"): each built-in spec against a
transcription of PyLO's naive implementation at inference, on every backend."""
from __future__ import annotations

import numpy as np
import pytest

from generated.elo import ELO
from oracle import F32, SMALL_FC_SHAPES, Array, SmallFcLoptOracle
from test_reference_vs_oracle import RTOL, as_torch, compare, seeded_weights


class ELOOracle(SmallFcLoptOracle):
    """PyLO's ELO_naive (pylo/optim/ELO_naive.py) at inference: small_fc_lopt's features
    with the raw decays, and p <- p - lr * (direction * exp(magnitude * exp_mult) + wd * p)."""

    decays = (np.array([0.9, 0.99, 0.999], F32), F32(0.999), np.array([0.9, 0.99, 0.999], F32))

    def __init__(self, weights: dict[str, Array], lr: float, weight_decay: float, exp_mult: float = 0.001):
        super().__init__(weights, lr, weight_decay)
        self.exp_mult = exp_mult

    def new_param(self, p: Array, direction: Array, magnitude: Array) -> Array:
        step = direction * np.exp(magnitude * F32(self.exp_mult))
        return p - F32(self.lr) * (step + F32(self.weight_decay) * p)


@pytest.mark.parametrize("backend", ["reference", "tvm", "cuda"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_elo_matches_pylo(weight_decay, backend):
    weights = seeded_weights(SMALL_FC_SHAPES, seed=7)
    lr = 0.3   # the update is ~lr * |direction|: as large as p, so an error of RTOL is not hidden
    oracle = ELOOracle(weights, lr=lr, weight_decay=weight_decay, exp_mult=0.01)
    worst = compare(lambda ps: ELO(ps, lr=lr, weight_decay=weight_decay, exp_mult=0.01, weights={"mlp": as_torch(weights)},
                                   backend=backend),
                    lambda params, grads, loss: oracle.step(params, grads), seed=8)
    assert worst <= RTOL


def test_elo_defaults_are_pylos():
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(ELO.__init__).parameters.items()}
    assert (defaults["lr"], defaults["exp_mult"], defaults["weight_decay"]) == (0.001, 0.001, 0.0)
