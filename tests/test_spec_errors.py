"""Every kind of spec error names file:line:col and says what was expected."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lopt_codegen.ir import lower_spec
from lopt_codegen.spec import SpecError, parse_spec

# A small valid spec; tests replace one line and check where the error points.
BASE = """\
name: tiny
class_name: Tiny
hyperparameters:
  lr: 0.1
factored_axes: adafactor
accumulators:
  m: {ema: g, decays: [0.9, 0.99]}
  r: {ema: {factored: "mean_d0(g * g)", unfactored: "g * g"}, decays: [0.9]}
derived:
  d: m * rsqrt(r + 1e-8)
features:
  normalized: [g, d]
  raw: ["tanh(t / [1, 10] - 1)"]
mlp:
  sizes: [5, 4, 1]
  outputs: [direction]
  weights: {group: mlp, layers: [l0, l1]}
weights:
  groups:
    mlp: {l0.weight: [4, 5], l0.bias: [4], l1.weight: [1, 4], l1.bias: [1]}
update:
  step: direction
"""


def compile_text(text: str):
    return lower_spec(parse_spec(text, "tiny.yaml"))


def replace_line(line_no: int, new: str) -> str:
    lines = BASE.splitlines()
    lines[line_no - 1] = new
    return "\n".join(lines) + "\n"


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_text(text)
    return info.value


def test_base_spec_compiles():
    program = compile_text(BASE)
    assert set(program.variants) == {"factored", "unfactored"}
    assert program.state_levels["r"]["factored"][0].label == "row"


@pytest.mark.parametrize("line_no, new, where, message", [
    # unknown name
    (10, "  d: m * rsqrt(q + 1e-8)", "tiny.yaml:10:16", "unknown name 'q'"),
    # unknown function
    (10, "  d: m * rsqrtt(r)", "tiny.yaml:10:10", "unknown function 'rsqrtt'"),
    # wrong arity
    (10, "  d: m * clip(r, 1)", "tiny.yaml:10:10", "clip() takes 3 arguments, got 2"),
    # channel mismatch: 2 momentum channels times a 3-channel constant
    (10, "  d: m * [1, 2, 3]", "tiny.yaml:10:6", "channel mismatch in mul: operands have 2, 3 channels"),
    # a cycle between derived names
    (10, "  d: m * d", "tiny.yaml:10:10", "cycle in definitions: d -> d"),
    # wrong type
    (7, "  m: {ema: g, decays: 0.9}", "tiny.yaml:7:23", "accumulators.m.decays: expected a list"),
    # an unknown key
    (5, "factored_axis: adafactor", "tiny.yaml:5:1", "unknown key 'factored_axis'"),
    # an enum value
    (5, "factored_axes: largest", "tiny.yaml:5:16", "expected one of adafactor, velo"),
    # a disallowed operator
    (10, "  d: m % r", "tiny.yaml:10:6", "operator mod is not allowed"),
    # expression syntax
    (10, "  d: m * (r", "tiny.yaml:10:", "syntax error in expression"),
    # the features do not fit the MLP
    (13, "  raw: [\"tanh(t / [1, 10, 100] - 1)\"]", "tiny.yaml:15:3", "the features have 6 channels but mlp.sizes[0] is 5"),
    # a row-level reduction used where tensors may be unfactored
    (10, "  d: m * mean_d0(g)", "tiny.yaml:10:10", "mean_d0 needs a factored tensor"),
    # a name missing its unfactored variant
    (8, '  r: {ema: {factored: "mean_d0(g * g)"}, decays: [0.9]}', "tiny.yaml:10:", "'r' has no `unfactored` variant"),
    # a decay that is not a step-level value
    (7, "  m: {ema: g, decays: [0.9, g]}", "tiny.yaml:7:", "a decay must be a number or depend only on hyperparameters"),
    # weights that do not fit the MLP
    (20, "    mlp: {l0.weight: [4, 6], l0.bias: [4], l1.weight: [1, 4], l1.bias: [1]}", "tiny.yaml:18:1",
     "weights.groups.mlp.l0.weight has shape [4, 6], expected [4, 5]"),
])
def test_error_position_and_message(line_no, new, where, message):
    err = error_of(replace_line(line_no, new))
    assert str(err).startswith(where), str(err)
    assert message in str(err), str(err)


def test_missing_section():
    text = BASE.replace("update:\n  step: direction\n", "")
    err = error_of(text)
    assert str(err).startswith("tiny.yaml:1:1") and "missing required key 'update'" in str(err)


def test_yaml_syntax_error():
    err = error_of(replace_line(7, "  m: {ema: g, decays: [0.9, 0.99}"))
    assert str(err).startswith("tiny.yaml:7:") and "YAML syntax error" in str(err)


def test_duplicate_key():
    err = error_of(BASE.replace("  lr: 0.1\n", "  lr: 0.1\n  lr: 0.2\n"))
    assert str(err).startswith("tiny.yaml:5:3") and "duplicate key 'lr'" in str(err)


def test_builtin_name_cannot_be_redefined():
    err = error_of(BASE.replace("derived:\n", "derived:\n  g: p\n"))
    assert str(err).startswith("tiny.yaml:10:3") and "'g' is a built-in name" in str(err)


def test_mlp_output_count():
    err = error_of(replace_line(16, "  outputs: [direction, magnitude]"))
    assert "mlp.outputs names 2 values but the last size is 1" in str(err)


def test_cli_exits_2_with_one_clean_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(replace_line(10, "  d: m * rsqrt(q + 1e-8)"))
    proc = subprocess.run([sys.executable, "-m", "lopt_codegen.cli", str(bad), "--out", str(tmp_path / "gen")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert f"{bad}:10:16: unknown name 'q'" in proc.stderr
    assert not (tmp_path / "gen" / "tiny").exists()
