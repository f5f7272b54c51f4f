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


class InfShape:
    """What mup.set_base_shapes attaches to a parameter, as far as MuLO reads it."""

    def __init__(self, ninf: int, width_mult: float):
        self._ninf, self._width_mult = ninf, width_mult

    def ninf(self) -> int:
        return self._ninf

    def width_mult(self) -> float:
        return self._width_mult


@pytest.mark.parametrize("backend", ["reference", "tvm", "cuda"])
def test_mulo_is_small_fc_lopt_with_pylos_mup_groups(backend):
    """PyLO's MuLO_naive regroups the parameters by infshape and divides the learning rate
    of matrix-like ones (ninf == 2) by their width multiplier: MuLO on the parameters
    equals SmallFcLopt on those regrouped param groups, step for step."""
    import torch

    from generated.mulo import MuLO
    from generated.small_fc_lopt import SmallFcLopt

    weights = {"mlp": as_torch(seeded_weights(SMALL_FC_SHAPES, seed=9))}
    gen = torch.Generator().manual_seed(3)
    # (shape, infshape or a group's values or nothing)
    layout = [((8, 6), InfShape(2, 4.0)), ((6, 8), InfShape(2, 2.0)), ((8,), InfShape(1, 4.0)),
              ((5, 3), InfShape(1, 4.0)), ((4, 4), None), ((3, 5), "group")]
    start = [torch.randn(s, generator=gen) for s, _ in layout]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    theirs = [torch.nn.Parameter(x.clone()) for x in start]
    for p, (_, info) in zip(ours, layout):
        if isinstance(info, InfShape):
            p.infshape = info
    lr, wd = 20.0, 0.01
    mulo = MuLO([{"params": ours[:5]}, {"params": ours[5:], "width_mult": 8.0, "inf_dims": 2}],
                lr=lr, weight_decay=wd, weights=weights, backend=backend)
    scale = [4.0, 2.0, 1.0, 1.0, 1.0, 8.0]
    regrouped = SmallFcLopt([{"params": [q], "lr": lr / s} for q, s in zip(theirs, scale)], lr=lr, weight_decay=wd,
                            weights=weights, backend="reference")
    for step in range(6):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        before = [q.detach().clone() for q in theirs]
        mulo.step()
        regrouped.step()
        for p, q, b in zip(ours, theirs, before):
            d_ours, d_ref = p.detach() - b, q.detach() - b
            rounding = 2 * float(np.finfo(np.float32).eps) * float(b.abs().max())
            assert float((d_ours - d_ref).abs().max()) <= RTOL * float(d_ref.abs().max()) + rounding, (p.shape, step)
            p.data.copy_(q.data)
