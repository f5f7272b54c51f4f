"""The memory rates a step's passes can reach on this machine, where the traffic floors
of step_time.py take fused AdamW's alone: reading only (torch.sum: a pass that sums and
writes nothing, as VeLO's first), reading and writing in place (a.add_(b), fused AdamW:
a pass that updates its state), over tensors that fit in the L3 cache (4 MB each) and
over tensors of 256 MB each (from memory).

    python benchmarks/memory_rates.py          # writes benchmarks/memory_rates.md

Rates are bytes moved per second (a float read or written in place counts 4 bytes each
way; fused AdamW its 28 bytes a parameter), medians of interleaved calls.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import machine_info, time_interleaved  # noqa: E402


def rates(sizes_mb: list[int], steps: int) -> list[tuple[str, int, float]]:
    """(what, megabytes of each tensor, GB/s) for each pattern and size."""
    rows = []
    for mb in sizes_mb:
        n = mb * (1 << 20) // 4
        a, b = torch.randn(n), torch.randn(n)
        param = torch.nn.Parameter(torch.randn(n))
        param.grad = torch.randn(n)
        adamw = torch.optim.AdamW([param], lr=1e-4, fused=True)
        patterns = {"read (torch.sum)": (a.sum, 4 * n),   # (the call, the bytes it moves)
                    "read and write in place (a.add_(b))": (lambda: a.add_(b, alpha=1e-3), 12 * n),
                    "fused AdamW (28 B a parameter)": (adamw.step, 28 * n)}
        medians, errors = time_interleaved({name: fn for name, (fn, _) in patterns.items()}, 3, steps, "cpu")
        if errors:
            raise RuntimeError(f"memory rates: {errors}")
        rows += [(name, mb, moved / medians[name] / 1e9) for name, (_, moved) in patterns.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,256", help="megabytes per tensor, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_rates.md"))
    args = parser.parse_args()
    rows = rates([int(s) for s in args.sizes.split(",")], args.steps)
    info = machine_info("cpu")
    lines = ["# Memory rates", "", __doc__.split("\n\n")[0], "",
             "| pattern | MB a tensor | GB/s |", "|---|---:|---:|"]
    lines += [f"| {name} | {mb} | {rate:.1f} |" for name, mb, rate in rows]
    lines += ["", f"Machine: {info['cores']} cores ({info['torch_threads']} torch threads), {info['processor']}, "
              f"{info['platform']}; torch {info['torch']}; {info['date']}."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
