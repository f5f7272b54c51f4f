"""Exact key set, shapes and dtypes of loaded meta-weights; the result is float32 CPU."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import WeightGroups, WeightsError, fmt_keys, fmt_shape, group_set_problem, plural

SHOWN_SHAPES = 10


def normalize_groups(groups: Mapping[str, Mapping[str, Any]]) -> WeightGroups:
    """Shapes as tuples of ints (specs give lists); a malformed layout is a caller bug."""
    if not isinstance(groups, Mapping) or not groups:
        raise WeightsError(f"weight groups must be a non-empty dict {{group: {{key: shape}}}}, got {groups!r}")
    out: WeightGroups = {}
    for group, keys in groups.items():
        if not isinstance(keys, Mapping) or not keys:
            raise WeightsError(f"weight group '{group}' must map keys to shapes, got {keys!r}")
        out[group] = {}
        for key, shape in keys.items():
            try:
                dims = tuple(int(n) for n in shape)
            except (TypeError, ValueError):
                dims = (-1,)
            if any(n < 0 for n in dims):
                raise WeightsError(f"weight group '{group}': the shape of '{key}' must be a list of "
                                   f"non-negative ints, got {shape!r}")
            out[group][key] = dims
    return out


def group_origin(origin: str, group: str, n_groups: int) -> str:
    """Name the group in messages only when there is more than one to confuse it with."""
    return origin if n_groups == 1 else f"{origin} (weight group '{group}')"


def check_weights(weights: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Mapping[str, Any]],
                  origin: str) -> dict[str, dict[str, torch.Tensor]]:
    """Check the exact group names, key sets, shapes and dtypes; return float32 CPU copies.

    `origin` names where the weights came from (a file path, "the built-in weights of X")
    and starts every error message. Float16/bfloat16/float64 are converted to float32;
    integer, bool and complex tensors, and non-finite values, are errors.
    """
    groups = normalize_groups(groups)
    if not isinstance(weights, Mapping):
        raise WeightsError(f"{origin}: expected a dict {{group: {{key: tensor}}}}, got {type(weights).__name__}")
    problem = group_set_problem(weights, groups)
    if problem:
        raise WeightsError(f"{origin} {problem}; the optimizer expects exactly the groups "
                           f"{fmt_keys(groups)}, each a dict {{key: tensor}}")
    return {g: check_group(weights[g], g, groups[g], group_origin(origin, g, len(groups))) for g in groups}


def check_group(tensors: Mapping[str, Any], group: str, expected: Mapping[str, tuple[int, ...]],
                origin: str) -> dict[str, torch.Tensor]:
    """One group: every failure of a kind is listed at once, so one fix round is enough."""
    if not isinstance(tensors, Mapping):
        raise WeightsError(f"{origin}: weight group '{group}' must be a dict {{key: tensor}}, "
                           f"got {type(tensors).__name__}")
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise WeightsError(_key_set_message(origin, group, missing, extra))
    converted = {key: as_tensor(tensors[key], key, origin) for key in expected}
    bad_dtype = [k for k, t in converted.items() if not t.is_floating_point()]
    if bad_dtype:
        found = ", ".join(f"'{k}' is {converted[k].dtype}" for k in bad_dtype[:SHOWN_SHAPES])
        raise WeightsError(f"{origin}: meta-weights must be floating point (float32, float16, bfloat16 or "
                           f"float64), but {found}. Save them as floats, e.g. tensor.float().")
    bad_shape = [k for k, t in converted.items() if tuple(t.shape) != expected[k]]
    if bad_shape:
        found = "; ".join(f"'{k}' expected {fmt_shape(expected[k])}, found {fmt_shape(converted[k].shape)}"
                          for k in bad_shape[:SHOWN_SHAPES])
        more = f" ({len(bad_shape)} in all)" if len(bad_shape) > SHOWN_SHAPES else ""
        raise WeightsError(f"{origin}: wrong shape for {plural(len(bad_shape), 'key')} of weight group "
                           f"'{group}': {found}{more}. The checkpoint was trained for a different network "
                           "size: use the checkpoint the spec was written for, or fix the spec's "
                           f"weights.groups.{group}.")
    out = {}
    for key, t in converted.items():
        # A fresh contiguous float32 copy: kernels index it flat, and the caller's tensors
        # (or a numpy array) are never aliased, so neither side can mutate the other.
        t = t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
        if not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise WeightsError(f"{origin}: '{key}' holds {n_bad} NaN/inf values (after conversion to "
                               "float32); the checkpoint is damaged or overflowed, use an intact copy.")
        out[key] = t
    return out


def as_tensor(value: Any, key: str, origin: str) -> torch.Tensor:
    """Accept torch tensors and numpy arrays (state dicts built by hand or by JAX ports)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise WeightsError(f"{origin}: '{key}' is a meta tensor without data; load real weights")
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub":  # ints/bools pass on to the uniform dtype message
            raise WeightsError(f"{origin}: '{key}' is a numpy array of dtype {value.dtype}; meta-weights "
                               "must be floating point. Convert it with array.astype(np.float32).")
        # torch.from_numpy refuses big-endian arrays (e.g. read from some .npz exports)
        return torch.from_numpy(np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="), copy=False)))
    raise WeightsError(f"{origin}: '{key}' is a {type(value).__name__}, not a tensor; pass torch tensors "
                       "or numpy arrays (a state dict {key: tensor})")


def _key_set_message(origin: str, group: str, missing: set[str], extra: set[str]) -> str:
    parts = []
    if missing:
        parts.append(f"lacks {plural(len(missing), 'key')} of weight group '{group}': {fmt_keys(missing)}")
    if extra:
        parts.append(f"has {plural(len(extra), 'unexpected key')}: {fmt_keys(extra)}")
    fix = ("This is not the checkpoint the spec describes: check the path points at the right "
           "weights (a missing key is never filled with a random init)")
    if extra:
        fix += (f"; if the unexpected keys are harmless extras, list fnmatch patterns for them under "
                f"the spec's weights.ignore.{group}")
    return f"{origin} {' and '.join(parts)}. {fix}."
