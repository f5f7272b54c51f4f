"""Declared loss buffers: step-level statistics of the training loss a spec names by
`loss_buffer.kind` (VeLO's, shared/ALGORITHMS.md)."""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .base import LossBufferKind


@lru_cache(maxsize=64)
def _loss_decays(count: int, horizon: float, device: torch.device) -> torch.Tensor:
    """The loss buffer's decays on a device, made once (a steady-state step copies
    nothing from the host; a CUDA graph cannot capture that). Never written in place."""
    horizons = torch.logspace(1.0, math.log10(horizon), count, dtype=torch.float64)
    return torch.exp(-1.0 / horizons).to(device=device, dtype=torch.float32)


class VeloLossBuffer(LossBufferKind):
    name = "velo"
    channels = 9
    _N = 10

    def _decays(self, device: torch.device) -> torch.Tensor:
        return _loss_decays(self._N, self.horizon, device)

    def initial_state(self, device):
        return {"loss_means": torch.zeros(self._N, device=device),
                "loss_iteration": torch.zeros((), device=device),
                "loss_running_min": torch.full((self._N,), 999999999999.0, device=device)}

    def update(self, state, loss):
        decay = self._decays(loss.device)
        it = state["loss_iteration"]
        means = state["loss_means"]
        debias = 1.0 - decay ** (it + 1.0)
        approx_max = torch.where(it == 0, loss, (means / debias).max())
        loss = torch.minimum(2.0 * approx_max.abs(), loss)
        means = means * decay + loss * (1.0 - decay)
        running_min = torch.minimum(state["loss_running_min"], means / debias)
        return {"loss_means": means, "loss_iteration": it + 1.0, "loss_running_min": running_min}

    def features(self, state):
        decay = self._decays(state["loss_means"].device)
        it = state["loss_iteration"]
        cor = state["loss_means"] / (1.0 - decay ** it)
        low = state["loss_running_min"][:-1]
        rel = (cor[:-1] - low) / torch.clamp(cor[1:] - low, min=1e-8) - 1.0
        # No host sync: the "too early" rule is a select, not a Python branch.
        return torch.where(it <= 2, torch.zeros_like(rel), rel.clamp(-1.0, 1.0))
