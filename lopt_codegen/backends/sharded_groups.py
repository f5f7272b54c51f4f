"""The compiled backends' collectives for tensors sharded on dim 0 (FSDP2's fully_shard).

The kernels run on each rank's rows. What needs every rank's rows is settled between
passes, for all of a step's groups at once, whatever their number:
- a reduction that removes dim 0 (a tensor mean, a mean along the sharded axis), from
  the kernels' partial sums or of a small value: each rank sums its own rows, and one
  all-reduce per round finishes them all (a round's reductions read only earlier ones');
- a tensor function of element values: its arguments' rows, one all-gather per call.
Ranks group their tensors by their own rows, so each may group them differently: every
flat buffer is laid out in the step's order of tensors (the same on every rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ir.nodes import REDUCE, Level, Node, topo_order
from ..ir.program import Program
from .base import StepBatch
from .group_values import GroupValues
from .sharded import all_gather_rows, local_sum, reduced_count
from .tensor_program import run_tensor_function


class RankSums:
    """One step's reductions across ranks: this rank's sums, pending until the next all-reduce."""

    def __init__(self, batch: StepBatch, program: Program):
        self.program = program
        self.position = {id(t): i for i, t in enumerate(batch.tasks)}
        self.group = next(t.shard.group for t in batch.tasks if t.shard is not None)
        self._topo: dict[str, list[Node]] = {}         # variant -> its nodes, producers first
        self._order: dict[str, dict[int, int]] = {}    # variant -> id(node) -> its place in the graph
        self._small: dict[tuple, list[Node]] = {}      # (variant, ndim, axes) -> reductions of small values
        self.pending: list[tuple[tuple[int, int], GroupValues, int, Node, torch.Tensor]] = []

    @classmethod
    def of(cls, batch: StepBatch, program: Program) -> RankSums | None:
        return cls(batch, program) if any(t.shard is not None for t in batch.tasks) else None

    def _nodes(self, variant: str) -> list[Node]:
        if variant not in self._topo:
            graph = self.program.variants[variant]
            roots = graph.roots() + ([graph.network_input] if graph.network_input is not None else [])
            self._topo[variant] = topo_order(roots)
        return self._topo[variant]

    def add(self, group: GroupValues, node: Node, total: torch.Tensor) -> None:
        """The group's sums for reduction `node` ([tensors, channels, *level shape])."""
        variant = group.tasks[0].variant
        if variant not in self._order:
            self._order[variant] = {id(n): i for i, n in enumerate(self._nodes(variant))}
        place = self._order[variant][id(node)]
        for i, task in enumerate(group.tasks):
            self.pending.append(((self.position[id(task)], place), group, i, node, total[i]))

    def all_reduce(self) -> None:
        """One all-reduce of every pending sum; each reduction then finished in its group."""
        if not self.pending:
            return
        self.pending.sort(key=lambda entry: entry[0])
        flat = torch.cat([entry[4].reshape(-1) for entry in self.pending])
        dist.all_reduce(flat, group=self.group)
        rows: dict[tuple[int, int], list] = {}
        offset = 0
        for _, group, i, node, part in self.pending:
            finished = rows.setdefault((id(group), id(node)), [group, node, [None] * len(group)])
            finished[2][i] = flat[offset:offset + part.numel()].view(part.shape)
            offset += part.numel()
        self.pending = []
        for group, node, parts in rows.values():
            group.finish(node, torch.stack(parts) / reduced_count(node, group.tasks[0].shape, group.axes))

    def settle(self, groups: list[GroupValues]) -> None:
        """Finishes the pending sums (a pass's), then, round by round, the reductions of
        small values that became computable (of those sums, of the network's outputs)."""
        self.all_reduce()
        while True:
            for group in groups:
                if group.ranks is not None:
                    for node in self._ready(group):
                        self.add(group, node, local_sum(node, group.dense(node.args[0]), group.ev))
            if not self.pending:
                return
            self.all_reduce()

    def _ready(self, group: GroupValues) -> list[Node]:
        """The group's unfinished reductions across ranks of small values computable now."""
        task = group.tasks[0]
        key = (task.variant, len(group.shape), group.axes)
        if key not in self._small:
            self._small[key] = [n for n in self._nodes(task.variant)
                                if n.args and n.args[0].level < Level.ELEMENT and group.crosses_ranks(n)]
        known: dict[int, bool] = {}

        def computable(n: Node) -> bool:
            if id(n) not in known:
                if id(n) in group.memo:
                    known[id(n)] = True
                elif n.level == Level.ELEMENT or group.crosses_ranks(n) or \
                        (n.op in REDUCE or n.op == "call") and any(a.level == Level.ELEMENT for a in n.args):
                    known[id(n)] = False   # a pass's or another round's
                elif n.op == "net_out":
                    known[id(n)] = bool(group.ev.net_out)
                else:
                    known[id(n)] = all(computable(a) for a in n.args)
            return known[id(n)]

        return [n for n in self._small[key] if id(n) not in group.memo and computable(n.args[0])]

    def accumulators(self, group: GroupValues) -> dict[str, Node]:
        return self.program.variants[group.tasks[0].variant].accumulators

    def run_calls(self, calls: list[tuple[GroupValues, list[Node]]]) -> None:
        """Each group's tensor functions (`calls`: a group and its calls due now), the
        sharded groups' j-th calls together: their element arguments' rows in one all-gather."""
        for j in range(max((len(c) for _, c in calls), default=0)):
            due = [(group, c[j]) for group, c in calls if j < len(c)]
            sharded = []
            for group, call in due:
                if group.ranks is None:
                    group.run_calls([call], self.accumulators(group))
                else:
                    sharded.append((group, call, group.call_args(call, self.accumulators(group))))
            if sharded:
                self._call_whole(sharded)

    def _call_whole(self, due: list[tuple[GroupValues, Node, list[torch.Tensor]]]) -> None:
        rows = sorted((((self.position[id(task)], k), (g, i, k), (args[k][i], 0, task.shard))
                       for g, call, args in due for i, task in enumerate(g.tasks)
                       for k, a in enumerate(call.args) if a.level == Level.ELEMENT), key=lambda row: row[0])
        wholes = dict(zip((where for _, where, _ in rows), all_gather_rows([part for *_, part in rows])))
        for g, call, args in due:
            whole = [torch.stack([wholes[(g, i, k)] for i in range(len(g))]) if a.level == Level.ELEMENT else x
                     for k, (a, x) in enumerate(zip(call.args, args))]
            out = run_tensor_function(g.ev.batch.tensor_functions[call.attrs[0]], whole, g.ev.call_env())
            if call.level == Level.ELEMENT:   # this rank's rows of the result
                shard = g.tasks[0].shard
                out = out.narrow(1, shard.start, g.shape[0])
            g.take_call(call, out, self.accumulators(g))


def run_group_calls(calls: list[tuple[GroupValues, list[Node]]], program: Program, ranks: RankSums | None) -> None:
    """Each group's tensor functions due now (`calls`: a group and its calls); under FSDP2
    (`ranks`) with their element arguments gathered from every rank."""
    calls = [(group, c) for group, c in calls if c]
    if ranks is not None:
        ranks.run_calls(calls)
        return
    for group, c in calls:
        group.run_calls(c, program.variants[group.tasks[0].variant].accumulators)
