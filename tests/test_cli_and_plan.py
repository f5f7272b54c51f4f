"""lopt-compile: emitting, --explain, --schema, --check (drift of generated/), and the plan."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from lopt_codegen.cli import run
from lopt_codegen.ir.nodes import reachable
from lopt_codegen.ir.plan import plan_program

from conftest import ROOT, SPECS

BUILTIN = [os.path.join(SPECS, f"{n}.yaml") for n in ("small_fc_lopt", "velo", "adam", "elo", "mulo", "celo2", "elo_celo2")]


def test_committed_generated_code_is_up_to_date(capsys):
    """generated/ must be what the compiler emits from specs/ and templates/ now."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        status = run(["--check", *[os.path.relpath(p, ROOT) for p in BUILTIN]])
    finally:
        os.chdir(cwd)
    assert status == 0, capsys.readouterr().err
    for name in ("small_fc_lopt", "velo", "adam"):   # the CUDA sources are checked too
        assert os.path.exists(os.path.join(ROOT, "generated", name, f"{name}.cu"))


def test_check_reports_a_stale_cuda_source(tmp_path, capsys):
    out = tmp_path / "gen"
    assert run([BUILTIN[2], "--backend", "cuda", "--out", str(out)]) == 0
    assert json.loads((out / "adam" / "manifest.json").read_text())["backend"] == "cuda"
    cu = out / "adam" / "adam.cu"
    cu.write_text(cu.read_text().replace("expf(", "__expf("))
    assert run(["--check", "--backend", "cuda", BUILTIN[2], "--out", str(out)]) == 1
    assert "adam.cu" in capsys.readouterr().err


def test_compile_into_a_new_folder_and_import(tmp_path, monkeypatch):
    out = tmp_path / "gen"
    assert run([BUILTIN[2], "--out", str(out)]) == 0
    files = sorted(os.listdir(out / "adam"))
    assert files == ["__init__.py", "adam.cu", "cuda_binding.py", "manifest.json", "program.json"]
    manifest = json.loads((out / "adam" / "manifest.json").read_text())
    assert manifest["backend"] == "auto" and len(manifest["spec_sha256"]) == 64
    assert manifest["plan"]["unfactored"]["passes"][0]["writes"] == {"m": 1, "v": 1, "param": 1}
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("gen.adam")
    p = torch.nn.Parameter(torch.ones(3))
    opt = module.Adam([p], lr=0.5)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.5))  # Adam's first step is lr * sign(g)


def test_check_reports_stale_output(tmp_path, capsys):
    out = tmp_path / "gen"
    assert run([BUILTIN[2], "--out", str(out)]) == 0
    assert run(["--check", BUILTIN[2], "--out", str(out)]) == 0
    (out / "adam" / "program.json").write_text("{}")
    assert run(["--check", BUILTIN[2], "--out", str(out)]) == 1
    assert "stale" in capsys.readouterr().err


def test_a_bad_spec_among_several_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\n")
    out = tmp_path / "gen"
    assert run([BUILTIN[2], str(bad), "--out", str(out)]) == 2
    assert not (out / "adam").exists()


def test_recompiling_replaces_the_package_whole(tmp_path):
    out = tmp_path / "gen"
    assert run([BUILTIN[2], "--out", str(out)]) == 0
    (out / "adam" / "leftover.txt").write_text("old")
    assert run([BUILTIN[2], "--out", str(out)]) == 0
    assert not (out / "adam" / "leftover.txt").exists()
    assert [n for n in os.listdir(out) if n.startswith(".")] == []  # no temp folders left


def test_schema_is_json_schema_of_the_language(capsys):
    assert run(["--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["type"] == "object"
    assert {"accumulators", "features", "mlp", "update", "network"} <= set(schema["properties"])


def test_explain_prints_the_plan(capsys):
    assert run(["--explain", BUILTIN[0]]) == 0
    out = capsys.readouterr().out
    assert "factored tensors (rank >= 2): 3 element pass(es)" in out
    assert "B/element" in out and "MACs/element" in out


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "lopt_codegen.cli", "--explain", BUILTIN[2]],
                          capture_output=True, text=True, check=True)
    assert "1 element pass(es)" in proc.stdout


@pytest.mark.parametrize("name, variant, n_passes", [
    ("small_fc_lopt", "factored", 3),    # accumulators + row/col sums; feature moments; apply
    ("small_fc_lopt", "unfactored", 2),  # no row/col statistics: moments fuse into pass 1
    ("velo", "factored", 3),
    ("velo", "unfactored", 3),
    ("adam", "unfactored", 1),
])
def test_pass_counts(programs, name, variant, n_passes):
    plan = plan_program(programs[name])[variant]
    assert len(plan.passes) == n_passes
    last = plan.passes[-1]
    assert last.writes.get("param") == 1
    # features are recomputed, never stored: only accumulators and the param are written
    written = {w for p in plan.passes for w in p.writes}
    assert written <= set(programs[name].state_levels) | {"param"}


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo", "adam", "elo", "mulo", "celo2", "elo_celo2"])
def test_every_reduction_is_finished_before_a_pass_or_the_network_uses_it(programs, name):
    """Reductions may run later than their earliest pass (plan._placed_reductions), never
    so late that a pass, a tensor function or the network would read them unfinished."""
    for variant, plan in plan_program(programs[name]).items():
        graph = programs[name].variants[variant]
        done = {id(r): p.index for p in plan.passes for r in p.reduce_nodes}
        assert len(done) == sum(len(p.reduce_nodes) for p in plan.passes)   # each in one pass

        def reductions_read(roots):   # through element and small work, not into reductions' arguments
            nodes = reachable(roots, lambda n: id(n) not in done)
            return [n for n in nodes if id(n) in done]

        for p in plan.passes:   # (its roots: its reductions' arguments, the values it writes)
            for r in reductions_read([n for n in p.roots if id(n) not in p.stored]):
                assert done[id(r)] < p.index, (variant, p.index, r.op)
            for call in p.calls:
                assert all(done[id(r)] < p.index for r in reductions_read(list(call.args))), (variant, call.attrs)
        if graph.network_input is not None:
            assert all(done[id(r)] <= plan.network_after for r in reductions_read([graph.network_input]))


def test_velo_means_run_in_the_pass_that_reads_their_inputs_anyway(programs):
    """VeLO keeps the means of m and v (m_mean, v_mean) for the next step's LSTM, and the
    moments of the new m and v run in the pass that writes them: its first pass then
    reads only the gradient and the parameter (72 B an element in all, not 88)."""
    plan = plan_program(programs["velo"])["factored"]
    assert [set(p.reads) for p in plan.passes] == [{"grad", "param"}, {"grad", "m", "v"}, {"grad", "m", "v", "param"}]
    assert [p.bytes_per_element for p in plan.passes] == [8, 36, 28]
    # Pass 1: the moments of g, clip(g) and p, the row and column means; the rest in pass 2.
    assert [p.reductions for p in plan.passes] == [
        ["tensor means: 3 channels", "row means (over d0): 1 channels", "col means (over d1): 1 channels"],
        ["tensor means: 25 channels"], []]
    # The earliest pass is kept where no later one reads the inputs anyway (param's moments).
    unfactored = plan_program(programs["velo"])["unfactored"]
    assert [p.bytes_per_element for p in unfactored.passes] == [44, 36, 40]


def test_velo_accumulators_are_written_after_their_last_old_read(programs):
    plan = plan_program(programs["velo"])["factored"]
    write_pass = next(p.index for p in plan.passes if "m" in plan.passes[p.index].writes)
    # the LSTM's variance features read m before the update in pass 2
    assert write_pass == 1 and plan.network_after == 1
