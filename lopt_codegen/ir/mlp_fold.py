"""How a spec's MLP takes its input, for the compiled backends: the input concat splits
into element features, which enter the first layer through its weights (columns scaled
by a tensor- or step-level factor where the feature is `x * s`), and parts at tensor
level or coarser, which fold into its bias. The fold itself runs once per tensor and
step (GroupValues.fold_mlp), so the per-element work sees only the element features.
"""
from __future__ import annotations

from dataclasses import dataclass

from .nodes import Level, Node


@dataclass(frozen=True)
class MlpFold:
    """How the MLP input concat splits: element features enter layer 1 through
    W1' = W1[:, cols] * s (s a tensor/step-level scale, or 1); parts at tensor/step
    level are folded into its bias. Computed once per tensor per step in torch."""

    element_parts: tuple[tuple[Node, Node | None, int, int], ...]  # (feature, scale, column, channels)
    bias_parts: tuple[tuple[Node, int], ...]                       # (value, column)

    @staticmethod
    def of(mlp: Node) -> "MlpFold":
        concat = mlp.args[0]
        parts = concat.args if concat.op == "concat" else (concat,)
        element, bias, col = [], [], 0
        for part in parts:
            if part.level <= Level.TENSOR:
                bias.append((part, col))
            elif part.op == "mul" and min(a.level for a in part.args) <= Level.TENSOR:
                x, s = sorted(part.args, key=lambda a: a.level, reverse=True)
                element.append((x, s, col, part.channels))
            else:
                element.append((part, None, col, part.channels))
            col += part.channels
        return MlpFold(tuple(element), tuple(bias))

    @property
    def features(self) -> int:
        return sum(ch for _, _, _, ch in self.element_parts)

    def layer_shapes(self, sizes: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Shapes of [W1', b1', W2, b2, ...] as the kernels take them."""
        sizes = (self.features, *sizes[1:])
        return [s for i in range(len(sizes) - 1) for s in ((sizes[i + 1], sizes[i]), (sizes[i + 1],))]
