"""TvmBackend: each pass of the plan runs as compiled TVM kernels, one call per group of
same-shape tensors (LLVM for CPU tensors; for CUDA ones a launch per kernel of the pass).
The small work between passes runs once per group too: on the CPU as compiled functions
(small_function.py), for CUDA tensors in torch (small_work.py); the network runs once
per step."""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import replace
from functools import partial
from typing import Callable, ContextManager

import torch

from ...ir.nodes import topo_order
from ...ir.plan import plan_program
from ...ir.program import Program, is_factored
from ..base import Backend, StepBatch, TensorTask
from ..build_cache import DEFAULT_CACHE, BuildCache
from ..cuda.build import nvcc_missing
from ..group_values import group_key, run_network_over_groups
from ..reference import ReferenceBackend
from ..sharded_groups import RankSums, run_group_calls
from .background import BackgroundBuilds, background_builds_enabled
from .build import build_kernel, cuda_kernels_path, kernel_built, llvm_target, load_cuda_kernels, load_kernel
from .replay import NetworkCall, StepRecord, recordable, step_key
from .signature import PassSignature, pass_signature
from .small_function import is_plain, small_signatures
from .small_work import GroupKept, GroupStep, SmallKernel
from .threads import CONTENTION
from .view import LANES, OWN_LANES_FROM, PARALLEL_WITHIN_FROM, ROW_CHUNKS, SHORT_ROWS_MACS, SYMBOLIC_BELOW, View, \
    view_of

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def unsupported_reason(task: TensorTask) -> str | None:
    """Why the compiled kernels cannot take this tensor (None: they can)."""
    return _kind_unsupported(task) or _layout_unsupported(task)


def _kind_unsupported(task: TensorTask) -> str | None:
    """unsupported_reason's part that a group's tensors share (device, dtypes, shape)."""
    p = task.param
    if p.device.type not in ("cpu", "cuda"):
        return f"the TVM backend has kernels for CPU and CUDA tensors, not {p.device.type}"
    if p.device.type == "cuda" and (missing := nvcc_missing()) is not None:
        return f"CUDA parameters need TVM's CUDA kernels, which are built with nvcc: {missing}"
    if p.dtype not in _DTYPES or task.grad.dtype not in _DTYPES:
        return f"unsupported dtype {p.dtype} / gradient {task.grad.dtype}"
    if p.numel() == 0 and task.shard is None:   # (a rank's empty share of a sharded tensor takes part)
        return "empty parameter"
    return None


def _layout_unsupported(task: TensorTask) -> str | None:
    if not task.param.is_contiguous():
        return "non-contiguous parameter (the kernels update it in place through a flat view)"
    return None


def _groups(tasks: list[TensorTask]) -> dict[tuple, list[TensorTask]]:
    """The tasks by group (same variant, shape, device and dtypes: one call of the kernels)."""
    groups: dict[tuple, list[TensorTask]] = {}
    for task in tasks:
        key = (*group_key(task), task.param.device, task.param.dtype, task.grad.dtype)
        groups.setdefault(key, []).append(task)
    return groups


def cuda_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _on_device(device: torch.device) -> ContextManager:
    """TVM's CUDA launcher runs on the current CUDA device (and torch's current stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Kernel:
    def __init__(self, sig: PassSignature, func: Callable):
        self.sig, self.func = sig, func


class TvmBackend(Backend):
    name = "tvm"

    def __init__(self, program: Program, cache: BuildCache = DEFAULT_CACHE, specialize_from: int = SYMBOLIC_BELOW,
                 parallel_within_from: int = PARALLEL_WITHIN_FROM, compiled_small_work: bool = True,
                 background: bool | None = None, own_lanes_from: int = OWN_LANES_FROM):
        super().__init__(program)
        # Tensors with fewer elements share shape-generic kernels (one build for all
        # sizes); larger ones get kernels built for their shape...
        self.specialize_from = specialize_from
        # ... and, from own_lanes_from elements, so do those whose shape-generic kernels
        # would run a lane at a time where an MLP makes that slow (view.OWN_LANES_FROM).
        self.own_lanes_from = own_lanes_from
        # Tensors this large split their own loops across the cores; a group of smaller
        # ones runs whole tensors per core (View.parallel_within).
        self.parallel_within_from = parallel_within_from
        # CPU groups run their small work as compiled functions (small_function.py); False:
        # in torch, as CUDA groups do (so that path is tested without a GPU).
        self.compiled_small_work = compiled_small_work
        self.target = llvm_target()
        self.cache = cache
        self.plans = plan_program(program)
        self._heavy_mlp = {v for v, plan in self.plans.items() if any(p.macs >= SHORT_ROWS_MACS for p in plan.passes)}
        self._with_calls = {v for v, graph in program.variants.items()
                            if any(n.op == "call" for n in topo_order(graph.roots()))}
        # Steps with a skip flag are never recorded (the flag is a value of the step, computed
        # in torch: replay.py), nor those of graphs with tensor functions (recordable).
        skips = any(n.op == "skip_step" for g in program.variants.values() for n in topo_order(g.roots()))
        self.replays_steps = not skips and len(self._with_calls) < len(program.variants)
        self.fallback = ReferenceBackend(program)
        # New kernels build in the background while the step runs on the tier below
        # (background.py); None: each is built when first needed, the step waiting.
        self.builds = BackgroundBuilds() if (background_builds_enabled() if background is None else background) \
            else None
        self._kernels: dict[tuple, list[_Kernel]] = {}
        self._small: dict[tuple, dict[str, SmallKernel]] = {}
        self._small_sigs: dict[tuple, list] = {}
        self._kept: dict[tuple, GroupKept] = {}   # group key -> its kept arguments
        self._warned: set[str] = set()
        self._record: StepRecord | None = None   # the last step's ops, if it may be replayed (replay.py)

    def view(self, task: TensorTask) -> View:
        """The kernels' view of a tensor (CUDA tensors: the GPU kernels' one)."""
        return view_of(tuple(task.param.shape), task.axes, gpu=task.param.device.type == "cuda")

    def _group_kernels(self, key: tuple, task: TensorTask, wait: bool) -> list[_Kernel] | None:
        """kernels() of a group's tensors, kept with the group once they are its best
        (finding them again took 5 us a group and step)."""
        kept = self._kept.get(key) or self._kept.setdefault(key, GroupKept())   # (made only when missing)
        if kept.kernels is not None:
            return kept.kernels
        kernels, best = self.kernels(task, wait)
        if best:
            kept.kernels = kernels
        return kernels

    def kernels(self, task: TensorTask, wait: bool = True) -> tuple[list[_Kernel] | None, bool]:
        """The tensor's kernels: built for its shape when it is large enough (or when the
        shape-generic ones would run its heavy MLP a lane at a time: _own_lanes), else
        shape-generic. wait=False: the best of those already built (its own, else the
        shape-generic ones, else None: the reference steps it), the better ones' builds
        started in the background. And whether they are the best (no better to come).
        A tensor whose shape-generic kernels split it across the cores (View.generic) takes
        them as its own: their loops are those of a kernel built for its shape, and they
        took the same time (interleaved, GPT-2's tensors: VeLO 61.9 ms a step against
        62.7, small_fc_lopt 256.0 against 255.5, Adam 7.80 against 7.74), with no build
        for each new shape."""
        p = task.param
        view = self.view(task)   # the GPU's is always shape-generic
        if not view.gpu and view.numel >= self.parallel_within_from:
            view = replace(view, parallel_within=True)
        shared = view.numel < self.specialize_from and not self._own_lanes(task.variant, view)
        if shared or view.generic().parallel_within:
            view = view.generic()
        arch = cuda_arch(p.device) if p.device.type == "cuda" else None
        wait = wait or view.gpu   # (CUDA kernels are shape-generic already)
        # Best first.
        tiers = [view] if wait or view.symbolic else [view, view.generic()]
        keys = [(task.variant, v.x_axis, v.symbolic or v.dims, v.vectors, v.gpu, v.parallel_within, p.dtype,
                 task.grad.dtype, arch) for v in tiers]
        if keys[0] in self._kernels:
            return self._kernels[keys[0]], True
        graph = self.program.variants[task.variant]
        sigs = [[pass_signature(ps, graph.new_param, graph.accumulators, v, _DTYPES[p.dtype], _DTYPES[task.grad.dtype])
                 for ps in self.plans[task.variant].passes] for v in tiers]
        ready = 0 if wait else None
        for k in [] if wait else reversed(range(len(tiers))):   # the stand-in's build is queued first
            jobs = sigs[k] + self._small_signatures(task, sigs[k])   # (shared by the tiers: built once)
            if keys[k] in self._kernels or self._built(keys[k], task.variant, jobs, tiers[k].symbolic):
                ready = k
        if ready is None:
            return None, False
        if keys[ready] not in self._kernels:
            self._kernels[keys[ready]] = [_Kernel(s, f) for s, f in zip(sigs[ready], self._load(task.variant,
                                                                                                  sigs[ready], arch))]
        return self._kernels[keys[ready]], ready == 0

    def _own_lanes(self, variant: str, view: View) -> bool:
        """Whether a small tensor takes its own kernels, which run vectors, where the
        shape-generic ones would run its heavy MLP a lane at a time (OWN_LANES_FROM)."""
        return (not view.gpu and view.numel >= self.own_lanes_from and variant in self._heavy_mlp
                and not view.generic().vectors and replace(view, pad_short_rows=True).element_y is not None)

    def _built(self, key: tuple, variant: str, jobs: list, stand_in: bool) -> bool:
        """Whether a tier's kernels are built: in the cache when first asked (no build),
        else by their background build, asked for then (a shape-generic one ahead of the rest)."""
        if not self.builds.asked(key) and \
                all(kernel_built(self.program, variant, s, self.target, self.cache) for s in jobs):
            return True
        return self.builds.done(key, lambda: self._build(variant, jobs), stand_in)

    def _small_key(self, task: TensorTask, sigs: list[PassSignature]) -> tuple:
        """What a tensor's small functions depend on besides the spec (small_kernels): its
        kind, and whether its own view is plain (SmallSignature.plain; the kernels' view may
        be another tensor's, since shape-generic kernels serve every shape of a kind)."""
        view = sigs[0].view
        return (task.variant, view.x_axis, view.gpu, sigs[0].means_over_y, sigs[0].means_in_m,
                is_plain(self.view(task).dims))

    def _small_signatures(self, task: TensorTask, sigs: list[PassSignature]) -> list:
        """The small functions small_kernels will load for these kernels (none: torch's),
        derived once per small key (each derivation walks the graph: 1-2 ms, 15 of them
        in VeLO's first step on GPT-2)."""
        key = self._small_key(task, sigs)
        if key not in self._small_sigs:
            skip = sigs[0].view.gpu or not self.compiled_small_work or task.variant in self._with_calls
            self._small_sigs[key] = [] if skip else \
                [s for s in small_signatures(self.program.variants[task.variant], sigs, plain=key[-1]) if not s.empty]
        return self._small_sigs[key]

    def _build(self, variant: str, sigs: list) -> None:
        for sig in sigs:
            build_kernel(self.program, variant, sig, self.target, self.cache)

    def small_kernels(self, task: TensorTask, sigs: list[PassSignature]) -> dict[str, SmallKernel] | None:
        """The compiled small work of a tensor kind (shape-generic; the finish functions per
        layout of the tensor means' sums, PassSignature.means_over_y and means_in_m), by consumer; None for
        the GPU kernels (their sums have the GPU layout; the small work runs in torch) and
        around tensor functions (they run in torch: so does the small work around them)."""
        key = self._small_key(task, sigs)
        if key not in self._small:   # (deriving the signatures took a third of Adam's time outside the kernels)
            small = self._small_signatures(task, sigs)
            self._small[key] = {s.name: SmallKernel(s, load_kernel(self.program, task.variant, s, self.target,
                                                                   self.cache)) for s in small}
        return self._small[key] or None

    def _load(self, variant: str, sigs: list[PassSignature], arch: str | None) -> list[Callable]:
        if arch is not None:
            return load_cuda_kernels(self.program, variant, sigs, arch, self.cache)
        return [load_kernel(self.program, variant, s, self.target, self.cache) for s in sigs]

    def step(self, batch: StepBatch) -> None:
        key = step_key(batch) if self.replays_steps else None
        last, self._record = self._record, None   # (only ever the last step's: replay.py)
        grads = last.gradients(batch) if key is not None and last is not None and last.key == key else None
        if grads is not None:
            CONTENTION.before_step()
            with self._step_threads(cpu=True):
                last.replay(batch, grads)
            self._record = last
            return
        record = StepRecord(key, batch) if key is not None and recordable(batch, self._with_calls) else None
        try:
            self._step_supported(batch, record)
        finally:
            if self.builds is not None:   # the builds this step asked for (background.py)
                self.builds.start()
        if record is not None and record.valid:
            record.recorded()
            self._record = record

    def _step_supported(self, batch: StepBatch, record: StepRecord | None = None) -> None:
        groups, rest = _groups(batch.tasks), []
        for key, tasks in list(groups.items()):   # (checked per group where its tensors share the reason)
            reason = _kind_unsupported(tasks[0])
            reasons = [reason] * len(tasks) if reason is not None else [_layout_unsupported(t) for t in tasks]
            if any(r is not None for r in reasons):
                rest += [(t, r) for t, r in zip(tasks, reasons) if r is not None]
                groups[key] = [t for t, r in zip(tasks, reasons) if r is None]
                if not groups[key]:
                    del groups[key]
        for _, reason in rest:
            self._warn_once(reason)
        if rest and record is not None:
            record.invalidate()
        if rest and batch.network is not None:
            # The network couples all tensors of a step: one backend must run them all.
            with self._core_left():
                self.fallback.step(batch)
            return
        if rest:
            with self._core_left():
                self.fallback.step(replace(batch, tasks=[t for t, _ in rest]))
        if groups:
            self._step(replace(batch, tasks=[t for tasks in groups.values() for t in tasks]) if rest else batch,
                       groups, record)

    def _step(self, batch: StepBatch, groups: dict[tuple, list[TensorTask]], record: StepRecord | None = None) -> None:
        cpu = any(t.param.device.type == "cpu" for t in batch.tasks)
        if cpu:
            CONTENTION.before_step()   # one thread while other processes want the cores
        ranks = RankSums.of(batch, self.program)   # FSDP2: the collectives across ranks
        # The kept arguments of groups this step lacks go (their buffers with them).
        self._kept = {k: kept for k, kept in self._kept.items() if k in groups}
        # Under FSDP2 every rank must take the same path: the kernels are waited for.
        wait = self.builds is None or ranks is not None
        kernels = {key: self._group_kernels(key, tasks[0], wait) for key, tasks in groups.items()}
        reference = any(k is None for k in kernels.values())   # kernels still building: this step on the reference
        if record is not None and (reference or ranks is not None or
                                   any(self._kept[key].kernels is None for key in groups)):
            record.invalidate()   # (better kernels to come: their step is not this one)
        if reference and self.builds is not None:
            # The reference's step takes seconds that the builds need not wait. (Else they
            # start when the step ends, so that it runs on all the cores: step() below.)
            self.builds.start()
        # On torch's threads less one where a build runs: on all of them, the reference's
        # step beside a build took 10.4 s against 2.5 s.
        with self._step_threads(cpu):
            if reference:
                self.fallback.step(batch)
            else:
                self._run_groups(batch, groups, kernels, ranks, record)

    def _core_left(self) -> ContextManager:
        """Torch's threads less one while a background build runs (background.py)."""
        return self.builds.core_left() if self.builds is not None else contextlib.nullcontext()

    def _step_threads(self, cpu: bool) -> ContextManager:
        """Torch's threads for a step: one while the machine is busy (CPU steps:
        Contention.torch_ops_too), less one while a build runs. No context where neither
        holds: the two took 3 us of a replayed 57 us step."""
        busy = cpu and CONTENTION.busy
        building = self.builds is not None and self.builds.running()
        if not (busy or building):
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if busy:
            stack.enter_context(CONTENTION.torch_ops_too())
        stack.enter_context(self._core_left())
        return stack

    def _run_groups(self, batch: StepBatch, groups: dict[tuple, list[TensorTask]],
                    kernels: dict[tuple, list[_Kernel]], ranks: RankSums | None,
                    record: StepRecord | None = None) -> None:
        runs = []
        for key, tasks in groups.items():
            sigs = [k.sig for k in kernels[key]]
            # A sharded group's small work runs in torch, where its reductions across ranks are.
            small = self.small_kernels(tasks[0], sigs) if tasks[0].shard is None else None
            kept = self._kept[key]   # (made by _group_kernels)
            if kept.view is None:
                kept.view = self.view(tasks[0])
            group = GroupStep(tasks, batch, kept.view, kept, sigs, small, ranks, record)
            runs.append((group, kernels[key]))
        steps = [group for group, _ in runs]
        before, after = [], []   # the passes up to the network, then the rest
        for group, kernels in runs:
            network_after = self.plans[group.tasks[0].variant].network_after
            split = len(kernels) if batch.network is None or network_after is None else network_after + 1
            before.append((group, kernels[:split]))
            after.append((group, kernels[split:]))
        self._run_passes(before, ranks)
        if batch.network is not None:
            inputs = [self.program.variants[g.tasks[0].variant].network_input for g in steps]
            for group, node in zip(steps, inputs):
                group.network_input(node)
            if record is None:
                run_network_over_groups(batch, steps, inputs)
            else:
                network = NetworkCall(batch, steps, inputs)
                network()
                record.ops.append(network)
        self._run_passes(after, ranks)
        run_group_calls([(group, self.plans[group.tasks[0].variant].calls_after) for group in steps], self.program,
                        ranks)
        if ranks is not None:
            ranks.settle(steps)
        for group in steps:
            group.write_small_accumulators(self.program.variants[group.tasks[0].variant].accumulators)

    def _run_passes(self, runs: list[tuple[GroupStep, list[_Kernel]]], ranks: RankSums | None) -> None:
        """The groups' passes in rounds (every group's first, then every group's second...);
        under FSDP2 the reductions across ranks are settled between rounds, for all groups."""
        groups = [group for group, _ in runs]
        for k in range(max((len(kernels) for _, kernels in runs), default=0)):
            due = [(group, kernels[k]) for group, kernels in runs if k < len(kernels)]
            if ranks is not None:
                ranks.settle(groups)
            run_group_calls([(group, self.plans[group.tasks[0].variant].passes[kernel.sig.index].calls)
                             for group, kernel in due], self.program, ranks)
            for group, kernel in due:
                self._run(kernel, group)
        if ranks is not None:
            ranks.settle(groups)

    def _run(self, kernel: _Kernel, group: GroupStep) -> None:
        """One call for the group, over a table of pointers (batched.py): on the CPU a loop
        over its tensors, on the GPU one launch per kernel (table in device memory). The
        arguments are kept per group and pass (KeptArgs): an unchanged group reuses its table."""
        sig = kernel.sig
        if group.view.numel == 0:   # FSDP2: this rank holds no rows of the group's tensors
            group.finish_sums(sig, *group.no_sums(sig))
            return
        table, write_back, *sums = group.kernel_args(sig)
        if not sig.view.gpu:
            group.do(partial(kernel.func, table, *sig.view.size_args(group.view.dims)))
        else:
            with _on_device(table.device):
                kernel.func(table, *group.view.dims, *([group.view.gpu_chunks()] if sig.x_sums else []))
        for original, copy in write_back:
            original.copy_(copy)
        group.finish_sums(sig, *sums)

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{self.program.class_name}: {reason}; using the reference backend for it",
                          RuntimeWarning, stacklevel=4)


def generic_signatures(program: Program, dtype: str, gpu: bool = False) -> dict[str, list[PassSignature]]:
    """The passes of the shape-generic kernels (gpu: the CUDA ones), per tensor kind:
    '<variant>-d0' for factored ones (d0 is the lower-numbered factored axis), '<variant>-d1', and
    '<variant>' for unfactored ones (variants: 'factored', 'unfactored' or '<route>_factored'...); on
    the CPU each also '<label>-vectors', for tensors whose dims allow vectors (View.vectors), and
    '<label>-vectors-parallel' for those that also split across the cores (View.generic)."""
    out = {}
    for variant, plan in plan_program(program).items():
        graph = program.variants[variant]
        views = {f"{variant}-d0": view_of((32, 16), (0, 1), gpu), f"{variant}-d1": view_of((16, 32), (1, 0), gpu)} \
            if is_factored(variant) else {variant: view_of((ROW_CHUNKS * LANES,), None, gpu)}   # (rows that split)
        for label, view in views.items():
            kinds = {label: view.fully_generic()} if gpu else {
                label: view.fully_generic(), f"{label}-vectors": view.generic(),
                f"{label}-vectors-parallel": replace(view, parallel_within=True).generic()}
            for kind, generic in kinds.items():
                out[kind] = [pass_signature(p, graph.new_param, graph.accumulators, generic, dtype, dtype)
                             for p in plan.passes]
    return out


def prebuild(program: Program, cache: BuildCache = DEFAULT_CACHE, target: str = "cpu",
             archs: tuple[str, ...] = ("sm_80", "sm_90")) -> tuple[int, float]:
    """Builds (or finds in the cache) the shape-generic kernels of every tensor kind and
    parameter dtype: for the CPU (target "cpu", with the small functions) or, with nvcc
    and no GPU needed, for each CUDA arch (target "cuda"). Returns (kernels, seconds)."""
    start = time.perf_counter()
    count = 0
    smalls: set[tuple] = set()
    llvm = llvm_target() if target == "cpu" else None
    for dtype in _DTYPES.values():
        for label, sigs in generic_signatures(program, dtype, gpu=llvm is None).items():
            variant = label.split("-")[0]
            if llvm is None:
                for arch in archs:
                    cuda_kernels_path(program, variant, sigs, arch, cache)
                    count += len(sigs)
                continue
            for sig in sigs:
                load_kernel(program, variant, sig, llvm, cache)
                count += 1
            # (the same functions for every dtype and view of a tensor kind; not plain ones
            # only where a tensor's view can have A, B or C > 1: factored ones)
            for plain in (True, False) if sigs[0].view.x_axis is not None else (True,):
                for small in small_signatures(program.variants[variant], sigs, plain):
                    if not small.empty and (variant, small.name, small.x_axis, plain) not in smalls:
                        smalls.add((variant, small.name, small.x_axis, plain))
                        load_kernel(program, variant, small, llvm, cache)
                        count += 1
    return count, time.perf_counter() - start
