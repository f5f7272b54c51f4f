"""Declared step-level machinery a spec names by `kind`: VeLO's loss buffer. It runs once
per step on the loss, in torch, for every backend. (Per-tensor networks are written in
specs: ir/network.py, backends/network_program.py.)"""
from __future__ import annotations

from .base import LossBufferKind
from .loss_buffers import VeloLossBuffer

LOSS_BUFFER_KINDS: dict[str, type[LossBufferKind]] = {VeloLossBuffer.name: VeloLossBuffer}

__all__ = ["LOSS_BUFFER_KINDS", "LossBufferKind"]
