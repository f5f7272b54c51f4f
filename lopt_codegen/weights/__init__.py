"""Meta-weights: read from local files (never the network), check exactly, or draw seeded.

Weights are runtime inputs, never baked into generated code, so one compiled optimizer
serves any checkpoint of its layout. See load_weights for the accepted sources.
"""
from __future__ import annotations

from .check import check_weights
from .errors import WeightGroups, WeightsError
from .load import load_weights
from .seeded import random_weights

__all__ = ["WeightGroups", "WeightsError", "load_weights", "random_weights", "check_weights"]
