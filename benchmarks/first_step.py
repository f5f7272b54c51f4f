"""The first steps of VeLO on the tvm backend on a GPT-2-shaped model (76 tensors,
13.9M parameters), each case in a fresh process on a build cache of its own:

- cold, waiting: every kernel compiled before the step that needs it (LOPT_BACKGROUND_BUILDS=0);
- cold: nothing cached, kernels built in the background (the default);
- generic cached: the shape-generic kernels cached (`lopt-compile --backend tvm` prebuilds
  them), the model's own kernels built in the background.

Printed: the first step, the next few, and the steady step once every build finished.

    python benchmarks/first_step.py                 # writes benchmarks/first_step.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"cold, waiting": ("0", False), "cold": ("1", False), "generic cached": ("1", True)}


def child(steps: int) -> dict:
    import torch
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from step_time import gpt_shapes

    from generated.velo import VeLO

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in gpt_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = VeLO(params, lr=1e-4, num_steps=10_000, weights="random", backend="tvm")
    loss = torch.tensor(1.0)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step(loss=loss)
        times.append(time.perf_counter() - start)
    builds = getattr(opt.backend, "builds", None)
    waited = time.perf_counter()
    if builds is not None:
        builds.wait()
    waited = time.perf_counter() - waited
    steady = []
    for _ in range(5):
        start = time.perf_counter()
        opt.step(loss=loss)
        steady.append(time.perf_counter() - start)
    return {"first": times[0], "next": times[1:], "waited": waited, "steady": statistics.median(steady)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "first_step.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps)))
        return
    from step_time import cpu_model
    lines = ["# The first steps of VeLO (tvm) on a GPT-2-shaped model (76 tensors, 13.9M parameters)", "",
             f"Each case in a fresh process with a build cache of its own; {os.cpu_count()} cores, {cpu_model()}.", "",
             "| case | prebuild (s) | first step (s) | next steps (s) | then waited (s) | steady step (s) | "
             "first / steady |", "|---|---:|---:|---|---:|---:|---:|"]
    for label, (background, prebuilt) in CASES.items():
        with tempfile.TemporaryDirectory(prefix="lopt-first-step-") as cache:
            env = dict(os.environ, LOPT_CACHE_DIR=cache, LOPT_BACKGROUND_BUILDS=background, PYTHONPATH=ROOT)
            prebuild = 0.0
            if prebuilt:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "lopt_codegen.cli", "--backend", "tvm", "--out",
                                os.path.join(cache, "generated"), os.path.join(ROOT, "specs", "velo.yaml")],
                               env=env, cwd=ROOT, check=True, capture_output=True)
                prebuild = time.perf_counter() - start
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps)],
                                 env=env, cwd=ROOT, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(f"| {label} | {prebuild:.1f} | {r['first']:.2f} | {', '.join(f'{t:.2f}' for t in r['next'])} | "
                     f"{r['waited']:.1f} | {r['steady']:.3f} | {r['first'] / r['steady']:.1f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
