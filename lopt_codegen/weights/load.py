"""load_weights: every accepted form of `source` down to checked float32 tensors per group."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .assign import assign
from .check import check_group, group_origin, normalize_groups
from .errors import WeightGroups, WeightsError, fmt_keys, group_set_problem, layout_hint
from .files import Source, read_path

PathLike = (str, os.PathLike)
TensorLike = (torch.Tensor, np.ndarray)


def load_weights(source: Any, groups: Mapping[str, Mapping[str, Any]],
                 ignore: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Load meta-weights from local files or memory, check them exactly, return float32 CPU tensors.

    `source` is one of:
      - a path (str / os.PathLike) to a .safetensors file, a torch.save state dict
        (.pt / .pth / .bin, read with weights_only=True), a PyLO / Hugging Face hub folder
        (model.safetensors, else pytorch_model.bin; config.json is not needed), or a folder
        holding one hub folder (or weight file) per group. With several groups, sources are
        matched to groups by their key sets, never by folder names; one file may also hold
        every group's keys when the groups' key sets are disjoint;
      - a dict {group: path} (each path as above, for that group alone);
      - a dict {group: {key: tensor or np.ndarray}}, or a flat state dict {key: tensor}.
    URLs and hub ids are never fetched: a missing path is a WeightsError saying what to download.

    `ignore` maps a group to fnmatch patterns of extra keys that are dropped (VeLO_MLP ships
    live copies of its banks). Every other mismatch (missing key, unexpected key, shape,
    integer dtype, unreadable file) raises WeightsError naming the file, the keys and the fix.
    """
    groups = normalize_groups(groups)
    ignore = _normalize_ignore(ignore, groups)
    if isinstance(source, PathLike):
        where = os.fspath(source)
        return _checked(assign(read_path(source, groups), groups, ignore, where), groups)
    if not isinstance(source, Mapping):
        raise WeightsError(f"weights must be a path, a dict {{group: path}} or a dict of tensors, got "
                           f"{type(source).__name__}. Expected {layout_hint(groups)}.")
    if not source:
        raise WeightsError(f"weights is an empty dict. Expected {layout_hint(groups)}.")
    if all(isinstance(v, TensorLike) for v in source.values()):
        # A flat state dict, as torch.load or a model's state_dict() gives it.
        return _checked(assign([Source("the given state dict", source)], groups, ignore,
                               "the given state dict"), groups)
    return _checked(_per_group(source, groups, ignore), groups)


def _per_group(source: Mapping[str, Any], groups: WeightGroups,
               ignore: Mapping[str, Sequence[str]]) -> dict[str, Source]:
    """{group: path or {key: tensor}}: the names are the user's explicit choice, so trust them."""
    problem = group_set_problem(source, groups)
    if problem:
        raise WeightsError(f"the weights dict {problem}; pass exactly the groups "
                           f"{fmt_keys(groups)}, each a path or a dict {{key: tensor}}")
    result = {}
    for g in groups:
        value, one = source[g], {g: groups[g]}
        if isinstance(value, PathLike):
            sources = read_path(value, one)
            where = os.fspath(value)
        elif isinstance(value, Mapping):
            sources, where = [Source(f"the tensors given for weight group '{g}'", value)], "the weights dict"
        else:
            raise WeightsError(f"weights['{g}'] is a {type(value).__name__}; pass a path or a dict "
                               f"{{key: tensor}}. Expected {layout_hint(one)}.")
        result.update(assign(sources, one, ignore, where))
    return result


def _checked(matched: Mapping[str, Source], groups: WeightGroups) -> dict[str, dict[str, torch.Tensor]]:
    return {g: check_group(matched[g].tensors, g, groups[g], group_origin(matched[g].name, g, len(groups)))
            for g in groups}


def _normalize_ignore(ignore: Mapping[str, Sequence[str]] | None, groups: WeightGroups) -> dict[str, list[str]]:
    if ignore is None:
        return {}
    unknown = set(ignore) - set(groups)
    if unknown:
        raise WeightsError(f"ignore names unknown weight group(s) {fmt_keys(unknown)}; "
                           f"the groups are {fmt_keys(groups)}")
    out = {}
    for g, patterns in ignore.items():
        if isinstance(patterns, str):  # a lone pattern would otherwise be split into characters
            patterns = [patterns]
        out[g] = [str(p) for p in patterns]
    return out
