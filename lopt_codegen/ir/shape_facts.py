"""Numbers known from a parameter's shape alone (the `shape` leaf): every backend asks
here, so that rank, fan_in or size(k) mean the same everywhere."""
from __future__ import annotations

import math


def shape_fact(fact: tuple, shape: tuple[int, ...], axes: tuple[int, int] | None) -> float:
    """The value of `fact` (a `shape` node's attrs) for a parameter of `shape` whose
    factored axes are `axes` (None: unfactored)."""
    kind = fact[0]
    if kind == "rank":
        return float(sum(d > 1 for d in shape))
    if kind == "ndim":
        return float(len(shape))
    if kind == "numel":
        return float(math.prod(shape))
    if kind in ("fan_in", "fan_out"):
        # torch.nn.init._calculate_fan_in_and_fan_out, extended to ndim < 2 (a vector
        # counts as out_features with one input).
        if len(shape) < 2:
            return 1.0 if kind == "fan_in" else float(math.prod(shape))
        receptive = math.prod(shape[2:])
        return float(shape[1 if kind == "fan_in" else 0] * receptive)
    if kind in ("size_d0", "size_d1"):
        if axes is None:
            raise ValueError(f"{kind} of an unfactored tensor of shape {shape}")
        return float(shape[axes[0 if kind == "size_d0" else 1]])
    if kind == "size":
        k = fact[1]
        index = k if k >= 0 else len(shape) + k
        return float(shape[index]) if 0 <= index < len(shape) else 1.0
    raise ValueError(f"unknown shape fact {fact}")
