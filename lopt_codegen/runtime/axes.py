"""Which two axes of a rank >= 2 tensor are factored (shared/ALGORITHMS.md)."""
from __future__ import annotations


def factored_axes(shape: tuple[int, ...], rule: str | None) -> tuple[int, int] | None:
    """(d0, d1): d0 the largest axis, d1 the second largest, by a stable argsort (so on a
    tie the lower index is d1). The `velo` rule swaps them on a tie, except for a 4-D
    tensor tied on axes (0, 1). `last_two` (torch.optim.Adafactor's): d0 the last axis,
    d1 the one before. None (unfactored) for rank < 2 or without a rule."""
    if rule is None or len(shape) < 2:
        return None
    if rule == "last_two":
        return len(shape) - 1, len(shape) - 2
    order = sorted(range(len(shape)), key=lambda i: shape[i])  # sorted() is stable
    d0, d1 = order[-1], order[-2]
    if rule == "velo" and shape[d0] == shape[d1] and not (len(shape) == 4 and {d0, d1} == {0, 1}):
        d0, d1 = d1, d0
    return d0, d1
