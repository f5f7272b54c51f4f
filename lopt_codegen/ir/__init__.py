"""The IR: dataflow graphs with levels and channels, lowering from specs, pass planning."""
from .lower import lower_spec
from .nodes import Level, Node
from .program import VARIANTS, MlpInfo, Program, VariantGraph

__all__ = ["Level", "Node", "Program", "VariantGraph", "MlpInfo", "VARIANTS", "lower_spec"]
