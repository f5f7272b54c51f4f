"""The IR's element-wise ops as numpy functions on float32 arrays: torch_ops.py's table
for the values of a network on the CPU (network_arrays.py).

The same IEEE arithmetic as torch's: NaN stays NaN through min, max, relu and sign.
Callers run them under np.errstate(all="ignore"): torch warns of nothing."""
from __future__ import annotations

from typing import Callable

import numpy as np

Array = np.ndarray


def _sigmoid(x: Array) -> Array:
    return 1 / (1 + np.exp(-x))   # (an exp that overflows gives 0, as torch's)


def _flag(compare: Callable[[Array, Array], Array]) -> Callable[[Array, Array], Array]:
    return lambda a, b: compare(a, b).astype(np.float32)


UNARY: dict[str, Callable[[Array], Array]] = {
    "neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "rsqrt": lambda x: 1 / np.sqrt(x),
    "tanh": np.tanh, "abs": np.abs, "sign": np.sign, "relu": lambda x: np.maximum(x, np.float32(0)),
    "sigmoid": _sigmoid, "zero_nonfinite": lambda x: np.where(np.isfinite(x), x, np.float32(0)),
}
BINARY: dict[str, Callable[[Array, Array], Array]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power,
    "min": np.minimum, "max": np.maximum,
    "lt": _flag(np.less), "le": _flag(np.less_equal), "gt": _flag(np.greater), "ge": _flag(np.greater_equal),
    "eq": _flag(np.equal), "ne": _flag(np.not_equal),
}
