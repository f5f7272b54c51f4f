"""The compiled backends on CUDA tensors (cuda: the Jinja kernels; tvm: TVM's CUDA
kernels, both built with nvcc) against the reference backend on the CPU: every built-in
spec, every shape, 12 steps, 1e-5 relative error of the updates; bf16 params;
bitwise-deterministic reruns; a step replayed from a CUDA graph, with `grad.nonfinite:
skip` too (skipped without a GPU)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from conftest import SHAPES
from test_cuda_backend import LINE_SHAPES, MAKERS, RTOL, STEPS
from test_nonfinite import skipping  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def run(name: str, device: str, backend: str, dtype: torch.dtype, seed: int = 21,
        shapes: list[tuple] = SHAPES, steps: int = STEPS):
    """Per step and tensor (float32, on the CPU): (update, p before, p after)."""
    rng = np.random.default_rng(seed)
    params = [torch.nn.Parameter(torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=np.float32))
                                 .to(device=device, dtype=dtype)) for s in shapes]
    opt = MAKERS[name](params, backend)
    history = []
    for step in range(steps):
        loss = torch.tensor(float(2.0 / (step + 1) + rng.uniform(0, 0.1)), device=device)
        before = [p.detach().float().cpu().clone() for p in params]
        for p, s in zip(params, shapes):
            g = np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0), dtype=np.float32)
            p.grad = torch.from_numpy(g).to(device=device, dtype=dtype)
        opt.step(loss=loss)
        after = [p.detach().float().cpu().clone() for p in params]
        history.append([(a - b, b, a) for a, b in zip(after, before)])
    if backend == "tvm":   # its CUDA kernels ran (no fallback to the reference for any tensor)
        assert opt.backend._kernels and all(key[-1] is not None for key in opt.backend._kernels)
        assert not opt.backend._warned, opt.backend._warned
    return history


BACKENDS = ["cuda", "tvm"]


def assert_updates_match(name: str, backend: str, shapes: list[tuple], ours, ref) -> None:
    for step, (a, b) in enumerate(zip(ours, ref)):
        for shape, (d_ours, _, _), (d_ref, before, after) in zip(shapes, a, b):
            scale = float(d_ref.abs().max())
            # both write p - lr * step in float32: allow that rounding (2 ulp of p) on top
            rounding = 2 * float(np.finfo(np.float32).eps) * max(float(before.abs().max()), float(after.abs().max()))
            err = float((d_ours - d_ref).abs().max())
            assert err <= RTOL * scale + rounding, (
                f"{backend} {name} shape {shape}, step {step}: error {err:.3g}, update {scale:.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_gpu_matches_reference(name, backend):
    ours, ref = run(name, "cuda", backend, torch.float32), run(name, "cpu", "reference", torch.float32)
    assert_updates_match(name, backend, SHAPES, ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["velo", "small_fc_lopt"])
def test_gpu_row_col_means_over_many_line_tiles(name, backend):
    """Row/col means from many (partial) line tiles: the warp shuffle trees per C."""
    def run_on(device: str, which: str):
        return run(name, device, which, torch.float32, seed=22, shapes=LINE_SHAPES, steps=5)
    assert_updates_match(name, backend, LINE_SHAPES, run_on("cuda", backend), run_on("cpu", "reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["small_fc_lopt", "adam"])
def test_gpu_bf16_params(name, backend):
    ours, ref = run(name, "cuda", backend, torch.bfloat16), run(name, "cpu", "reference", torch.bfloat16)
    ulp = float(torch.finfo(torch.bfloat16).eps)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for shape, (d_ours, _, after), (d_ref, _, _) in zip(SHAPES, a, b):
            err = float((d_ours - d_ref).abs().max())
            assert err <= ulp * float(after.abs().max()) + 1e-6, (
                f"{backend} {name} bf16 shape {shape}, step {step}: {err:.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_reruns_are_bitwise_identical(backend):
    """Reductions are partials summed in a fixed order: no atomics."""
    first, second = run("velo", "cuda", backend, torch.float32), run("velo", "cuda", backend, torch.float32)
    for a, b in zip(first, second):
        for (_, _, p), (_, _, q) in zip(a, b):
            assert torch.equal(p, q)


def eager_and_captured(make: Callable, seed: int, poisoned: dict[int, float] | None = None):
    """Two optimizers (`make(params)`) on the same random CUDA parameters, one stepping
    eagerly and one whose step is captured in a CUDA graph after 3 warm-up steps (on a
    side stream, as torch asks). Returns (eager params, captured params, the captured
    optimizer, step(k)): step writes step k's gradients in place (a captured step reads
    fixed memory; `poisoned` k: a value for the last tensor's last element) and runs both."""
    rng = np.random.default_rng(seed)
    start = [torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=np.float32)).cuda() for s in SHAPES]
    eager = [torch.nn.Parameter(p.clone()) for p in start]
    captured = [torch.nn.Parameter(p.clone()) for p in start]
    for p in eager + captured:
        p.grad = torch.zeros_like(p)
    loss = torch.zeros((), device="cuda")
    opt_eager, opt_captured = make(eager), make(captured)
    poisoned = poisoned or {}

    def new_gradients(step: int) -> None:
        for k, (p, q) in enumerate(zip(eager, captured)):
            g = torch.from_numpy(np.asarray(rng.standard_normal(p.shape), dtype=np.float32)).cuda()
            if step in poisoned and k == len(SHAPES) - 1:
                g.view(-1)[-1] = poisoned[step]
            p.grad.copy_(g)
            q.grad.copy_(g)
        loss.fill_(1.0 / (step + 1))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            new_gradients(step)
            opt_eager.step(loss=loss)
            opt_captured.step(loss=loss)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_captured.step(loss=loss)

    def step(k: int) -> None:
        new_gradients(k)
        opt_eager.step(loss=loss)
        graph.replay()
    return eager, captured, opt_captured, step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_gpu_step_replays_from_a_cuda_graph(name, backend):
    """A step captured in a CUDA graph and replayed on new gradients gives bitwise what
    eager steps give: nothing in a step is copied from the host or synchronizes with it."""
    eager, captured, _, step = eager_and_captured(lambda ps: MAKERS[name](ps, backend), seed=7)
    for k in range(3, 6):
        step(k)
    torch.cuda.synchronize()
    for p, q in zip(eager, captured):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adam", "velo"])
def test_gpu_skip_is_decided_on_the_device_in_a_cuda_graph(skipping, name, backend):
    """`grad.nonfinite: skip` in a captured step: the replays whose gradients hold a NaN or
    an inf change no parameter, the others give bitwise what eager steps give, and
    state["skipped_steps"] counts the skipped replays. (A decision on the host would
    fail the capture or be frozen into the graph.)"""
    cls = skipping[f"{name}_skip"]
    extra = {"weights": "random", "seed": 3, "num_steps": 40} if name == "velo" else {}
    poisoned = {4: float("nan"), 6: float("inf")}   # replays whose gradients hold one bad element
    eager, captured, opt_captured, step = eager_and_captured(
        lambda ps: cls(ps, lr=0.01, backend=backend, **extra), seed=9, poisoned=poisoned)
    for k in range(3, 8):
        before = [q.detach().clone() for q in captured]
        step(k)
        torch.cuda.synchronize()
        assert all(torch.equal(p, q) for p, q in zip(eager, captured)), k
        unchanged = [torch.equal(q, b) for q, b in zip(captured, before)]
        assert all(unchanged) if k in poisoned else not all(unchanged), k
    assert float(opt_captured.state["skipped_steps"]) == len(poisoned)
