"""The reference backend: interprets the IR with eager torch ops, on any device.

Every value is a float32 tensor shaped [channels, *param_shape], with size 1 on the
axes its level does not have (so torch broadcasting implements level broadcasting).
It is the oracle the compiled backends are tested against, and the fallback everywhere.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch

from ..ir.nodes import Level, Node, topo_order
from ..ir.program import is_scratch
from ..ir.shape_facts import shape_fact
from .base import Backend, StepBatch, TensorTask
from .tensor_program import GroupEnv, run_tensor_function
from .torch_ops import BINARY as _BINARY, UNARY as _UNARY

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
_MLP_CHUNK = 16384


class TensorEvaluator:
    """Evaluates IR nodes for one parameter tensor: values are [channels, *shape]."""

    channel_dim = 0   # GroupEvaluator's values have a leading tensor axis before it

    def __init__(self, task: TensorTask, batch: StepBatch):
        self.task, self.batch = task, batch
        self.ndim, self.axes = task.param.dim(), task.axes
        self._p: torch.Tensor | None = None
        self.net_out: dict[str, torch.Tensor] = {}
        self.mlp_weights = batch.mlp_weights
        self.known: dict[int, torch.Tensor] = {}   # id(node) -> its value, computed elsewhere (sharded.py)

    @property
    def p(self) -> torch.Tensor:
        """The parameter in float32, made on first use (the compiled backends' small work
        rarely needs it). Not a functools.cached_property: its lock breaks torch.compile."""
        if self._p is None:
            self._p = self.task.param.detach().to(torch.float32)
        return self._p

    def take_network(self, outputs: dict[str, torch.Tensor], mlp: list[torch.Tensor], index: int | slice) -> None:
        """This tensor's row (`index`) of the network's outputs and MLP weights."""
        self.net_out = {name: out[index] for name, out in outputs.items()}
        if mlp:   # else the MLP's weights are the shared ones of its weight group
            self.mlp_weights = [w[index] for w in mlp]

    def scalar(self, values: torch.Tensor) -> torch.Tensor:
        """A (channels,) vector as a broadcastable value."""
        return values.to(device=self.task.param.device, dtype=torch.float32).reshape(-1, *[1] * self.ndim)

    def leaf(self, node: Node) -> torch.Tensor:
        op, task = node.op, self.task
        if op == "const":
            return self.scalar(torch.tensor(node.attrs, dtype=torch.float32))
        if op == "grad":
            return task.grad.to(torch.float32).unsqueeze(0)
        if op == "param":
            return self.p.unsqueeze(0)
        if op == "hyper":
            return self.scalar(torch.tensor([task.hyper[node.attrs[0]]], dtype=torch.float32))
        if op == "step":
            return self.scalar(task.state["step"])
        if op == "shape":
            return self.scalar(torch.tensor([shape_fact(node.attrs, task.shape, task.axes)]))
        if op == "state":
            return task.state[node.attrs[0]]
        if op == "loss_features":
            return self.scalar(self.batch.loss_features)
        if op == "skip_step":
            return self.scalar(self.batch.skip_step)
        if op == "net_out":
            return self.scalar(self.net_out[node.attrs[0]])
        raise ValueError(f"reference backend: unknown leaf op {op}")

    def apply(self, node: Node, args: list[torch.Tensor]) -> torch.Tensor:
        op = node.op
        if op in _UNARY:
            return _UNARY[op](args[0])
        if op in _BINARY:
            return _BINARY[op](args[0], args[1])
        if op == "where":
            return torch.where(args[0] != 0, args[1], args[2])
        c = self.channel_dim
        if op == "mean":
            dims = tuple(range(c + 1, c + 1 + self.ndim))
            return args[0].mean(dim=dims, keepdim=True) if dims else args[0]
        if op in ("mean_d0", "mean_d1"):
            axis = self.axes[0 if op == "mean_d0" else 1]
            return args[0].mean(dim=c + 1 + axis, keepdim=True)
        if op == "concat":
            shape = list(torch.broadcast_shapes(*(a.shape[:c] + (1,) + a.shape[c + 1:] for a in args)))
            return torch.cat([a.expand(*shape[:c], a.shape[c], *shape[c + 1:]) for a in args], dim=c)
        if op == "channel":
            return args[0].narrow(c, node.attrs[0], 1)
        if op == "mlp":
            return self.mlp(node, args[0])
        if op == "call":
            return self.call(node, args)
        raise ValueError(f"reference backend: unknown op {op}")

    # --- tensor functions ------------------------------------------------------------
    @property
    def tensors(self) -> list[TensorTask]:
        """The tensors whose values this evaluator holds, in the order of its leading axis."""
        return [self.task]

    def call_env(self) -> GroupEnv:
        tasks, device = self.tensors, self.task.param.device
        return GroupEnv(self.task.shape, self.task.axes, len(tasks), device,
                        hyper=lambda n: torch.tensor([t.hyper[n] for t in tasks], dtype=torch.float32, device=device),
                        hyper_floats=lambda n: [float(t.hyper[n]) for t in tasks],
                        step=lambda: torch.stack([t.state["step"] for t in tasks]).to(device))

    def call(self, node: Node, args: list[torch.Tensor]) -> torch.Tensor:
        """A tensor function over this evaluator's tensors: values [(T,) channel 1, *shape]
        in, the same layout out."""
        count, c = len(self.tensors), self.channel_dim
        inputs = []
        for a, value in zip(node.args, args):
            if a.level == Level.ELEMENT:
                x = value.squeeze(c) if c else value          # (T, *shape)
                inputs.append(x.expand(count, *x.shape[1:]))
            else:
                inputs.append(value.reshape(value.shape[0]).expand(count))
        out = run_tensor_function(self.batch.tensor_functions[node.attrs[0]], inputs, self.call_env())
        if node.level != Level.ELEMENT:
            out = out.reshape(count, *[1] * self.ndim)
        return out.unsqueeze(1) if c else out

    def mlp(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        sizes, activation = node.attrs
        h = x.expand(x.shape[0], *self.p.shape).reshape(sizes[0], -1)
        out = torch.empty(sizes[-1], h.shape[1], dtype=torch.float32, device=h.device)
        # Column chunks keep each layer's activations in cache: ~3x faster on CPU than
        # one (hidden, N) matrix per layer for N in the millions.
        # Under torch.compile one chunk: inductor turns each slice assignment into an
        # index-range check on every element, so chunking there costs work per chunk.
        chunk = h.shape[1] if torch.compiler.is_compiling() else _MLP_CHUNK
        for start in range(0, h.shape[1], chunk):
            a = h[:, start:start + chunk]
            for i in range(len(sizes) - 1):
                w, b = self.mlp_weights[2 * i], self.mlp_weights[2 * i + 1]
                a = torch.addmm(b.unsqueeze(1), w, a)
                if i < len(sizes) - 2:
                    a = _ACTIVATIONS[activation](a)
            out[:, start:start + chunk] = a
        return out.reshape(sizes[-1], *self.p.shape)

    def evaluate(self, roots: list[Node]) -> list[torch.Tensor]:
        """Evaluate roots, freeing each intermediate after its last use (memory stays
        near a few element-level values, not one per node)."""
        known = self.known
        order = topo_order(roots, known)
        uses = Counter(id(a) for n in order if id(n) not in known for a in n.args)
        for r in roots:
            uses[id(r)] += 1
        values: dict[int, torch.Tensor] = {}
        for node in order:
            if id(node) in known:
                out = known[id(node)]
            elif node.args:
                out = self.apply(node, [values[id(a)] for a in node.args])
                for a in node.args:
                    uses[id(a)] -= 1
                    if uses[id(a)] == 0:
                        del values[id(a)]
            else:
                out = self.leaf(node)
            values[id(node)] = out
        return [values[id(r)] for r in roots]


class ReferenceBackend(Backend):
    name = "reference"

    def step(self, batch: StepBatch) -> None:
        program = self.program
        evaluators = [TensorEvaluator(task, batch) for task in batch.tasks]
        sharded = any(task.shard is not None for task in batch.tasks)   # FSDP2's rows of each tensor
        if sharded:
            from .sharded import ShardedEvaluator, whole_tensor_values   # (it builds on this module)
            evaluators = [ShardedEvaluator(t, batch) if t.shard is not None else TensorEvaluator(t, batch)
                          for t in batch.tasks]
        if batch.network is not None:
            if sharded:
                whole_tensor_values(program, evaluators, network_inputs=True)
            self._run_network(batch, evaluators)
        if sharded:
            whole_tensor_values(program, evaluators, network_inputs=False)
        for ev, task in zip(evaluators, batch.tasks):
            graph = program.variants[task.variant]
            names = [n for n in graph.accumulators if not is_scratch(n)]   # it evaluates calls directly
            *accs, new_p = ev.evaluate([graph.accumulators[n] for n in names] + [graph.new_param])
            for name, value in zip(names, accs):
                task.state[name].copy_(value)
            task.param.detach().copy_(new_p[0])

    def _run_network(self, batch: StepBatch, evaluators: list[TensorEvaluator]) -> None:
        inputs = [ev.evaluate([self.program.variants[t.variant].network_input])[0].reshape(-1)
                  for ev, t in zip(evaluators, batch.tasks)]
        outputs, mlp = run_network(batch, batch.tasks, torch.stack(inputs))
        for i, ev in enumerate(evaluators):
            ev.take_network(outputs, mlp, i)


def run_network(batch: StepBatch, tasks: list[TensorTask], x: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One network call over `tasks` (their inputs are the rows of x): stores each
    tensor's new network state; returns the outputs {name: (T, channels)} and the MLP
    weights [(T, ...), ...], row i for tasks[i]."""
    net = batch.network
    state, own = {}, {}
    for k in net.state_keys:
        values = [t.state[k] for t in tasks]
        kept = net.state_rows.get(k)
        own[k] = kept is not None and len(kept[1]) == len(values) and all(map(operator.is_, kept[1], values))
        state[k] = kept[0] if own[k] else torch.stack(values)
    outputs, mlp, new_state = net.forward(x, state)
    if batch.skip_step is not None:   # a skipped step leaves the network's state too
        keep = batch.skip_step.reshape(()) != 0
        new_state = {k: torch.where(keep, state[k], new_state[k]) for k in net.state_keys}
    for k in net.state_keys:
        if own[k]:
            state[k].copy_(new_state[k])
        else:   # the tasks' states become rows of one tensor, in their order (SpecNetwork.state_rows)
            rows = new_state[k].clone(memory_format=torch.contiguous_format)
            views = list(rows.unbind(0))
            for t, view in zip(tasks, views):
                t.state[k] = view
            net.state_rows[k] = (rows, views)
            batch.replaced_states.append(k)
    return outputs, mlp
