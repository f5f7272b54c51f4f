"""What a network's values (network_program.py) are held in: numpy arrays on the CPU,
torch tensors on a GPU. Its linear layers and projections run in torch either way (on
numpy's memory, without a copy); its element-wise ops, concats and reductions in the
arrays' own library: numpy's ops on a few thousand floats take a few us, torch's 5-15
from the cold caches a step's kernels leave."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import numpy as np
import torch

from . import numpy_ops, torch_ops

Value = Any   # a torch.Tensor or a numpy array, (rows, channels)


class TorchArrays:
    """Values as torch tensors on the network's device."""

    unary, binary = torch_ops.UNARY, torch_ops.BINARY

    def __init__(self, device: torch.device):
        self.device = device

    def of(self, t: torch.Tensor) -> Value:
        return t

    def tensor(self, v: Value) -> torch.Tensor:
        return v

    def row(self, values: torch.Tensor) -> Value:
        """A float32 (1, channels) row of the host's values, on the device."""
        return values.to(device=self.device, dtype=torch.float32).reshape(1, -1)

    def where(self, cond: Value, a: Value, b: Value) -> Value:
        return torch.where(cond != 0, a, b)

    def max_channels(self, v: Value) -> Value:
        return v.amax(1, keepdim=True)

    def expand(self, v: Value, rows: int, channels: int) -> Value:
        return v.expand(rows, channels)

    def concat(self, parts: list[Value]) -> Value:
        return concat_tensors(parts)

    def over_tensors(self, kind: str, v: Value) -> Value:
        return {"max": torch.amax, "mean": torch.mean, "sum": torch.sum}[kind](v, 0, keepdim=True)

    def quiet(self) -> ContextManager:
        return contextlib.nullcontext()


class NumpyArrays(TorchArrays):
    """Values as float32 numpy arrays (the network on the CPU)."""

    unary, binary = numpy_ops.UNARY, numpy_ops.BINARY

    def of(self, t: torch.Tensor) -> Value:
        return t.detach().numpy()

    def tensor(self, v: Value) -> torch.Tensor:
        if not v.flags.writeable:   # a broadcast (full): torch takes no read-only memory
            v = v.copy()
        return torch.from_numpy(v)

    def row(self, values: torch.Tensor) -> Value:
        return values.to(torch.float32).numpy().reshape(1, -1)

    def where(self, cond: Value, a: Value, b: Value) -> Value:
        return np.where(cond != 0, a, b)

    def max_channels(self, v: Value) -> Value:
        return v.max(1, keepdims=True)

    def expand(self, v: Value, rows: int, channels: int) -> Value:
        return np.broadcast_to(v, (rows, channels))

    def concat(self, parts: list[Value]) -> Value:
        return np.concatenate([self.expand(p, _rows(parts), p.shape[1]) for p in parts], axis=1)

    def over_tensors(self, kind: str, v: Value) -> Value:
        return {"max": np.max, "mean": np.mean, "sum": np.sum}[kind](v, 0, keepdims=True)

    def quiet(self) -> ContextManager:
        return np.errstate(all="ignore")


def concat_tensors(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.expand(_rows(parts), p.shape[1]) for p in parts], dim=1)


def _rows(parts: list[Value]) -> int:
    # A shared row (1, C) beside rows (T, C) takes T rows; T is 0 on a rank with no tensors.
    return 0 if any(p.shape[0] == 0 for p in parts) else max(p.shape[0] for p in parts)
