"""The IR's element-wise ops as torch functions: the one table every torch-side
evaluator uses (the reference, the tensor-function executor, constant folding).

Non-finite values follow IEEE arithmetic, and a NaN stays NaN through every op (min,
max, relu, sign: torch.sign would give 0), as the compiled backends print them."""
from __future__ import annotations

from typing import Callable

import torch

UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "tanh": torch.tanh, "abs": torch.abs, "sign": lambda x: torch.where(torch.isnan(x), x, torch.sign(x)), "relu": torch.relu, "sigmoid": torch.sigmoid,
    "zero_nonfinite": lambda x: torch.where(torch.isfinite(x), x, torch.zeros_like(x)),
}
BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "min": torch.minimum, "max": torch.maximum,
    "lt": lambda a, b: (a < b).float(), "le": lambda a, b: (a <= b).float(),
    "gt": lambda a, b: (a > b).float(), "ge": lambda a, b: (a >= b).float(),
    "eq": lambda a, b: (a == b).float(), "ne": lambda a, b: (a != b).float(),
}
