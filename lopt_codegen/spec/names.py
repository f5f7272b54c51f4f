"""The language's own vocabulary: built-in names and functions, each with its level and
meaning. One table, read by the parser (arity, reserved names), the lowering, and
docs/spec-language.md (a test keeps the document's tables equal to these)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Builtin:
    level: str     # how many values: element, tensor or step
    meaning: str


BUILTIN_NAMES: dict[str, Builtin] = {
    "grad": Builtin("element", "the raw gradient (float32), after `grad.nonfinite`"),
    "g": Builtin("element", "the gradient the rule uses: `grad.expr` (default `grad`)"),
    "p": Builtin("element", "the parameter before this step (float32)"),
    "t": Builtin("step", "the step count: 0 at the first step"),
    "rank": Builtin("tensor", "the number of axes of size > 1 (a (1, 16) weight has rank 1)"),
    "ndim": Builtin("tensor", "the number of axes (a (1, 16) weight has ndim 2)"),
    "numel": Builtin("tensor", "the number of elements"),
    "fan_in": Builtin("tensor", "torch's fan_in: size(1) times the product of axes 2.. (Linear: in_features; "
                      "Conv: in_channels / groups * kernel size); 1 for ndim < 2"),
    "fan_out": Builtin("tensor", "torch's fan_out: size(0) times the product of axes 2.. (Linear: "
                       "out_features); numel for ndim < 2"),
    "size_d0": Builtin("tensor", "the size of the factored axis d0 (factored tensors only)"),
    "size_d1": Builtin("tensor", "the size of the factored axis d1 (factored tensors only)"),
    "loss_features": Builtin("step", "the loss buffer's features (needs `loss_buffer`)"),
    "width_mult": Builtin("tensor", "μP: the parameter's `infshape.width_mult()` (mup.set_base_shapes) if it "
                          "has one, else its param group's `width_mult`, else 1"),
    "inf_dims": Builtin("tensor", "μP: the parameter's `infshape.ninf()` (its axes that grow with the width: 2 "
                        "for hidden matrices) if it has one, else its param group's `inf_dims`, else 0"),
}

# The shape facts among the names: tensor-level values known from the shape alone.
SHAPE_FACTS = ("rank", "ndim", "numel", "fan_in", "fan_out", "size_d0", "size_d1")
# Per-parameter values the runtime reads from the parameter (mup's infshape) or its group.
PARAMETER_VALUES = {"width_mult": 1.0, "inf_dims": 0.0}   # name -> the value without either


@dataclass(frozen=True)
class BuiltinFunction:
    args: tuple[str, ...]
    meaning: str

    @property
    def arity(self) -> int:
        return len(self.args)


FUNCTIONS: dict[str, BuiltinFunction] = {
    "rsqrt": BuiltinFunction(("x",), "1 / sqrt(x)"),
    "sqrt": BuiltinFunction(("x",), "square root"),
    "exp": BuiltinFunction(("x",), "e ** x"),
    "log": BuiltinFunction(("x",), "natural logarithm"),
    "tanh": BuiltinFunction(("x",), "hyperbolic tangent"),
    "abs": BuiltinFunction(("x",), "absolute value"),
    "sign": BuiltinFunction(("x",), "-1, 0 or 1: the sign of x"),
    "relu": BuiltinFunction(("x",), "max(x, 0)"),
    "sigmoid": BuiltinFunction(("x",), "1 / (1 + exp(-x))"),
    "clip": BuiltinFunction(("x", "lo", "hi"), "min(max(x, lo), hi)"),
    "min": BuiltinFunction(("a", "b"), "the smaller of a and b"),
    "max": BuiltinFunction(("a", "b"), "the larger of a and b"),
    "where": BuiltinFunction(("c", "a", "b"), "a where c is not 0, else b"),
    "mean": BuiltinFunction(("x",), "the mean over the whole tensor: one value per tensor"),
    "sum": BuiltinFunction(("x",), "the sum over the whole tensor: mean(x) * numel"),
    "mean_d0": BuiltinFunction(("x",), "the mean over the factored axis d0 (row statistics)"),
    "mean_d1": BuiltinFunction(("x",), "the mean over the factored axis d1 (column statistics)"),
    "sum_d0": BuiltinFunction(("x",), "the sum over d0: mean_d0(x) * size_d0"),
    "sum_d1": BuiltinFunction(("x",), "the sum over d1: mean_d1(x) * size_d1"),
    "size": BuiltinFunction(("k",), "the size of axis k (a whole number; negative counts from the last "
                            "axis); 1 where the tensor has no axis k"),
    "channel": BuiltinFunction(("x", "k"), "channel k of x (a whole number from 0): one channel"),
    "prev": BuiltinFunction(("acc",), "an accumulator's value before this step"),
}

# Names a spec may not define for itself.
RESERVED = frozenset(BUILTIN_NAMES)
# Names a hyperparameter may not take: the generated constructor's own arguments, what
# its body calls, and the param-group keys torch.optim and its LR schedulers keep.
CONSTRUCTOR_NAMES = frozenset({"self", "params", "weights", "seed", "backend", "shard", "reduce_grads", "super",
                               "initial_lr"})
# Names of the generated module that a class name would shadow.
MODULE_NAMES = frozenset({"Any", "LearnedOptimizer", "load_program", "annotations"})
