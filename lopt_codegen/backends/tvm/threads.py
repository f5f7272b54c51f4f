"""TVM's CPU kernels run their parallel loops on torch's OpenMP threads.

A TVM kernel's parallel loop calls the function pointer __TVMBackendParallelLaunch, which
the TVM runtime fills with its own thread pool when it loads the module. Two pools on the
same cores fight: after each torch op, torch's OpenMP workers spin for a while (GOMP's
default), and TVM's workers then share the cores with them (measured on 2 cores: a VeLO
step 39 ms, 28.7 ms once GOMP stopped spinning). TVM also sizes its pool as half the
logical CPUs on x86, taking the rest for hyperthreads: one thread on 2 cores. So every
loaded kernel's pointer is set to a launcher that runs the tasks in an OpenMP parallel
region of the OpenMP runtime torch loaded (its soname, libgomp.so.1, resolves to that
copy), with torch.get_num_threads() threads. Where the launcher cannot be built (a
compiler without OpenMP), the kernels keep TVM's pool, sized like torch's, with a warning.

On a busy machine the kernels, and the step's torch ops, run on one thread (Contention):
with every core's thread in a region, a competing process makes the region wait for a
thread the OS has descheduled while the others spin (benchmarks/busy_machine.md: a VeLO
step 13-25x slower on 2 cores, torch's fused AdamW 6-24x; on one thread both keep their
quiet time). The kernels' results do not depend on the thread count: the sums' order is
fixed by the shape (torch's ops may round differently on one thread).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import torch   # loaded first: the launcher binds to torch's OpenMP runtime

from ..build_cache import DEFAULT_CACHE

_FLAGS = ["-O2", "-fopenmp"]

_SOURCE = r"""
#include <dlfcn.h>
#include <omp.h>
#include <cstdint>
#include <tvm/ffi/error.h>
#include <tvm/ffi/string.h>

// TVM's C ABI of a parallel loop (tvm/runtime/c_backend_api.h).
struct TVMParallelGroupEnv { void* sync_handle; int32_t num_task; };
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

// At most this many threads per region (0: no limit): set_launch_threads.
static int thread_limit = 0;

// Runs task i of n on OpenMP thread i. num_task 0: as many tasks as threads.
static int omp_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int threads = num_task > 0 ? num_task : omp_get_max_threads();
  if (thread_limit > 0 && threads > thread_limit) threads = thread_limit;
  if (threads <= 1 || omp_in_parallel()) {
    TVMParallelGroupEnv env = {nullptr, 1};
    return flambda(0, &env, cdata);
  }
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    TVMParallelGroupEnv env = {nullptr, omp_get_num_threads()};
    failed |= flambda(omp_get_thread_num(), &env, cdata) != 0;
  }
  return failed ? -1 : 0;
}

// Points the loaded library at `path` to omp_parallel_launch.
void use_omp_threads(tvm::ffi::String path) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (lib == nullptr) TVM_FFI_THROW(RuntimeError) << path << " is not loaded";
  void** launch = static_cast<void**>(dlsym(lib, "__TVMBackendParallelLaunch"));
  bool barrier = dlsym(lib, "__TVMBackendParallelBarrier") != nullptr;
  dlclose(lib);
  // A barrier would need TVM's own pool (its sync_handle); the pass kernels have none.
  if (barrier) TVM_FFI_THROW(RuntimeError) << path << " synchronizes inside a parallel loop";
  if (launch != nullptr) *launch = reinterpret_cast<void*>(&omp_parallel_launch);
}

void set_launch_threads(int64_t limit) { thread_limit = static_cast<int>(limit); }
int64_t launch_thread_limit() { return thread_limit; }
"""


@lru_cache(maxsize=1)
def omp_launcher():
    """The launcher's module (built once into the default cache, loaded once per process)."""
    import tvm_ffi
    import tvm_ffi.cpp

    def build(path: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="lopt-omp-") as tmp:
            try:
                lib = tvm_ffi.cpp.build_inline("lopt_omp_launch", cpp_sources=_SOURCE,
                                               functions=["use_omp_threads", "set_launch_threads",
                                                          "launch_thread_limit"],
                                               extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], build_directory=tmp)
            except Exception as exc:   # noqa: BLE001 - the compiler's own error, explained
                raise LauncherUnavailable("the TVM backend runs its CPU kernels on torch's OpenMP threads through a small "
                                   "launcher built with the C++ compiler (CXX, default c++) and -fopenmp, and that "
                                   f"build failed; install a compiler with OpenMP support (e.g. g++): {exc}") from exc
            shutil.copy(lib, path)

    key = {"source_sha256": hashlib.sha256(_SOURCE.encode()).hexdigest(), "flags": _FLAGS,
           "tvm_ffi": tvm_ffi.__version__}
    return DEFAULT_CACHE.get("tvm-omp-launch", key, "launch.so", build, lambda path: tvm_ffi.load_module(str(path)))


class LauncherUnavailable(RuntimeError):
    """The OpenMP launcher could not be built."""


@lru_cache(maxsize=1)
def _launcher_or_none():
    try:
        return omp_launcher()
    except LauncherUnavailable as exc:
        warnings.warn(f"{exc}\nThe TVM kernels use TVM's own thread pool instead (slower next to torch's threads).",
                      RuntimeWarning, stacklevel=2)
        # Before TVM's pool starts: as many threads as torch, none spinning between kernels
        # (spinning workers slowed torch's ops up to 30x on 2 cores).
        os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
        return None


def use_torch_threads(library: Path) -> None:
    """After TVM loaded the kernel library at `library`: its parallel loops run on
    torch's OpenMP threads (call again after every load: TVM resets the pointer)."""
    launcher = _launcher_or_none()
    if launcher is not None:
        launcher.use_omp_threads(str(library))


_launch_limit = 0   # the launcher's thread limit as _limit_launches last set it (its only setter)


def _limit_launches(limit: int) -> None:
    """At most `limit` threads per kernel launch (0: no limit), once a kernel has loaded
    the launcher. Compared with the limit set last, not read through the launcher at
    every step (an FFI call: 5-10 us from cold caches)."""
    global _launch_limit
    if limit == _launch_limit or not _launcher_or_none.cache_info().currsize:   # (none loaded: nothing to limit)
        return
    launcher = _launcher_or_none()
    if launcher is not None:
        launcher.set_launch_threads(limit)
    _launch_limit = limit


SAMPLE_EVERY = 8   # steps between two looks at the machine (each reads ~10 small /proc files: 50 us)
# ... and at least this long: every 8 steps was 6 us a step of Adam's on a 1M matrix.
LOOK_INTERVAL_S = 0.02


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _our_running_threads() -> int:
    """This process's threads in state R (Linux: /proc/self/task/*/stat)."""
    ours = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:   # the thread ended meanwhile
            continue
        ours += stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"R"
    return ours


def _procs_running() -> int:
    """Threads ready to run now on the whole machine (Linux: /proc/stat's procs_running)."""
    with open("/proc/stat", "rb") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(b"procs_running"))


def other_runnable(ours: Callable[[], int] = _our_running_threads,
                   total: Callable[[], int] = _procs_running) -> int | None:
    """Threads of other processes ready to run now: the machine's less this process's;
    None where /proc cannot tell. Ours are read first: torch's OpenMP workers spin for a
    moment after each op, then sleep, and one that stops between the two reads is then
    in ours and not in the total (others undercounted for that moment), where the other
    order counted it as another process's. (Other processes' threads that run for a
    moment are seen too: Contention looks again before it believes them.)"""
    try:
        mine = ours()
        return max(0, total() - mine)
    except (OSError, StopIteration, ValueError):
        return None


class Contention:
    """Every SAMPLE_EVERY steps, at least `interval` seconds apart (the first step always):
    do other processes' runnable threads leave torch's threads fewer cores than they
    are? Then the kernels run on one thread until they do not. The machine turns busy, or
    quiet, only when the next step's look finds it so too: on this quiet machine about
    one look in a hundred saw another process's thread that ran for a moment (a look
    takes ~50 us; a second look at once saw it again, and the next SAMPLE_EVERY steps ran
    on one thread: small_fc_lopt's ResNet-18 steps at half speed in make bench), and on a
    busy one a look can miss the competing process (other_runnable undercounts where a
    worker of ours stops between its reads; the next SAMPLE_EVERY steps then waited for
    a descheduled thread), while a competing process is there at every look."""

    def __init__(self, probe: Callable[[], int | None] = other_runnable, interval: float = LOOK_INTERVAL_S):
        self.probe, self.steps, self.busy = probe, 0, False
        self.interval, self._looked = interval, 0.0
        self._seen_change = False   # the last step's look disagreed with `busy`: look again
        # torch's threads, read where a look may be due (12 us a read from cold caches, as
        # after a step's kernels; a change in between only delays a limit that is one thread)
        self._threads = 1

    def before_step(self) -> None:
        if self._seen_change or self.steps % SAMPLE_EVERY == 0:
            self._threads = threads = torch.get_num_threads()
            if threads > 1 and (self._seen_change or self.steps == 0 or
                                time.monotonic() - self._looked >= self.interval):
                self._looked = time.monotonic()
                changed = self._outnumbered(threads) != self.busy
                if changed and self._seen_change:
                    self.busy = not self.busy
                self._seen_change = changed and not self._seen_change
        self.steps += 1
        _limit_launches(1 if self.busy and self._threads > 1 else 0)   # 0: torch's threads

    def _outnumbered(self, threads: int) -> bool:
        """Whether other processes' runnable threads and `threads` outnumber the cores."""
        others = self.probe()
        return others is not None and others + threads > _cores()

    @contextlib.contextmanager
    def torch_ops_too(self) -> Iterator[None]:
        """While busy, torch's own ops of the step (the network, the small work) on one
        thread too, for the step: a region of torch's threads waits for a descheduled one
        as the kernels' did (VeLO on 0.1M parameters, 2 threads, one busy process: 8.3 ms
        a step against 3.8 quiet; 4.9-5.2 ms with these on one thread too)."""
        threads = torch.get_num_threads()
        if not self.busy or threads < 2:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


CONTENTION = Contention()   # one for the process, as the launcher's limit is
