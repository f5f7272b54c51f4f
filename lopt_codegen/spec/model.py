"""Typed, validated spec objects. Expressions are parsed (`Expr`) but not yet resolved:
name resolution, channel and level checks happen while lowering to the IR."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..weights.layouts import Derived
from .errors import Mark
from .expr import Expr


@dataclass(frozen=True)
class Variants:
    """An expression that may differ between factored (rank >= 2) and unfactored tensors.
    A missing variant means the name does not exist for that kind of tensor."""

    factored: Expr | None
    unfactored: Expr | None
    mark: Mark

    def get(self, variant: str) -> Expr | None:
        return self.factored if variant == "factored" else self.unfactored


@dataclass(frozen=True)
class Accumulator:
    """State kept across steps, zero before the first. Either the short form, an EMA
    (`ema` with `decays`, one channel per decay), or the general form: `update`, any
    expression of its value before this step, `prev(name)`, and this step's values."""

    name: str
    ema: Variants | None
    decays: tuple[Expr, ...]
    update: Variants | None
    mark: Mark

    @property
    def rule(self) -> Variants:
        return self.ema if self.ema is not None else self.update


@dataclass(frozen=True)
class Function:
    name: str
    args: tuple[str, ...]
    body: Expr
    mark: Mark


@dataclass(frozen=True)
class TensorFunction:
    """A program over whole tensors (matrix products, norms, fixed loops), called from
    expressions like a function; its body is statements (expr.Assign, Loop, Branch,
    Return)."""

    name: str
    args: tuple[str, ...]
    body: tuple
    mark: Mark


@dataclass(frozen=True)
class Mlp:
    sizes: tuple[int, ...]
    activation: str
    outputs: tuple[str, ...]
    weight_group: str | None  # None: the weights come from the network, per tensor
    layers: tuple[str, ...]
    mark: Mark


@dataclass(frozen=True)
class Network:
    """A per-tensor network run once per step over all tensors: `x` is the concatenated
    inputs, one row per tensor; the body (statements) updates the network state and
    sets the outputs; `mlp` gives each tensor's MLP weights (w0, b0, w1, b1, ...)."""

    inputs: tuple[Expr, ...]
    state: dict[str, Expr]      # name -> initial value (a weight, numbers)
    body: tuple
    outputs: tuple[str, ...]
    mlp: tuple[Expr, ...]
    mark: Mark


@dataclass(frozen=True)
class LossBuffer:
    """Step-level statistics of the training loss: state, and a body over `loss` (the
    step's loss) that sets `loss_features`."""

    state: dict[str, Expr]
    body: tuple
    mark: Mark


@dataclass(frozen=True)
class Weights:
    groups: dict[str, dict[str, tuple[int, ...]]]   # the files' keys and shapes
    ignore: dict[str, tuple[str, ...]]
    builtin: dict[str, dict[str, list]] | None
    layouts: dict[str, dict[str, Derived]] = field(default_factory=dict)   # keys derived on load
    hub: dict[str, str] = field(default_factory=dict)   # group -> its Hugging Face Hub repository


@dataclass(frozen=True)
class Spec:
    path: str
    source: str  # the YAML text, hashed into the manifest
    name: str
    class_name: str
    description: str
    hyperparameters: dict[str, float | None]
    factored_axes: str | None
    functions: dict[str, Function]
    tensor_functions: dict[str, TensorFunction]
    grad: Expr
    nonfinite: str
    accumulators: dict[str, Accumulator]
    derived: dict[str, Variants]
    loss_buffer: LossBuffer | None
    network: Network | None
    normalized: tuple[Expr, ...]
    norm_eps: float
    normalize_over: str   # "tensor" or "factored_axes"
    raw_features: tuple[Expr, ...]
    mlp: Mlp | None   # None: a hand-designed rule, no meta-weights
    weights: Weights
    step: Expr | None   # None only in a spec whose routes each have their own
    weight_decay: str
    marks: dict[str, Mark] = field(default_factory=dict)  # section name -> position
    lr_scale: Expr | None = None   # this tensor's learning rate is lr * lr_scale
    routes: tuple["Route", ...] = ()


@dataclass(frozen=True)
class Route:
    """Parameters for which `when` holds (the first route that matches; None: every
    parameter) follow `spec`: the spec with the route's own sections in place."""

    name: str
    when: Expr | None
    spec: Spec
    mark: Mark
