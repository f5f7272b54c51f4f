"""Kernel builds on a background thread, so that a new model's first steps do not wait
for the compiler: each build compiles into the build cache (build.build_kernel), and
the step's thread loads it once it is done. Until then the step runs on the tier below:
shape-generic kernels, or the reference backend. While a build runs, the step leaves it a
core: with torch's OpenMP threads on every core, each parallel region would otherwise
wait for the thread the build displaced (benchmarks/busy_machine.md; VeLO's reference
step took 10.4 s beside a build on 2 threads, 2.5 s on one). The first steps' rounding
then depends on when each build finishes (the tiers sum in different orders, torch on
fewer threads);
LOPT_BACKGROUND_BUILDS=0 builds every kernel when it is first needed instead, for runs
that must repeat bit for bit."""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Iterator

import torch


def background_builds_enabled() -> bool:
    return os.environ.get("LOPT_BACKGROUND_BUILDS", "1") != "0"


class BackgroundBuilds:
    """Builds asked for once each and run one at a time (the cores are the training's),
    stand-ins first: a shape-generic build asked for after a tensor's own one still runs
    before it. They start when `start` is called (the step that asks for them runs on the
    stand-ins with all the cores first). At exit the thread finishes the builds asked
    for, so they are in the cache next time."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()   # (0 stand-in | 1 own, order, build, future)
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._jobs: dict[tuple, Future] = {}

    def running(self) -> bool:
        """Whether a build is going (it takes a core from the step)."""
        with self._lock:
            return self._worker is not None

    def asked(self, key: tuple) -> bool:
        return key in self._jobs

    def done(self, key: tuple, build: Callable[[], None], stand_in: bool = False) -> bool:
        """Whether the build of `key` has finished (asked for now if it had not been). A
        build that failed raises its error here, on the step's thread."""
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = Future()
            self._queue.put((0 if stand_in else 1, next(self._order), build, job))
        if not job.done():
            return False
        job.result()
        return True

    def start(self) -> None:
        """Starts the builds asked for (the step that asks calls this when it ends, so
        that it runs on all the cores)."""
        with self._lock:
            if self._worker is None and not self._queue.empty():
                self._worker = threading.Thread(target=self._work, name="lopt-tvm-build")
                self._worker.start()

    def _work(self) -> None:
        """Runs the queued builds; ends when none is left (a new one starts a new thread)."""
        while True:
            with self._lock:
                if self._queue.empty():
                    self._worker = None
                    return
                _, _, build, job = self._queue.get()
            try:
                build()
                job.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - raised on the step's thread by done()
                job.set_exception(exc)

    def wait(self, which: Callable[[tuple], bool] = lambda key: True) -> None:
        """Until the builds asked for so far whose key passes `which` have finished."""
        self.start()
        for key, job in list(self._jobs.items()):
            if which(key):
                job.result()

    @contextlib.contextmanager
    def core_left(self) -> Iterator[None]:
        """Torch's threads (and so the kernels') less one while a build runs."""
        threads = torch.get_num_threads()
        if threads < 2 or not self.running():
            yield
            return
        torch.set_num_threads(threads - 1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
