"""The interface of declared loss buffers."""
from __future__ import annotations

from typing import ClassVar

import torch


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
