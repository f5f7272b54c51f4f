"""Smoke tests of benchmarks/: step_time.py runs and writes consistent results; the demo's
training loop runs. No timing assertions: only that the numbers are sane and consistent."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_quick_run_writes_consistent_results(tmp_path):
    step_time = _load("step_time")
    step_time.main(["--quick", "--no-compile", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# Optimizer step time")
    rows = results["rows"]
    backends = results["config"]["backends"]
    assert "reference" in backends
    assert {(r["spec"], r["method"]) for r in rows} == {(s, b) for s in ("small_fc_lopt", "velo", "adam")
                                                        for b in backends}
    assert len({r["case"] for r in rows}) == 2
    for r in rows:
        assert r["note"] is None, r
        assert r["finite"] is True, r
        for key in ("ms", "adamw_ms", "ratio_adamw", "foreach_ms", "ratio_foreach", "traffic_floor_ms",
                    "ratio_traffic", "fma_floor_ms", "ratio_fma", "pass_floor_ms", "ratio_pass"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["ratio_adamw"] == pytest.approx(r["ms"] / r["adamw_ms"], rel=1e-9)
        assert r["ratio_foreach"] == pytest.approx(r["ms"] / r["foreach_ms"], rel=1e-9)
        assert r["ratio_traffic"] == pytest.approx(r["ms"] / r["traffic_floor_ms"], rel=1e-9)
        assert r["ratio_fma"] == pytest.approx(r["ms"] / r["fma_floor_ms"], rel=1e-9)
        assert r["ratio_pass"] == pytest.approx(r["ms"] / r["pass_floor_ms"], rel=1e-9)
        # Each pass at its slower bound: at least either floor, at most their sum.
        assert max(r["traffic_floor_ms"], r["fma_floor_ms"]) <= r["pass_floor_ms"] * (1 + 1e-9)
        assert r["pass_floor_ms"] <= (r["traffic_floor_ms"] + r["fma_floor_ms"]) * (1 + 1e-9)
        # The floors from the plans: Adam moves fused AdamW's 28 B/param; VeLO 72 on a matrix.
        assert r["bytes_per_param"] == 28 if r["spec"] == "adam" else r["bytes_per_param"] > 28
        if r["spec"] == "adam":
            assert r["traffic_floor_ms"] == pytest.approx(r["adamw_ms"], rel=1e-9)
        ref = next(x for x in rows if (x["case"], x["spec"], x["method"]) == (r["case"], r["spec"], "reference"))
        assert r["ratio_reference"] == pytest.approx(r["ratio_adamw"] / ref["ratio_adamw"], rel=1e-9)
        assert r["ratio_compiled"] is None


def test_step_time_cases_and_plan_cost():
    """The GPT-2 and ResNet-18 sets have the issue's sizes; plan_cost reads the spec's plan."""
    step_time = _load("step_time")
    gpt, resnet = step_time.case_shapes("gpt"), step_time.case_shapes("resnet")
    assert (len(gpt), sum(math.prod(s) for s in gpt)) == (76, 13_891_584)
    assert (len(resnet), sum(math.prod(s) for s in resnet)) == (62, 11_689_512)
    # Multiply-adds per element: the first layer over the element-level features only.
    # VeLO, factored: 18 of its 30 features (12 are row/column values), 18x4 + 4x4 + 4x3.
    # Per pass, (bytes, MACs): VeLO's three passes, its MLP in the last (72 B in all).
    # Its LSTM network, a fourth round: its weights read once, its layers once per tensor,
    # as many multiply-adds as torch counts running it on 3 tensors' rows.
    n = 64 * 48
    network = step_time.plan_cost("velo", [(64, 48)])[3]
    assert step_time.plan_cost("velo", [(64, 48)]) == [(8 * n, 0), (36 * n, 0), (28 * n, 100 * n), network]
    assert step_time.plan_cost("velo", [(48,)])[2][1] == 148 * 48   # unfactored: all 30
    # A factored and an unfactored tensor: pass k of both in one round.
    rounds = step_time.plan_cost("velo", [(64, 48), (48,)])
    assert [r[0] for r in rounds] == [8 * n + 44 * 48, 36 * n + 36 * 48, 28 * n + 40 * 48, network[0]]
    assert rounds[3][1] == 2 * network[1]
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode
    from generated.velo import VeLO

    class Reads(TorchDispatchMode):
        """The data pointers of every tensor an op reads."""
        def __init__(self):
            super().__init__()
            self.pointers: set[int] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.pointers |= {a.data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            return func(*args, **(kwargs or {}))

    opt = VeLO([torch.nn.Parameter(torch.randn(3))], num_steps=10, weights="random")
    net = opt._network(torch.device("cpu"))
    state = {k: v.reshape(1, -1).expand(3, -1) for k, v in net.initial_state(torch.device("cpu")).items()}
    inputs = next(g.network_input.channels for g in VeLO.program.variants.values())
    with FlopCounterMode(display=False) as counter, Reads() as reads:
        net.forward(torch.randn(3, inputs), state)
    assert counter.get_total_flops() == 2 * 3 * network[1]
    assert network[0] == 4 * sum(w.numel() for keys in net.weights.values() for w in keys.values()
                                 if w.data_ptr() in reads.pointers)
    # small_fc_lopt, unfactored: 28 of its 39 inputs (11 step-level time features fold into the bias).
    assert sum(m for _, m in step_time.plan_cost("small_fc_lopt", [(7,)])) == (28 * 32 + 32 * 32 + 32 * 2) * 7
    # The pass floor: each pass at its slower bound (1 B/ms, 1 MAC/ms).
    assert step_time.pass_floor([(10, 2), (3, 7)], 1.0, 1.0) == 17


def test_network_cost_counts_a_layer_over_a_shared_row_once():
    """A linear or project layer over one row shared by all tensors (a reduction over the
    tensors) costs once a step; over rows, once per tensor. Unread weights are not read."""
    from lopt_codegen.ir.network import NetworkIR, network_cost

    body = (("set", "h", ("linear", ("var", "x"), "g", "a")),
            ("set", "s", ("linear", ("over_tensors", "max", ("var", "h")), "g", "b")),
            ("set", "y", ("op", "add", (("var", "h"), ("project", ("var", "s"), "g", "p")))))
    shapes = {"g": {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (5, 4), "b.bias": (5,), "p": (5, 4),
                    "unused": (7,)}}
    assert network_cost(NetworkIR({}, body, {"y": 4}, (), ("g",)), shapes) == (12, 20 + 20, 12 + 4 + 20 + 5 + 20)


def test_gpu_check_dry_run_prints_its_table(capsys):
    """The device script runs end to end on the CPU (parity, timing, pass bandwidth, the tables)."""
    _load("gpu_check").main(["--device", "cpu", "--sizes", "4K", "--steps", "1", "--specs", "adam,velo",
                             "--bandwidth", "velo", "--bandwidth-size", "4K"])
    table = capsys.readouterr().out.split("## gpu_check")[-1]
    rows = [line for line in table.splitlines() if line.startswith("| adam") or line.startswith("| velo")]
    passes = [r for r in rows if "_pass" in r]
    assert [r.split(" | ")[1] for r in passes] == ["factored_pass1", "factored_pass2", "factored_pass3"]
    assert all(float(r.split(" | ")[4]) > 0 and float(r.split(" | ")[7].strip(" |")) > 0 for r in passes)   # ms, copy GB/s
    steps = [r for r in rows if r not in passes]
    assert len(steps) == 4
    assert {r.split(" | ")[1] for r in steps} == {"cuda", "tvm"}
    assert all("parity PASS" in r for r in steps)
    assert "velo: its passes move 72.25 B/element" in table


def test_distributed_quick_run_writes_its_table(tmp_path):
    """2 gloo processes end to end: every row, with times, collectives and bytes."""
    out = tmp_path / "distributed.md"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "distributed.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and " ms |" in line]
    assert [(r[0][2:], r[1]) for r in rows] == [
        ("AdamW (fused)", "shard=True, DDP's gradients"),
        *[(f"{o}, tvm", m) for m in ("shard=True, DDP's gradients", "shard=True, reduce_grads=True")
          for o in ("Adam (ours)", "VeLO", "small_fc_lopt")],
        ("AdamW (foreach)", "FSDP2 (fully_shard)"),
        *[(f"{o}, tvm", "FSDP2 (fully_shard)") for o in ("Adam (ours)", "VeLO", "small_fc_lopt")]]
    for r in rows:
        assert float(r[2].split()[0]) > 0 and float(r[3].split()[0]) > 0
    calls = [int(r[6]) for r in rows]
    assert calls[1] == 1 and calls[4] == 2   # Adam: the all-gather; + the reduce-scatter
    assert calls[-3] == 0 and calls[-2] >= 1   # FSDP2: Adam needs none, VeLO its rounds and the loss


def test_demo_training_runs_with_finite_loss():
    demo = _load("demo")
    make = demo.optimizers()["VeLO (random weights)"]
    result = demo.train(make, steps=5)
    assert len(result["losses"]) == 5 and len(result["step_times"]) == 5
    assert all(math.isfinite(v) for v in result["losses"])
    assert math.isfinite(result["final_loss"])
    assert result["final_loss"] != result["initial_loss"], "the parameters never moved"


def test_busy_machine_run_writes_its_table(tmp_path):
    """Quiet and busy, all threads and one, for both cases: every row timed."""
    out = tmp_path / "busy.md"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "busy_machine.py"), "--steps", "2",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "x |" in line]
    assert [(r[0][2:], r[2]) for r in rows] == [(case, name) for case in ("small (0.1M)", "1M") for _ in range(2)
                                                 for name in ("VeLO (tvm)", "AdamW (fused)")]
    assert [int(r[1]) for r in rows][2::4] == [1, 1]   # the one-thread runs
    assert all(float(v) > 0 for r in rows for v in r[3:7])


def test_memory_rates_run_writes_its_table(tmp_path):
    """Each pattern at each size, with a rate from its own bytes and time."""
    out = tmp_path / "rates.md"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_rates.py"), "--sizes", "1,2",
                    "--steps", "2", "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "GB/s" not in line]
    patterns = ["read (torch.sum)", "read and write in place (a.add_(b))", "fused AdamW (28 B a parameter)"]
    assert [(r[0][2:], r[1]) for r in rows] == [(p, mb) for mb in ("1", "2") for p in patterns]
    assert all(float(r[2].rstrip(" |")) > 0 for r in rows)
