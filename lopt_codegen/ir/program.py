"""A lowered optimizer: the per-variant dataflow graphs plus what the runtime needs to
bind them (hyperparameters, state layout, MLP and network weights)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .nodes import Level, Node
from ..weights.layouts import Derived
from .network import NetworkIR
from .tensor_function import FunctionIR

VARIANTS = ("factored", "unfactored")
# Accumulator names of scratch values (full-size inputs and results of tensor functions):
# kept in the state like accumulators while a step runs, never saved. Spec names cannot
# start with it.
SCRATCH_PREFIX = "__scratch"


def is_scratch(name: str) -> bool:
    return name.startswith(SCRATCH_PREFIX)


def variant_name(route: str | None, kind: str) -> str:
    """The graph of a kind of tensor ("factored" or "unfactored") on a route."""
    return kind if route is None else f"{route}_{kind}"


def mlp_weight_shapes(sizes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The MLP's weights in order, w0 (out, in), b0 (out,), w1, b1, ..."""
    return [s for n_in, n_out in zip(sizes, sizes[1:]) for s in ((n_out, n_in), (n_out,))]


def is_factored(variant: str) -> bool:
    return variant == "factored" or variant.endswith("_factored")


@dataclass(frozen=True)
class VariantGraph:
    """The step of one kind of tensor: factored (rank >= 2) or unfactored (rank < 2)."""

    accumulators: dict[str, Node]   # name -> value after this step (stored in the state)
    new_param: Node                 # p after this step
    network_input: Node | None      # tensor-level inputs of the network, if any

    def roots(self) -> list[Node]:
        extra = [self.network_input] if self.network_input is not None else []
        return [*self.accumulators.values(), self.new_param, *extra]


@dataclass(frozen=True)
class MlpInfo:
    sizes: tuple[int, ...]
    activation: str
    outputs: tuple[str, ...]
    weight_group: str | None   # None: per-tensor weights from the network
    layers: tuple[str, ...]    # `<layer>.weight` (out, in) and `<layer>.bias` keys


@dataclass(frozen=True)
class Program:
    name: str
    class_name: str
    description: str
    spec_sha256: str
    hyperparameters: dict[str, float | None]
    factored_axes: str | None
    variants: dict[str, VariantGraph]
    state_levels: dict[str, dict[str, tuple[Level, int]]]  # acc -> variant -> (level, channels)
    tensor_functions: dict[str, FunctionIR]
    routes: tuple[tuple[str, Node | None], ...]   # (name, its `when`; None: always), in order; () no routes
    mlp: MlpInfo | None                      # None: no per-element network
    network: NetworkIR | None                # the per-tensor network, if any
    loss_buffer: NetworkIR | None            # the loss buffer's program, if any
    weight_groups: dict[str, dict[str, tuple[int, ...]]]
    weight_ignore: dict[str, tuple[str, ...]]
    weight_layouts: dict[str, dict[str, Derived]]   # keys derived from the files' on load
    builtin_weights: dict[str, dict[str, list]] | None
    weight_hub: dict[str, str] = field(default_factory=dict)   # group -> its Hugging Face Hub repository

    @property
    def needs_loss(self) -> bool:
        return self.loss_buffer is not None
