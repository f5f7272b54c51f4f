"""specs/examples/: hand-designed optimizers written as specs (no MLP, no meta-weights),
compiled with `lopt-compile --out` into a package of their own and imported from there,
as a user would. Every backend (reference, tvm, the cuda backend's host build and its
kernels under the SIMT emulation) matches torch.optim per step within 1e-5 relative over
20 steps on the shape matrix; Lion, which torch lacks, against a transcription here."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import ROOT, SHAPES
from lopt_codegen.cli import run as lopt_compile
from test_cuda_simt import SimtBackend

EXAMPLES = os.path.join(ROOT, "specs", "examples")
STEPS = 20
RTOL = 1e-5


class LionReference(torch.optim.Optimizer):
    """Lion as published (Chen et al. 2023, Algorithm 2), plain torch."""

    def __init__(self, params, lr: float = 1e-4, beta1: float = 0.9, beta2: float = 0.99, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                direction = (group["beta1"] * m + (1 - group["beta1"]) * p.grad).sign()
                p.sub_(group["lr"] * (direction + group["weight_decay"] * p))
                m.mul_(group["beta2"]).add_((1 - group["beta2"]) * p.grad)


class MuonReference(torch.optim.Optimizer):
    """torch.optim.Muon's step (torch/optim/_muon.py) with its Newton-Schulz iteration
    in float32 instead of bfloat16, and a conv kernel taken as its 2-D view."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps))

    @staticmethod
    def orthogonalize(grad: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
        a, b, c = coefficients
        x = grad.reshape(grad.shape[0], -1)
        tall = x.size(0) > x.size(1)
        x = x.T if tall else x
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return (x.T if tall else x).reshape(grad.shape)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = self.orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                rows, columns = p.shape[:2]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1, rows / columns) ** 0.5)


# Muon is for matrices (conv kernels as their 2-D view); (5, 3) twice makes a group of two.
MATRIX_SHAPES = [(5, 3), (3, 5), (4, 4), (1, 6), (6, 1), (12, 7), (7, 12), (5, 3), (4, 2, 3, 3), (2, 3, 4)]

# (example, its class, the oracle, hyperparameters); lr large enough that each update is
# not hidden below p's float32 rounding.
CASES = [
    ("muon", "Muon", MuonReference, dict(lr=0.05, weight_decay=0.1)),
    ("muon", "Muon", MuonReference, dict(lr=0.05, nesterov=False, momentum=0.5, ns_steps=3)),
    ("sgd", "SGD", torch.optim.SGD, dict(lr=0.1)),
    ("sgd", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    ("sgd", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("rmsprop", "RMSprop", torch.optim.RMSprop, dict(lr=0.03)),
    ("rmsprop", "RMSprop", torch.optim.RMSprop, dict(lr=0.03, momentum=0.5, centered=True, weight_decay=0.05)),
    ("amsgrad", "AMSGrad", lambda params, **kw: torch.optim.Adam(params, amsgrad=True, **kw),
     dict(lr=0.05, weight_decay=0.05)),
    ("lion", "Lion", LionReference, dict(lr=0.01, weight_decay=0.5)),
    ("adafactor", "Adafactor", torch.optim.Adafactor, dict(lr=0.3)),
    ("adafactor", "Adafactor", torch.optim.Adafactor, dict(lr=0.3, weight_decay=0.05, d=1.2)),
]
BACKENDS = ["reference", "tvm", "cuda", "simt"]


def compile_and_import(out: str, package: str, specs: list[str]) -> dict[str, type]:
    """The specs compiled by the CLI into <out>/<package>, imported from there: name -> class."""
    assert lopt_compile(["--out", os.path.join(out, package), *specs]) == 0
    sys.path.insert(0, out)
    try:
        modules = {name: importlib.import_module(f"{package}.{name}")
                   for name in sorted({os.path.basename(s)[:-5] for s in specs})}
    finally:
        sys.path.remove(out)
    return {name: getattr(m, m.__all__[0]) for name, m in modules.items()}


@pytest.fixture(scope="session")
def examples(tmp_path_factory) -> dict[str, type]:
    specs = sorted(os.path.join(EXAMPLES, f) for f in os.listdir(EXAMPLES) if f.endswith(".yaml"))
    return compile_and_import(str(tmp_path_factory.mktemp("out")), "lopt_examples", specs)


def run_against_oracle(cls: type, oracle: Callable, hyper: dict, backend: str, seed: int = 0,
                       shapes: list[tuple] = SHAPES, steps: int = STEPS):
    """Yield (step, shape, our update, the oracle's, p before, p after) per step and
    tensor; each step starts both from the oracle's parameters, so errors do not compound."""
    rng = np.random.default_rng(seed)
    start = [torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=np.float32)) for s in shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    opt = cls(ours, backend="cuda" if backend == "simt" else backend, **hyper)
    if backend == "simt":
        opt.backend = SimtBackend(cls.program)
    ref = oracle(theirs, **hyper)
    for step in range(steps):
        before = [q.detach().clone() for q in theirs]
        for p, q, s in zip(ours, theirs, shapes):
            g = torch.from_numpy(np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0), dtype=np.float32))
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for s, p, q, b in zip(shapes, ours, theirs, before):
            yield step, s, p.detach() - b, q.detach() - b, b, q.detach().clone()
            p.data.copy_(q.data)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("example, class_name, oracle, hyper", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_example_matches_torch(examples, example, class_name, oracle, hyper, backend):
    cls = examples[example]
    assert cls.__name__ == class_name and not cls.program.weight_groups and cls.program.mlp is None
    shapes = MATRIX_SHAPES if example == "muon" else SHAPES
    assert_updates_match(run_against_oracle(cls, oracle, hyper, backend, shapes=shapes),
                         f"{example} {hyper} on {backend}")


def assert_updates_match(updates, what: str) -> None:
    for step, shape, d_ours, d_ref, before, after in updates:
        scale = float(d_ref.abs().max())
        rounding = 2 * float(np.finfo(np.float32).eps) * max(float(before.abs().max()), float(after.abs().max()))
        err = float((d_ours - d_ref).abs().max())
        assert scale > 0, f"the oracle's update is zero for shape {shape} at step {step}"
        assert err <= RTOL * scale + rounding, (
            f"{what}, shape {shape}, step {step}: error {err:.3g}, update {scale:.3g}")


def test_examples_need_no_weights(examples):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="has no meta-weights"):
        examples["sgd"]([p], weights="random")


def test_flags_take_booleans_in_groups_and_the_constructor(examples):
    """`nesterov=True` as torch.optim.SGD takes it, in the constructor or a param group."""
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a = examples["sgd"]([p], lr=0.1, momentum=0.5, nesterov=True, backend="reference")
    b = examples["sgd"]([{"params": [q], "nesterov": True}], lr=0.1, momentum=0.5, backend="reference")
    for opt, x in ((a, p), (b, q)):
        x.grad = torch.ones(2)
        opt.step()
    # Nesterov: g + momentum * buf = 1.5 at the first step (plain momentum: 1).
    assert torch.allclose(p.detach(), torch.full((2,), 0.85)) and torch.equal(p.detach(), q.detach())


def test_muon_agrees_with_torch_to_bfloat16_rounding(examples):
    """torch.optim.Muon iterates in bfloat16: the same update to its rounding (5e-2 measured),
    far from what a wrong sign, scale or transposition would give (~1)."""
    shapes = [s for s in MATRIX_SHAPES if len(s) == 2]
    worst = 0.0
    for step, shape, d_ours, d_ref, before, after in run_against_oracle(
            examples["muon"], torch.optim.Muon, dict(lr=0.05), "reference", shapes=shapes):
        worst = max(worst, float((d_ours - d_ref).norm() / d_ref.norm()))
    assert worst < 0.1, worst


def _muon_adamw_pair(cls: type, backend: str, start: dict[str, list[torch.Tensor]]):
    """MuonAdamW on three param groups, and its oracle: MuonReference on the hidden
    matrices, torch.optim.AdamW on the hidden group's vectors and on the embeddings."""
    ours = {k: [torch.nn.Parameter(x.clone()) for x in v] for k, v in start.items()}
    theirs = {k: [torch.nn.Parameter(x.clone()) for x in v] for k, v in start.items()}
    hidden = dict(lr=0.05, weight_decay=0.1, momentum=0.9)
    embed = dict(lr=0.01, weight_decay=0.02)
    opt = cls([{"params": ours["hidden"], **hidden}, {"params": ours["embedding"], "embedding": True, **embed}],
              backend="cuda" if backend == "simt" else backend, beta2=0.99)
    if backend == "simt":
        opt.backend = SimtBackend(cls.program)
    matrices = [p for p in theirs["hidden"] if p.dim() >= 2]
    vectors = [p for p in theirs["hidden"] if p.dim() < 2]
    oracles = [MuonReference(matrices, **hidden),
               torch.optim.AdamW(vectors, lr=hidden["lr"], weight_decay=hidden["weight_decay"], betas=(0.9, 0.99)),
               torch.optim.AdamW(theirs["embedding"], betas=(0.9, 0.99), **embed)]
    return opt, oracles, [p for v in ours.values() for p in v], [p for v in theirs.values() for p in v]


@pytest.mark.parametrize("backend", BACKENDS)
def test_routes_send_each_parameter_to_its_rule(examples, backend):
    """Two routes: by shape (vectors to AdamW) and by a param group's flag (embeddings)."""
    gen = torch.Generator().manual_seed(5)
    start = {"hidden": [torch.randn(s, generator=gen) for s in [(6, 4), (4, 6), (6, 4), (3, 2, 2, 2), (6,), ()]],
             "embedding": [torch.randn(s, generator=gen) for s in [(10, 4), (6, 4)]]}
    opt, oracles, ours, theirs = _muon_adamw_pair(examples["muon_adamw"], backend, start)
    variants = {opt._router.variant(tuple(p.shape), False, {**g, "embedding": float(g["embedding"])})
                for g in opt.param_groups for p in g["params"]}
    assert variants == {"muon_unfactored", "adamw_unfactored"}

    def updates():
        for step in range(12):
            before = [q.detach().clone() for q in theirs]
            for p, q in zip(ours, theirs):
                p.grad = q.grad = None
                g = torch.randn(p.shape, generator=gen) * 10.0 ** -(step % 3)
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            for o in oracles:
                o.step()
            for p, q, b in zip(ours, theirs, before):
                yield step, tuple(p.shape), p.detach() - b, q.detach() - b, b, q.detach().clone()
                p.data.copy_(q.data)

    assert_updates_match(updates(), f"muon_adamw on {backend}")
    assert set(opt.state[ours[0]]) >= {"buf"} and set(opt.state[ours[4]]) >= {"m", "v"}


def test_a_parameter_that_changes_route_gets_a_clear_error(examples):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = examples["muon_adamw"]([p], backend="reference")
    p.grad = torch.randn(4, 3)
    opt.step()
    opt.param_groups[0]["embedding"] = True
    with pytest.raises(RuntimeError, match="now takes 'adamw_unfactored', but its state belongs to 'muon_unfactored'"):
        opt.step()


def test_no_matching_route_names_the_parameter(tmp_path):
    text = open(os.path.join(EXAMPLES, "muon_adamw.yaml")).read().replace("  muon:\n", "  muon:\n    when: ndim == 2\n")
    (tmp_path / "narrow.yaml").write_text(text.replace("name: muon_adamw", "name: narrow"))
    cls = compile_and_import(str(tmp_path), "lopt_narrow", [str(tmp_path / "narrow.yaml")])["narrow"]
    p = torch.nn.Parameter(torch.randn(2, 3, 4))
    p.grad = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\) with embedding=0.0 takes none of the routes"):
        cls([p], backend="reference").step()
