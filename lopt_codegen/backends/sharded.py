"""The reference backend's step for tensors sharded on dim 0 (FSDP2's fully_shard): each
rank holds some rows of every tensor and steps them in place.

Element work needs only the rank's rows. A reduction that removes dim 0 from a value that
has it (a tensor mean, the mean over d0 when d0 is dim 0, ...) needs every rank's rows:
each rank sums its own, and the sums are all-reduced. The reductions are taken in
rounds (a round's reductions read only earlier rounds' results), and each round is one
all-reduce of one flat buffer for all tensors together, whatever their number. A tensor
function (Newton-Schulz on a whole matrix) gathers its tensor's rows first.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..ir.nodes import Level, Node, level_shape, topo_order
from ..ir.program import Program
from .base import RowShard
from .reference import TensorEvaluator

_REMOVES = {"mean": None, "mean_d0": 0, "mean_d1": 1}   # op -> the factored axis it removes (None: all)


def has_rows(level: Level, axes: tuple[int, int] | None) -> bool:
    """Whether a value at `level` keeps dim 0 (the sharded one)."""
    if level == Level.ELEMENT:
        return True
    if level in (Level.STEP, Level.TENSOR):
        return False
    dropped = {Level.ROW: {axes[0]}, Level.COL: {axes[1]}, Level.BATCH: set(axes)}[level]
    return 0 not in dropped


def crosses_ranks(node: Node, axes: tuple[int, int] | None, ndim: int) -> bool:
    """A reduction that removes dim 0 from a value that has it: it needs every rank's rows."""
    if node.op not in _REMOVES or ndim == 0 or not has_rows(node.args[0].level, axes):
        return False
    axis = _REMOVES[node.op]
    return axis is None or axes[axis] == 0


def _chunk_rows(rows: int, world: int) -> int:
    """Rows per rank of torch.chunk's split (FSDP2's): the last ranks may have fewer or none."""
    return -(-rows // world) if rows else 0


class ShardedEvaluator(TensorEvaluator):
    """A sharded tensor's evaluator: tensor functions run on the whole tensor, gathered."""

    def call(self, node: Node, args: list[torch.Tensor]) -> torch.Tensor:
        shard = self.task.shard
        c = self.channel_dim + 1   # the dim of the parameter's rows in a value
        whole = [gather_rows(v, shard, c) if a.level == Level.ELEMENT else v for a, v in zip(node.args, args)]
        out = super().call(node, whole)
        if node.level == Level.ELEMENT:
            out = out.narrow(c, shard.start, self.task.param.shape[0])
        self.known[id(node)] = out   # once per step: later evaluations read it
        return out


def gather_rows(x: torch.Tensor, shard: RowShard, dim: int) -> torch.Tensor:
    """Every rank's rows of x (rows along `dim`), in order: the whole tensor's values."""
    rows, chunk = x.shape[dim], _chunk_rows(shard.shape[0], shard.world)
    padded = torch.zeros(*x.shape[:dim], chunk, *x.shape[dim + 1:], dtype=x.dtype, device=x.device)
    padded.narrow(dim, 0, rows).copy_(x)
    parts = [torch.empty_like(padded) for _ in range(shard.world)]
    dist.all_gather(parts, padded.contiguous(), group=shard.group)
    return torch.cat(parts, dim).narrow(dim, 0, shard.shape[0])


def whole_tensor_reductions(program: Program, evaluators: list[TensorEvaluator], network_inputs: bool) -> None:
    """Each sharded tensor's reductions across ranks, into its evaluator's known values:
    round by round, one all-reduce per round for all tensors. First those the network's
    inputs read (network_inputs=True), then, after the network, the rest."""
    pending = []   # (evaluator, {round: [reductions]})
    for ev in evaluators:
        task = ev.task
        if task.shard is None:
            continue
        graph = program.variants[task.variant]
        roots = [graph.network_input] if network_inputs else graph.roots()
        rounds: dict[int, list[Node]] = {}
        depth: dict[int, int] = {}
        for n in topo_order(roots, ev.known):
            d = max((depth[id(a)] for a in n.args if id(n) not in ev.known), default=0)
            if id(n) not in ev.known and crosses_ranks(n, task.axes, len(task.shape)):
                rounds.setdefault(d, []).append(n)
                d += 1
            depth[id(n)] = d
        pending.append((ev, rounds))
    last = max((max(r, default=-1) for _, r in pending), default=-1)
    for k in range(last + 1):
        parts, places = [], []
        for ev, rounds in pending:
            nodes = rounds.get(k, [])
            if not nodes:
                continue
            values = ev.evaluate([n.args[0] for n in nodes])
            for n, x in zip(nodes, values):
                parts.append(_local_sum(n, x, ev))
                places.append((ev, n))
        if not parts:
            continue
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(flat, group=places[0][0].task.shard.group)
        offset = 0
        for (ev, n), part in zip(places, parts):
            total = flat[offset:offset + part.numel()].view(part.shape)
            offset += part.numel()
            ev.known[id(n)] = total / _count(n, ev)


def _local_sum(node: Node, x: torch.Tensor, ev: TensorEvaluator) -> torch.Tensor:
    """This rank's part of the reduction: the sum its mean would take, over its rows."""
    c, axes = ev.channel_dim, ev.task.axes
    axis = _REMOVES[node.op]
    dims = tuple(range(c + 1, c + 1 + ev.ndim)) if axis is None else (c + 1 + axes[axis],)
    return x.sum(dim=dims, keepdim=True)


def _count(node: Node, ev: TensorEvaluator) -> int:
    """How many values of the whole tensor each result averages."""
    shape, axes = ev.task.shape, ev.task.axes
    return math.prod(level_shape(shape, node.args[0].level, axes)) // math.prod(level_shape(shape, node.level, axes))
