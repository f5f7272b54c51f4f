"""The first steps of VeLO on the tvm backend on a GPT-2-shaped model (76 tensors,
13.9M parameters), each case in a fresh process on a build cache of its own:

- cold, waiting: every kernel compiled before the step that needs it (LOPT_BACKGROUND_BUILDS=0);
- cold: nothing cached, kernels built in the background (the default);
- generic cached: the shape-generic kernels cached (`lopt-compile --backend tvm` prebuilds
  them), the model's own kernels built in the background;
- fused AdamW: torch's AdamW(fused=True) on the same tensors, for comparison: its first
  step also makes its state (2 floats an element, VeLO's 4) in fresh memory.

Printed: the first step, the next few, and the steady step once every build finished;
and the size of the optimizer's state with the time zeros of that size take in fresh
memory, as the first step makes them (page faults: on some machines a large part of it).

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
# label: (LOPT_BACKGROUND_BUILDS, shape-generic kernels prebuilt, torch's fused AdamW in VeLO's place)
CASES = {"cold, waiting": ("0", False, False), "cold": ("1", False, False), "generic cached": ("1", True, False),
         "fused AdamW": ("1", False, True)}


def child(steps: int, adamw: bool) -> dict:
    import torch
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from step_time import gpt_shapes

    from generated.velo import VeLO

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in gpt_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    if adamw:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    else:
        opt = VeLO(params, lr=1e-4, num_steps=10_000, weights="random", backend="tvm")
    kwargs = {} if adamw else {"loss": torch.tensor(1.0)}
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step(**kwargs)
        times.append(time.perf_counter() - start)
    builds = getattr(getattr(opt, "backend", None), "builds", None)   # (the tvm backend's)
    waited = time.perf_counter()
    if builds is not None:
        builds.wait()
    waited = time.perf_counter() - waited
    steady = []
    for _ in range(5):
        start = time.perf_counter()
        opt.step(**kwargs)
        steady.append(time.perf_counter() - start)
    values = [v for state in opt.state.values() for v in (state.values() if isinstance(state, dict) else [state])]
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in values if torch.is_tensor(v)}
    state_bytes = sum(storages.values())
    start = time.perf_counter()
    torch.zeros(state_bytes // 4)
    zeros = time.perf_counter() - start
    return {"first": times[0], "next": times[1:], "waited": waited, "steady": statistics.median(steady),
            "state_mb": state_bytes / 1e6, "zeros": zeros}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "first_step.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adamw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps, args.adamw)))
        return
    from step_time import cpu_model
    lines = ["# The first steps of VeLO (tvm) on a GPT-2-shaped model (76 tensors, 13.9M parameters)", "",
             f"Each case in a fresh process with a build cache of its own; {os.cpu_count()} cores, {cpu_model()}.", "",
             "| case | prebuild (s) | first step (s) | next steps (s) | then waited (s) | steady step (s) | "
             "first / steady | state (MB) | its zeros (s) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for label, (background, prebuilt, adamw) in CASES.items():
        with tempfile.TemporaryDirectory(prefix="lopt-first-step-") as cache:
            env = dict(os.environ, LOPT_CACHE_DIR=cache, LOPT_BACKGROUND_BUILDS=background, PYTHONPATH=ROOT)
            prebuild = 0.0
            if prebuilt:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "lopt_codegen.cli", "--backend", "tvm", "--out",
                                os.path.join(cache, "generated"), os.path.join(ROOT, "specs", "velo.yaml")],
                               env=env, cwd=ROOT, check=True, capture_output=True)
                prebuild = time.perf_counter() - start
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps)]
                                 + (["--adamw"] if adamw else []),
                                 env=env, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)   # (its errors shown)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(f"| {label} | {prebuild:.1f} | {r['first']:.3f} | {', '.join(f'{t:.2f}' for t in r['next'])} | "
                     f"{r['waited']:.1f} | {r['steady']:.3f} | {r['first'] / r['steady']:.1f}x | "
                     f"{r['state_mb']:.0f} | {r['zeros']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
