"""Compile-time checks that the declared weight groups fit the MLP and the network."""
from __future__ import annotations

import numpy as np

from ..spec.errors import SpecError
from ..spec.model import Spec
from ..weights.layouts import derived_shape


def group_shapes(spec: Spec, group: str, where) -> dict[str, tuple[int, ...]]:
    """A group's keys and shapes once loaded: its files' keys and the keys its layout derives."""
    files = {k: tuple(v) for k, v in spec.weights.groups.get(group, {}).items()}
    shapes = dict(files)
    for key, rule in spec.weights.layouts.get(group, {}).items():
        if key in files:
            raise SpecError(where, f"weights.layouts.{group}.{key} derives a key the file already has; name it "
                            "differently")
        try:
            shapes[key] = derived_shape(rule, files)
        except ValueError as exc:
            raise SpecError(where, f"weights.layouts.{group}.{key} {exc}") from None
    return shapes


def _declared(spec: Spec, group: str, key: str, shape: tuple[int, ...], where) -> None:
    groups = spec.weights.groups
    if group not in groups:
        raise SpecError(where, f"weight group '{group}' is not declared under weights.groups "
                        f"(declared: {', '.join(groups) or 'none'})")
    weights_mark = spec.marks.get("weights", where)
    shapes = group_shapes(spec, group, weights_mark)
    if key not in shapes:
        raise SpecError(weights_mark, f"weights.groups.{group} lacks '{key}' with shape {list(shape)} "
                        "(declare it, or derive it under weights.layouts)")
    if shapes[key] != tuple(shape):
        what = "layouts" if key in spec.weights.layouts.get(group, {}) else "groups"
        raise SpecError(weights_mark, f"weights.{what}.{group}.{key} has shape {list(shapes[key])}, "
                        f"expected {list(shape)}")


def check_weight_layout(spec: Spec) -> None:
    weights_mark = spec.marks.get("weights")
    for group in spec.weights.layouts:
        if group not in spec.weights.groups:
            raise SpecError(weights_mark, f"weights.layouts.{group}: no such weight group "
                            f"(declared: {', '.join(spec.weights.groups) or 'none'})")
        group_shapes(spec, group, weights_mark)
    for group in spec.weights.hub:
        if group not in spec.weights.groups:
            raise SpecError(weights_mark, f"weights.hub.{group}: no such weight group "
                            f"(declared: {', '.join(spec.weights.groups) or 'none'})")
    unnamed = [g for g in spec.weights.groups if spec.weights.hub and g not in spec.weights.hub]
    if unnamed:   # weights="pretrained" would fetch some groups and not others
        raise SpecError(weights_mark, f"weights.hub names no repository for group(s) {', '.join(unnamed)}: "
                        "name every group's, or none")
    if spec.mlp is not None:
        _check_mlp(spec)
    _check_builtin(spec)


def _check_mlp(spec: Spec) -> None:
    mlp = spec.mlp
    if len(mlp.outputs) != mlp.sizes[-1]:
        raise SpecError(mlp.mark, f"mlp.outputs names {len(mlp.outputs)} values but the last size is {mlp.sizes[-1]}")
    if mlp.weight_group is not None:
        if spec.network is not None and spec.network.mlp:
            raise SpecError(mlp.mark, "the network gives each tensor's MLP weights (network.mlp): write "
                            "`weights: network`")
        if len(mlp.layers) != len(mlp.sizes) - 1:
            raise SpecError(mlp.mark, f"mlp.weights.layers names {len(mlp.layers)} layers, "
                            f"mlp.sizes needs {len(mlp.sizes) - 1}")
        for layer, n_in, n_out in zip(mlp.layers, mlp.sizes, mlp.sizes[1:]):
            _declared(spec, mlp.weight_group, f"{layer}.weight", (n_out, n_in), mlp.mark)
            _declared(spec, mlp.weight_group, f"{layer}.bias", (n_out,), mlp.mark)
    elif spec.network is None or not spec.network.mlp:
        raise SpecError(mlp.mark, "`weights: network` needs a `network` section whose `mlp` gives them")


def _check_builtin(spec: Spec) -> None:
    for group, values in (spec.weights.builtin or {}).items():
        declared = spec.weights.groups.get(group)
        where = spec.marks.get("weights")
        if declared is None or set(values) != set(declared):
            raise SpecError(where, f"weights.builtin.{group} must give exactly the keys of weights.groups.{group}")
        for key, value in values.items():
            shape = np.asarray(value, dtype=np.float32).shape
            if shape != tuple(declared[key]):
                raise SpecError(where, f"weights.builtin.{group}.{key} has shape {list(shape)}, "
                                f"declared {list(declared[key])}")
