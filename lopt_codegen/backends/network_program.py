"""Runs a spec's per-tensor network (ir/network.py) once per step over the rows of all
tensors: the one implementation every backend calls (through run_network). Its linear
layers run in torch; its values are numpy arrays on the CPU, torch tensors on a GPU
(network_arrays.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..ir.network import NetworkIR
from ..ir.program import mlp_weight_shapes
from .network_arrays import NumpyArrays, TorchArrays, Value, concat_tensors
from .network_fold import FOLD_FROM_ROWS, FoldedLinear, folded_body
from .torch_ops import BINARY, UNARY


Compiled = Callable[[dict[str, Value]], Value]   # scope -> an expression's value
# Rows (tensors) up to which a network on the CPU holds its values in numpy arrays
# (network_arrays.py), beyond which torch's ops on two cores are faster. VeLO's network
# from cold caches, a call, numpy / torch: 2 rows 0.95-0.97 / 1.04-1.05 ms, 76 rows 2.85 /
# 2.95, 200 rows 4.80 / 4.71; its loss buffer (1 row) 227-229 / 324-325 us.
NUMPY_ROWS = 128


@dataclass
class _Program:
    """The network compiled for one kind of arrays."""
    arrays: TorchArrays
    statements: list[tuple[str, Compiled]]
    mlp: list[Compiled]


class SpecNetwork:
    """A network with its weights on one device (fold=False: its body as written, no layer
    folded through another: network_fold.py; arrays: "numpy" or "torch" for every call,
    else numpy's on the CPU up to NUMPY_ROWS rows). Its expressions are compiled once into
    closures (`_compile`): walking the nested tuples at every step, hashing the folded
    subexpressions to find their values, took most of the loss buffer's time (VeLO's:
    30 ops on 10 floats, about 250 us a step from cold caches)."""

    def __init__(self, ir: NetworkIR, weights: dict[str, dict[str, torch.Tensor]], mlp_sizes: tuple[int, ...] | None,
                 device: torch.device, fold: bool = True, arrays: str | None = None):
        self.ir, self.weights, self.device = ir, weights, device
        self._arrays = arrays
        self._hyper: dict[str, float] = {}
        self.state_keys = tuple(ir.state)
        # The body as it runs: linear layers over a concat folded through the layer before (network_fold.py)
        self.body = folded_body(ir, weights) if fold else list(ir.body)
        self.mlp_shapes = [] if mlp_sizes is None else mlp_weight_shapes(mlp_sizes)
        # A sharded step's reduction over every rank's tensors (runtime/sharding.py), on torch
        # tensors; None: over the step's rows.
        self.over_tensors: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        # State key -> (rows (T, channels), the row views that are the last step's tensors'
        # state, in their order): while the tensors' states are those views, a step reads
        # the rows and writes its new state with one copy, where stacking and writing back
        # 200 tensors' states took about 0.7 ms of VeLO's 21-22 ms step (reference.run_network).
        self.state_rows: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._programs: dict[str, _Program] = {}
        # Linear layers, and projections, of one value with one weight group run as one
        # product (`_merged_product`): (kind, value's expression, group) -> the layers or
        # keys, where two or more; their stacked weights kept per version of the weights.
        # A network call of VeLO's from cold caches, its six MLP banks merged: 0.99-1.14 ->
        # 0.78-0.91 ms on 2 tensors, 3.57 -> 3.37 ms on 76; then its two layers over lstm_h
        # too: 0.91-0.93 -> 0.76-0.78 ms on 2, 3.12 -> 2.80 ms on 76.
        self._merged = {k: keys for k, keys in _products([e for _, _, e in self.body] + list(ir.mlp)).items()
                        if len(keys) > 1}
        self._stacked: dict[tuple, tuple] = {}

    def initial_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """One tensor's network state before its first step: each (channels,)."""
        arrays = self._program(1).arrays
        with arrays.quiet():
            return {name: arrays.tensor(self._compile(init, arrays)({})).reshape(-1).to(device, copy=True)
                    for name, (init, _) in self.ir.state.items()}

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """x: (T, inputs); state: each (T, channels). Returns the outputs (T, channels), the
        MLP weights [w0 (T, out, in), b0 (T, out), ...] and the new state."""
        count = x.shape[0]
        program = self._program(count)
        arrays = program.arrays
        with arrays.quiet():
            scope = self._run(program, {"x": x, **state})
            mlp = [e(scope) for e in program.mlp]

        def rows(v: Value, shape: tuple[int, ...] = ()) -> torch.Tensor:
            """(T, *shape) of v's rows, a shared row for every tensor; shaped in the arrays' own
            library, then one conversion (from cold caches each torch call costs)."""
            if v.shape[0] != count:
                v = arrays.expand(v, count, v.shape[1])
            return arrays.tensor(v.reshape(count, *shape) if shape else v)
        outputs = {name: rows(scope[name]) for name in self.ir.outputs}
        mlp = [rows(w, shape) for w, shape in zip(mlp, self.mlp_shapes)]
        return outputs, mlp, {name: rows(scope[name]) for name in self.ir.state}

    def run(self, scope: dict[str, torch.Tensor], hyper: dict[str, float] | None = None,
            names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The body's values from its inputs and state (scope), each (T or 1, channels):
        those of `names`, or all."""
        program = self._program(max(v.shape[0] for v in scope.values()))
        with program.arrays.quiet():
            values = self._run(program, scope, hyper)
        return {name: program.arrays.tensor(values[name]) for name in (values if names is None else names)}

    def _program(self, rows: int) -> _Program:
        """The body compiled for the arrays that hold the values of `rows` tensors."""
        kind = self._arrays or ("numpy" if self.device.type == "cpu" and rows <= NUMPY_ROWS else "torch")
        if kind not in self._programs:
            arrays = (NumpyArrays if kind == "numpy" else TorchArrays)(self.device)
            self._programs[kind] = _Program(arrays, [(name, self._compile(expr, arrays)) for _, name, expr in self.body],
                                            [self._compile(e, arrays) for e in self.ir.mlp])
        return self._programs[kind]

    def _run(self, program: _Program, scope: dict[str, torch.Tensor], hyper: dict[str, float] | None = None
             ) -> dict[str, Value]:
        self._hyper = hyper or {}
        values = {name: program.arrays.of(v) for name, v in scope.items()}
        for name, value in program.statements:
            values[name] = value(values)
        return values

    def _compile(self, e: tuple, arrays: TorchArrays) -> Compiled:
        """A function of the scope computing expression e on `arrays`."""
        kind = e[0]
        if kind in ("fold", "hyper"):
            return self._folded(e[1] if kind == "fold" else e, arrays)
        if kind == "const":
            value = arrays.row(torch.tensor(e[1], dtype=torch.float32))
            return lambda scope: value
        if kind == "var":
            name = e[1]
            return lambda scope: scope[name]
        if kind == "weight":
            group, key = e[1], e[2]
            return lambda scope: arrays.of(self.weights[group][key].reshape(1, -1))
        if kind == "linear":
            # (W x^T + b)^T: the layer's outputs as the product's rows, so that BLAS splits the
            # product over the cores even for a few tensors' rows (torch.nn.functional.linear,
            # x W^T, ran VeLO's 2 tensors' LSTM as matrix-vector products on one core: 7.1 vs
            # 5.9 ms a step at 1M)
            x, group, weight, bias = self._compile(e[1], arrays), e[2], f"{e[3]}.weight", f"{e[3]}.bias"
            if e[3] in self._merged.get(e[:3], ()):
                return self._merged_product(e[:3], x, e[3], arrays)

            def linear(scope: dict[str, Value]) -> Value:
                w = self.weights[group]
                return arrays.of(torch.addmm(w[bias].unsqueeze(1), w[weight], arrays.tensor(x(scope)).t()).t())
            return linear
        if kind == "project":
            x, group, key = self._compile(e[1], arrays), e[2], e[3]
            if key in self._merged.get(e[:3], ()):
                return self._merged_product(e[:3], x, key, arrays)

            def project(scope: dict[str, Value]) -> Value:
                w = self.weights[group][key]
                return arrays.of(arrays.tensor(x(scope)) @ w.reshape(w.shape[0], -1))
            return project
        if kind == "concat":
            parts = [self._compile(a, arrays) for a in e[1]]
            return lambda scope: arrays.concat([part(scope) for part in parts])
        if kind == "folded_linear":
            return self._folded_linear(e[1], arrays)
        if kind == "slice":
            x, start, stop = self._compile(e[1], arrays), e[2], e[2] + e[3]
            return lambda scope: x(scope)[:, start:stop]
        if kind == "over_tensors":
            x, reduction = self._compile(e[2], arrays), e[1]

            def over_tensors(scope: dict[str, Value]) -> Value:
                if self.over_tensors is None:
                    return arrays.over_tensors(reduction, x(scope))
                return arrays.of(self.over_tensors(reduction, arrays.tensor(x(scope))))
            return over_tensors
        if kind == "max_channels":
            x = self._compile(e[1], arrays)
            return lambda scope: arrays.max_channels(x(scope))
        if kind == "full":
            x, channels = self._compile(e[2], arrays), e[1]

            def full(scope: dict[str, Value]) -> Value:
                v = x(scope)
                return arrays.expand(v, v.shape[0], channels)
            return full
        args = [self._compile(a, arrays) for a in e[2]]
        if e[1] == "where":
            cond, a, b = args
            return lambda scope: arrays.where(cond(scope), a(scope), b(scope))
        if e[1] in arrays.unary:
            f, (a,) = arrays.unary[e[1]], args
            return lambda scope: f(a(scope))
        f, (a, b) = arrays.binary[e[1]], args
        return lambda scope: f(a(scope), b(scope))

    def _merged_product(self, merge: tuple, x: Compiled, key: str, arrays: TorchArrays) -> Compiled:
        """Layer or projection `key` of a merged product (self._merged[merge]) as its
        columns of that product, made by the first of its keys a call reaches."""
        kind, _, group = merge
        keys = tuple(self._merged[merge])
        made = f":product{list(self._merged).index(merge)}"   # (not a name a spec can write)
        # (the weights' shapes are the spec's: checked when they load)
        widths = [self.weights[group][f"{k}.weight"].shape[0] if kind == "linear"
                  else math.prod(self.weights[group][k].shape[1:]) for k in keys]
        stop = sum(widths[:keys.index(key) + 1])
        start = stop - widths[keys.index(key)]

        def product(scope: dict[str, Value]) -> Value:
            if made not in scope:
                weight, bias = self._stack(kind, group, keys)
                v = arrays.tensor(x(scope))
                # (a linear layer as the unmerged one: (W x^T + b)^T)
                scope[made] = arrays.of(v @ weight if bias is None else torch.addmm(bias, weight, v.t()).t())
            return scope[made][:, start:stop]
        return product

    def _stack(self, kind: str, group: str, keys: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Linear layers' weights one above the other and their biases as a column, or
        projections' weights side by side, each (in, ...) as (in, prod(...)); made again
        when one is written to or replaced."""
        names = [f"{k}.{part}" for k in keys for part in ("weight", "bias")] if kind == "linear" else list(keys)
        tensors = [self.weights[group][n] for n in names]
        seen = tuple((id(t), t._version) for t in tensors)
        kept = self._stacked.get((kind, group, keys))
        if kept is None or kept[0] != seen:
            if kind == "linear":
                stacked = (torch.cat(tensors[0::2]), torch.cat(tensors[1::2]).unsqueeze(1))
            else:
                stacked = (torch.cat([t.reshape(t.shape[0], -1) for t in tensors], 1), None)
            kept = self._stacked[(kind, group, keys)] = (seen, stacked)
        return kept[1]

    def _folded(self, e: tuple, arrays: TorchArrays) -> Compiled:
        """Numbers and hyperparameters alone: float64 on the host, as Python computes them,
        then float32 on the device; made once per values of the hyperparameters it reads
        (a steady step copies nothing from the host)."""
        names = _hyper_names(e)
        made: dict[tuple[float, ...], Value] = {}

        def folded(scope: dict[str, Value]) -> Value:
            key = tuple(float(self._hyper[n]) for n in names)
            value = made.get(key)
            if value is None:
                if len(made) >= _CONSTS_LIMIT:   # a schedule changing a value every step
                    made.clear()
                value = made[key] = arrays.row(_host(e, self._hyper))
            return value
        return folded

    def _folded_linear(self, fold: FoldedLinear, arrays: TorchArrays) -> Compiled:
        """The folded layer from FOLD_FROM_ROWS rows, as written below (network_fold.py)."""
        parts, written = [self._compile(a, arrays) for a in fold.parts], self._compile(fold.written, arrays)

        def folded_linear(scope: dict[str, Value]) -> Value:
            values = [part(scope) for part in parts]
            if max(v.shape[0] for v in values) < FOLD_FROM_ROWS:
                return written(scope)
            tensor = arrays.tensor
            return arrays.of(fold.apply(self.weights, list(map(tensor, values)), concat_tensors,
                                             tensor(scope[fold.shared])))
        return folded_linear


_CONSTS_LIMIT = 4096


def _products(exprs: list) -> dict[tuple, list[str]]:
    """("linear" | "project", the expression multiplied, weight group) -> the layers or
    keys it is multiplied with, in order; not inside a folded layer (network_fold.py),
    which runs either of two products."""
    found: dict[tuple, list[str]] = {}

    def visit(e: object) -> None:
        if isinstance(e, tuple):
            if e and e[0] in ("linear", "project"):
                keys = found.setdefault(e[:3], [])
                if e[3] not in keys:
                    keys.append(e[3])
            for part in e:
                visit(part)
    for e in exprs:
        visit(e)
    return found


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
