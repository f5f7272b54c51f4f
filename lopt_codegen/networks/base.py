"""Interfaces of declared network kinds."""
from __future__ import annotations

from typing import ClassVar

import torch


class NetworkKind:
    """A per-tensor hypernetwork: reads one row of tensor-level inputs per parameter
    tensor, returns tensor-level outputs and the weights of each tensor's MLP."""

    name: ClassVar[str]
    input_channels: ClassVar[int]
    outputs: ClassVar[dict[str, int]]                    # name -> channels, tensor level
    roles: ClassVar[dict[str, dict[str, tuple[int, ...]]]]  # weight role -> keys it reads
    mlp_sizes: ClassVar[tuple[int, ...]]                 # the per-tensor MLP it produces
    state_keys: ClassVar[tuple[str, ...]]                # per-tensor state it keeps

    def __init__(self, weights: dict[str, dict[str, torch.Tensor]]):
        self.weights = weights

    def initial_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The network state of one tensor before its first step."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """x: (T, input_channels); state: each (T, ...). Returns (outputs (T, ch),
        MLP weights [w0 (T, out, in), b0 (T, out), ...], new state)."""
        raise NotImplementedError


class LossBufferKind:
    """Step-level statistics of the training loss (one per optimizer)."""

    name: ClassVar[str]
    channels: ClassVar[int]

    def __init__(self, horizon: float):
        self.horizon = horizon

    def initial_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update(self, state: dict[str, torch.Tensor], loss: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def features(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError
