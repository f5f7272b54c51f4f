"""Runs a spec's per-tensor network (ir/network.py) with torch, once per step over the
rows of all tensors: the one implementation every backend calls (through run_network)."""
from __future__ import annotations

from typing import Callable

import torch

from ..ir.network import NetworkIR
from ..ir.program import mlp_weight_shapes
from .network_fold import FOLD_FROM_ROWS, folded_body
from .torch_ops import BINARY, UNARY


class SpecNetwork:
    """A network with its weights on one device."""

    def __init__(self, ir: NetworkIR, weights: dict[str, dict[str, torch.Tensor]], mlp_sizes: tuple[int, ...] | None,
                 device: torch.device):
        self.ir, self.weights, self.device = ir, weights, device
        self._consts: dict[tuple, torch.Tensor] = {}   # made once: a steady step copies nothing from the host
        self._hyper: dict[str, float] = {}
        self.state_keys = tuple(ir.state)
        # The body as it runs: linear layers over a concat folded through the layer before (network_fold.py)
        self.body = folded_body(ir, weights)
        self.mlp_shapes = [] if mlp_sizes is None else mlp_weight_shapes(mlp_sizes)
        # (kind, rows) -> the shared row; a sharded step (runtime/sharding.py) reduces over
        # every rank's tensors.
        self.over_tensors: Callable[[str, torch.Tensor], torch.Tensor] = _over_local_tensors
        # State key -> (rows (T, channels), the row views that are the last step's tensors'
        # state, in their order): while the tensors' states are those views, a step reads
        # the rows and writes its new state with one copy, where stacking and writing back
        # 200 tensors' states took about 0.7 ms of VeLO's 21-22 ms step (reference.run_network).
        self.state_rows: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def initial_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """One tensor's network state before its first step: each (channels,)."""
        return {name: self._eval(init, {}).reshape(-1).to(device, copy=True) for name, (init, _) in self.ir.state.items()}

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """x: (T, inputs); state: each (T, channels). Returns the outputs (T, channels), the
        MLP weights [w0 (T, out, in), b0 (T, out), ...] and the new state."""
        scope = self.run({"x": x, **state})
        count = x.shape[0]
        rows = lambda v: v.expand(count, v.shape[1])  # noqa: E731  (a shared row for every tensor)
        outputs = {name: rows(scope[name]) for name in self.ir.outputs}
        mlp = [rows(self._eval(e, scope)).reshape(count, *shape) for e, shape in zip(self.ir.mlp, self.mlp_shapes)]
        return outputs, mlp, {name: rows(scope[name]) for name in self.ir.state}

    def run(self, scope: dict[str, torch.Tensor], hyper: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """The body's values from its inputs and state (scope), each (T or 1, channels)."""
        self._hyper = hyper or {}
        scope = dict(scope)
        for _, name, expr in self.body:
            scope[name] = self._eval(expr, scope)
        return scope

    def _folded(self, e: tuple) -> torch.Tensor:
        """Numbers and hyperparameters alone: float64 on the host, as Python computes them,
        then float32 on the device; made once per values of the hyperparameters it reads."""
        key = (e, tuple(float(self._hyper[n]) for n in _hyper_names(e)))
        if key not in self._consts:
            if len(self._consts) >= _CONSTS_LIMIT:   # a schedule changing a value every step
                self._consts.clear()
            value = _host(e, self._hyper)
            self._consts[key] = value.to(device=self.device, dtype=torch.float32).reshape(1, -1)
        return self._consts[key]

    def _eval(self, e: tuple, scope: dict[str, torch.Tensor]) -> torch.Tensor:
        kind = e[0]
        if kind == "fold":
            return self._folded(e[1])
        if kind == "hyper":
            return self._folded(e)
        if kind == "max_channels":
            return self._eval(e[1], scope).amax(1, keepdim=True)
        if kind == "full":
            return self._eval(e[2], scope).expand(-1, e[1])
        if kind == "var":
            return scope[e[1]]
        if kind == "const":
            if e[1] not in self._consts:
                self._consts[e[1]] = torch.tensor(e[1], dtype=torch.float32, device=self.device).reshape(1, -1)
            return self._consts[e[1]]
        if kind == "weight":
            return self.weights[e[1]][e[2]].reshape(1, -1)
        if kind == "linear":
            # (W x^T + b)^T: the layer's outputs as the product's rows, so that BLAS splits the
            # product over the cores even for a few tensors' rows (torch.nn.functional.linear,
            # x W^T, ran VeLO's 2 tensors' LSTM as matrix-vector products on one core: 7.1 vs
            # 5.9 ms a step at 1M)
            w = self.weights[e[2]]
            return torch.addmm(w[f"{e[3]}.bias"].unsqueeze(1), w[f"{e[3]}.weight"], self._eval(e[1], scope).t()).t()
        if kind == "project":
            w = self.weights[e[2]][e[3]]
            return self._eval(e[1], scope) @ w.reshape(w.shape[0], -1)
        if kind == "concat":
            return _concat([self._eval(a, scope) for a in e[1]])
        if kind == "folded_linear":
            fold = e[1]
            parts = [self._eval(a, scope) for a in fold.parts]
            if max(p.shape[0] for p in parts) < FOLD_FROM_ROWS:
                return self._eval(fold.written, scope)
            return fold.apply(self.weights, parts, _concat, scope[fold.shared])
        if kind == "slice":
            return self._eval(e[1], scope)[:, e[2]:e[2] + e[3]]
        if kind == "over_tensors":
            return self.over_tensors(e[1], self._eval(e[2], scope))
        args = [self._eval(a, scope) for a in e[2]]
        if e[1] == "where":
            return torch.where(args[0] != 0, args[1], args[2])
        return UNARY[e[1]](args[0]) if e[1] in UNARY else BINARY[e[1]](args[0], args[1])


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
