"""The per-element MLP as TE stages, one per layer, each over [unit, *element dims]:

  F_v<f>  the element features (printed from the IR)
  Hr, Hc  W1' F over the features constant along Y (per row), along X (per column)
  H0      act(b1' + Hr + Hc + W1' F)   the folded first layer, written out over the features
  S<l>    sum_r W[j, r] H<l-1>[r]   a reduction over the previous layer's units
  H<l>    act(b[j] + S<l>[j])       (no activation after the last layer); over a layer of
          at most WRITTEN_OUT_UP_TO units, act(b[j] + sum_r W[j, r] H<l-1>[r]) written out

The schedule computes them per vector tile into per-tile buffers laid out [unit, lane], so
each weight is broadcast once per tile and the loops over units stay loops (compact
code that compiles in about a second, instead of thousands of written-out FMAs); Hr once
per row, Hc once per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tvm import te, tirx

from ...ir.mlp_fold import MlpFold
from ...ir.nodes import Node
from .printer import ACTIVATIONS, ElementPrinter

# A layer over at most this many units is written out as one stage, its sum in two chains
# of dependent multiply-adds (`_written_out`), not a reduction stage (S<l>) whose one chain
# then waits for the bias: VeLO's MLP pass, whose loop is bound by its chain of dependent
# operations more than by their count, 2-3% faster at 1M and 4M with its two layers of 4.
WRITTEN_OUT_UP_TO = 8


@dataclass
class MlpStages:
    features: list[te.Tensor]
    layers: list[te.Tensor]                      # H0, H1, ... (the last one is the output)
    sums: list[te.Tensor | None] = field(default_factory=list)   # S1, S2, ... (None: written out)
    row_sums: te.Tensor | None = None            # Hr: the first layer's sums per row (AlongAxes)
    col_sums: te.Tensor | None = None            # Hc: ... per column

    @property
    def output(self) -> te.Tensor:
        return self.layers[-1]

    def block_names(self) -> list[str]:
        """Producers before consumers."""
        names = [f"F_v{k}" for k in range(len(self.features))] if len(self.features) > 1 else \
            ["F"] if self.features else []
        names.append("H0")
        for layer in range(1, len(self.layers)):
            names += ([f"S{layer}"] if self.sums[layer - 1] is not None else []) + [f"H{layer}"]
        return names


@dataclass
class AlongAxes:
    """Where features constant along Y or along X enter the first layer as per-row and
    per-column partial sums (CPU kernels vectorized along Y): `y_const(feature)` and
    `x_const(feature)` tell them apart; `rows` / `cols` are those sums' dims, `row_at` /
    `col_at` map an element's index to its row's (column's) there, and `row_point` /
    `col_point` an index there to an element of that row (column) whose features it holds."""

    y_const: Callable[[Node], bool]
    x_const: Callable[[Node], bool]
    rows: tuple
    cols: tuple
    row_at: Callable[[tuple], tuple]
    col_at: Callable[[tuple], tuple]
    row_point: Callable[[tuple], tuple]
    col_point: Callable[[tuple], tuple]


def build_mlp_stages(mlp: Node, dims: tuple, weights: list[te.Tensor],
                     printer: Callable[[tuple], ElementPrinter], along: AlongAxes | None = None,
                     reread: Callable[[tuple], tirx.PrimExpr] | None = None) -> MlpStages:
    """along: features constant along Y (or X) enter H0 through Hr (Hc), their first layer's
    sums per row (column), computed once per row (tensor), not per element: VeLO's 12 row
    and column features of 30 take 48 of its 148 multiply-adds an element.

    reread (CPU): an offset of the first layer's weight index that is 0 at run time but,
    as far as LLVM knows, changes from one vector to the next, so each weight is read in
    the loop, as a broadcast memory operand of its FMA. Otherwise LLVM hoists all of them
    out of the loop as broadcast vectors, more than the registers hold beside the
    element's values (VeLO: 72), and reloads each spilled 64-byte vector from the stack
    for its FMA: VeLO's MLP pass on the GPT-2 set 25.6 -> 22.2 ms."""
    sizes, activation = mlp.attrs
    fold = MlpFold.of(mlp)
    act = ACTIVATIONS[activation]
    flat = [(feat, c) for feat, _, _, ch in fold.element_parts for c in range(ch)]
    channels = [(f, feat, c) for f, (feat, c) in enumerate(flat)]   # (column of W1', feature, its channel)
    parts = {"element": channels, "row": [], "col": []}
    if along is not None:
        parts = {"element": [x for x in channels if not along.y_const(x[1]) and not along.x_const(x[1])],
                 "row": [x for x in channels if along.y_const(x[1])],
                 "col": [x for x in channels if along.x_const(x[1]) and not along.y_const(x[1])]}
    features = []
    if parts["element"]:
        F = te.compute(dims, lambda *i: [printer(i).expr(feat, c) for _, feat, c in parts["element"]], name="F")
        features = list(F) if isinstance(F, (list, tuple)) else [F]
    last = len(sizes) - 2
    w, b = weights[0], weights[1]

    def partial_sums(kind: str, at: tuple, point: Callable[[tuple], tuple], name: str) -> te.Tensor | None:
        """W1' times the features of one kind, at each of their positions (`at` dims)."""
        if not parts[kind]:
            return None
        def weighted(k, *i):
            terms = [w[k, f] * printer(point(i)).expr(feat, c) for f, feat, c in parts[kind]]
            return sum(terms[1:], terms[0])
        return te.compute((sizes[1], *at), weighted, name=name)
    rows = partial_sums("row", along.rows, along.row_point, "Hr") if along is not None else None
    cols = partial_sums("col", along.cols, along.col_point, "Hc") if along is not None else None

    def first(k, *i):
        total = b[k]
        if rows is not None:
            total = total + rows[(k, *along.row_at(i))]
        if cols is not None:
            total = total + cols[(k, *along.col_at(i))]
        offset = reread(i) if reread is not None else 0
        for (f, _, _), feature in zip(parts["element"], features):
            total = total + w[k, f + offset] * feature[i]
        return total if last == 0 else act(total)

    stages = MlpStages(features, [te.compute((sizes[1], *dims), first, name="H0")],
                       row_sums=rows, col_sums=cols)
    for layer in range(1, last + 1):
        w, b, h = weights[2 * layer], weights[2 * layer + 1], stages.layers[-1]
        finish = (lambda v: v) if layer == last else act
        if sizes[layer] <= WRITTEN_OUT_UP_TO:
            stages.sums.append(None)
            stages.layers.append(te.compute((sizes[layer + 1], *dims), _written_out(w, b, h, sizes[layer], finish),
                                            name=f"H{layer}"))
            continue
        r = te.reduce_axis((0, sizes[layer]), "r")
        s = te.compute((sizes[layer + 1], *dims), lambda j, *i: te.sum(w[j, r] * h[(r, *i)], axis=r), name=f"S{layer}")
        # te.sum ignores init= (TVM_NOTES.md), so the bias is added by the next stage.
        stages.sums.append(s)
        stages.layers.append(te.compute((sizes[layer + 1], *dims), lambda j, *i: finish(b[j] + s[(j, *i)]),
                                        name=f"H{layer}"))
    return stages


def _written_out(w: te.Tensor, b: te.Tensor, h: te.Tensor, n: int, finish: Callable) -> Callable:
    """A layer's unit j over the n units of h, its sum written out in two chains: the bias
    and the first half, the second half, then their sum (WRITTEN_OUT_UP_TO)."""
    def unit(j, *i):
        terms = [w[j, r] * h[(r, *i)] for r in range(n)]
        half = (n + 1) // 2
        first = sum(terms[:half], b[j])
        return finish(first if half == n else first + sum(terms[half + 1:], terms[half]))
    return unit
