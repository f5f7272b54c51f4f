"""The reference backend's step for tensors sharded on dim 0 (FSDP2's fully_shard): each
rank holds some rows of every tensor and steps them in place.

Element work needs only the rank's rows. A reduction that removes dim 0 from a value that
has it (a tensor mean, the mean over d0 when d0 is dim 0, ...) needs every rank's rows:
each rank sums its own, and the sums are all-reduced. A tensor function (Newton-Schulz
on a whole matrix) needs the whole tensor: its arguments' rows are all-gathered. Both
are taken in rounds (a round's values read only earlier rounds'), and each round is
one all-reduce and one all-gather of flat buffers for all tensors together, whatever
their number.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from ..ir.nodes import REDUCE, Level, Node, level_shape, topo_order
from ..ir.program import Program
from .base import RowShard
from .reference import TensorEvaluator

def has_rows(level: Level, axes: tuple[int, int] | None, ndim: int) -> bool:
    """Whether a value at `level` of a parameter with ndim axes keeps dim 0 (the sharded one)."""
    return ndim > 0 and level_shape((2,) * ndim, level, axes)[0] == 2


def _removed_axis(node: Node) -> int | None:
    """The factored axis (0: d0, 1: d1) a reduction removes; None: every axis."""
    return {None: None, "d0": 0, "d1": 1}[REDUCE[node.op]]


def crosses_ranks(node: Node, axes: tuple[int, int] | None, ndim: int) -> bool:
    """A reduction that removes dim 0 from a value that has it: it needs every rank's rows."""
    if node.op not in REDUCE or not has_rows(node.args[0].level, axes, ndim):
        return False
    axis = _removed_axis(node)
    return axis is None or axes[axis] == 0


def collective(name: str) -> Callable:
    """torch's all_gather / reduce_scatter of single tensors, under its newer name where it
    has one (all_gather_single; older: all_gather_into_tensor)."""
    new = {"all_gather": "all_gather_single", "reduce_scatter": "reduce_scatter_single"}[name]
    old = {"all_gather": "all_gather_into_tensor", "reduce_scatter": "reduce_scatter_tensor"}[name]
    return getattr(dist, new, None) or getattr(dist, old)


def _chunk_rows(rows: int, world: int) -> int:
    """Rows per rank of torch.chunk's split (FSDP2's): the last ranks may have fewer or none."""
    return -(-rows // world) if rows else 0


def _needs_whole(node: Node, axes: tuple[int, int] | None, ndim: int) -> bool:
    """A reduction across the ranks' rows, or a tensor function of element values."""
    if node.op == "call":
        return any(a.level == Level.ELEMENT for a in node.args)
    return crosses_ranks(node, axes, ndim)


class ShardedEvaluator(TensorEvaluator):
    """A sharded tensor's evaluator: whole_tensor_values computes its reductions and tensor
    functions before it evaluates anything else."""

    def call_whole(self, node: Node, whole: list[torch.Tensor]) -> torch.Tensor:
        """A tensor function of the whole tensor's values (element ones gathered): this rank's rows."""
        out = super().call(node, whole)
        if node.level == Level.ELEMENT:
            out = out.narrow(self.channel_dim + 1, self.task.shard.start, self.task.param.shape[0])
        return out


def whole_tensor_values(program: Program, evaluators: list[TensorEvaluator], network_inputs: bool) -> None:
    """Each sharded tensor's reductions across ranks and tensor functions, into its
    evaluator's known values, round by round: a round's values read only earlier rounds',
    and each round is one all-reduce (the reductions' sums) and one all-gather (the tensor
    functions' arguments) for all tensors together. First what the network's inputs read
    (network_inputs=True), then, after the network, the rest."""
    pending = []   # (evaluator, {round: [nodes]})
    for ev in evaluators:
        task = ev.task
        if task.shard is None:
            continue
        graph = program.variants[task.variant]
        roots = [graph.network_input] if network_inputs else graph.roots()
        rounds: dict[int, list[Node]] = {}
        depth: dict[int, int] = {}
        for n in topo_order(roots, ev.known):
            if id(n) in ev.known:   # a value at hand: its args were not visited
                depth[id(n)] = 0
                continue
            d = max((depth[id(a)] for a in n.args), default=0)
            if _needs_whole(n, task.axes, len(task.shape)):
                rounds.setdefault(d, []).append(n)
                d += 1
            depth[id(n)] = d
        pending.append((ev, rounds))
    last = max((max(r, default=-1) for _, r in pending), default=-1)
    for k in range(last + 1):
        sums, calls = [], []   # (evaluator, node, its local sum / its argument values)
        for ev, rounds in pending:
            nodes = rounds.get(k, [])
            values = iter(ev.evaluate([a for n in nodes for a in (n.args if n.op == "call" else n.args[:1])]))
            for n in nodes:
                if n.op == "call":
                    calls.append((ev, n, [next(values) for _ in n.args]))
                else:
                    sums.append((ev, n, local_sum(n, next(values), ev)))
        if sums:
            _all_reduce_means(sums)
        if calls:
            _gather_and_call(calls)


def _all_reduce_means(sums: list[tuple[ShardedEvaluator, Node, torch.Tensor]]) -> None:
    flat = torch.cat([part.reshape(-1) for _, _, part in sums])
    dist.all_reduce(flat, group=sums[0][0].task.shard.group)
    offset = 0
    for ev, n, part in sums:
        total = flat[offset:offset + part.numel()].view(part.shape)
        offset += part.numel()
        ev.known[id(n)] = total / reduced_count(n, ev.task.shape, ev.task.axes)


def _gather_and_call(calls: list[tuple[ShardedEvaluator, Node, list[torch.Tensor]]]) -> None:
    """Every rank's rows of the calls' element arguments in one all-gather, then the calls."""
    rows = [(x, ev.channel_dim + 1, ev.task.shard) for ev, n, args in calls
            for a, x in zip(n.args, args) if a.level == Level.ELEMENT]
    wholes = iter(all_gather_rows(rows))
    for ev, n, args in calls:
        whole = [next(wholes) if a.level == Level.ELEMENT else x for a, x in zip(n.args, args)]
        ev.known[id(n)] = ev.call_whole(n, whole)


def all_gather_rows(parts: list[tuple[torch.Tensor, int, RowShard]]) -> list[torch.Tensor]:
    """The whole values of `parts`, each (this rank's rows of a sharded tensor's value along
    dim `dim`, dim, the tensor's shard), in one all-gather for all of them (each padded to
    torch.chunk's rows per rank, so every rank sends as much). Every rank must pass the
    same parts in the same order."""
    padded = []
    for x, dim, shard in parts:
        part = x.new_zeros(*x.shape[:dim], _chunk_rows(shard.shape[0], shard.world), *x.shape[dim + 1:])
        part.narrow(dim, 0, x.shape[dim]).copy_(x)
        padded.append(part)
    shard = parts[0][2]
    mine = torch.cat([p.reshape(-1) for p in padded])
    everyone = mine.new_empty(shard.world * mine.numel()).view(shard.world, -1)
    collective("all_gather")(everyone.view(-1), mine, group=shard.group)
    out, offset = [], 0
    for (_, dim, shard), part in zip(parts, padded):
        pieces = everyone[:, offset:offset + part.numel()].reshape(shard.world, *part.shape)
        offset += part.numel()
        out.append(torch.cat(list(pieces.unbind(0)), dim).narrow(dim, 0, shard.shape[0]))
    return out


def local_sum(node: Node, x: torch.Tensor, ev: TensorEvaluator) -> torch.Tensor:
    """This rank's part of the reduction: the sum its mean would take, over its rows."""
    c, axes = ev.channel_dim, ev.task.axes
    axis = _removed_axis(node)
    dims = tuple(range(c + 1, c + 1 + ev.ndim)) if axis is None else (c + 1 + axes[axis],)
    return x.sum(dim=dims, keepdim=True)


def reduced_count(node: Node, shape: tuple[int, ...], axes: tuple[int, int] | None) -> int:
    """How many values of a tensor of `shape` each result of reduction `node` averages."""
    arg = level_shape(shape, node.args[0].level, axes)
    axis = _removed_axis(node)
    return math.prod(arg) if axis is None else arg[axes[axis]]
