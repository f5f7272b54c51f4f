"""Background builds (tvm/background.py): a new model's first step does not wait for the
compiler. While even the shape-generic kernels build, the reference steps; then those
kernels, while a large tensor's own build; then its own. Each step equals the
reference's; with everything in the cache, the first step runs the tensor's own kernels."""
from __future__ import annotations

import threading

import torch

import lopt_codegen.backends.tvm.backend as tvm_backend
import lopt_codegen.backends.tvm.build as tvm_build
from generated.adam import Adam
from lopt_codegen.backends.build_cache import BuildCache
from lopt_codegen.backends.tvm import TvmBackend

SHAPES = [(64, 80), (80,), (3, 5)]   # 5,120 elements: kernels of its own; the others shape-generic


def _pair(cache: BuildCache) -> tuple[list[torch.Tensor], Adam, list[torch.Tensor], Adam]:
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Adam(params, lr=0.05, backend="tvm")
    opt.backend = TvmBackend(Adam.program, cache=cache, background=True)
    return params, opt, ref, Adam(ref, lr=0.05, backend="reference")


def _step(pair, gen: torch.Generator) -> None:
    params, opt, ref, ref_opt = pair
    for p, q in zip(params, ref):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    opt.step()
    ref_opt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _loaded(opt) -> set[str]:
    """What the backend's loaded kernels are built for: 'generic' and/or 'own'."""
    return {"generic" if kernels[0].sig.view.symbolic else "own" for kernels in opt.backend._kernels.values()}


def test_the_first_steps_run_on_the_tier_below_while_the_kernels_build(tmp_path, monkeypatch):
    gates = {True: threading.Event(), False: threading.Event()}   # shape-generic builds, own builds
    build = tvm_backend.build_kernel

    def gated(program, variant, sig, *args):
        gates[getattr(getattr(sig, "view", None), "symbolic", True)].wait(60)   # small functions: generic
        build(program, variant, sig, *args)

    monkeypatch.setattr(tvm_backend, "build_kernel", gated)
    monkeypatch.setattr(tvm_build, "_LOADED", {})   # kernels other tests loaded in this process count as built
    cache, gen = BuildCache(tmp_path), torch.Generator().manual_seed(12)
    pair = _pair(cache)
    opt = pair[1]
    _step(pair, gen)
    assert _loaded(opt) == set()   # nothing built yet: the reference stepped
    gates[True].set()
    opt.backend.builds.wait(lambda key: key[2] is True)
    _step(pair, gen)
    assert _loaded(opt) == {"generic"}
    gates[False].set()
    opt.backend.builds.wait()
    _step(pair, gen)
    _step(pair, gen)
    assert _loaded(opt) == {"generic", "own"}

    # A new optimizer on the now filled cache: its first step runs the kernels, none built.
    fresh = _pair(cache)
    _step(fresh, gen)
    assert _loaded(fresh[1]) == {"generic", "own"}


def test_the_step_that_starts_the_builds_leaves_them_a_core(tmp_path, monkeypatch):
    """On torch's threads less one: on all of them, each parallel region waits for the one
    the build displaced (the first step on the reference took 4x as long)."""
    gate, build = threading.Event(), tvm_backend.build_kernel

    def gated(*args):
        gate.wait(60)
        build(*args)

    monkeypatch.setattr(tvm_backend, "build_kernel", gated)
    monkeypatch.setattr(tvm_build, "_LOADED", {})
    pair = _pair(BuildCache(tmp_path))
    fallback, seen = pair[1].backend.fallback, []
    reference_step = fallback.step
    monkeypatch.setattr(fallback, "step", lambda batch: (seen.append(torch.get_num_threads()), reference_step(batch)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _step(pair, torch.Generator().manual_seed(14))   # starts the builds, held at the gate
        gate.set()
        pair[1].backend.builds.wait()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert (seen, after) == ([1], 2)


def test_a_step_on_the_stand_ins_runs_on_every_core_and_starts_the_builds_as_it_ends(tmp_path, monkeypatch,
                                                                                    quiet_machine):
    """The builds a step asks for start when it ends (a step on the reference starts them
    at once: it takes seconds); from the next step on, the step leaves them a core."""
    cache, gen = BuildCache(tmp_path), torch.Generator().manual_seed(15)
    monkeypatch.setattr(tvm_build, "_LOADED", {})
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    filler = Adam(params, lr=0.05, backend="tvm")   # the stand-ins into the cache
    filler.backend = TvmBackend(Adam.program, cache=cache, specialize_from=1 << 40, background=False)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    filler.step()

    gate, build = threading.Event(), tvm_backend.build_kernel

    def gated(*args):
        gate.wait(60)
        build(*args)

    monkeypatch.setattr(tvm_backend, "build_kernel", gated)
    pair = _pair(cache)
    backend, seen = pair[1].backend, []
    run_groups = backend._run_groups
    monkeypatch.setattr(backend, "_run_groups", lambda *args: (seen.append((torch.get_num_threads(),
                                                                             backend.builds.running())),
                                                               run_groups(*args)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _step(pair, gen)
        started = backend.builds.running()
        _step(pair, gen)
        gate.set()
        backend.builds.wait()
    finally:
        torch.set_num_threads(threads)
    assert (seen, started) == ([(2, False), (1, True)], True)
    assert _loaded(pair[1]) == {"generic"}   # (the own kernels load at the next step)
