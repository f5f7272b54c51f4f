"""The small work of a group of tensors at once. Tensors of one variant and shape have
small values (coarser than element) of equal shapes, so each IR node is evaluated once
for the whole group, on values [tensors, channels, *level shape]: the reference's own
per-op rules with a leading tensor axis. A step then costs a few torch calls per node
per group instead of per tensor (a model's many biases and norms of one size)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..ir.mlp_fold import MlpFold
from ..ir.nodes import Level, Node, level_shape
from ..ir.program import is_scratch
from .base import StepBatch, TensorTask
from .reference import TensorEvaluator, run_network
from .sharded import crosses_ranks, reduced_count
from .small_values import SmallValues
from .tensor_program import GroupEnv, run_tensor_function

if TYPE_CHECKING:
    from .sharded_groups import RankSums

# Leaves with one value for the whole group (the loss is the step's; shape facts the shape's).
_GROUP_LEAVES = {"const", "loss_features", "skip_step", "shape"}
# Host values on a device (constants, shape facts, hyperparameters), made once, so that a
# steady-state step copies nothing from the host: a CUDA graph cannot capture such a
# copy. Never written in place. Emptied when full (a schedule changing lr every step).
_ON_DEVICE: dict[tuple, torch.Tensor] = {}
_ON_DEVICE_LIMIT = 4096


def _kept_on_device(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    value = _ON_DEVICE.get(key)
    if value is None:
        if len(_ON_DEVICE) >= _ON_DEVICE_LIMIT:
            _ON_DEVICE.clear()
        value = _ON_DEVICE[key] = make()
    return value


def group_key(task: TensorTask) -> tuple:
    """Tensors with equal keys form a group (their small values have equal shapes; under
    FSDP2 the whole tensors' shapes are equal too, as are their shape facts)."""
    return task.variant, tuple(task.param.shape), task.axes, task.shape, task.shard is None


class GroupEvaluator(TensorEvaluator):
    channel_dim = 1

    def __init__(self, tasks: list[TensorTask], batch: StepBatch):
        super().__init__(tasks[0], batch)
        self.tasks = tasks
        self._members: list[TensorEvaluator] | None = None
        self.shared_mlp = batch.mlp_weights   # None once the network gives each tensor its own

    @property
    def mlp_weights(self) -> list[torch.Tensor] | None:
        """The MLP's weights with a leading tensor axis: shared ones expanded (no copy),
        when first used (most steps the compiled small work needs no copy of them)."""
        if self._mlp is not None and self._mlp is self.shared_mlp:
            self._mlp = [w.expand(len(self.tasks), *w.shape) for w in self._mlp]
        return self._mlp

    @mlp_weights.setter
    def mlp_weights(self, weights: list[torch.Tensor] | None) -> None:
        self._mlp = weights

    def mlp_shapes(self) -> list[tuple[int, ...]]:
        """Each MLP weight's shape for one tensor."""
        if self._mlp is not None and self._mlp is self.shared_mlp:
            return [tuple(w.shape) for w in self._mlp]
        return [tuple(w.shape[1:]) for w in self.mlp_weights]

    def take_network(self, outputs: dict[str, torch.Tensor], mlp: list[torch.Tensor], index: int | slice) -> None:
        super().take_network(outputs, mlp, index)
        if mlp:
            self.shared_mlp = None

    @property
    def members(self) -> list[TensorEvaluator]:
        """One evaluator per tensor, made when a leaf first needs them (most steps, none)."""
        if self._members is None:
            self._members = [TensorEvaluator(t, self.batch) for t in self.tasks]
        return self._members

    def leaf(self, node: Node) -> torch.Tensor:
        op = node.op
        if node.level == Level.ELEMENT:
            raise RuntimeError(f"{node} is element-level: the kernels compute it, not the small work")
        device = self.task.param.device
        if op in ("const", "shape"):
            return _kept_on_device((op, node.attrs, self.task.shape, self.task.axes, device),
                                   lambda: self.members[0].leaf(node).unsqueeze(0))
        if op in _GROUP_LEAVES:
            return self.members[0].leaf(node).unsqueeze(0)
        # One torch call per leaf for the whole group, not one per tensor.
        if op == "hyper":
            values = tuple(float(t.hyper[node.attrs[0]]) for t in self.tasks)
            return _kept_on_device(("hyper", values, self.ndim, device),
                                   lambda: self._per_tensor(torch.tensor(values)))
        if op == "step":
            return self._per_tensor(torch.stack([t.state["step"] for t in self.tasks]))
        if op == "net_out":   # take_network (inherited) keeps the group's rows
            return self.net_out[node.attrs[0]].to(torch.float32).reshape(len(self.tasks), -1, *[1] * self.ndim)
        return torch.stack([m.leaf(node) for m in self.members])

    @property
    def tensors(self) -> list[TensorTask]:
        return self.tasks

    def call_env(self) -> GroupEnv:
        env = super().call_env()
        device = self.task.param.device
        values = lambda n: tuple(float(t.hyper[n]) for t in self.tasks)  # noqa: E731
        env.hyper = lambda n: _kept_on_device(("hyper", values(n), device), lambda: torch.tensor(values(n)).to(device))
        return env

    def _per_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """(tensors,) -> [tensors, 1, 1, ...] float32 on the group's device."""
        return values.to(device=self.task.param.device, dtype=torch.float32).reshape(-1, 1, *[1] * self.ndim)


class GroupValues(SmallValues):
    """The memoized small values of a group of tensors (see GroupEvaluator). With `ranks`
    (FSDP2: each rank holds some rows of the group's tensors), the reductions that cross
    the ranks' rows are finished by it, for all groups together (sharded_groups.py)."""

    def __init__(self, tasks: list[TensorTask], batch: StepBatch, ranks: RankSums | None = None):
        super().__init__(GroupEvaluator(tasks, batch))
        self.tasks = tasks
        self.shape, self.axes = tuple(tasks[0].param.shape), tasks[0].axes
        self.ranks = ranks if tasks[0].shard is not None else None

    def crosses_ranks(self, node: Node) -> bool:
        return self.ranks is not None and crosses_ranks(node, self.axes, len(self.shape))

    def get(self, node: Node) -> torch.Tensor:
        if id(node) not in self.memo and self.crosses_ranks(node):
            raise RuntimeError(f"{node} needs every rank's rows: RankSums.settle finishes it first")
        return super().get(node)

    def finish_sum(self, node: Node, total: torch.Tensor) -> None:
        """Reduction `node` from its sums over this rank's values ([tensors, channels, *level
        shape]): finished now, or, where it crosses the ranks' rows, by the next all-reduce."""
        if self.crosses_ranks(node):
            self.ranks.add(self, node, total)
        else:
            self.finish(node, total / reduced_count(node, self.shape, self.axes))

    def __len__(self) -> int:
        return len(self.tasks)

    def level_shape(self, level: Level) -> list[int]:
        return level_shape(self.shape, level, self.axes)

    def dense(self, node: Node) -> torch.Tensor:
        """The node's values as [tensors, channels, *level shape] (broadcasts expanded)."""
        return self.get(node).expand(len(self.tasks), node.channels, *self.level_shape(node.level))

    def fold_mlp(self, fold: MlpFold) -> list[torch.Tensor]:
        """The MLP weights the kernels take, with a leading tensor axis: W1' = W1[:, element
        columns] * scale and b1' = b1 + W1[:, folded columns] @ values (MlpFold), then the
        other layers as they are."""
        count = len(self)
        w1, b1, *rest = self.ev.mlp_weights
        columns = []
        for _, scale, col, ch in fold.element_parts:
            w = w1[:, :, col:col + ch]
            columns.append(w if scale is None else w * self.dense(scale).reshape(count, 1, -1))
        bias = b1
        for part, col in fold.bias_parts:
            values = self.dense(part).reshape(count, part.channels, 1)
            bias = bias + (w1[:, :, col:col + part.channels] @ values).squeeze(-1)
        return [torch.cat(columns, 2), bias, *rest]

    def run_calls(self, calls: list[Node], accumulators: dict[str, Node]) -> None:
        """Tensor functions over the group, between passes: their full-size arguments
        from the scratch values the passes wrote (or the gradient and parameter), their
        full-size results into scratch values the next passes read (ir/lower.py: _scratch)."""
        for call in calls:
            args = self.call_args(call, accumulators)
            self.take_call(call, run_tensor_function(self.ev.batch.tensor_functions[call.attrs[0]], args,
                                                     self.ev.call_env()), accumulators)

    def call_args(self, call: Node, accumulators: dict[str, Node]) -> list[torch.Tensor]:
        """A tensor function's arguments: element ones (T, *shape) float32, others (T,)."""
        scratch = _scratch_names(accumulators)
        return [self._full_size(a, scratch) if a.level == Level.ELEMENT else
                self.dense(a).reshape(len(self.tasks), -1)[:, 0] for a in call.args]

    def take_call(self, call: Node, out: torch.Tensor, accumulators: dict[str, Node]) -> None:
        """A tensor function's result: element ones into their scratch values."""
        if call.level == Level.ELEMENT:
            name = _scratch_names(accumulators)[id(call)]
            torch._foreach_copy_([t.state[name][0] for t in self.tasks], list(out.unbind(0)))
        else:
            self.finish(call, out.reshape(len(self.tasks), 1, *[1] * len(self.shape)))

    def _full_size(self, node: Node, scratch: dict[int, str]) -> torch.Tensor:
        """An element value of every tensor as (T, *shape) float32."""
        if node.op == "grad":   # the only one read in place (ir/scratch.py)
            values = [t.grad.to(torch.float32) for t in self.tasks]
        else:
            values = [t.state[scratch[id(node)]][0] for t in self.tasks]
        return values[0].unsqueeze(0) if len(values) == 1 else torch.stack(values)   # one tensor: no copy

    def write_small_accumulators(self, accumulators: dict[str, Node]) -> None:
        """Row/col/tensor-level accumulators, after everything that reads their old value."""
        new = {name: self.dense(node) for name, node in accumulators.items() if node.level < Level.ELEMENT}
        for name, value in new.items():
            torch._foreach_copy_([t.state[name] for t in self.tasks], list(value.unbind(0)))


def _scratch_names(accumulators: dict[str, Node]) -> dict[int, str]:
    """id(node) -> name of the scratch values (tensor functions' element results, their arguments)."""
    return {id(node): name for name, node in accumulators.items() if is_scratch(name)}


NetworkOut = tuple[dict[str, torch.Tensor], list[torch.Tensor]]   # (outputs, MLP weights), row i tensor i's


def run_network_over_groups(batch: StepBatch, groups: list[GroupValues], inputs: list[Node],
                            hold: Callable[[NetworkOut], NetworkOut] | None = None, take: bool = True) -> None:
    """One network call over every tensor of the step (inputs[i]: the network input node
    of groups[i]); each group takes its rows of the outputs and MLP weights (of
    `hold(outputs, mlp)`'s where given: tensors of the caller's), unless not `take`
    (they hold those rows already)."""
    parts = [g.dense(node).reshape(len(g), -1) for g, node in zip(groups, inputs)]
    x = parts[0] if len(parts) == 1 else torch.cat(parts)   # (only read)
    tasks = [t for g in groups for t in g.tasks]
    if any(t.shard is not None for t in tasks):
        # FSDP2: ranks group the tensors by their own rows, so each orders them differently;
        # in the step's order every rank's network sums over the tensors alike, to the bit.
        position = {id(t): i for i, t in enumerate(batch.tasks)}
        order = sorted(range(len(tasks)), key=lambda i: position[id(tasks[i])])
        outputs, mlp = run_network(batch, [tasks[i] for i in order], x[order])
        back = sorted(range(len(order)), key=order.__getitem__)
        outputs, mlp = {k: v[back] for k, v in outputs.items()}, [w[back] for w in mlp]
    else:
        outputs, mlp = run_network(batch, tasks, x)
    if hold is not None:
        outputs, mlp = hold((outputs, mlp))
    if not take:
        return
    start = 0
    for g in groups:
        g.ev.take_network(outputs, mlp, slice(start, start + len(g)))
        start += len(g)
