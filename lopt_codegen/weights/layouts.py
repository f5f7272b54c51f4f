"""Weight layouts: keys a spec derives from the keys of its weight files when it loads
them, so a checkpoint is read as published. A derived key is the concatenation of file
keys along an axis, optionally transposed: CELO2MLP's per-feature-group first layer
(`w0.0` ... `w0.13`, each (in, out) as Haiku stores it) becomes one (out, in) matrix."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Derived:
    sources: tuple[str, ...]   # file keys, concatenated in this order
    axis: int = 0
    transpose: bool = False


def derived_shape(rule: Derived, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of a derived key from its sources' shapes; ValueError says what does not fit."""
    missing = [k for k in rule.sources if k not in shapes]
    if missing:
        raise ValueError(f"takes {', '.join(missing)}, which the group does not declare")
    first = shapes[rule.sources[0]]
    axis = rule.axis if rule.axis >= 0 else len(first) + rule.axis
    if not 0 <= axis < len(first):
        raise ValueError(f"concatenates along axis {rule.axis}, but {rule.sources[0]} has {len(first)} axes")
    for key in rule.sources[1:]:
        other = shapes[key]
        if len(other) != len(first) or any(a != b for i, (a, b) in enumerate(zip(first, other)) if i != axis):
            raise ValueError(f"cannot concatenate {rule.sources[0]} {list(first)} and {key} {list(other)} "
                             f"along axis {rule.axis}")
    shape = list(first)
    shape[axis] = sum(shapes[k][axis] for k in rule.sources)
    if rule.transpose:
        if len(shape) != 2:
            raise ValueError(f"transposes a {len(shape)}-D value; only matrices can be transposed")
        shape.reverse()
    return tuple(shape)


def apply_layouts(weights: Mapping[str, Mapping[str, torch.Tensor]],
                  layouts: Mapping[str, Mapping[str, Derived]]) -> dict[str, dict[str, torch.Tensor]]:
    """The checked weights with each group's derived keys added."""
    out = {g: dict(keys) for g, keys in weights.items()}
    for group, rules in layouts.items():
        for key, rule in rules.items():
            value = torch.cat([weights[group][k] for k in rule.sources], dim=rule.axis)
            out[group][key] = value.t().contiguous() if rule.transpose else value
    return out
