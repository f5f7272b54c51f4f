"""The per-element MLP as TE stages, one per layer, each over [unit, *element dims]:

  F_v<f>  the element features (printed from the IR)
  H0      act(b1' + W1' F)          the folded first layer, written out over the features
  S<l>    sum_r W[j, r] H<l-1>[r]   a reduction over the previous layer's units
  H<l>    act(b[j] + S<l>[j])       (no activation after the last layer)

The schedule computes them per vector tile into per-tile buffers laid out [unit, lane], so
each weight is broadcast once per tile and the loops over units stay loops (compact
code that compiles in about a second, instead of thousands of written-out FMAs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tvm import te

from ...ir.mlp_fold import MlpFold
from ...ir.nodes import Node
from .printer import ACTIVATIONS, ElementPrinter


@dataclass
class MlpStages:
    features: list[te.Tensor]
    layers: list[te.Tensor]                      # H0, H1, ... (the last one is the output)
    sums: list[te.Tensor] = field(default_factory=list)   # S1, S2, ...

    @property
    def output(self) -> te.Tensor:
        return self.layers[-1]

    def block_names(self) -> list[str]:
        """Producers before consumers."""
        names = [f"F_v{k}" for k in range(len(self.features))] if len(self.features) > 1 else ["F"]
        names.append("H0")
        for layer in range(1, len(self.layers)):
            names += [f"S{layer}", f"H{layer}"]
        return names


def build_mlp_stages(mlp: Node, dims: tuple, weights: list[te.Tensor],
                     printer: Callable[[tuple], ElementPrinter]) -> MlpStages:
    sizes, activation = mlp.attrs
    fold = MlpFold.of(mlp)
    act = ACTIVATIONS[activation]
    channels = [(feat, c) for feat, _, _, ch in fold.element_parts for c in range(ch)]
    F = te.compute(dims, lambda *i: [printer(i).expr(feat, c) for feat, c in channels], name="F")
    features = list(F) if isinstance(F, (list, tuple)) else [F]
    last = len(sizes) - 2
    w, b = weights[0], weights[1]

    def first(k, *i):
        total = b[k]
        for f, feature in enumerate(features):
            total = total + w[k, f] * feature[i]
        return total if last == 0 else act(total)

    stages = MlpStages(features, [te.compute((sizes[1], *dims), first, name="H0")])
    for layer in range(1, last + 1):
        w, b, h = weights[2 * layer], weights[2 * layer + 1], stages.layers[-1]
        r = te.reduce_axis((0, sizes[layer]), "r")
        s = te.compute((sizes[layer + 1], *dims), lambda j, *i: te.sum(w[j, r] * h[(r, *i)], axis=r), name=f"S{layer}")
        # te.sum ignores init= (TVM_NOTES.md), so the bias is added by the next stage.
        out = (lambda j, *i: b[j] + s[(j, *i)]) if layer == last else (lambda j, *i: act(b[j] + s[(j, *i)]))
        stages.sums.append(s)
        stages.layers.append(te.compute((sizes[layer + 1], *dims), out, name=f"H{layer}"))
    return stages
