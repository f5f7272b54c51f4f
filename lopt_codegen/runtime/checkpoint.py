"""State dicts of parameters sharded by FSDP2 that torch.distributed.checkpoint (DCP)
saves and reshards onto another world size.

An accumulator of a DTensor parameter is kept as this rank's rows ([channels, *rows]);
in a state dict it becomes a DTensor over the parameter's mesh: Shard(1) (the
parameter's dim 0, after the channels) where its level keeps dim 0, else Replicate (a
row or tensor statistic, the same on every rank). Per-tensor values (t, network state)
are the same on every rank and stay plain tensors, which DCP saves once.

DCP's get_optimizer_state_dict keeps only the entries keyed by parameter, so the
optimizer-wide values (the loss buffer, the count of skipped steps) travel in every
parameter's entry under GLOBAL, and come back from the first one on load.
"""
from __future__ import annotations

from typing import Any

import torch

from ..backends.base import RowShard
from .sharding import is_dtensor

GLOBAL = "__global."


def fold_global_state(state: dict[Any, Any]) -> dict[Any, Any]:
    """Entries keyed by parameter only, each with a copy of the optimizer-wide values."""
    shared = {}
    for key, value in state.items():
        if isinstance(key, str):
            items = value.items() if isinstance(value, dict) else [(None, value)]
            shared.update({GLOBAL + key + ("" if k is None else "." + k): v for k, v in items})
    if not shared:
        return state
    return {k: {**s, **shared} for k, s in state.items() if not isinstance(k, str)}


def unfold_global_state(state: dict[Any, Any]) -> dict[Any, Any]:
    """fold_global_state undone (a state without GLOBAL keys is returned as it is)."""
    out: dict[Any, Any] = {}
    shared: dict[str, Any] = {}
    for key, entry in state.items():
        if not isinstance(entry, dict) or not any(isinstance(k, str) and k.startswith(GLOBAL) for k in entry):
            out[key] = entry
            continue
        out[key] = {k: v for k, v in entry.items() if not k.startswith(GLOBAL)}
        for k, v in entry.items():
            if k.startswith(GLOBAL):
                shared.setdefault(k[len(GLOBAL):], v)
    for name, value in shared.items():
        owner, _, sub = name.partition(".")
        if sub:
            out.setdefault(owner, {})[sub] = value
        else:
            out[owner] = value
    return out


def sharded_accumulator(local: torch.Tensor, p: torch.Tensor, shard: RowShard | None, has_rows: bool,
                        whole_shape: list[int]) -> torch.Tensor:
    """A DTensor parameter's accumulator as a DTensor on its mesh (whole_shape: the
    accumulator's shape for the whole parameter, channels first)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if shard is None or not has_rows:
        return DTensor.from_local(local, p.device_mesh, [Replicate()], run_check=False)
    stride = torch.empty(whole_shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), p.device_mesh, [Shard(1)], run_check=False,
                              shape=torch.Size(whole_shape), stride=stride)


def local_accumulator(value: torch.Tensor, shard: RowShard | None, has_rows: bool, rows: int) -> torch.Tensor:
    """This rank's part of a saved accumulator: a DTensor's local values (DCP has
    resharded it onto this mesh), or the rows of a whole one (a checkpoint of one process)."""
    if is_dtensor(value):
        return value.to_local()
    if shard is not None and has_rows and value.dim() > 1 and value.shape[1] == shard.shape[0]:
        return value.narrow(1, shard.start, rows)
    return value
