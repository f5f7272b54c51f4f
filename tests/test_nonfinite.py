"""`grad.nonfinite: keep` (the default) is IEEE arithmetic with NaN kept through every op
(min, max, clip, relu, sign), the same on every backend: after a step whose gradients
hold NaN and ±inf, parameters and state have NaN and inf in the same places on reference,
tvm, the cuda host build and the SIMT run, and equal values elsewhere."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_examples import BACKENDS, SimtBackend, examples  # noqa: F401 (a fixture)

SHAPES = [(5, 3), (7,), (2, 3, 4), (), (4, 6)]
BUILTIN = {"adam": "Adam", "small_fc_lopt": "SmallFcLopt", "velo": "VeLO", "elo": "ELO", "celo2": "CELO2",
           "elo_celo2": "ELO_CELO2", "mulo": "MuLO"}
EXAMPLES = ["lion", "adafactor", "amsgrad", "sgd", "rmsprop"]


def poisoned_run(cls: type, backend: str, steps: int = 3) -> dict[str, torch.Tensor]:
    """Parameters and float state after `steps` steps; step 1's gradients hold NaN, +inf
    and -inf at a few elements of every tensor but the 0-D one."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    kwargs = {"num_steps": 50} if "num_steps" in cls.program.hyperparameters else {}
    if cls.program.weight_groups and not cls.program.builtin_weights:
        kwargs["weights"] = "random"
    opt = cls(params, lr=0.01, backend="cuda" if backend == "simt" else backend, **kwargs)
    if backend == "simt":
        opt.backend = SimtBackend(cls.program)
    for step in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen)
            if step == 1 and p.dim() > 0:
                flat = g.view(-1)
                flat[0], flat[-1] = float("nan"), float("inf")
                if flat.numel() > 2:
                    flat[1] = -float("inf")
            p.grad = g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(loss=torch.tensor(1.0)) if cls.program.needs_loss else opt.step()
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(params)}
    state = opt.state_dict()["state"]   # scratch buffers of tensor functions are not state
    for i, s in state.items():
        out.update({f"s{i}.{k}": v.clone() for k, v in s.items()
                    if isinstance(v, torch.Tensor) and v.dtype.is_floating_point})
    return out


def assert_same_nonfinite(ours: dict, ref: dict, what: str) -> None:
    assert set(ours) == set(ref), what
    for key, r in ref.items():
        o = ours[key]
        assert torch.equal(o.isnan(), r.isnan()), f"{what}: NaN positions differ in {key}"
        assert torch.equal(o.isposinf(), r.isposinf()) and torch.equal(o.isneginf(), r.isneginf()), \
            f"{what}: inf positions differ in {key}"
        finite = r.isfinite()
        assert torch.allclose(o[finite], r[finite], rtol=1e-4, atol=1e-6), f"{what}: finite values differ in {key}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_optimizers_keep_nonfinite_values_alike(name, backend):
    cls = getattr(importlib.import_module(f"generated.{name}"), BUILTIN[name])
    ref = poisoned_run(cls, "reference")
    if name != "elo":   # ELO zeroes non-finite gradients first (grad.nonfinite: zero)
        assert any(not v.isfinite().all() for v in ref.values()), "the poison reached nothing"
    assert_same_nonfinite(poisoned_run(cls, backend), ref, f"{name} on {backend}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_keep_nonfinite_values_alike(examples, name, backend):  # noqa: F811
    cls = examples[name]
    ref = poisoned_run(cls, "reference")
    assert any(not v.isfinite().all() for v in ref.values()), "the poison reached nothing"
    assert_same_nonfinite(poisoned_run(cls, backend), ref, f"{name} on {backend}")


def test_nan_stays_nan_through_min_max_relu_and_sign():
    from lopt_codegen.backends.torch_ops import BINARY, UNARY

    x = torch.tensor([float("nan"), 2.0, -3.0, float("inf")])
    y = torch.tensor([1.0, float("nan"), -float("inf"), 0.0])
    assert torch.equal(BINARY["min"](x, y).isnan(), torch.tensor([True, True, False, False]))
    assert torch.equal(BINARY["max"](x, y).isnan(), torch.tensor([True, True, False, False]))
    assert UNARY["sign"](x).isnan()[0] and UNARY["relu"](x).isnan()[0]


@pytest.fixture(scope="session")
def skipping(tmp_path_factory) -> dict[str, type]:
    """Adam, VeLO (network state, loss buffer) and CELO2 (routes, a tensor function) with
    `grad.nonfinite: skip`, as specs that extend the built-in ones."""
    from conftest import SPECS
    from test_examples import compile_and_import

    out = tmp_path_factory.mktemp("skip")
    paths = []
    for name in ("adam", "velo", "celo2"):
        path = out / f"{name}_skip.yaml"
        path.write_text(f"extends: {SPECS}/{name}.yaml\nname: {name}_skip\nclass_name: {name.title()}Skip\n"
                        "grad:\n  nonfinite: skip\n")
        paths.append(str(path))
    return compile_and_import(str(out), "lopt_skip", paths)


def run_steps(cls: type, backend: str, poison_at: int | None, steps: int = 5):
    """Params and state after `steps` steps of random gradients; with poison_at, that step's
    gradients hold NaN and inf (None: that step is not taken at all, the reference run)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    kwargs = {"num_steps": 50} if "num_steps" in cls.program.hyperparameters else {}
    if cls.program.weight_groups and not cls.program.builtin_weights:
        kwargs.update(weights="random", seed=3)
    opt = cls(params, lr=0.01, backend="cuda" if backend == "simt" else backend, **kwargs)
    if backend == "simt":
        opt.backend = SimtBackend(cls.program)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if step == 2:
            if poison_at is None:
                continue
            grads[2].view(-1)[5] = float("nan")
            grads[0].view(-1)[0] = float("inf")
        for p, g in zip(params, grads):
            p.grad = g
        opt.step(loss=torch.tensor(2.0 / (step + 1))) if cls.program.needs_loss else opt.step()
    return params, opt


SKIP_CASES = [(name, backend) for name in ("adam", "velo", "celo2") for backend in BACKENDS]


@pytest.mark.parametrize("name, backend", SKIP_CASES)
def test_skip_leaves_parameters_and_state_as_if_the_step_never_happened(skipping, name, backend, quiet_machine):
    cls = skipping[f"{name}_skip"]
    skipped_params, skipped = run_steps(cls, backend, poison_at=2)
    clean_params, clean = run_steps(cls, backend, poison_at=None)
    for a, b in zip(skipped_params, clean_params):
        assert torch.equal(a, b), name
    theirs = clean.state_dict()["state"]
    ours = skipped.state_dict()["state"]
    assert (float(ours.pop("skipped_steps")), float(theirs.pop("skipped_steps"))) == (1.0, 0.0)
    assert ours.keys() == theirs.keys()
    for key, state in theirs.items():
        for k, v in state.items():
            assert torch.equal(ours[key][k], v) if isinstance(v, torch.Tensor) else ours[key][k] == v, (key, k)


def test_the_count_of_skipped_steps_is_saved_and_keeps_counting(skipping):
    cls = skipping["adam_skip"]
    params, opt = run_steps(cls, "reference", poison_at=2)
    again = cls(params, lr=0.01, backend="reference")
    again.load_state_dict(opt.state_dict())
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    before = [p.detach().clone() for p in params]
    again.step()
    assert float(again.state["skipped_steps"]) == 2.0
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@settings(max_examples=8, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(poison=st.lists(st.tuples(st.integers(0, 3), st.integers(0, len(SHAPES) - 1), st.integers(0, 30),
                                 st.sampled_from([float("nan"), float("inf"), -float("inf")])),
                       min_size=1, max_size=4),
       policy=st.sampled_from(["keep", "skip"]))
def test_fuzz_nonfinite_gradients_agree_across_backends(skipping, poison, policy):
    """NaN and ±inf at random elements of random tensors at random steps: under `keep`
    (small_fc_lopt) and `skip` (CELO2), tvm, cuda and SIMT end with the reference's
    parameters and state."""
    from generated.small_fc_lopt import SmallFcLopt

    cls = SmallFcLopt if policy == "keep" else skipping["celo2_skip"]

    def run(backend: str) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
        opt = cls(params, lr=0.01, weights="random", seed=1, backend="cuda" if backend == "simt" else backend)
        if backend == "simt":
            opt.backend = SimtBackend(cls.program)
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=gen)
                for at_step, tensor, element, value in poison:
                    if (at_step, tensor) == (step, i):
                        p.grad.view(-1)[element % p.numel()] = value
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
        out = {f"p{i}": p.detach().clone() for i, p in enumerate(params)}
        for i, s in opt.state_dict()["state"].items():
            if isinstance(s, dict):
                out.update({f"s{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
        return out

    ref = run("reference")
    for backend in ("tvm", "cuda", "simt"):
        assert_same_nonfinite(run(backend), ref, f"{policy} on {backend}, poison {poison}")
