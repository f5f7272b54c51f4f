"""The TVM CPU kernels' parallel loops run on torch's OpenMP threads (threads.py), on one
thread while other processes want the cores, and their results do not depend on the
thread count or on how a group is split across cores."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tvm

from conftest import ROOT
from generated.velo import VeLO
from lopt_codegen.backends.build_cache import BuildCache
from lopt_codegen.backends.tvm import TvmBackend
from lopt_codegen.backends.tvm.backend import generic_signatures
from lopt_codegen.backends.tvm.replay import StepRecord
from lopt_codegen.backends.tvm.build import llvm_target, load_kernel
from lopt_codegen.backends.tvm.threads import (CONTENTION, SAMPLE_EVERY, Contention, _launcher_or_none, omp_launcher,
                                                other_runnable)


SHAPES = [(33, 40), (5, 8, 9), (1000,), (33, 40)]   # factored, 3-D, flat; a group of two


def _loaded_kernel_libraries() -> list[str]:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if line.endswith("/kernel.so")})


def test_loaded_kernels_launch_on_openmp_not_tvms_pool(tmp_path, programs):
    program = programs["adam"]
    sig = generic_signatures(program, "float32")["unfactored"][0]
    load_kernel(program, "unfactored", sig, llvm_target(), BuildCache(tmp_path))
    libraries = _loaded_kernel_libraries()   # this one, and any other this process loaded
    tvm_pool = ctypes.cast(ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"))
                           .TVMBackendParallelLaunch, ctypes.c_void_p).value
    launching = []
    for library in libraries:
        try:
            slot = ctypes.c_void_p.in_dll(ctypes.CDLL(library), "__TVMBackendParallelLaunch").value
        except ValueError:   # no parallel loop: a one-row tensor's kernel that splits its rows (one)
            continue
        launching.append(library)
        assert slot not in (None, tvm_pool), library
    assert launching, libraries   # (the one loaded here has a parallel loop)


def _run_velo(parallel_within_from: int, threads: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = VeLO(params, lr=300.0, weights="random", num_steps=40, backend="tvm")
    opt.backend = TvmBackend(VeLO.program, specialize_from=0, parallel_within_from=parallel_within_from)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** -step
            opt.step(loss=1.0 / (step + 1))
    finally:
        torch.set_num_threads(before)
    views = {k.sig.view.parallel_within for ks in opt.backend._kernels.values() for k in ks}
    assert views == {parallel_within_from == 0}
    return [p.detach().clone() for p in params]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_results_do_not_depend_on_threads_or_parallel_split(quiet_machine):
    """The sums' order is fixed by the shape and the kind of parallel loop (row chunks of
    a tensor split across the cores; one chunk when the cores split the group), never by
    the threads: bitwise the same results on 1 and 2 threads. The two kinds differ only
    in float rounding."""
    runs = {(within, threads): _run_velo(within, threads) for within in (0, 1 << 30) for threads in (1, 2)}
    for within in (0, 1 << 30):
        for a, b in zip(runs[within, 1], runs[within, 2]):
            assert torch.equal(a, b)
    for a, b in zip(runs[0, 2], runs[1 << 30, 2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_other_processes_runnable_threads_are_read_from_proc():
    assert isinstance(other_runnable(), int) and other_runnable() >= 0


def test_a_thread_of_ours_that_stops_running_during_a_look_is_not_another_process():
    """Torch's OpenMP workers spin after each op, then sleep: one that stops between the
    look's two reads must not count as another process's runnable thread (the look right
    after a torch op then found a quiet machine busy)."""
    running = {"ours": 3, "others": 0}   # (the main thread and two spinning workers)

    def read_ours() -> int:
        count = running["ours"]
        running["ours"] = 1   # the workers stop spinning after the first read
        return count

    def read_total() -> int:
        count = running["ours"] + running["others"]
        running["ours"] = 1
        return count

    assert other_runnable(read_ours, read_total) == 0
    running.update(ours=1, others=2)   # two threads of another process
    assert other_runnable(read_ours, read_total) == 2


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_a_busy_machine_limits_the_kernels_to_one_thread(monkeypatch):
    """Sampled every SAMPLE_EVERY steps: while other processes' runnable threads and
    torch's outnumber the cores, the launcher runs one thread; then torch's again."""
    others = [os.cpu_count()]
    probe_calls = []

    def probe():
        probe_calls.append(others[0])
        return others[0]

    contention = Contention(probe, interval=0.0)
    launcher = _launcher_or_none()   # (made when the first kernel loads)
    limits = []
    for step in range(2 * SAMPLE_EVERY):
        if step == SAMPLE_EVERY:
            others[0] = 0
        contention.before_step()
        limits.append(launcher.launch_thread_limit())
    # (a look that disagrees with the machine's state is taken again at the next step)
    assert len(probe_calls) == 4
    assert limits == [0] + [1] * SAMPLE_EVERY + [0] * (SAMPLE_EVERY - 1)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_looks_at_the_machine_are_at_least_an_interval_apart():
    """Fast steps look every SAMPLE_EVERY steps only once `interval` has passed (a look
    reads /proc: 50 us); the first step always looks."""
    looks = []
    contention = Contention(lambda: looks.append(0) or 0, interval=3600.0)
    for _ in range(4 * SAMPLE_EVERY):
        contention.before_step()
    assert len(looks) == 1
    contention.interval = 0.0
    for _ in range(2 * SAMPLE_EVERY):
        contention.before_step()
    assert len(looks) == 3


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_one_busy_look_alone_leaves_the_threads():
    """A look that finds a quiet machine busy is taken again at the next step; busy only
    if both are (on a quiet machine one look in a hundred saw another process's thread
    that ran for a moment, and a second look at once often saw it again)."""
    looks = iter([4, 0, 4, 4, 0])
    contention = Contention(lambda: next(looks), interval=0.0)
    busy = []
    for _ in range(2 * SAMPLE_EVERY + 1):
        contention.before_step()
        busy.append(contention.busy)
    # Looks at steps 0 (busy), 1 (again: quiet), 8 (busy), 9 (again: busy) and 16 (quiet:
    # a look again at the next step).
    assert busy == [False] * (SAMPLE_EVERY + 1) + [True] * SAMPLE_EVERY


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_one_quiet_look_alone_leaves_a_busy_machine_busy():
    """On a busy machine a look can miss the competing process (other_runnable
    undercounts where a worker of ours stops between its reads): quiet only if the look
    at the next step finds it so too."""
    looks = iter([4, 4, 0, 4, 0, 0])
    contention = Contention(lambda: next(looks), interval=0.0)
    busy = []
    for _ in range(2 * SAMPLE_EVERY + 2):
        contention.before_step()
        busy.append(contention.busy)
    # Looks at steps 0 and 1 (busy), 8 (quiet), 9 (again: busy), 16 and 17 (quiet).
    assert busy == [False] + [True] * 2 * SAMPLE_EVERY + [False]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_busy_or_quiet_the_same_results(monkeypatch, quiet_machine):
    quiet = _run_velo(0, 2)
    monkeypatch.setattr(CONTENTION, "probe", lambda: 64 * (os.cpu_count() or 1))
    monkeypatch.setattr(CONTENTION, "steps", 0)
    busy = _run_velo(0, 2)
    assert omp_launcher().launch_thread_limit() == 1
    for a, b in zip(quiet, busy):
        assert torch.equal(a, b)
    CONTENTION.probe = lambda: 0
    CONTENTION.steps = 0
    CONTENTION.before_step()   # (quiet: looked at again at the next step)
    CONTENTION.before_step()
    assert omp_launcher().launch_thread_limit() == 0


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_busy_steps_run_torch_ops_on_one_thread_then_restore_them(monkeypatch, quiet_machine):
    """While busy, the step's torch ops (the network, the small work) run on one thread
    too, replayed or not; torch's thread count is back after the step, and quiet steps
    keep it."""
    seen, after = [], []
    run_groups, replay, step = TvmBackend._run_groups, StepRecord.replay, TvmBackend.step

    def recording(self, *args):
        seen.append(torch.get_num_threads())
        return run_groups(self, *args)

    def replaying(self, *args):
        seen.append(torch.get_num_threads())
        return replay(self, *args)

    def stepping(self, batch):
        step(self, batch)
        after.append(torch.get_num_threads())
    monkeypatch.setattr(TvmBackend, "_run_groups", recording)
    monkeypatch.setattr(StepRecord, "replay", replaying)
    monkeypatch.setattr(TvmBackend, "step", stepping)
    quiet = _run_velo(0, 2)
    assert seen and set(seen) == set(after) == {2}
    seen.clear()
    after.clear()
    monkeypatch.setattr(CONTENTION, "probe", lambda: 64 * (os.cpu_count() or 1))
    monkeypatch.setattr(CONTENTION, "steps", 0)
    busy = _run_velo(0, 2)
    assert seen[0] == 2 and set(seen[1:]) == {1}   # (busy once the second step's look finds it so too)
    assert set(after) == {2}
    for a, b in zip(quiet, busy):
        assert torch.equal(a, b)
    CONTENTION.probe = lambda: 0
    CONTENTION.steps = 0
    CONTENTION.before_step()   # (quiet: looked at again at the next step)
    CONTENTION.before_step()
    assert not CONTENTION.busy


def _child(script: str, cache: Path, **env) -> str:
    env = dict(os.environ, LOPT_CACHE_DIR=str(cache), PYTHONPATH=ROOT, **env)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_compiler_without_openmp_gets_a_clear_error_and_no_cache_entry(tmp_path):
    script = ("from lopt_codegen.backends.tvm.threads import LauncherUnavailable, omp_launcher\n"
              "try:\n    omp_launcher()\nexcept LauncherUnavailable as exc:\n    print(str(exc).splitlines()[0])\n")
    out = _child(script, tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert "install a compiler with OpenMP support" in out
    assert not list(tmp_path.rglob("launch.so"))


def test_without_the_launcher_the_kernels_run_on_tvms_pool_with_a_warning(tmp_path):
    script = """
import warnings, torch
import lopt_codegen.backends.tvm.threads as threads
def unavailable():
    raise threads.LauncherUnavailable("no OpenMP here")
threads.omp_launcher = unavailable
from generated.adam import Adam
from lopt_codegen.backends.tvm import TvmBackend
params = [torch.nn.Parameter(torch.randn(300, 300)) for _ in range(2)]
ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
opt = Adam(params, lr=0.1, backend="tvm")
opt.backend = TvmBackend(Adam.program, specialize_from=0, parallel_within_from=0)
ref_opt = Adam(ref, lr=0.1, backend="reference")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(3):
        for p, q in zip(params, ref):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
import os, tvm
for p, q in zip(params, ref):
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
print(sum("TVM's own thread pool" in str(w.message) for w in caught), tvm.runtime.num_threads(),
      os.environ["TVM_THREAD_POOL_SPIN_COUNT"])
"""
    warned, threads, spin = _child(script, tmp_path).split()
    assert (warned, threads, spin) == ("1", str(torch.get_num_threads()), "0")
