"""The `cuda` backend: runs each planned element pass as one call of the generated code
over all tensors of a variant (a CUDA kernel for CUDA tensors, the host build's loop
for CPU tensors); the small work between passes and the network stay in torch.
"""
from __future__ import annotations

from functools import cached_property

import torch

from ...ir.nodes import Level
from ...ir.plan import plan_program
from ..base import Backend, StepBatch, TensorTask
from ..reference import TensorEvaluator, run_network
from ..small_values import SmallValues
from .build import ToolchainMissing, build_cuda, build_host
from .passes import PassLayout
from .render import Rendered, render_cuda
from .tables import build_launch, finish_reductions, table_tensor


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, program):
        super().__init__(program)
        self._modules: dict[str, object] = {}
        plans = plan_program(program)
        after = {plan.network_after for plan in plans.values()}
        if program.network_kind is not None and len(after) != 1:
            raise ValueError(f"cuda backend: the network of {program.name} runs after different passes per "
                             f"variant ({sorted(after)}); one step runs them together, so they must agree")
        self.network_after = after.pop() if program.network_kind is not None else None

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
        evaluators = [TensorEvaluator(task, batch) for task in batch.tasks]
        smalls = [SmallValues(ev) for ev in evaluators]
        groups: dict[tuple[str, torch.device], list[int]] = {}
        for i, task in enumerate(batch.tasks):
            groups.setdefault((task.variant, task.param.device), []).append(i)
        n_passes = max(len(self.rendered.layouts[v]) for v, _ in groups)
        for k in range(n_passes):
            for (variant, device), idx in groups.items():
                layouts = self.rendered.layouts[variant]
                if k < len(layouts):
                    self._run_pass(layouts[k], device, [batch.tasks[i] for i in idx],
                                   [smalls[i] for i in idx], [evaluators[i].mlp_weights for i in idx])
            if batch.network is not None and k == self.network_after:
                # As the reference; its outputs stay on the device (VeLO's step multiplier
                # is never read back).
                inputs = [small.get(program.variants[t.variant].network_input).reshape(-1)
                          for small, t in zip(smalls, batch.tasks)]
                outputs, mlp = run_network(batch, batch.tasks, torch.stack(inputs))
                for i, ev in enumerate(evaluators):
                    ev.take_network(outputs, mlp, i)
        # Coarser accumulators (Adafactor rows/cols) come out of the small work.
        for task, small in zip(batch.tasks, smalls):
            for name, node in program.variants[task.variant].accumulators.items():
                if node.level != Level.ELEMENT:
                    task.state[name].copy_(small.get(node))

    def _run_pass(self, layout: PassLayout, device: torch.device, tasks: list[TensorTask],
                  smalls: list[SmallValues], weights: list[list[torch.Tensor] | None]) -> None:
        module = self.module(device)
        launch = build_launch(layout, tasks, smalls, weights)
        table = table_tensor(launch, device)
        if device.type == "cuda":
            getattr(module, f"{layout.name}_cuda")(table, launch.total_blocks)
        else:
            getattr(module, f"{layout.name}_host")(table)
        finish_reductions(launch, tasks, smalls)
