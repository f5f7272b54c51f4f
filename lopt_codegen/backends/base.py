"""What the runtime hands a backend each step, and the interface backends implement."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ir.program import Program
from ..ir.tensor_function import FunctionIR
from .network_program import SpecNetwork


@dataclass
class TensorTask:
    """One parameter tensor's share of a step. `state` is the optimizer state of the
    parameter: accumulators (float32, shaped [channels, *shape with reduced axes = 1]),
    network state, and `step` (float32 0-D tensor, t before this step)."""

    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, torch.Tensor]
    hyper: dict[str, float]
    variant: str                       # "factored" or "unfactored"
    axes: tuple[int, int] | None       # (d0, d1) for factored tensors
    shard: RowShard | None = None      # param and grad are this rank's rows of a tensor sharded on dim 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole tensor's shape (under FSDP2, more rows than `param` holds)."""
        return self.shard.shape if self.shard is not None else tuple(self.param.shape)


@dataclass(frozen=True)
class RowShard:
    """Where this rank's rows lie in a parameter sharded on dim 0 over a process group
    (FSDP2's Shard(0), torch.chunk's split: the last ranks may hold fewer rows, or none)."""

    shape: tuple[int, ...]     # the whole tensor's
    start: int                 # its first row here
    group: Any                 # torch.distributed.ProcessGroup
    world: int


def checked_accumulator(task: TensorTask, name: str, backend: str) -> torch.Tensor:
    """Accumulator `name` of the task, checked to be what compiled kernels read through
    bare pointers: float32 [channels, *shape], each channel contiguous, on the param's device."""
    acc = task.state[name]
    # Every channel has channel 0's sizes and strides: one contiguous means all are.
    if acc.dtype != torch.float32 or acc.device != task.param.device or acc.dim() == 0 or \
            not acc[0].is_contiguous():
        raise ValueError(f"{backend} backend: accumulator '{name}' must be float32 [channels, *shape] with each "
                         f"channel contiguous, on the parameter's device; got {acc.dtype} with strides "
                         f"{acc.stride()} on {acc.device}")
    return acc


@dataclass
class StepBatch:
    tasks: list[TensorTask]
    mlp_weights: list[torch.Tensor] | None = None  # [w0, b0, w1, b1, ...] shared by all tensors
    network: SpecNetwork | None = None
    loss_features: torch.Tensor | None = None      # (channels,) from the loss buffer
    skip_step: torch.Tensor | None = None          # (1,): 1.0 when this step is skipped (grad.nonfinite: skip)
    tensor_functions: dict[str, FunctionIR] = field(default_factory=dict)   # the program's, by name
    # The tasks' generation (runtime/steady.py): a step of the same generation as another
    # has the same task objects, params, state and routes; only the tasks' gradients and
    # hyperparameters (the param groups' values `hyper_values`) may differ. None: unknown.
    generation: int | None = None
    hyper_values: tuple = ()
    # The state keys whose tensors the step replaced (made them rows of one tensor: views),
    # so the optimizer keys its tasks again after the step (SteadyTasks.rekey). One list,
    # shared by the copies a backend makes of the batch (dataclasses.replace).
    replaced_states: list[str] = field(default_factory=list)


class Backend:
    name: str = "base"
    # Whether a step of the last step's task generation (StepBatch.generation) may repeat
    # it through the addresses it read: the generation then covers the state's addresses.
    replays_steps: bool = False

    def __init__(self, program: Program):
        self.program = program

    def step(self, batch: StepBatch) -> None:
        """Update params and state of every task in place."""
        raise NotImplementedError
