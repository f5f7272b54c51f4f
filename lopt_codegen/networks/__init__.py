"""Declared network kinds: per-tensor or per-step machinery a spec names by `kind`
(VeLO's LSTM hypernetwork, its loss buffer). They run once per step on tiny inputs, in
torch, for every backend; the per-element work stays in the IR."""
from __future__ import annotations

from .base import LossBufferKind, NetworkKind
from .velo import VeloLossBuffer, VeloLstm

NETWORK_KINDS: dict[str, type[NetworkKind]] = {VeloLstm.name: VeloLstm}
LOSS_BUFFER_KINDS: dict[str, type[LossBufferKind]] = {VeloLossBuffer.name: VeloLossBuffer}

__all__ = ["NETWORK_KINDS", "LOSS_BUFFER_KINDS", "NetworkKind", "LossBufferKind"]
