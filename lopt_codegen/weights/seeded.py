"""Seeded random meta-weights for tests and benchmarks (weights="random")."""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from .check import normalize_groups

_DOT_BIAS = re.compile(r"^(?P<prefix>.*)\.bias$")
_UNDERSCORE_BIAS = re.compile(r"^(?P<prefix>.*)_bias(?P<suffix>.*)$")


def random_weights(groups: Mapping[str, Mapping[str, Any]], seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Uniform random float32 weights in [-b, b] with b = 1 / sqrt(fan_in), like torch.nn.Linear.

    fan_in rule:
      - a bias (a key `<prefix>.bias`, or `<prefix>_bias<suffix>` as in VeLO's `input_bias_`,
        `hidden_bias_.0`) uses the fan_in of its weight (`<prefix>.weight`,
        `<prefix>_weights<suffix>` or `<prefix>_weight<suffix>`) when the group has one;
        this holds for any rank, so VeLO's banked biases (256, 4) get the bound of their
        (256, 4, 30) weights;
      - otherwise fan_in = shape[-1] for rank >= 2, shape[0] for rank 1, 1 for rank 0
        (and at least 1, so empty axes give b = 1).

    Deterministic: each tensor draws from its own torch.Generator seeded with a 64-bit
    blake2b hash of (seed, group, key). The values depend on nothing else (not on the
    order of the groups, not on PYTHONHASHSEED, not on the machine), so adding a key never
    changes the others.
    """
    groups = normalize_groups(groups)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, keys in groups.items():
        out[group] = {}
        for key, shape in keys.items():
            bound = 1.0 / math.sqrt(max(fan_in(key, keys), 1))
            gen = torch.Generator(device="cpu").manual_seed(derived_seed(seed, group, key))
            u = torch.rand(shape, generator=gen, dtype=torch.float32)
            out[group][key] = (u * 2.0 - 1.0) * bound
    return out


def derived_seed(seed: int, group: str, key: str) -> int:
    """A stable 63-bit seed per tensor (Python's hash() is salted per process)."""
    text = f"{int(seed)}\0{group}\0{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def fan_in(key: str, keys: Mapping[str, tuple[int, ...]]) -> int:
    weight = _weight_of(key, keys)
    if weight is not None:
        return keys[weight][-1]
    shape = keys[key]
    return shape[-1] if shape else 1


def _weight_of(key: str, keys: Mapping[str, tuple[int, ...]]) -> str | None:
    """The weight a bias belongs to, if the group has it (and it has an input axis)."""
    candidates = []
    m = _DOT_BIAS.match(key)
    if m:
        candidates.append(f"{m['prefix']}.weight")
    m = _UNDERSCORE_BIAS.match(key)
    if m:
        candidates += [f"{m['prefix']}_weights{m['suffix']}", f"{m['prefix']}_weight{m['suffix']}"]
    return next((c for c in candidates if c in keys and len(keys[c]) >= 1), None)
