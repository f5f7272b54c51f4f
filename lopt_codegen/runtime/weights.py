"""Turn the user's `weights=` argument into checked float32 tensors for a program."""
from __future__ import annotations

from typing import Any

import torch

from ..ir.program import Program
from ..weights import check_weights, load_weights, random_weights
from ..weights.hub import pretrained_folders
from ..weights.layouts import apply_layouts


def resolve_weights(program: Program, weights: Any, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """The checked weights of each group, as its files hold them, plus the keys its layout derives."""
    return apply_layouts(_file_weights(program, weights, seed), program.weight_layouts)


def _file_weights(program: Program, weights: Any, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    groups = program.weight_groups
    if not groups:
        if weights is not None:
            raise ValueError(f"{program.class_name} has no meta-weights (its spec declares no weight groups): "
                             f"remove weights={weights!r}")
        return {}
    ignore = {g: list(p) for g, p in program.weight_ignore.items()}
    if weights is None and program.weight_hub:
        weights = "pretrained"   # the default where the spec names the repositories (of every group)
    if weights is None:
        if program.builtin_weights is None:
            raise ValueError(
                f"{program.class_name} needs meta-weights: weights=<path> (a PyLO hub folder with "
                f"config.json + model.safetensors, a .safetensors or torch state-dict file"
                + (", or a folder holding one such folder per group: " + ", ".join(groups) if len(groups) > 1 else "")
                + "), or weights='random' (seeded by seed=, for tests and benchmarks)")
        builtin = {g: {k: torch.tensor(v, dtype=torch.float32) for k, v in keys.items()}
                   for g, keys in program.builtin_weights.items()}
        return check_weights(builtin, groups, f"the built-in weights of {program.name}")
    if isinstance(weights, str) and weights == "random":
        return random_weights(groups, seed)
    if isinstance(weights, str) and weights == "pretrained":
        if not program.weight_hub:
            raise ValueError(f"{program.class_name} has no published weights (its spec's weights.hub names no "
                             "repository): pass weights=<path>")
        return load_weights(pretrained_folders(program.weight_hub), groups, ignore)
    return load_weights(weights, groups, ignore)
