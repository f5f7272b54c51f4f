"""A network body's linear layers over a concat folded through the layer before: where

    v = linear(x, F) + r          (r one row shared by all tensors, x a variable)
    y = linear(concat(..., v, ...), L)

and v is wider than x (VeLO: x 30 channels, v 512, L 2048 x 1024 over concat(v, lstm_h)),
L's columns over v times F make one weight of x's width, so y's product reads x in v's
place: y = [L_a | L_v F | L_b] [a; x; b] + (b_L + L_v (b_F + r)). The product's
multiply-adds per tensor fall from out x width(concat) to out x (width - width(v) +
width(x)) (VeLO's LSTM gates: 2048 x 1024 -> 2048 x 542); the bias is one row a step,
a product that reads L_v. So a step over a few tensors, where reading the weights sets
the time, runs the layer as written (FOLD_FROM_ROWS). L_v F is computed once per version
of the weights (written in place: again), in their dtype (VeLO's in float32: within 4e-7
of its largest entry from float64's, 1 ms where float64 took 4-8 ms of the first step).
v itself is computed only where something else reads it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ir.network import NetworkIR

Weights = dict[str, dict[str, torch.Tensor]]
_SHARED_KINDS = {"const", "fold", "hyper", "weight", "over_tensors"}
# Tensors (rows) from which the folded layer runs. VeLO's network, ms a call (folded /
# as written): 1 row 0.48 / 0.36, 2 rows 0.72-0.77 / 0.63, 8 rows 1.00-1.04 / 1.29-1.31,
# 76 rows 2.29-2.41 / 3.04-3.07, 200 rows 4.32-4.37 / 6.39-6.79.
FOLD_FROM_ROWS = 8


@dataclass
class FoldedLinear:
    """y = linear(concat(parts), L) with parts[index] = linear(x, F) + r (see the module's doc)."""

    parts: tuple            # the concat's expressions, x's variable in place of v
    index: int              # v's place among them
    layer: tuple[str, str]  # L: (group, layer)
    inner: tuple[str, str]  # F
    shared: str             # the variable holding r
    written: tuple          # y's expression as written, with v's in v's place (fewer rows than FOLD_FROM_ROWS)
    _kept: tuple = ()       # (the weights' versions, [L_a | L_v F | L_b], L_v^T contiguous)

    def apply(self, weights: Weights, parts: list[torch.Tensor], concat: Callable[[list[torch.Tensor]], torch.Tensor],
              r: torch.Tensor) -> torch.Tensor:
        """y from the parts' values (x's in v's place, FOLD_FROM_ROWS rows or more) and r's;
        `concat` the network's."""
        widths = [p.shape[1] for p in parts]
        widths[self.index] = weights[self.inner[0]][f"{self.inner[1]}.weight"].shape[0]
        # (as the network's linear: (W x^T + b)^T, its rows the products' rows)
        return torch.addmm(self._bias(weights, widths, r).t(), self._weight(weights, widths), concat(parts).t()).t()

    def macs(self, weights: Weights) -> tuple[int, int, int]:
        """The multiply-adds of the layer as written, per tensor; folded, per tensor and
        once a step (the bias's product)."""
        out, width = weights[self.layer[0]][f"{self.layer[1]}.weight"].shape
        v, x = weights[self.inner[0]][f"{self.inner[1]}.weight"].shape
        return out * width, out * (width - v + x), out * v

    def _weight(self, weights: Weights, widths: list[int]) -> torch.Tensor:
        """[L_a | L_v F | L_b] for the parts' widths (v's own at `index`)."""
        return self._kept_for(weights, widths)[1]

    def _bias(self, weights: Weights, widths: list[int], r: torch.Tensor) -> torch.Tensor:
        """b_L + L_v (b_F + r): one row (1, out). L_v^T kept contiguous: its rows strided
        within L's (VeLO: 512 of 1024 columns), the product read it at half the rate
        (0.53-0.67 ms a step against 0.31-0.32, from memory as in a step)."""
        b = weights[self.layer[0]][f"{self.layer[1]}.bias"]
        b_f = weights[self.inner[0]][f"{self.inner[1]}.bias"]
        return torch.addmm(b.unsqueeze(0), b_f.unsqueeze(0) + r, self._kept_for(weights, widths)[2])

    def _kept_for(self, weights: Weights, widths: list[int]) -> tuple:
        """_kept, made again when the weights were written to (or replaced)."""
        w, f = weights[self.layer[0]][f"{self.layer[1]}.weight"], weights[self.inner[0]][f"{self.inner[1]}.weight"]
        seen = (id(w), w._version, id(f), f._version)
        if not self._kept or self._kept[0] != seen:
            start = sum(widths[:self.index])
            end = start + widths[self.index]
            through = w[:, start:end] @ f
            self._kept = (seen, torch.cat([w[:, :start], through, w[:, end:]], 1), w[:, start:end].t().contiguous())
        return self._kept


def folded_body(ir: NetworkIR, weights: Weights) -> list[tuple]:
    """The network's statements with each foldable `y = linear(concat(...), L)` as
    ("folded_linear", FoldedLinear) reading x and r; v's statement then sets r (in a
    variable of its own) and, where another statement, an output, the state or the MLP's
    weights read v, v too."""
    reads = {*ir.outputs, *ir.state}.union(*(variables_read(e) for e in ir.mlp))
    return _fold_linears(ir.body, weights, reads)


def _fold_linears(body: tuple, weights: Weights, reads: set[str]) -> list[tuple]:
    # (v set once, before y, and x never: each then holds one value through the body)
    assigned = [name for _, name, _ in body]
    defs = {name: expr for _, name, expr in body if assigned.count(name) == 1}
    shared = _shared_variables(body)
    plans: dict[int, tuple[str, FoldedLinear]] = {}   # statement -> (v, its fold)
    for k, (_, name, expr) in enumerate(body):
        fold = _fold_of(expr, {v: e for v, e in defs.items() if v in assigned[:k]}, set(assigned), shared, weights)
        if fold is not None:
            plans[k] = fold
    if not plans:
        return list(body)
    folded = {v for v, _ in plans.values()}
    still_read = set(reads)
    for k, (_, name, expr) in enumerate(body):
        if k not in plans:
            still_read |= variables_read(expr)
    out = []
    for k, (kind, name, expr) in enumerate(body):
        if name in folded:
            r_expr = _split(expr)[1]
            out.append((kind, _shared_name(name), r_expr))
            if name in still_read:
                out.append((kind, name, ("op", "add", (_split(expr)[0], ("var", _shared_name(name))))))
        elif k in plans:
            out.append((kind, name, ("folded_linear", plans[k][1])))
        else:
            out.append((kind, name, expr))
    return out


def _shared_name(v: str) -> str:
    return f"{v}:shared"   # (not a name a spec can write)


def _fold_of(expr: tuple, defs: dict[str, tuple], assigned: set[str], shared: set[str], weights: Weights
             ) -> tuple[str, FoldedLinear] | None:
    """(v, its fold) where expr is y's (module doc); defs: the variables set once before it."""
    if expr[0] != "linear" or expr[1][0] != "concat":
        return None
    parts = expr[1][1]
    for index, part in enumerate(parts):
        if part[0] != "var" or part[1] not in defs:
            continue
        split = _split(defs[part[1]])
        if split is None or not _is_shared(split[1], shared):
            continue
        (_, x, group, layer), _ = split
        if x[0] != "var" or x[1] in assigned:
            continue
        f = weights[group][f"{layer}.weight"]
        if f.shape[1] >= f.shape[0]:   # (no fewer multiply-adds)
            continue
        v = ("op", "add", (split[0], ("var", _shared_name(part[1]))))
        written = ("linear", ("concat", tuple(v if i == index else p for i, p in enumerate(parts))), *expr[2:])
        fold = FoldedLinear(tuple(x if i == index else p for i, p in enumerate(parts)), index, (expr[2], expr[3]),
                            (group, layer), _shared_name(part[1]), written)
        return part[1], fold
    return None


def _split(expr: tuple) -> tuple[tuple, tuple] | None:
    """(linear(x, F), r) of expr = linear(x, F) + r (either order), else None."""
    if expr[0] != "op" or expr[1] != "add":
        return None
    a, b = expr[2]
    if a[0] == "linear":
        return a, b
    if b[0] == "linear":
        return b, a
    return None


def _shared_variables(body: tuple) -> set[str]:
    shared: set[str] = set()
    for _, name, expr in body:
        if _is_shared(expr, shared):
            shared.add(name)
    return shared


def _is_shared(expr: tuple, shared: set[str]) -> bool:
    """Whether expr is one row for all tensors (its value does not depend on the tensor)."""
    kind = expr[0]
    if kind in _SHARED_KINDS:
        return True
    if kind == "var":
        return expr[1] in shared
    if kind == "op":
        return all(_is_shared(a, shared) for a in expr[2])
    if kind == "concat":
        return all(_is_shared(a, shared) for a in expr[1])
    if kind in ("linear", "project"):
        return _is_shared(expr[1], shared)
    if kind in ("max_channels", "slice", "full"):
        return _is_shared(expr[1] if kind != "full" else expr[2], shared)
    return False


def variables_read(expr: tuple) -> set[str]:
    """The variables an expression reads."""
    if not isinstance(expr, tuple) or not expr:
        return set()
    if expr[0] == "var":
        return {expr[1]}
    found: set[str] = set()
    for part in expr[1:]:
        if isinstance(part, tuple):
            if part and isinstance(part[0], str):
                found |= variables_read(part)
            else:
                for p in part:
                    found |= variables_read(p)
    return found
