"""Runs a spec's per-tensor network (ir/network.py) with torch, once per step over the
rows of all tensors: the one implementation every backend calls (through run_network)."""
from __future__ import annotations

from typing import Callable

import torch

from ..ir.network import NetworkIR
from ..ir.program import mlp_weight_shapes
from .network_fold import FOLD_FROM_ROWS, FoldedLinear, folded_body
from .torch_ops import BINARY, UNARY


Compiled = Callable[[dict[str, torch.Tensor]], torch.Tensor]   # scope -> an expression's value


class SpecNetwork:
    """A network with its weights on one device (fold=False: its body as written, no layer
    folded through another: network_fold.py). Its expressions are compiled once into
    closures (`_compile`): walking the nested tuples at every step, hashing the folded
    subexpressions to find their values, took most of the loss buffer's time (VeLO's:
    30 ops on 10 floats, about 250 us a step from cold caches)."""

    def __init__(self, ir: NetworkIR, weights: dict[str, dict[str, torch.Tensor]], mlp_sizes: tuple[int, ...] | None,
                 device: torch.device, fold: bool = True):
        self.ir, self.weights, self.device = ir, weights, device
        self._hyper: dict[str, float] = {}
        self.state_keys = tuple(ir.state)
        # The body as it runs: linear layers over a concat folded through the layer before (network_fold.py)
        self.body = folded_body(ir, weights) if fold else list(ir.body)
        self.mlp_shapes = [] if mlp_sizes is None else mlp_weight_shapes(mlp_sizes)
        # (kind, rows) -> the shared row; a sharded step (runtime/sharding.py) reduces over
        # every rank's tensors.
        self.over_tensors: Callable[[str, torch.Tensor], torch.Tensor] = _over_local_tensors
        # State key -> (rows (T, channels), the row views that are the last step's tensors'
        # state, in their order): while the tensors' states are those views, a step reads
        # the rows and writes its new state with one copy, where stacking and writing back
        # 200 tensors' states took about 0.7 ms of VeLO's 21-22 ms step (reference.run_network).
        self.state_rows: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._statements = [(name, self._compile(expr)) for _, name, expr in self.body]
        self._mlp = [self._compile(e) for e in ir.mlp]

    def initial_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """One tensor's network state before its first step: each (channels,)."""
        return {name: self._compile(init)({}).reshape(-1).to(device, copy=True)
                for name, (init, _) in self.ir.state.items()}

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """x: (T, inputs); state: each (T, channels). Returns the outputs (T, channels), the
        MLP weights [w0 (T, out, in), b0 (T, out), ...] and the new state."""
        scope = self.run({"x": x, **state})
        count = x.shape[0]
        rows = lambda v: v.expand(count, v.shape[1])  # noqa: E731  (a shared row for every tensor)
        outputs = {name: rows(scope[name]) for name in self.ir.outputs}
        mlp = [rows(e(scope)).reshape(count, *shape) for e, shape in zip(self._mlp, self.mlp_shapes)]
        return outputs, mlp, {name: rows(scope[name]) for name in self.ir.state}

    def run(self, scope: dict[str, torch.Tensor], hyper: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """The body's values from its inputs and state (scope), each (T or 1, channels)."""
        self._hyper = hyper or {}
        scope = dict(scope)
        for name, value in self._statements:
            scope[name] = value(scope)
        return scope

    def _compile(self, e: tuple) -> Compiled:
        """A function of the scope computing expression e."""
        kind = e[0]
        if kind in ("fold", "hyper"):
            return self._folded(e[1] if kind == "fold" else e)
        if kind == "const":
            value = torch.tensor(e[1], dtype=torch.float32, device=self.device).reshape(1, -1)
            return lambda scope: value
        if kind == "var":
            name = e[1]
            return lambda scope: scope[name]
        if kind == "weight":
            group, key = e[1], e[2]
            return lambda scope: self.weights[group][key].reshape(1, -1)
        if kind == "linear":
            # (W x^T + b)^T: the layer's outputs as the product's rows, so that BLAS splits the
            # product over the cores even for a few tensors' rows (torch.nn.functional.linear,
            # x W^T, ran VeLO's 2 tensors' LSTM as matrix-vector products on one core: 7.1 vs
            # 5.9 ms a step at 1M)
            x, group, weight, bias = self._compile(e[1]), e[2], f"{e[3]}.weight", f"{e[3]}.bias"

            def linear(scope: dict[str, torch.Tensor]) -> torch.Tensor:
                w = self.weights[group]
                return torch.addmm(w[bias].unsqueeze(1), w[weight], x(scope).t()).t()
            return linear
        if kind == "project":
            x, group, key = self._compile(e[1]), e[2], e[3]

            def project(scope: dict[str, torch.Tensor]) -> torch.Tensor:
                w = self.weights[group][key]
                return x(scope) @ w.reshape(w.shape[0], -1)
            return project
        if kind == "concat":
            parts = [self._compile(a) for a in e[1]]
            return lambda scope: _concat([part(scope) for part in parts])
        if kind == "folded_linear":
            return self._folded_linear(e[1])
        if kind == "slice":
            x, start, stop = self._compile(e[1]), e[2], e[2] + e[3]
            return lambda scope: x(scope)[:, start:stop]
        if kind == "over_tensors":
            x, reduction = self._compile(e[2]), e[1]
            return lambda scope: self.over_tensors(reduction, x(scope))
        if kind == "max_channels":
            x = self._compile(e[1])
            return lambda scope: x(scope).amax(1, keepdim=True)
        if kind == "full":
            x, channels = self._compile(e[2]), e[1]
            return lambda scope: x(scope).expand(-1, channels)
        args = [self._compile(a) for a in e[2]]
        if e[1] == "where":
            cond, a, b = args
            return lambda scope: torch.where(cond(scope) != 0, a(scope), b(scope))
        if e[1] in UNARY:
            f, (a,) = UNARY[e[1]], args
            return lambda scope: f(a(scope))
        f, (a, b) = BINARY[e[1]], args
        return lambda scope: f(a(scope), b(scope))

    def _folded(self, e: tuple) -> Compiled:
        """Numbers and hyperparameters alone: float64 on the host, as Python computes them,
        then float32 on the device; made once per values of the hyperparameters it reads
        (a steady step copies nothing from the host)."""
        names = _hyper_names(e)
        made: dict[tuple[float, ...], torch.Tensor] = {}

        def folded(scope: dict[str, torch.Tensor]) -> torch.Tensor:
            key = tuple(float(self._hyper[n]) for n in names)
            value = made.get(key)
            if value is None:
                if len(made) >= _CONSTS_LIMIT:   # a schedule changing a value every step
                    made.clear()
                value = made[key] = _host(e, self._hyper).to(device=self.device, dtype=torch.float32).reshape(1, -1)
            return value
        return folded

    def _folded_linear(self, fold: FoldedLinear) -> Compiled:
        """The folded layer from FOLD_FROM_ROWS rows, as written below (network_fold.py)."""
        parts, written = [self._compile(a) for a in fold.parts], self._compile(fold.written)

        def folded_linear(scope: dict[str, torch.Tensor]) -> torch.Tensor:
            values = [part(scope) for part in parts]
            if max(v.shape[0] for v in values) < FOLD_FROM_ROWS:
                return written(scope)
            return fold.apply(self.weights, values, _concat, scope[fold.shared])
        return folded_linear


_CONSTS_LIMIT = 4096


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    # A shared row (1, C) beside rows (T, C) takes T rows; T is 0 on a rank with no tensors.
    count = 0 if any(p.shape[0] == 0 for p in parts) else max(p.shape[0] for p in parts)
    return torch.cat([p.expand(count, p.shape[1]) for p in parts], dim=1)


def _over_local_tensors(kind: str, x: torch.Tensor) -> torch.Tensor:
    return {"max": torch.amax, "mean": torch.mean, "sum": torch.sum}[kind](x, 0, keepdim=True)


def _hyper_names(e: tuple) -> list[str]:
    if e[0] == "hyper":
        return [e[1]]
    return [n for a in e[2] for n in _hyper_names(a)] if e[0] == "op" else []


def _host(e: tuple, hyper: dict[str, float]) -> torch.Tensor:
    """A folded subexpression in float64 on the CPU: (1, channels)."""
    if e[0] == "const":
        return torch.tensor(e[1], dtype=torch.float64).reshape(1, -1)
    if e[0] == "hyper":
        return torch.tensor([[float(hyper[e[1]])]], dtype=torch.float64)
    args = [_host(a, hyper) for a in e[2]]
    if e[1] == "where":
        return torch.where(args[0] != 0, args[1], args[2])
    return UNARY[e[1]](args[0]) if e[1] in UNARY else BINARY[e[1]](args[0], args[1])
