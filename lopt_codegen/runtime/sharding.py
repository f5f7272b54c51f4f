"""The sharded step of data-parallel training (`shard=True`): every rank of a process
group owns whole parameter tensors, keeps only their optimizer state and steps only
them (ZeRO stage 1 by tensor, as torch's ZeroRedundancyOptimizer), and the updated
parameters are all-gathered after the step.

Whatever a step needs from every tensor is one collective over all tensors together,
never one per tensor:
- the gradients, when the optimizer averages them (`reduce_grads=True`): one
  reduce-scatter of a flat buffer laid out rank by rank;
- the loss (mean over ranks) and the non-finite flag of `grad.nonfinite: skip`: one
  all-reduce of a few numbers;
- each reduction over tensors in the spec's network (max/mean/sum_over_tensors): one
  all-reduce of a row of channels;
- the updated parameters: one all-gather of a flat byte buffer.
Everything else of a step (features, normalization over a tensor, the MLP, tensor
functions) reads one tensor, so a rank computes it alone.

Parameters sharded by FSDP2 (DTensors, dim 0 over a 1-D mesh) are the other case: every
rank holds rows of every tensor. `fsdp_rows` finds a rank's rows, the reference
backend all-reduces the reductions across ranks (backends/sharded.py), and `agree`
makes the loss and the skip flag the same on every rank.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..backends.base import RowShard
from ..backends.sharded import collective

_ALIGN_BYTES = 16   # each tensor's bytes in a flat buffer start here: any dtype views them


def agree(group: dist.ProcessGroup | None, loss: torch.Tensor | None, skip: torch.Tensor | None
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The loss's mean over the group's ranks and the skip flag of any rank, in one
    all-reduce on the device (no host read)."""
    parts = [v.reshape(1).float() for v in (loss, skip) if v is not None]
    if not parts:
        return loss, skip
    values = torch.cat(parts)
    dist.all_reduce(values, group=group)
    if loss is not None:
        loss, values = values[0] / dist.get_world_size(group), values[1:]
    if skip is not None:
        skip = (values[:1] > 0).float()
    return loss, skip


def dtensor_rows(p: torch.Tensor, class_name: str) -> tuple[torch.Tensor, RowShard | None]:
    """A DTensor parameter's local values and where its rows lie (None: replicated, the
    local tensor is the whole one). FSDP2's fully_shard shards dim 0 over a 1-D mesh;
    other layouts are refused with what to use instead."""
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1:
        raise TypeError(f"{class_name} steps DTensor parameters on a 1-D device mesh (fully_shard over one "
                        f"dimension); this one has a {mesh.ndim}-D mesh {tuple(mesh.shape)} (HSDP, tensor "
                        "parallelism), not supported yet")
    local = p.to_local()
    if placements[0].is_replicate():
        return local, None
    if not placements[0].is_shard(0):
        raise TypeError(f"{class_name} steps DTensor parameters sharded on dim 0 (fully_shard's default); this "
                        f"one has placement {placements[0]}; pass fully_shard(..., shard_placement_fn=None)")
    rows, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    if local.shape[0] != min(chunk, rows - start):
        raise RuntimeError(f"{class_name}: a parameter of shape {tuple(p.shape)} holds rows {tuple(local.shape)} "
                           f"on rank {rank} of {world}, not torch.chunk's split that FSDP2 uses")
    return local, RowShard(tuple(p.shape), start, mesh.get_group(), world)


def dtensor_grad(p: torch.Tensor, local: torch.Tensor, class_name: str) -> torch.Tensor:
    """This rank's part of a DTensor parameter's gradient, laid out as its values."""
    grad = p.grad.to_local() if is_dtensor(p.grad) else p.grad
    if grad.shape != local.shape:
        raise RuntimeError(f"{class_name}: a parameter of shape {tuple(p.shape)} holds rows {tuple(local.shape)} here, "
                           f"its gradient {tuple(grad.shape)}: shard the gradient as the parameter")
    return grad


@functools.cache
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # a torch built without distributed
        return None
    return DTensor


def is_dtensor(t: torch.Tensor) -> bool:
    """A parameter sharded by FSDP2 (fully_shard) or tensor parallelism."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


@dataclass
class _Layout:
    """Where each rank's tensors lie in a flat buffer: one chunk per rank, as long as the
    longest (collectives move equal chunks)."""

    chunk: int
    offsets: dict[int, int]   # id(param) -> offset in its owner's chunk


class TensorSharding:
    """Which rank owns which tensor, and the step's collectives over a process group."""

    def __init__(self, group: dist.ProcessGroup | None, reduce_grads: bool, class_name: str):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{class_name}(shard=...) shards the optimizer over a process group: call "
                               "torch.distributed.init_process_group(...) before making the optimizer")
        self.group, self.reduce_grads = group, reduce_grads
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._owner: dict[int, int] = {}
        self._load = [0] * self.world

    # --- ownership ------------------------------------------------------------------
    def assign(self, params: list[tuple[torch.Tensor, dict]], cost: Callable[[torch.Tensor, dict], int]) -> None:
        """Owners for the params (with their param groups) not yet assigned, by cost (the
        floats of their state): the costliest first to the least loaded rank (ties: the
        earlier param, the lower rank). The same answer on every rank, and an owner never
        changes, so state never moves between ranks."""
        new = [(i, p, cost(p, group)) for i, (p, group) in enumerate(params) if id(p) not in self._owner]
        for _, p, floats in sorted(new, key=lambda ipc: (-ipc[2], ipc[0])):
            rank = min(range(self.world), key=lambda r: (self._load[r], r))
            self._owner[id(p)] = rank
            self._load[rank] += max(floats, 1)

    def owns(self, p: torch.Tensor) -> bool:
        return self._owner[id(p)] == self.rank

    def _layout(self, params: list[torch.Tensor], nbytes: Callable[[torch.Tensor], int]) -> _Layout:
        ends = [0] * self.world
        offsets = {}
        for p in params:
            rank = self._owner[id(p)]
            offsets[id(p)] = ends[rank]
            ends[rank] += -(-nbytes(p) // _ALIGN_BYTES) * _ALIGN_BYTES
        return _Layout(max(max(ends), _ALIGN_BYTES), offsets)

    # --- the step's collectives -------------------------------------------------------
    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Each owner's gradients become their mean over the ranks (one reduce-scatter of
        float32 values); the other ranks' copies of those gradients are left as they were."""
        if not params:
            return
        layout = self._layout(params, lambda p: 4 * p.numel())
        words = layout.chunk // 4
        flat = torch.zeros(self.world * words, dtype=torch.float32, device=params[0].device)
        for p in params:
            start = self._owner[id(p)] * words + layout.offsets[id(p)] // 4
            flat[start:start + p.numel()].copy_(p.grad.reshape(-1))
        mine = torch.empty(words, dtype=torch.float32, device=flat.device)
        collective("reduce_scatter")(mine, flat, group=self.group)
        mine.div_(self.world)
        for p in params:
            if self.owns(p):
                start = layout.offsets[id(p)] // 4
                p.grad.copy_(mine[start:start + p.numel()].view(p.shape))

    def over_tensors(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """A network's reduction over all tensors of the step from this rank's rows x (T, C),
        which may be none: (1, C), the same on every rank."""
        if kind == "max":
            part = x.amax(0, keepdim=True) if x.shape[0] else torch.full((1, x.shape[1]), -torch.inf,
                                                                          dtype=x.dtype, device=x.device)
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=self.group)
            return part
        count = torch.full((1, 1), x.shape[0], dtype=x.dtype, device=x.device)
        part = torch.cat([x.sum(0, keepdim=True), count], dim=1)
        dist.all_reduce(part, group=self.group)
        return part[:, :-1] if kind == "sum" else part[:, :-1] / part[:, -1:]

    def gather_params(self, params: list[torch.Tensor]) -> None:
        """Every rank's copy of every parameter becomes its owner's (one all-gather of bytes)."""
        if not params:
            return
        layout = self._layout(params, lambda p: p.numel() * p.element_size())
        mine = torch.zeros(layout.chunk, dtype=torch.uint8, device=params[0].device)
        for p in params:
            if self.owns(p):
                data = p.detach().reshape(-1).view(torch.uint8)
                mine[layout.offsets[id(p)]:layout.offsets[id(p)] + data.numel()].copy_(data)
        everyone = torch.empty(self.world * layout.chunk, dtype=torch.uint8, device=mine.device)
        collective("all_gather")(everyone, mine, group=self.group)
        for p in params:
            if not self.owns(p):
                start = self._owner[id(p)] * layout.chunk + layout.offsets[id(p)]
                size = p.numel() * p.element_size()
                p.detach().copy_(everyone[start:start + size].view(p.dtype).view(p.shape))
