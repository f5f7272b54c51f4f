"""Step time on a busy machine: the median and 90th percentile of `opt.step()` quiet and
with one competing busy process (a Python loop), for VeLO on the tvm backend and torch's
fused AdamW on the same tensors, with torch's threads as set (all cores) and with one.

    python benchmarks/busy_machine.py                  # writes benchmarks/busy_machine.md
    python benchmarks/busy_machine.py --steps 50 --out /tmp/busy.md

Each (case, threads) runs in a child process of its own, since torch's thread count is
best set before its first parallel region.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Steady steps are timed: each kernel is built when first needed, not in the background.
os.environ.setdefault("LOPT_BACKGROUND_BUILDS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"small (0.1M)": [(256, 256), (256,), (512, 128), (128,), (64, 64, 3, 3), (64,)],
         "1M": [(1024, 1024), (1024,), (512, 512)]}


def _percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered) * 1e3, ordered[int(0.9 * (len(ordered) - 1))] * 1e3


def child(case: str, threads: int | None, steps: int) -> dict:
    """Quiet, then busy: {"velo": {"quiet": (median, p90), "busy": ...}, "adamw": ...}."""
    import torch
    if threads is not None:
        torch.set_num_threads(threads)
    sys.path.insert(0, ROOT)
    from generated.velo import VeLO

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in CASES[case]]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, copies):
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
        q.grad = p.grad.clone()
    velo = VeLO(params, lr=1e-3, num_steps=1000, weights="random", backend="tvm")
    adamw = torch.optim.AdamW(copies, lr=1e-3, fused=True)
    loss = torch.tensor(1.0)
    steps_of = {"velo": lambda: velo.step(loss=loss), "adamw": adamw.step}

    def timed() -> dict:
        times = {name: [] for name in steps_of}
        for _ in range(steps):
            for name, step in steps_of.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        return {name: _percentiles(t) for name, t in times.items()}

    for _ in range(5):   # kernels built, state made
        for step in steps_of.values():
            step()
    quiet = timed()
    busy_process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = timed()
    finally:
        busy_process.kill()
    return {name: {"quiet": quiet[name], "busy": busy[name]} for name in steps_of} | \
        {"threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "busy_machine.md"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, threads = args.child
        print(json.dumps(child(case, None if threads == "all" else int(threads), args.steps)))
        return
    from step_time import cpu_model
    lines = [f"# Step time with one competing busy process ({os.cpu_count()} cores, {cpu_model()})", "",
             f"Median and 90th percentile of {args.steps} steps, quiet and busy; VeLO on the tvm backend and torch's "
             "AdamW(fused=True) interleaved on the same tensors.", "",
             "| case | torch threads | optimizer | quiet median (ms) | quiet p90 | busy median (ms) | busy p90 | "
             "busy / quiet median |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for case in CASES:
        for threads in ("all", "1"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, threads,
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True, cwd=ROOT)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            for name, label in (("velo", "VeLO (tvm)"), ("adamw", "AdamW (fused)")):
                (qm, q90), (bm, b90) = result[name]["quiet"], result[name]["busy"]
                lines.append(f"| {case} | {result['threads']} | {label} | {qm:.2f} | {q90:.2f} | {bm:.2f} | "
                             f"{b90:.2f} | {bm / qm:.2f}x |")
            print(lines[-2], lines[-1], sep="\n", flush=True)
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
