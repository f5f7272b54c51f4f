"""The `cuda` backend: runs each planned element pass as one call of the generated code
over all tensors of a variant (a CUDA kernel for CUDA tensors, the host build's loop
for CPU tensors); the small work between passes (once per group of same-shape tensors)
and the network stay in torch.
"""
from __future__ import annotations

from functools import cached_property

import torch

from ...ir.plan import plan_program
from ..base import Backend, StepBatch, TensorTask
from ..group_values import GroupValues, group_key, run_network_over_groups
from ..sharded_groups import RankSums, run_group_calls
from .build import ToolchainMissing, build_cuda, build_host, nvcc_missing
from .passes import PassLayout
from .render import Rendered, render_cuda
from .tables import DTYPES, Launch, finish_reductions, update_launch


def unsupported_reason(task: TensorTask) -> str | None:
    """Why the CUDA kernels cannot take this CUDA tensor (None: they can)."""
    p = task.param
    if p.dtype not in DTYPES:
        return f"the cuda backend's kernels take float32, bfloat16 and float16 parameters, not {p.dtype}"
    if not p.is_contiguous():
        return "non-contiguous parameter (the kernels update it in place through a flat view)"
    if (missing := nvcc_missing()) is not None:
        return f"CUDA parameters need the cuda backend's kernels, which are built with nvcc: {missing}"
    return None


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, program):
        super().__init__(program)
        self._modules: dict[str, object] = {}
        self._launches: dict[tuple, Launch] = {}   # (pass name, device) -> its kept launch
        self.plans = plans = plan_program(program)
        after = {plan.network_after for plan in plans.values()}
        if program.network is not None and len(after) != 1:
            raise ValueError(f"cuda backend: the network of {program.name} runs after different passes per "
                             f"variant ({sorted(after)}); one step runs them together, so they must agree")
        self.network_after = after.pop() if program.network is not None else None

    @cached_property
    def rendered(self) -> Rendered:
        return render_cuda(self.program, f"{self.program.name} spec")

    def module(self, device: torch.device):
        """The built module for a device type: the host build for CPU, nvcc for CUDA."""
        if device.type == "cpu":
            key = "cpu"
        elif device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            key = f"sm_{major}{minor}"
        else:
            raise ValueError(f"cuda backend: no build for {device.type} tensors (it runs CPU and CUDA tensors); "
                             "use backend='reference'")
        if key not in self._modules:
            name = f"lopt_{self.program.name}"
            if key == "cpu":
                self._modules[key] = build_host(self.rendered.source, name)
            else:
                try:
                    self._modules[key] = build_cuda(self.rendered.source, name, (key,))
                except ToolchainMissing as exc:
                    raise RuntimeError(f"cuda backend: CUDA tensors need the nvcc build, which is unavailable: "
                                       f"{exc}; use backend='reference' on this machine") from exc
        return self._modules[key]

    def step(self, batch: StepBatch) -> None:
        program = self.program
        # Small work once per group of same-shape tensors (group_values.py); the launches
        # still cover every tensor of a variant and device at once.
        by_shape: dict[tuple, list[TensorTask]] = {}
        for task in batch.tasks:
            by_shape.setdefault((*group_key(task), task.param.device), []).append(task)
        ranks = RankSums.of(batch, program)   # FSDP2: the collectives across ranks
        groups = [GroupValues(tasks, batch, ranks) for tasks in by_shape.values()]
        launches: dict[tuple[str, torch.device], list[GroupValues]] = {}
        for group in groups:
            launches.setdefault((group.tasks[0].variant, group.tasks[0].param.device), []).append(group)
        n_passes = max(len(self.rendered.layouts[v]) for v, _ in launches)
        for k in range(n_passes + 1):
            if ranks is not None:   # the reductions across ranks, of all groups, between passes
                ranks.settle(groups)
            self._run_calls(k, launches, ranks)
            for (variant, device), launch_groups in launches.items():
                if k < len(self.rendered.layouts[variant]):
                    self._run_pass(self.rendered.layouts[variant][k], device, launch_groups)
            if batch.network is not None and k == self.network_after:
                if ranks is not None:
                    ranks.settle(groups)
                # As the reference; its outputs stay on the device (VeLO's step multiplier
                # is never read back).
                run_network_over_groups(batch, groups, [program.variants[g.tasks[0].variant].network_input
                                                        for g in groups])
        if ranks is not None:
            ranks.settle(groups)
        # Coarser accumulators (Adafactor rows/cols) come out of the small work.
        for group in groups:
            group.write_small_accumulators(program.variants[group.tasks[0].variant].accumulators)

    def _run_calls(self, k: int, launches: dict[tuple[str, torch.device], list[GroupValues]],
                   ranks: RankSums | None) -> None:
        """The tensor functions that run before pass k (or after the last) of every group."""
        calls = []
        for (variant, _), launch_groups in launches.items():
            plan = self.plans[variant]
            due = plan.passes[k].calls if k < len(plan.passes) else plan.calls_after if k == len(plan.passes) else []
            calls += [(group, due) for group in launch_groups if due]
        run_group_calls(calls, self.program, ranks)

    def driver(self, device: torch.device) -> str:
        """The generated function that runs a pass here: `cuda` (the kernel) or `host` (the
        plain loop). The tests' SIMT emulation runs the kernel on CPU tensors instead."""
        return "cuda" if device.type == "cuda" else "host"

    def _run_pass(self, layout: PassLayout, device: torch.device, groups: list[GroupValues]) -> None:
        module, driver = self.module(device), self.driver(device)
        launch = self._launches.setdefault((layout.name, device), Launch(layout, kernel=driver != "host"))
        table = update_launch(launch, groups)
        if driver == "host":
            getattr(module, f"{layout.name}_host")(table)
        else:
            getattr(module, f"{layout.name}_{driver}")(table, launch.total_blocks)
        finish_reductions(launch, groups)
