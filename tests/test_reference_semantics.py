"""The reference backend's meaning of the language, checked against values computed by
hand: levels and factored reductions, gradient preprocessing, the EMA rule, weight decay."""
from __future__ import annotations

import torch

from lopt_codegen.backends.base import StepBatch, TensorTask
from lopt_codegen.backends.reference import ReferenceBackend
from lopt_codegen.ir import lower_spec
from lopt_codegen.runtime.axes import factored_axes
from lopt_codegen.spec import parse_spec

# A one-feature spec whose MLP is the identity (relu(x) - relu(-x)), so `direction` is the
# feature itself and the update is exactly lr * <feature>.
TEMPLATE = """\
name: probe
class_name: Probe
factored_axes: adafactor
grad: {{expr: "{grad}", nonfinite: {nonfinite}}}
accumulators:
  r: {{ema: {{factored: "mean_d0(g * g)", unfactored: "g * g"}}, decays: [0.5]}}
  c: {{ema: {{factored: "mean_d1(g)", unfactored: "g"}}, decays: [0.25]}}
features:
  normalized: []
  raw: ["{feature}"]
mlp:
  sizes: [1, 2, 1]
  outputs: [direction]
  weights: {{group: w, layers: [a, b]}}
weights:
  groups: {{w: {{a.weight: [2, 1], a.bias: [2], b.weight: [1, 2], b.bias: [1]}}}}
update:
  step: direction
  weight_decay: {wd}
"""
IDENTITY = [torch.tensor([[1.0], [-1.0]]), torch.zeros(2), torch.tensor([[1.0, -1.0]]), torch.zeros(1)]


def step(feature: str, p: torch.Tensor, g: torch.Tensor, *, grad="grad", nonfinite="keep",
         wd_rule="none", lr=1.0, wd=0.0, state=None):
    program = lower_spec(parse_spec(TEMPLATE.format(feature=feature, grad=grad, nonfinite=nonfinite, wd=wd_rule),
                                    "probe.yaml"))
    axes = factored_axes(tuple(p.shape), "adafactor")
    variant = "factored" if axes else "unfactored"
    state = state or {}
    state.setdefault("step", torch.tensor(0.0))
    for name, per in program.state_levels.items():
        if variant in per and name not in state:
            level, ch = per[variant]
            shape = list(p.shape)
            if level.label == "row":
                shape[axes[0]] = 1
            if level.label == "col":
                shape[axes[1]] = 1
            state[name] = torch.zeros([ch, *shape])
    param = p.clone()
    task = TensorTask(param, g, state, {"lr": lr, "weight_decay": wd}, variant, axes)
    ReferenceBackend(program).step(StepBatch([task], mlp_weights=IDENTITY))
    return param, state


def test_row_and_col_statistics_follow_the_factored_axes():
    p = torch.randn(3, 5)  # d0 = axis 1 (largest), d1 = axis 0
    g = torch.randn(3, 5)
    new_p, state = step("r + c", p, g)
    r = 0.5 * (g * g).mean(dim=1, keepdim=True)   # mean over d0 -> one value per row
    c = 0.75 * g.mean(dim=0, keepdim=True)        # mean over d1 -> one value per column
    assert torch.allclose(state["r"][0], r) and torch.allclose(state["c"][0], c)
    assert torch.allclose(new_p, p - (r + c), atol=1e-6)


def test_unfactored_tensor_uses_its_own_variant():
    p, g = torch.randn(4), torch.randn(4)
    new_p, state = step("r", p, g)
    assert set(state) == {"step", "r", "c"} and state["r"].shape == (1, 4)
    assert torch.allclose(new_p, p - 0.5 * g * g, atol=1e-6)


def test_tensor_mean_and_step_level_values():
    p, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    new_p, _ = step("mean(g) * (t + 2) + rank", p, g)
    assert torch.allclose(new_p, p - (g.mean() * 2 + 3), atol=1e-6)


def test_functions_and_comparisons():
    p, g = torch.randn(6), torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0, 3.0])
    new_p, _ = step("where(g > 0, clip(g, -1, 1), sign(g)) + (g == 0.5)", p, g)
    expected = torch.where(g > 0, g.clamp(-1, 1), torch.sign(g)) + (g == 0.5).float()
    assert torch.allclose(new_p, p - expected, atol=1e-6)


def test_gradient_expression_and_nonfinite_zero():
    p = torch.randn(4)
    g = torch.tensor([1.0, float("nan"), float("inf"), -3.0])
    new_p, _ = step("g", p, g, grad="clip(grad, -2, 2)", nonfinite="zero")
    assert torch.allclose(new_p, p - torch.tensor([1.0, 0.0, 0.0, -2.0]))
    kept, _ = step("g", p, g, nonfinite="keep")
    assert torch.isnan(kept[1]) and torch.isinf(kept[2])


def test_weight_decay_rules():
    p, g = torch.randn(5), torch.randn(5)
    lr, wd = 0.1, 0.3
    after, _ = step("g", p, g, wd_rule="after_step", lr=lr, wd=wd)
    p1 = p - lr * g
    assert torch.allclose(after, p1 - lr * wd * p1, atol=1e-7)
    decoupled, _ = step("g", p, g, wd_rule="decoupled", lr=lr, wd=wd)
    assert torch.allclose(decoupled, p - lr * (g + wd * p), atol=1e-7)


def test_ema_uses_and_replaces_the_previous_state():
    p, g = torch.randn(4), torch.randn(4)
    old = torch.rand(1, 4)
    new_p, state = step("prev(r) + r", p, g, state={"r": old.clone()})
    r = 0.5 * old[0] + 0.5 * g * g
    assert torch.allclose(state["r"][0], r)
    assert torch.allclose(new_p, p - (old[0] + r), atol=1e-6)
