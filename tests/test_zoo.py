"""The PyLO zoo as specs (issue "The PyLO zoo as specs"): each built-in spec against a
transcription of PyLO's naive implementation at inference, on every backend."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SHAPES, InfShape
from generated.celo2 import CELO2
from generated.elo import ELO
from generated.elo_celo2 import ELO_CELO2
from oracle import CELO2_SHAPES, F32, SMALL_FC_SHAPES, Array, CELO2Oracle, SmallFcLoptOracle
from test_cuda_simt import SimtBackend
from test_reference_vs_oracle import RTOL, as_torch, compare, seeded_weights

ALL_BACKENDS = ["reference", "tvm", "cuda", "simt"]


class ELOOracle(SmallFcLoptOracle):
    """PyLO's ELO_naive (pylo/optim/ELO_naive.py) at inference: small_fc_lopt's features
    with the raw decays, and p <- p - lr * (direction * exp(magnitude * exp_mult) + wd * p)."""

    decays = (np.array([0.9, 0.99, 0.999], F32), F32(0.999), np.array([0.9, 0.99, 0.999], F32))

    def __init__(self, weights: dict[str, Array], lr: float, weight_decay: float, exp_mult: float = 0.001,
                 clip_norm: float | None = None):
        super().__init__(weights, lr, weight_decay)
        self.exp_mult, self.clip_norm = exp_mult, clip_norm

    def step(self, params: list[Array], grads: list[Array]) -> list[Array]:
        if self.clip_norm is not None:   # optax.clip_by_global_norm over every tensor
            norm = F32(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads)))
            grads = [np.asarray(g, F32) * (F32(self.clip_norm) / max(norm, F32(self.clip_norm))) for g in grads]
        return super().step(params, grads)

    def new_param(self, p: Array, direction: Array, magnitude: Array) -> Array:
        step = direction * np.exp(magnitude * F32(self.exp_mult))
        return p - F32(self.lr) * (step + F32(self.weight_decay) * p)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weight_decay, clip_norm", [(0.0, None), (0.1, None), (0.1, 0.5)])
def test_elo_matches_pylo(weight_decay, clip_norm, backend):
    weights = seeded_weights(SMALL_FC_SHAPES, seed=7)
    lr = 0.3   # the update is ~lr * |direction|: as large as p, so an error of RTOL is not hidden
    oracle = ELOOracle(weights, lr=lr, weight_decay=weight_decay, exp_mult=0.01, clip_norm=clip_norm)
    clip = {} if clip_norm is None else {"clip_grad": True, "clip_norm": clip_norm}
    worst = compare(lambda ps: on_backend(ELO(ps, lr=lr, weight_decay=weight_decay, exp_mult=0.01, **clip,
                                              weights={"mlp": as_torch(weights)},
                                              backend="cuda" if backend == "simt" else backend), backend),
                    lambda params, grads, loss: oracle.step(params, grads), seed=8)
    assert worst <= RTOL


def test_elo_defaults_are_pylos():
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(ELO.__init__).parameters.items()}
    assert (defaults["lr"], defaults["exp_mult"], defaults["weight_decay"], defaults["clip_grad"],
            defaults["clip_norm"]) == (0.001, 0.001, 0.0, 0, 1.0)


class MuLOOracle:
    """PyLO's MuLO_naive: small_fc_lopt (the oracle) with each tensor's learning rate
    divided by its width multiplier when it has two infinite axes, as MuLO_naive's
    regrouped param groups do; tensors do not interact, so one oracle per tensor."""

    def __init__(self, weights: dict[str, Array], lr: float, weight_decay: float, scales: list[float]):
        self.per_tensor = [SmallFcLoptOracle(weights, lr=lr / s, weight_decay=weight_decay) for s in scales]

    def step(self, params: list[Array], grads: list[Array]) -> list[Array]:
        return [o.step([p], [g])[0] for o, p, g in zip(self.per_tensor, params, grads)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mulo_matches_pylo_on_mup_shapes(backend):
    """Infshapes as mup.set_base_shapes attaches them (matrix-like: two infinite axes,
    vector-like: one), a param group's width_mult / inf_dims without mup, and defaults."""
    from generated.mulo import MuLO

    weights = seeded_weights(SMALL_FC_SHAPES, seed=9)
    # per tensor of SHAPES: an infshape, "group" (the second param group's values) or None
    info = [None, InfShape(1, 4.0), InfShape(1, 4.0), InfShape(2, 4.0), InfShape(2, 2.0), "group", None,
            InfShape(2, 3.0), InfShape(2, 8.0), InfShape(2, 2.0), InfShape(1, 2.0)]
    assert len(info) == len(SHAPES)
    scales = [s.width_mult() if isinstance(s, InfShape) and s.ninf() == 2 else 8.0 if s == "group" else 1.0
              for s in info]
    lr, wd = 20.0, 0.01   # small_fc_lopt's step is ~0.01 lr: as large as p, so RTOL is not hidden
    oracle = MuLOOracle(weights, lr, wd, scales)

    def make(ps):
        for p, s in zip(ps, info):
            if isinstance(s, InfShape):
                p.infshape = s
        grouped = [p for p, s in zip(ps, info) if s == "group"]
        rest = [p for p, s in zip(ps, info) if s != "group"]
        return on_backend(MuLO([{"params": rest}, {"params": grouped, "width_mult": 8.0, "inf_dims": 2}],
                               lr=lr, weight_decay=wd, weights={"mlp": as_torch(weights)},
                               backend="cuda" if backend == "simt" else backend), backend)

    assert compare(make, lambda params, grads, loss: oracle.step(params, grads), seed=10) <= RTOL


def compare_per_step(make_opt, oracle_step, seed: int, steps: int = 10, shapes: list[tuple] = SHAPES) -> float:
    """Ours against the oracle on the shape matrix, each step from the oracle's parameters:
    Newton-Schulz iterations amplify float32 rounding, so two trajectories left to drift
    apart would be compared on different inputs. Returns the worst relative error of an
    update (beyond the rounding of p - lr * step)."""
    import torch

    rng = np.random.default_rng(seed)
    expected = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in expected]
    opt = make_opt(params)
    worst = 0.0
    for step in range(steps):
        grads = [np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0), dtype=np.float32) for s in shapes]
        for p, e, g in zip(params, expected, grads):
            p.data.copy_(torch.from_numpy(np.asarray(e, np.float32)))
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        new = [np.asarray(x, np.float32) for x in oracle_step(expected, grads)]
        for shape, p, before, after in zip(shapes, params, expected, new):
            d_ours, d_ref = p.detach().numpy() - before, after - before
            scale = float(np.abs(d_ref).max())
            rounding = 2 * float(np.finfo(np.float32).eps) * max(float(np.abs(after).max()), float(np.abs(before).max()))
            err = float(np.abs(d_ours - d_ref).max())
            assert scale > 0, f"the oracle's update is zero for shape {shape} at step {step}"
            assert err <= RTOL * scale + rounding, f"shape {shape}, step {step}: max error {err:.3g}, scale {scale:.3g}"
            worst = max(worst, (err - rounding) / scale)
        expected = new
    return worst


def on_backend(opt, backend: str):
    """`opt` (built with backend="cuda" for "simt") running the CUDA kernels under SIMT."""
    if backend == "simt":
        opt.backend = SimtBackend(type(opt).program)
    return opt


EMBEDDING = 4   # SHAPES[4], a (3, 5) matrix, is in an is_embedding group: AdamW
# Newton-Schulz multiplies the rounding of its input by up to a^iterations along small
# singular values (a = 3.4445: 490x for 5 iterations, 12x for 2), and any float32 MLP
# output carries rounding: with 5 iterations even a float32 transcription of the math is
# off by more than 1e-5 on some 3 x 3 matrices. The parity cases with orthogonalization
# run 2 iterations (the same code: the count is a loop bound); test_celo2_newton_schulz
# checks 5 on matrices whose singular values keep the amplification small.
CELO2_CASES = {
    "defaults": {"ns_iters": 2},
    "clipped_decayed_adamw": {"orthogonalize": False, "clip_grad": True, "clip_norm": 0.5, "weight_decay": 0.1,
                              "adam_weight_decay": 0.02, "adam_lr_mult": 0.5, "adam_betas": (0.8, 0.99),
                              "adam_eps": 1e-6},
    "vectors_by_celo2": {"ns_iters": 2, "use_adamw_for_1d": False, "exp_mult": 0.3, "param_scale_mult": True,
                         "rmsmult": 0.7},
}


def celo2_hyper(case: dict) -> dict:
    """PyLO's constructor arguments as our hyperparameters (adam_betas is two)."""
    out = {k: v for k, v in case.items() if k != "adam_betas"}
    if "adam_betas" in case:
        out["adam_beta1"], out["adam_beta2"] = case["adam_betas"]
    return out


# Clipped gradients are tiny, so the epsilons dominate the features and the MLP's step
# is nearly the same for every element: a matrix of rank about one, the worst case of
# Newton-Schulz's amplification. Clipping is checked without orthogonalization.
ELO_CELO2_CASES = {
    "clipped_adamw_options": {"orthogonalize": False, "adam_lr_mult": 2.0, "adam_weight_decay": 0.0},
    "orthogonalized_unclipped": {"ns_iters": 2, "clip_grad": False},
    "vectors_by_celo2": {"ns_iters": 2, "clip_grad": False, "use_adamw_for_1d": False, "weight_decay": 0.0},
}
# name -> (class, the oracle's arguments for the class's defaults, cases)
CELO2_FAMILY = {
    "celo2": (CELO2, {}, CELO2_CASES),
    "elo_celo2": (ELO_CELO2, {"shared_adam": True, "weight_decay": 0.1, "clip_grad": True}, ELO_CELO2_CASES),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name, case", [(n, c) for n, (_, _, cases) in CELO2_FAMILY.items() for c in cases])
def test_celo2_family_matches_pylo(name, case, backend):
    cls, oracle_defaults, cases = CELO2_FAMILY[name]
    weights = seeded_weights(CELO2_SHAPES, seed=3)
    lr = 0.3   # the step has a root mean square of 1 per matrix: lr * 1 is as large as p
    oracle = CELO2Oracle(weights, lr=lr, embedding=frozenset({EMBEDDING}),
                         **{"weight_decay": 0.0, **oracle_defaults, **cases[case]})

    def make(ps):
        groups = [{"params": ps[:EMBEDDING] + ps[EMBEDDING + 1:]}, {"params": [ps[EMBEDDING]], "is_embedding": True}]
        return on_backend(cls(groups, lr=lr, weights={"mlp": as_torch(weights)},
                              backend="cuda" if backend == "simt" else backend, **celo2_hyper(cases[case])), backend)

    assert compare_per_step(make, oracle.step, seed=5) <= RTOL


def test_celo2_family_defaults_are_pylos():
    import inspect

    def defaults(cls) -> dict:
        return {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}

    celo2, elo_celo2 = defaults(CELO2), defaults(ELO_CELO2)
    shared = {"lr": 1e-3, "adam_lr_mult": 1.0, "use_adamw_for_1d": 1, "orthogonalize": 1, "clip_norm": 1.0,
              "exp_mult": 0.0, "rmsmult": 1.0, "param_scale_mult": 0, "ns_a": 3.4445, "ns_b": -4.775,
              "ns_c": 2.0315, "ns_iters": 5, "ns_eps": 1e-8, "grad_clip_val": 1000.0, "is_embedding": 0}
    assert {k: celo2[k] for k in shared} == shared == {k: elo_celo2[k] for k in shared}
    assert (celo2["weight_decay"], celo2["clip_grad"], celo2["adam_beta1"], celo2["adam_beta2"],
            celo2["adam_eps"]) == (0.0, 0, 0.9, 0.95, 1e-8)
    assert (elo_celo2["weight_decay"], elo_celo2["clip_grad"]) == (0.1, 1)
    assert not {"adam_beta1", "adam_beta2", "adam_eps"} & set(elo_celo2)   # its AdamW reads CELO2's accumulators


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (2, 3, 4), (3, 3, 2, 2), (4, 2, 3, 3)])
def test_celo2_newton_schulz(shape):
    """CELO2's matrix step (Newton-Schulz with its 5 default iterations, then the
    normalization) against the oracle's, on
    groups of 2 tensors whose matrices have singular values in [0.3, 1] (where the
    iteration does not amplify rounding much)."""
    import torch

    from lopt_codegen.backends.tensor_program import GroupEnv, run_tensor_function
    from lopt_codegen.runtime.axes import factored_axes
    from oracle import newton_schulz, rms_normalize

    rng = np.random.default_rng(sum(shape))
    axes = factored_axes(shape, "adafactor")
    lo, hi = sorted(axes)
    r, c = shape[lo], shape[hi]
    batch = [n for i, n in enumerate(shape) if i not in (lo, hi)]
    k = min(r, c)

    def conditioned() -> np.ndarray:
        u = np.linalg.qr(rng.standard_normal((r, r)))[0][:, :k]
        v = np.linalg.qr(rng.standard_normal((c, c)))[0][:, :k]
        m = (u * rng.uniform(0.3, 1.0, k)) @ v.T
        return m

    mats = np.stack([np.stack([conditioned() for _ in range(int(np.prod(batch)))]) for _ in range(2)])
    x = np.moveaxis(mats.reshape(2, *batch, r, c), (-2, -1), (lo + 1, hi + 1)).astype(np.float32)
    hyper = CELO2.program.hyperparameters
    env = GroupEnv(shape, axes, 2, torch.device("cpu"),
                   hyper=lambda n: torch.full((2,), float(hyper[n])), hyper_floats=lambda n: [float(hyper[n])] * 2,
                   step=lambda: torch.zeros(2))
    ours = run_tensor_function(CELO2.program.tensor_functions["matrix_step"], [torch.from_numpy(x)], env).numpy()
    for i in range(2):
        expected = rms_normalize(newton_schulz(x[i].astype(np.float64), axes, (3.4445, -4.7750, 2.0315), 5, 1e-8), axes)
        assert ours[i].shape == shape
        assert np.abs(ours[i] - expected).max() <= RTOL * np.abs(expected).max(), shape


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_celo2_groups_of_same_shape_tensors(backend):
    """Same-shape tensors run each tensor function as one batch: two (5, 3) matrices from
    param groups with orthogonalize on and off, and three (2, 3, 4) tensors, one of them
    in the other group."""
    shapes = [(5, 3), (5, 3), (2, 3, 4), (2, 3, 4), (2, 3, 4), (7,)]
    off = frozenset({1, 3})
    weights = seeded_weights(CELO2_SHAPES, seed=11)
    oracle = CELO2Oracle(weights, lr=0.3, weight_decay=0.05, ns_iters=2, unorthogonalized=off)

    def make(ps):
        groups = [{"params": [p for i, p in enumerate(ps) if i not in off]},
                  {"params": [p for i, p in enumerate(ps) if i in off], "orthogonalize": False}]
        return on_backend(CELO2(groups, lr=0.3, weight_decay=0.05, ns_iters=2, weights={"mlp": as_torch(weights)},
                                backend="cuda" if backend == "simt" else backend), backend)

    assert compare_per_step(make, oracle.step, seed=12, shapes=shapes) <= RTOL
