"""The runtime every generated optimizer targets."""
from .loader import load_program
from .optimizer import LearnedOptimizer

__all__ = ["LearnedOptimizer", "load_program"]
