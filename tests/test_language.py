"""The language's second-generation parts: shape facts (numel, fan_in, fan_out, size(k),
...), sums, general accumulators (`update:`), optional MLP; and their errors. The
reference backend is checked against plain torch written here; every compiled backend
against the reference."""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import SHAPES
from lopt_codegen.ir import lower_spec
from lopt_codegen.ir.nodes import Level, topo_order
from lopt_codegen.ir.shape_facts import shape_fact
from lopt_codegen.runtime.axes import factored_axes
from lopt_codegen.spec import SpecError, load_spec, parse_spec
from test_examples import BACKENDS, SimtBackend, assert_updates_match, compile_and_import, run_against_oracle

# Every shape fact and sum in one rule; `count` is a tensor-level accumulator in the
# general form, `peak` an element-level one reading another accumulator.
FACTS_SPEC = """\
name: facts
class_name: Facts
hyperparameters:
  lr: 0.01
  width: 2.0
factored_axes: adafactor
accumulators:
  count: {update: "prev(count) + 1"}
  v: {ema: g * g, decays: [0.5]}
  peak: {update: "max(prev(peak), abs(g))"}
  row:
    update: {factored: "0.5 * prev(row) + sum_d0(g * g) / size_d0", unfactored: "sum(g * g) / numel"}
derived:
  shape_mix:
    factored: fan_in / fan_out + size(-1) + 10 * ndim + 100 * rank + size_d1 / size_d0 + size(7)
    unfactored: fan_in / fan_out + size(-1) + 10 * ndim + 100 * rank + size(7)
  line:
    factored: sum_d1(g) / numel + row
    unfactored: sum(g) / numel + row
update:
  step: width * (g * rsqrt(v + 1e-8) + peak + line) * shape_mix / count
"""


def _fan(shape: tuple[int, ...]) -> tuple[float, float]:
    if len(shape) < 2:
        return 1.0, float(math.prod(shape))
    return tuple(float(x) for x in torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape)))


class FactsOracle(torch.optim.Optimizer):
    """FACTS_SPEC's rule in plain torch, from the language reference's definitions."""

    def __init__(self, params, lr: float = 0.01, width: float = 2.0):
        super().__init__(params, dict(lr=lr, width=width))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g, shape = p.grad, tuple(p.shape)
                st = self.state[p]
                axes = factored_axes(shape, "adafactor")
                st["count"] = st.get("count", 0) + 1
                st["v"] = 0.5 * st.get("v", torch.zeros_like(p)) + 0.5 * g * g
                st["peak"] = torch.maximum(st.get("peak", torch.zeros_like(p)), g.abs())
                fan_in, fan_out = _fan(shape)
                mix = fan_in / fan_out + (shape[-1] if shape else 1) + 10 * len(shape) + 100 * sum(d > 1 for d in shape)
                mix += (shape[7] if len(shape) > 7 else 1)
                if axes is None:
                    st["row"] = (g * g).sum() / g.numel()
                    line = g.sum() / g.numel() + st["row"]
                else:
                    d0, d1 = axes
                    st["row"] = 0.5 * st.get("row", 0.0) + (g * g).sum(d0, keepdim=True) / shape[d0]
                    line = g.sum(d1, keepdim=True) / g.numel() + st["row"]
                    mix += shape[d1] / shape[d0]
                step = group["width"] * (g * torch.rsqrt(st["v"] + 1e-8) + st["peak"] + line) * mix / st["count"]
                p.sub_(group["lr"] * step)


def _compiled(tmp_path_factory, name: str, text: str) -> type:
    """The optimizer class of spec `text`, compiled by the CLI as <name>.yaml and imported."""
    out = tmp_path_factory.mktemp(name)
    (out / f"{name}.yaml").write_text(text)
    return compile_and_import(str(out), f"lopt_{name}", [str(out / f"{name}.yaml")])[name]


@pytest.fixture(scope="session")
def facts(tmp_path_factory) -> type:
    return _compiled(tmp_path_factory, "facts", FACTS_SPEC)


@pytest.mark.parametrize("shape", [(5, 3), (3, 5, 2), (4, 2, 3, 3), (1, 6), (6, 1), (2, 1, 3, 1)])
def test_fan_in_and_fan_out_are_torchs(shape):
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert shape_fact(("fan_in",), shape, None) == fan_in and shape_fact(("fan_out",), shape, None) == fan_out


def test_shape_facts_of_vectors_and_scalars():
    assert [shape_fact((f,), (7,), None) for f in ("fan_in", "fan_out", "numel", "ndim", "rank")] == [1, 7, 7, 1, 1]
    assert [shape_fact((f,), (), None) for f in ("fan_in", "fan_out", "numel", "ndim", "rank")] == [1, 1, 1, 0, 0]
    assert [shape_fact(("size", k), (2, 3, 4), None) for k in (0, 2, -1, -3, 3, -4)] == [2, 4, 4, 2, 1, 1]
    assert shape_fact(("size_d0",), (2, 3, 4), (2, 1)) == 4 and shape_fact(("size_d1",), (2, 3, 4), (2, 1)) == 3


def test_general_accumulators_take_their_rules_level(facts):
    levels = facts.program.state_levels
    assert levels["count"]["factored"] == (Level.TENSOR, 1) == levels["count"]["unfactored"]
    assert levels["peak"]["factored"] == (Level.ELEMENT, 1)
    assert levels["row"]["factored"] == (Level.ROW, 1) and levels["row"]["unfactored"] == (Level.TENSOR, 1)


@pytest.mark.parametrize("backend", ["reference"])
def test_reference_matches_the_definitions(facts, backend):
    assert_updates_match(run_against_oracle(facts, FactsOracle, {}, backend, steps=6), "facts vs torch")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_compiled_backends_match_the_reference(facts, backend):
    def reference(params, **hyper):
        return facts(params, backend="reference", **hyper)

    assert_updates_match(run_against_oracle(facts, reference, {"width": 3.0}, backend, steps=6,
                                            shapes=SHAPES + [(40, 3, 36), (70, 45)]), f"facts on {backend}")


def test_per_group_values_reach_the_rule(facts):
    """A hyperparameter is a per-group value: μP's width multiplier set per param group."""
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = facts([{"params": [p], "width": 1.0}, {"params": [q], "width": 4.0}], backend="reference")
    p.grad, q.grad = torch.full((3,), 0.5), torch.full((3,), 0.5)
    opt.step()
    assert torch.allclose(1 - q.detach(), 4 * (1 - p.detach()))


BASE = """\
name: tiny
class_name: Tiny
factored_axes: adafactor
accumulators:
  m: {ema: g, decays: [0.9]}
update:
  step: m
"""


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        lower_spec(parse_spec(text, "tiny.yaml"))
    return info.value


def with_line(line_no: int, new: str) -> str:
    lines = BASE.splitlines()
    lines[line_no - 1] = new
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("line_no, new, where, message", [
    (5, "  m: {ema: g, update: g}", "tiny.yaml:5:6", "give either `ema:` with `decays:`"),
    (5, "  m: {}", "tiny.yaml:5:6", "give either `ema:` with `decays:`"),
    (5, "  m: {ema: g}", "tiny.yaml:5:6", "`ema:` needs `decays:`"),
    (5, "  m: {update: g, decays: [0.9]}", "tiny.yaml:5:18", "`decays:` goes with `ema:`"),
    (5, "  m: {update: prev(m)}", "tiny.yaml:5:15", "the update of 'm' is prev(m): it never changes"),
    (5, "  m: {update: m + g}", "tiny.yaml:5:15", "cycle in definitions: m -> m"),
    (7, "  step: m * size(1.5)", "tiny.yaml:7:18", "size() takes an axis number"),
    (7, "  step: m * size(g)", "tiny.yaml:7:18", "size() takes an axis number"),
    (7, "  step: m * size_d0", "tiny.yaml:7:13", "size_d0 is the size of a factored axis"),
    (7, "  step: sum_d1(m)", "tiny.yaml:7:9", "mean_d1 needs a factored tensor"),
    (7, "  step: direction", "tiny.yaml:7:9", "unknown name 'direction'"),
    (3, "factored_axes: first_two", "tiny.yaml:3:16", "expected one of adafactor, velo, last_two"),
])
def test_errors_point_at_the_culprit(line_no, new, where, message):
    err = error_of(with_line(line_no, new))
    assert str(err).startswith(where) and message in str(err), str(err)


def test_channel_picks_one_channel():
    program = lower_spec(parse_spec(with_line(7, "  step: channel(m * [1, 2], 1)"), "tiny.yaml"))
    step = [n for g in program.variants.values() for n in topo_order(g.roots()) if n.op == "channel"]
    assert step and all(n.attrs == (1,) and n.channels == 1 for n in step)
    for k in ("2", "-1", "0.5"):
        err = error_of(with_line(7, f"  step: channel(m * [1, 2], {k})"))
        assert str(err).startswith("tiny.yaml:7:29") and "k is a whole number from 0 to 1" in str(err), str(err)


def extends_error(tmp_path, base: str, child: str) -> SpecError:
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "child.yaml").write_text(child)
    with pytest.raises(SpecError) as info:
        lower_spec(load_spec(str(tmp_path / "child.yaml")))
    return info.value


POWERS_SPEC = """\
name: powers
class_name: Powers
hyperparameters:
  lr: 0.01
factored_axes: adafactor
accumulators:
  v: {ema: g * g, decays: [0.5]}
update:
  step: "g * (v + 1e-3) ** -0.5 + (v + 1) ** 0.5 + g ** 2 + (v + 1) ** -1 + g ** 1 + (v + 2) ** 0.7 + 2 ** 3 * g"
"""


class PowersOracle(torch.optim.Optimizer):
    """POWERS_SPEC's rule with torch.pow for every power."""

    def __init__(self, params, lr: float = 0.01):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g, st = p.grad, self.state[p]
                st["v"] = 0.5 * st.get("v", torch.zeros_like(p)) + 0.5 * g * g
                v = st["v"]
                step = (g * torch.pow(v + 1e-3, -0.5) + torch.pow(v + 1, 0.5) + torch.pow(g, 2) + torch.pow(v + 1, -1)
                        + torch.pow(g, 1) + torch.pow(v + 2, 0.7) + 2.0 ** 3 * g)
                p.sub_(group["lr"] * step)


@pytest.fixture(scope="session")
def powers(tmp_path_factory) -> type:
    return _compiled(tmp_path_factory, "powers", POWERS_SPEC)


def test_usual_powers_lower_to_vector_instructions(powers):
    """x ** -0.5, 0.5, 2, -1, 1 as rsqrt, sqrt, a multiply, a divide, x itself (the CPU
    kernels would call powf a lane at a time); other exponents, and powers of numbers,
    stay powers."""
    for graph in powers.program.variants.values():
        nodes = topo_order(graph.roots())
        assert sorted((n.args[0].op, n.args[1].attrs) for n in nodes if n.op == "pow") == [("add", (0.7,)),
                                                                                       ("const", (3.0,))]
        assert {"rsqrt", "sqrt", "div"} <= {n.op for n in nodes}


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_usual_powers_match_torch_pow(powers, backend):
    shapes = [(), (7,), (5, 3), (2, 3, 4), (33,)]
    assert_updates_match(run_against_oracle(powers, PowersOracle, {}, backend, shapes=shapes, steps=3),
                         f"powers on {backend}")


def test_extends_merges_mappings_and_removes_keys(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE + "hyperparameters:\n  beta: 0.5\n  gone: 1\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\nclass_name: Child\nhyperparameters:\n  lr: 0.25\n  gone: !remove\n"
        "accumulators:\n  m: {decays: [beta]}\n")
    child, base = (lower_spec(load_spec(str(tmp_path / f"{n}.yaml"))) for n in ("child", "base"))
    assert (child.name, child.class_name) == ("child", "Child")
    assert child.hyperparameters == {**{k: v for k, v in base.hyperparameters.items() if k != "gone"}, "lr": 0.25}
    assert list(child.hyperparameters) == [k for k in base.hyperparameters if k != "gone"]   # the base's order
    decays = [n for g in child.variants.values() for n in topo_order(g.roots()) if n.op == "hyper"]
    assert any(n.attrs == ("beta",) for n in decays)
    assert child.spec_sha256 != base.spec_sha256
    # a change to the base changes the child's hash (its generated code is then stale)
    before = child.spec_sha256
    (tmp_path / "base.yaml").write_text((tmp_path / "base.yaml").read_text() + "# edited\n")
    assert lower_spec(load_spec(str(tmp_path / "child.yaml"))).spec_sha256 != before


@pytest.mark.parametrize("base, child, where, message", [
    (BASE, "extends: nothere.yaml\nname: c\nclass_name: C\n", "child.yaml:1:1", "extends: cannot read"),
    ("extends: child.yaml\nname: b\nclass_name: B\n", "extends: base.yaml\nname: c\nclass_name: C\n",
     "base.yaml:1:1", "extends this spec back (a cycle)"),
    (BASE, "extends: base.yaml\nname: c\nclass_name: C\nfunctions: !remove\n", "child.yaml:4:12",
     "'functions' is not in the spec"),
    (BASE, "extends: base.yaml\nname: c\nclass_name: C\nupdate:\n  step: !remove\n", "child.yaml:", "step"),
    (BASE + "hyperparameters:\n  lr: !remove\n", "extends: base.yaml\nname: c\nclass_name: C\n", "base.yaml:9:7",
     "there is none here"),
    (BASE, "extends: 3\n", "child.yaml:1:1", "extends: the path of the spec"),
    (BASE, "extends: base.yaml\nname: c\n", "child.yaml:1:1", "needs its own `class_name`"),
    (BASE, "extends: base.yaml\nname: c\nclass_name: C\nupdate: !remove {step: m}\n", "child.yaml:4:9",
     "!remove stands alone"),
    (BASE, "extends: base.yaml\nname: c\nclass_name: C\nupdate: !remove m\n", "child.yaml:4:9",
     "!remove stands alone"),
])
def test_extends_errors(tmp_path, base, child, where, message):
    err = extends_error(tmp_path, base, child)
    assert str(err).startswith(str(tmp_path / where)) and message in str(err), str(err)


def test_mlp_and_features_go_together():
    err = error_of(BASE + "features:\n  normalized: [g]\n")
    assert str(err).startswith("tiny.yaml:8:1") and "`features` goes with `mlp`" in str(err)
    mlp = "mlp:\n  sizes: [1, 1]\n  outputs: [d]\n  weights: {group: w, layers: [l]}\n"
    err = error_of(BASE + mlp)
    assert str(err).startswith("tiny.yaml:8:1") and "`mlp` goes with `features`" in str(err)


def test_a_flow_list_that_split_an_expression_says_to_quote_it():
    text = BASE + "derived:\n  x: m\nmlp:\n  sizes: [1, 1]\n  outputs: [d]\n  weights: {group: w, layers: [l]}\n" \
        "features:\n  normalized: [g, clip(g, -0.1, 0.1)]\n"
    err = error_of(text)
    assert str(err).startswith("tiny.yaml:15:19") and "quote each expression that holds commas" in str(err)
    quoted = text.replace("[g, clip(g, -0.1, 0.1)]", "[g, \"clip(g, -0.1, 0.1)\"]")
    assert "quote" not in str(error_of(quoted))   # it parses; the missing weight group is next


def test_spec_without_mlp_lowers_with_no_weights():
    program = lower_spec(parse_spec(BASE, "tiny.yaml"))
    assert program.mlp is None and program.weight_groups == {}
    assert not any(n.op == "mlp" for g in program.variants.values() for n in g.roots())


def test_language_reference_tables_match_the_compiler():
    from conftest import ROOT
    from lopt_codegen.spec.doc_tables import rewrite, stale_tables

    path = f"{ROOT}/docs/spec-language.md"
    text = open(path, encoding="utf-8").read()
    assert stale_tables(text) == [], "run: python -m lopt_codegen.spec.doc_tables docs/spec-language.md"
    assert stale_tables(text.replace("| `numel` |", "| `nmel` |")) == ["names"]   # the check can fail
    assert rewrite(text.replace("| `numel` |", "| `nmel` |")) == text
    readme = open(f"{ROOT}/README.md", encoding="utf-8").read()
    assert "docs/spec-language.md" in readme


# Tensor functions: a scalar result from a full-size argument (a cut like a reduction),
# one from single numbers only (small work), a full-size result read by a later pass,
# branches on the shape, a loop counted by a hyperparameter, axis reductions.
PROGRAMS_SPEC = """\
name: programs
class_name: Programs
hyperparameters:
  lr: 0.01
  rounds: 2
accumulators:
  m: {ema: g, decays: [0.5]}
tensor_functions:
  spread:
    args: [G]
    body: |
      X = matrix(G)
      return norm(X) / sqrt(numel) + mean(sum(X * X, 1)) + norm(mean(X, 0))
  scaled:
    args: [s]
    body: "return 2 * s + fan_in"
  smooth:
    args: [G, s]
    body: |
      X = matrix(G)
      if size(0) > 2:
          X = X - mean(X, 0)
      else:
          X = X * 0.5
      for _ in range(rounds):
          X = X + s * (X @ transpose(X)) @ X / (norm(X) ** 3 + 1)
      return unmatrix(X) + G * t
update:
  step: smooth(m, scaled(lr)) / (1 + spread(g))
"""


class ProgramsOracle(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.01, rounds: float = 2):
        super().__init__(params, dict(lr=lr, rounds=rounds))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                t = st.get("t", 0)
                st["t"] = t + 1
                m = st["m"] = 0.5 * st.get("m", torch.zeros_like(p)) + 0.5 * p.grad
                rows = p.shape[0] if p.dim() else 1
                x = p.grad.reshape(rows, -1)
                spread = x.norm() / math.sqrt(p.numel()) + (x * x).sum(1).mean() + x.mean(0).norm()
                s = 2 * group["lr"] + _fan(tuple(p.shape))[0]
                y = m.reshape(rows, -1)
                y = y - y.mean(0, keepdim=True) if rows > 2 else y * 0.5
                for _ in range(int(group["rounds"])):
                    y = y + s * (y @ y.T) @ y / (y.norm() ** 3 + 1)
                step = (y.reshape(p.shape) + m * t) / (1 + spread)
                p.sub_(group["lr"] * step)


@pytest.fixture(scope="session")
def programs_class(tmp_path_factory) -> type:
    return _compiled(tmp_path_factory, "programs", PROGRAMS_SPEC)


def test_tensor_functions_on_the_reference_match_torch(programs_class):
    assert_updates_match(run_against_oracle(programs_class, ProgramsOracle, {"rounds": 3}, "reference", steps=6),
                         "programs vs torch")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_tensor_functions_on_compiled_backends(programs_class, backend):
    def reference(params, **hyper):
        return programs_class(params, backend="reference", **hyper)

    shapes = SHAPES + [(3, 5), (3, 5), (40, 3, 36)]   # a group of two; tiles of a bigger tensor
    assert_updates_match(run_against_oracle(programs_class, reference, {}, backend, steps=6, shapes=shapes),
                         f"programs on {backend}")


def test_tensor_function_results_are_planned_between_passes(programs_class):
    from lopt_codegen.ir.plan import plan_program

    (plan,) = plan_program(programs_class.program).values()
    assert [sorted(c.attrs[0] for c in p.calls) for p in plan.passes] == [[], ["smooth", "spread"]]
    scratch = [n for n in programs_class.program.state_levels if n.startswith("__scratch")]
    assert len(scratch) == 2 and all(n in plan.passes[0].writes or n in plan.passes[1].reads for n in scratch)


def test_scratch_values_are_not_saved_and_a_resumed_run_continues_exactly(programs_class):
    def run(opt, params, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    start = [torch.randn(4, 3), torch.randn(5)]
    a = [torch.nn.Parameter(x.clone()) for x in start]
    opt_a = programs_class(a, backend="tvm")
    run(opt_a, a, 3, 0)
    saved = opt_a.state_dict()
    assert all(not k.startswith("__") for s in saved["state"].values() for k in s)
    assert any(k.startswith("__") for s in opt_a.state.values() for k in s)   # the live state keeps them
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_b = programs_class(b, backend="tvm")
    opt_b.load_state_dict(saved)
    run(opt_a, a, 2, 1)
    run(opt_b, b, 2, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


FUNCTION_BASE = """\
name: tiny
class_name: Tiny
hyperparameters:
  k: 2
tensor_functions:
  f:
    args: [G]
    body: |
      X = matrix(G)
      return unmatrix(X)
update:
  step: f(g)
"""


def test_a_number_known_from_the_shape_ends_with_its_branch():
    """`n` set from rows() inside a branch does not outlive it: a later `n` is a new name."""
    body = "      if size(0) > 1:\n          n = rows(X)\n          X = X / n\n      n = norm(X)\n      X = X / n\n"
    lines = FUNCTION_BASE.splitlines()
    lines.insert(9, body.rstrip("\n"))
    program = lower_spec(parse_spec("\n".join(lines) + "\n", "tiny.yaml"))
    assert [st[0] for st in program.tensor_functions["f"].body] == ["set", "if", "set", "set", "return"]


@pytest.mark.parametrize("body_line, where, message", [
    ("      Y = X @ G", "tiny.yaml:10:11", "@ multiplies two matrices (or two batches), got a matrix and a element"),
    ("      Y = X + G", "tiny.yaml:10:11", "mixes values of different kinds (element, matrix)"),
    ("      Y = matrices(G)", "tiny.yaml:10:11", "matrices() needs a factored tensor"),
    ("      Y = rows(G)", "tiny.yaml:10:11", "rows() takes a matrix, got a element"),
    ("      n = rows(X)\n      n = norm(X)", "tiny.yaml:11:7", "'n' holds a number known from the shape"),
    ("      Y = transpose(G)", "tiny.yaml:10:11", "transpose() takes a matrix"),
    ("      Y = q", "tiny.yaml:10:11", "unknown name 'q' in tensor function 'f'"),
    ("      Y = mean_d0(X)", "tiny.yaml:10:11", "unknown function 'mean_d0' in a tensor function"),
    ("      Y = norm(X, 2)", "tiny.yaml:10:19", "a matrix has axes 0 and 1"),
    ("      X = norm(X)", "tiny.yaml:10:7", "'X' was a matrix, now a scalar"),
    ("      G = X", "tiny.yaml:10:7", "'G' is an argument"),
    ("      if k > 1:", "tiny.yaml:10:10", "a test may only compare numbers and shape facts; 'k' is not one"),
    ("      for _ in range(-1):", "tiny.yaml:10:22", "a loop count cannot be negative"),
    ("      for i in [1, 2]:", "tiny.yaml:10:7", "a loop is `for _ in range(count):`"),
    ("      return X", "tiny.yaml:10:7", "a tensor function returns once, as its last statement"),
    ("      import os", "tiny.yaml:10:7", "import is not allowed in a tensor function"),
    ("      X = (", "tiny.yaml:10:", "syntax error in tensor function"),
])
def test_tensor_function_errors_point_at_the_culprit(body_line, where, message):
    lines = FUNCTION_BASE.splitlines()
    lines.insert(9, body_line + ("\n          pass_ = 1" if body_line.rstrip().endswith(":") else ""))
    err = error_of("\n".join(lines) + "\n")
    assert str(err).startswith(where) and message in str(err), str(err)


@pytest.mark.parametrize("old, new, where, message", [
    ("      return unmatrix(X)", "      return X", "tiny.yaml:10:7", "return unmatrix(X)"),
    ("      return unmatrix(X)", "      Y = X", "tiny.yaml:6:3", "has no `return` at its end"),
    ("  step: f(g)", "  step: f(g, g)", "tiny.yaml:12:9", "f() takes 1 argument, got 2"),
    ("  step: f(g)", "  step: g @ g", "tiny.yaml:12:9", "the matrix product @ is allowed only in `tensor_functions`"),
    ("  f:", "  __f:", "tiny.yaml:6:3", "names starting with __ are the compiler's own"),
])
def test_tensor_function_spec_errors(old, new, where, message):
    assert old in FUNCTION_BASE
    err = error_of(FUNCTION_BASE.replace(old, new))
    assert str(err).startswith(where) and message in str(err), str(err)


ROUTED = """\
name: tiny
class_name: Tiny
hyperparameters:
  flag: 0
accumulators:
  m: {ema: g, decays: [0.9]}
routes:
  vectors:
    when: ndim < 2 or flag
    update:
      step: g
  rest: {}
update:
  step: m
"""


def test_routes_lower_to_one_graph_per_route_and_kind():
    program = lower_spec(parse_spec(ROUTED, "tiny.yaml"))
    assert set(program.variants) == {"vectors_unfactored", "rest_unfactored"} and [n for n, _ in program.routes] == \
        ["vectors", "rest"]
    assert "vectors_unfactored" in program.state_levels["m"] and "rest_unfactored" in program.state_levels["m"]
    assert program.routes[1][1] is None


@pytest.mark.parametrize("old, new, where, message", [
    ("    when: ndim < 2 or flag", "    when: mean(g) > 0", "tiny.yaml:9:11", "routes.vectors.when decides by the shape"),
    ("    when: ndim < 2 or flag", "    when: t > 3", "tiny.yaml:9:11", "it reads step"),
    ("  rest: {}", "  rest: {when: numel > 1}\n  more: {}", "tiny.yaml:13:3", None),
    ("    when: ndim < 2 or flag\n", "", "tiny.yaml:11:3", "routes.rest is never taken"),
    ("update:\n  step: m\n", "", "tiny.yaml:12:3", "routes.rest: no update rule"),
    ("  rest: {}", "  rest: {accumulators: {flag: {ema: g, decays: [0.5]}}}", "tiny.yaml:12:25",
     "'flag' is already defined"),
])
def test_route_errors(old, new, where, message):
    assert old in ROUTED
    text = ROUTED.replace(old, new)
    if message is None:   # valid: a later route after one with a test
        lower_spec(parse_spec(text, "tiny.yaml"))
        return
    err = error_of(text)
    assert str(err).startswith(where) and message in str(err), str(err)


def test_a_spec_needs_an_update_rule():
    err = error_of(BASE.replace("update:\n  step: m\n", ""))
    assert "missing required key 'update'" in str(err)


# A split-input MLP stored as Haiku does (CELO2MLP: one (in, out) matrix per feature
# group), read through a weight layout into the compiler's (out, in) layers.
SPLIT_MLP = """\
name: split
class_name: Split
hyperparameters:
  lr: 0.1
accumulators:
  m: {ema: g, decays: [0.5, 0.9, 0.99]}
features:
  normalized: []
  raw: [g, m]
mlp:
  sizes: [4, 5, 2]
  outputs: [direction, magnitude]
  weights: {group: mlp, layers: [layer0, layer1]}
weights:
  groups:
    mlp: {w0.0: [1, 5], w0.1: [3, 5], b0: [5], dense_w.0: [5, 2], dense_b.0: [2]}
  layouts:
    mlp:
      layer0.weight: {from: [w0.0, w0.1], transpose: true}
      layer0.bias: b0
      layer1.weight: {from: dense_w.0, transpose: true}
      layer1.bias: dense_b.0
update:
  step: direction * exp(0.1 * magnitude)
"""


def test_weight_layouts_read_a_split_haiku_mlp(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "split.yaml").write_text(SPLIT_MLP)
    cls = compile_and_import(str(tmp_path), "lopt_split", [str(tmp_path / "split.yaml")])["split"]
    gen = torch.Generator().manual_seed(3)
    w = {"w0.0": torch.randn(1, 5, generator=gen), "w0.1": torch.randn(3, 5, generator=gen),
         "b0": torch.randn(5, generator=gen), "dense_w.0": torch.randn(5, 2, generator=gen),
         "dense_b.0": torch.randn(2, generator=gen)}
    save_file(w, str(tmp_path / "celo2.safetensors"))
    p = torch.nn.Parameter(torch.randn(3, 4, generator=gen))
    start = p.detach().clone()
    g = torch.randn(3, 4, generator=gen)
    p.grad = g.clone()
    cls([p], weights=str(tmp_path / "celo2.safetensors"), backend="reference").step()
    # CELO2MLP.forward: the sum of each feature group times its own (in, out) matrix.
    m = torch.stack([(1 - d) * g for d in (0.5, 0.9, 0.99)], -1)
    hidden = torch.relu(g.unsqueeze(-1) @ w["w0.0"] + m @ w["w0.1"] + w["b0"])
    out = hidden @ w["dense_w.0"] + w["dense_b.0"]
    expected = start - 0.1 * out[..., 0] * torch.exp(0.1 * out[..., 1])
    assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-6)
    del w["w0.1"]
    save_file(w, str(tmp_path / "short.safetensors"))
    with pytest.raises(Exception, match="w0.1"):   # the file's own keys are still checked exactly
        cls([p], weights=str(tmp_path / "short.safetensors"))


@pytest.mark.parametrize("old, new, message", [
    ("layer0.weight: {from: [w0.0, w0.1], transpose: true}", "layer0.weight: {from: [w0.0, w0.2], transpose: true}",
     "weights.layouts.mlp.layer0.weight takes w0.2, which the group does not declare"),
    ("layer0.weight: {from: [w0.0, w0.1], transpose: true}", "layer0.weight: {from: [w0.0, b0], transpose: true}",
     "cannot concatenate w0.0 [1, 5] and b0 [5] along axis 0"),
    ("layer1.bias: dense_b.0", "layer1.bias: {from: dense_b.0, transpose: true}",
     "weights.layouts.mlp.layer1.bias transposes a 1-D value"),
    ("layer0.bias: b0", "b0: b0", "weights.layouts.mlp.b0 derives a key the file already has"),
    ("layer0.weight: {from: [w0.0, w0.1], transpose: true}", "layer0.weight: {from: [w0.0, w0.1]}",
     "weights.layouts.mlp.layer0.weight has shape [4, 5], expected [5, 4]"),
    ("  layouts:\n    mlp:", "  layouts:\n    mlpp:", "weights.layouts.mlpp: no such weight group"),
    ("transpose: true}\n      layer0.bias", "transpose: yes please}\n      layer0.bias",
     "expected true or false"),
    ("weights:\n  groups:", "weights:\n  hub: {other: a/b}\n  groups:", "weights.hub.other: no such weight group"),
    ("weights:\n  groups:", "weights:\n  hub: {mlp: not-a-repo}\n  groups:",
     "weights.hub.mlp: 'not-a-repo' is not a Hugging Face repository id (owner/name)"),
    ("weights:\n  groups:\n    mlp: {w0.0: [1, 5], w0.1: [3, 5], b0: [5], dense_w.0: [5, 2], dense_b.0: [2]}",
     "weights:\n  hub: {mlp: a/b}\n  groups:\n    mlp: {w0.0: [1, 5], w0.1: [3, 5], b0: [5], dense_w.0: [5, 2], "
     "dense_b.0: [2]}\n    spare: {x: [1]}", "weights.hub names no repository for group(s) spare"),
])
def test_weight_layout_errors(old, new, message):
    assert old in SPLIT_MLP
    err = error_of(SPLIT_MLP.replace(old, new))
    assert message in str(err) and str(err).startswith("tiny.yaml:"), str(err)


# A per-tensor GRU written in the spec, and two routed kinds of parameters (by shape and
# by a param group's flag) that read its output.
GRU_SPEC = """\
name: gru_routes
class_name: GruRoutes
hyperparameters:
  lr: 0.05
  flag: 0
accumulators:
  m: {ema: g, decays: [0.9]}
  v: {ema: g * g, decays: [0.99]}
network:
  inputs:
    - log(mean(prev(v)) + 1e-8)
    - mean(abs(g))
    - tanh(t / 10)
    - rank == [1, 2]
  state:
    h: {init: 'weight("gru:h0")'}
  body: |
    z = sigmoid(linear(concat(x, h), "gru:z"))
    r = sigmoid(linear(concat(x, h), "gru:r"))
    n = tanh(linear(concat(x, r * h), "gru:n"))
    h = (1 - z) * n + z * h
    scale = exp(linear(h, "gru:out")) * (1 + max_over_tensors(slice(h, 0, 1)))
  outputs: [scale]
routes:
  vectors:
    when: ndim < 2 or flag
    update:
      step: scale * m / (sqrt(v) + 1e-8)
  matrices:
    accumulators:
      m: {ema: g, decays: [0.5]}
      v: {ema: g * g, decays: [0.9]}
    update:
      step: scale * sign(m) + 0.1 * m
weights:
  groups:
    gru: {z.weight: [6, 11], z.bias: [6], r.weight: [6, 11], r.bias: [6], n.weight: [6, 11], n.bias: [6],
          out.weight: [1, 6], out.bias: [1], h0: [6]}
"""


class GruOracle:
    """GRU_SPEC in plain torch: the network over all tensors, then each route's rule."""

    def __init__(self, groups: list[dict], weights: dict[str, torch.Tensor]):
        self.groups, self.w = groups, weights
        self.state: dict = {}
        self.t = 0

    @torch.no_grad()
    def step(self):
        w, rows, params = self.w, [], []
        for group in self.groups:
            for p in group["params"]:
                st = self.state.setdefault(p, {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "h": w["h0"].clone()})
                rank = sum(d > 1 for d in p.shape)
                rows.append(torch.tensor([float(torch.log(st["v"].mean() + 1e-8)), float(p.grad.abs().mean()),
                                          math.tanh(self.t / 10), float(rank == 1), float(rank == 2)]))
                params.append((p, group))
        x, h = torch.stack(rows), torch.stack([self.state[p]["h"] for p, _ in params])
        linear = lambda v, k: v @ w[f"{k}.weight"].T + w[f"{k}.bias"]  # noqa: E731
        z, r = torch.sigmoid(linear(torch.cat([x, h], 1), "z")), torch.sigmoid(linear(torch.cat([x, h], 1), "r"))
        h = (1 - z) * torch.tanh(linear(torch.cat([x, r * h], 1), "n")) + z * h
        scale = torch.exp(linear(h, "out")) * (1 + h[:, :1].max())
        for (p, group), h_p, s in zip(params, h, scale[:, 0]):
            st = self.state[p]
            st["h"] = h_p
            vector = p.dim() < 2 or group.get("flag", False)
            b1, b2 = (0.9, 0.99) if vector else (0.5, 0.9)
            st["m"] = b1 * st["m"] + (1 - b1) * p.grad
            st["v"] = b2 * st["v"] + (1 - b2) * p.grad * p.grad
            step = s * st["m"] / (st["v"].sqrt() + 1e-8) if vector else s * st["m"].sign() + 0.1 * st["m"]
            p.sub_(group["lr"] * step)
        self.t += 1


@pytest.fixture(scope="session")
def gru_class(tmp_path_factory) -> type:
    return _compiled(tmp_path_factory, "gru_routes", GRU_SPEC)


def _gru_updates(cls: type, make_oracle, backend: str, steps: int = 8):
    from lopt_codegen.weights import random_weights

    gen = torch.Generator().manual_seed(8)
    weights = random_weights(cls.program.weight_groups, seed=2)
    shapes = {"plain": [(5, 3), (3, 5), (7,), (), (2, 3, 4), (5, 3)], "flagged": [(4, 6), (3,)]}
    start = {k: [torch.randn(s, generator=gen) for s in v] for k, v in shapes.items()}
    ours = {k: [torch.nn.Parameter(x.clone()) for x in v] for k, v in start.items()}
    theirs = {k: [torch.nn.Parameter(x.clone()) for x in v] for k, v in start.items()}
    opt = cls([{"params": ours["plain"]}, {"params": ours["flagged"], "flag": True, "lr": 0.02}],
              weights=weights, backend="cuda" if backend == "simt" else backend)
    if backend == "simt":
        opt.backend = SimtBackend(cls.program)
    ref = make_oracle([{"params": theirs["plain"], "lr": 0.05}, {"params": theirs["flagged"], "flag": True, "lr": 0.02}],
                      weights)
    flat_ours = [p for v in ours.values() for p in v]
    flat_theirs = [p for v in theirs.values() for p in v]
    for step in range(steps):
        before = [q.detach().clone() for q in flat_theirs]
        for p, q in zip(flat_ours, flat_theirs):
            g = torch.randn(p.shape, generator=gen) * 10.0 ** -(step % 3)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q, b in zip(flat_ours, flat_theirs, before):
            yield step, tuple(p.shape), p.detach() - b, q.detach() - b, b, q.detach().clone()
            p.data.copy_(q.data)


def test_gru_network_and_routes_on_the_reference_match_torch(gru_class):
    assert set(gru_class.program.variants) == {"vectors_unfactored", "matrices_unfactored"}
    assert_updates_match(_gru_updates(gru_class, lambda groups, w: GruOracle(groups, w["gru"]), "reference"),
                         "gru vs torch")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_gru_network_and_routes_agree_across_backends(gru_class, backend):
    def reference(groups, weights):
        return gru_class(groups, weights=weights, backend="reference")

    assert_updates_match(_gru_updates(gru_class, reference, backend), f"gru on {backend}")


@pytest.mark.parametrize("old, new, message", [
    ('    z = sigmoid(linear(concat(x, h), "gru:z"))', '    z = sigmoid(linear(concat(x, h), "gru:zz"))',
     "weight group 'gru' has no 'zz.weight'"),
    ('    z = sigmoid(linear(concat(x, h), "gru:z"))', '    z = sigmoid(linear(concat(x, h), "grux:z"))',
     "weight group 'grux' is not declared"),
    ('    z = sigmoid(linear(concat(x, h), "gru:z"))', '    z = sigmoid(linear(x, "gru:z"))',
     "linear(): 'gru:z' takes 11 channels, the value has 5"),
    ('    z = sigmoid(linear(concat(x, h), "gru:z"))', '    z = sigmoid(linear(concat(x, h), "z"))',
     'a weight is named "group:key"'),
    ("    h = (1 - z) * n + z * h", "    h = concat(h, h)", "state 'h' has 6 channels; this value has 12"),
    ("    h = (1 - z) * n + z * h", "    h = slice(h, 4, 3)", "slice(4, 3) is outside the value's 6 channels"),
    ("  outputs: [scale]", "  outputs: [scale, extra]", "network output 'extra' is never set"),
    ("    - tanh(t / 10)", "    - tanh(t / 10) + scale", "cycle in definitions: scale -> scale"),
    ("    z = sigmoid(", "    for _ in range(2):\n        z = 1\n    z = sigmoid(", "a network body is assignments"),
    ("    n = tanh(", "    n = q + tanh(", "unknown name 'q' in the network"),
    ("    n = tanh(", "    n = mean(h) + tanh(", "unknown function 'mean' in the network"),
])
def test_network_errors(old, new, message):
    assert old in GRU_SPEC
    err = error_of(GRU_SPEC.replace(old, new))
    assert message in str(err) and str(err).startswith("tiny.yaml:"), str(err)


def test_a_flow_mapping_that_split_an_expression_says_to_quote_it():
    text = GRU_SPEC.replace("""    h: {init: 'weight("gru:h0")'}""", "    h: {init: full(6, 0)}")
    err = error_of(text)
    assert "unknown key '0)'" in str(err) and "quote an expression that holds commas" in str(err), str(err)


LOSS_SPEC = """\
name: tiny
class_name: Tiny
hyperparameters:
  lr: 0.1
  horizon: 4
loss_buffer:
  state:
    ema: {init: 0}
  body: |
    ema = (1 - 1 / horizon) * ema + loss / horizon
    loss_features = loss - ema
update:
  step: g * (1 + loss_features)
"""


def test_loss_buffer_written_in_the_spec(tmp_path):
    (tmp_path / "tiny.yaml").write_text(LOSS_SPEC)
    cls = compile_and_import(str(tmp_path), "lopt_loss", [str(tmp_path / "tiny.yaml")])["tiny"]
    p = torch.nn.Parameter(torch.zeros(3))
    opt = cls([p], horizon=5, backend="reference")
    ema, expected = 0.0, torch.zeros(3)
    for loss in (2.0, 1.0, 0.5):
        p.grad = torch.ones(3)
        opt.step(loss=loss)
        ema = 0.8 * ema + loss / 5
        expected -= 0.1 * (1 + loss - ema)
        assert torch.allclose(p.detach(), expected), (loss, p, expected)
    assert float(opt.state["loss_buffer"]["ema"].reshape(())) == pytest.approx(ema)
    with pytest.raises(ValueError, match="needs the training loss"):
        opt.step()


@pytest.mark.parametrize("old, new, message", [
    ("    loss_features = loss - ema\n", "", "the loss buffer's body must set `loss_features`"),
    ("    ema = (1 - 1 / horizon) * ema + loss / horizon", "    ema = full(2, loss)", "state 'ema' has 1 channels"),
    ("    ema = (1 - 1 / horizon) * ema + loss / horizon", "    loss = 1", "'loss' is the step's loss"),
    ("    ema = (1 - 1 / horizon) * ema + loss / horizon", "    ema = g", "unknown name 'g' in the network"),
])
def test_loss_buffer_errors(old, new, message):
    assert old in LOSS_SPEC
    err = error_of(LOSS_SPEC.replace(old, new))
    assert message in str(err) and str(err).startswith("tiny.yaml:"), str(err)


def test_the_language_references_whole_examples_compile():
    """Every complete spec in docs/spec-language.md (a yaml block starting with `name:`, or
    with `extends:` a built-in spec, as if it were in specs/)."""
    import re

    from conftest import ROOT, SPECS

    text = open(f"{ROOT}/docs/spec-language.md", encoding="utf-8").read()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith(("name:", "extends:"))]
    assert any(b.startswith("extends:") for b in blocks) and any(b.startswith("name:") for b in blocks)
    for block in blocks:
        assert lower_spec(parse_spec(block, os.path.join(SPECS, "docs_example.yaml"))).variants


def test_a_tensor_function_after_the_last_pass_reads_the_parameter_before_the_step(tmp_path):
    """A call whose result only a tensor-level accumulator reads runs after the last pass,
    which has updated p: it reads p as it was (a scratch copy), as the reference does."""
    text = """\
name: after
class_name: After
hyperparameters:
  lr: 0.5
tensor_functions:
  fro:
    args: [G]
    body: "return norm(G)"
accumulators:
  pnorm: {update: "fro(p)"}
update:
  step: g
"""
    (tmp_path / "after.yaml").write_text(text)
    cls = compile_and_import(str(tmp_path), "lopt_after", [str(tmp_path / "after.yaml")])["after"]
    for backend in BACKENDS:
        p = torch.nn.Parameter(torch.ones(4, 3))
        opt = cls([p], backend="cuda" if backend == "simt" else backend)
        if backend == "simt":
            opt.backend = SimtBackend(cls.program)
        p.grad = torch.ones(4, 3)
        opt.step()
        assert float(opt.state[p]["pnorm"].reshape(())) == pytest.approx(12 ** 0.5), backend
        assert torch.allclose(p.detach(), torch.full((4, 3), 0.5)), backend


def test_a_route_test_cannot_use_factored_axes():
    err = error_of(ROUTED.replace("    when: ndim < 2 or flag", "    when: size_d0 > 3"))
    assert "decided before a tensor is factored: use ndim, numel, size(k)" in str(err), str(err)
