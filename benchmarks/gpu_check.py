"""The one device check for a lent GPU machine: build, parity against the reference on
the device, CUDA-graph capture of a step, step time against torch's fused AdamW at
10M and 100M parameters, and the bandwidth each pass of the cuda backend achieves
(VeLO, small_fc_lopt) against a device copy. Prints the tables last (commit them with
the closing note).

    python benchmarks/gpu_check.py                               # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --sizes 64K --steps 2   # dry run, no GPU

Backends: "cuda" (Jinja-templated kernels) and "tvm" (TVM's CUDA kernels, built with nvcc).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.step_time import import_spec, parse_count  # noqa: E402

SPECS = ("small_fc_lopt", "velo", "adam")
PARITY_SHAPES = [(), (7,), (5, 3), (3, 5), (4, 2, 3, 3), (257, 129)]


def optimizer(spec: str, params, backend: str, lr: float):
    extra = {"num_steps": 1000} if spec == "velo" else {}
    weights = {} if spec == "adam" else {"weights": "random"}
    return import_spec(spec)(params, lr=lr, backend=backend, **weights, **extra)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parity(spec: str, backend: str, device: str, steps: int) -> str:
    """Largest error of a step's update against the reference, relative to the update."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in PARITY_SHAPES]
    lr = {"adam": 1.0, "small_fc_lopt": 30.0, "velo": 300.0}[spec]
    ref_p = [torch.nn.Parameter(p.clone().to(device)) for p in start]
    our_p = [torch.nn.Parameter(p.clone().to(device)) for p in start]
    ref, ours = optimizer(spec, ref_p, "reference", lr), optimizer(spec, our_p, backend, lr)
    worst = 0.0
    for _ in range(steps):
        for p, q in zip(ref_p, our_p):
            g = torch.randn(p.shape, generator=gen).to(device)
            p.grad, q.grad = g.clone(), g.clone()
        before = [p.detach().clone() for p in ref_p]
        ref.step(loss=1.0)
        ours.step(loss=1.0)
        for p, q, b in zip(ref_p, our_p, before):
            d_ref, d_ours = p.detach() - b, q.detach() - b
            rounding = 2 * torch.finfo(torch.float32).eps * float(b.abs().max())
            worst = max(worst, (float((d_ref - d_ours).abs().max()) - rounding) / float(d_ref.abs().max()))
            q.data.copy_(p.data)
            for key, value in ref.state[p].items():
                ours.state[q][key].copy_(value)
    fallback = getattr(ours.backend, "_warned", None)   # tvm sends what it cannot run to the reference
    if fallback:
        return f"FAIL (ran on the reference: {sorted(fallback)[0][:80]})"
    return f"{'PASS' if worst <= 1e-5 else 'FAIL'} {max(worst, 0.0):.1e}"


def graph_capture(spec: str, backend: str, device: str) -> str:
    if not device.startswith("cuda"):
        return "n/a (cpu)"
    p = torch.nn.Parameter(torch.randn(1024, 1024, device=device))
    p.grad = torch.randn_like(p)
    opt = optimizer(spec, [p], backend, 1e-3)
    loss = torch.tensor(1.0, device=device)
    try:
        stream = torch.cuda.Stream()   # warm-up on a side stream (state, caches, tables), as torch asks
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                opt.step(loss=loss)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step(loss=loss)
        graph.replay()
        sync(device)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def step_time(spec: str, backend: str, count: int, device: str, steps: int) -> tuple[float, float]:
    """Median ms per step of (backend, fused AdamW) on a square matrix of ~count params."""
    n = int(count ** 0.5)
    def make():
        p = torch.nn.Parameter(torch.randn(n, n, device=device))
        p.grad = torch.randn_like(p) * 1e-3
        return p
    ours, adamw_p = make(), make()
    opt = optimizer(spec, [ours], backend, 1e-4)
    fused = {"fused": True} if device.startswith("cuda") else {"foreach": True}
    adamw = torch.optim.AdamW([adamw_p], lr=1e-4, **fused)
    fns = {"ours": lambda: opt.step(loss=1.0), "adamw": adamw.step}
    for fn in fns.values():
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["ours"]) * 1e3, statistics.median(times["adamw"]) * 1e3


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of fn() over reps runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


ADAMW_BYTES = 28   # per float32 element: reads p, g, m, v; writes p, m, v


def copy_bandwidth(count: int, device: str, reps: int) -> float:
    """GB/s of a float32 device-to-device copy of count elements (read + write)."""
    src = torch.randn(count, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * count / timed(lambda: dst.copy_(src), device, reps) / 1e9


def pass_bandwidth(spec: str, count: int, device: str, reps: int) -> list[tuple[str, ...]]:
    """Each pass of the cuda backend on one square float32 matrix of ~count params:
    its kernel alone (rerun on its kept table), GB/s by its compulsory traffic
    (PassLayout.element_bytes), and that as a share of a device copy."""
    n = int(count ** 0.5)
    p = torch.nn.Parameter(torch.randn(n, n, device=device))
    p.grad = torch.randn_like(p) * 1e-3
    opt = optimizer(spec, [p], "cuda", 1e-4)
    for _ in range(2):
        opt.step(loss=1.0)
    backend, dev = opt.backend, torch.device(device)
    module, copy = backend.module(dev), copy_bandwidth(n * n, device, reps)
    rows = []
    ran = [L for ls in backend.rendered.layouts.values() for L in ls if (L.name, dev) in backend._launches]
    for L in ran:
        launch = backend._launches[(L.name, dev)]
        if dev.type == "cuda":
            run = lambda: getattr(module, f"{L.name}_cuda")(launch.table, launch.total_blocks)  # noqa: E731
        else:
            run = lambda: getattr(module, f"{L.name}_host")(launch.table)  # noqa: E731
        seconds = timed(run, device, reps)
        rate = L.element_bytes() * n * n / seconds / 1e9
        rows.append((spec, L.name, f"{n}x{n}", f"{L.element_bytes():g}", f"{seconds * 1e3:.3f}", f"{rate:.0f}",
                     f"{rate / copy:.0%}"))
    return [row + (f"{copy:.0f}",) for row in rows]


def mlp_multiply_adds(spec: str) -> int:
    """Per element, of the factored variant's (folded) MLP: the compute a step cannot avoid."""
    from lopt_codegen.backends.cuda.render import render_cuda

    program = optimizer(spec, [torch.nn.Parameter(torch.zeros(2, 2))], "reference", 1e-3).program
    L = next(L for L in render_cuda(program, spec).layouts["factored"] if L.mlp is not None)
    dims = (L.fold.features, *L.mlp.attrs[0][1:])
    return sum(a * b for a, b in zip(dims, dims[1:]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="10M,100M")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--backends", default="cuda,tvm")
    ap.add_argument("--bandwidth", default="velo,small_fc_lopt",
                    help="specs whose cuda-backend passes are rated against a device copy ('' skips)")
    ap.add_argument("--bandwidth-size", default=None, help="default: the largest of --sizes")
    args = ap.parse_args(argv)
    args.bandwidth_size = args.bandwidth_size or max(args.sizes.split(","), key=parse_count)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --device cpu for a dry run")
    rows = []
    for spec in args.specs.split(","):
        for backend in args.backends.split(","):
            try:
                check = parity(spec, backend, args.device, steps=3)
                capture = graph_capture(spec, backend, args.device)
                for size in args.sizes.split(","):
                    ms, adamw_ms = step_time(spec, backend, parse_count(size), args.device, args.steps)
                    rows.append((spec, backend, size, f"{ms:.3f}", f"{adamw_ms:.3f}", f"{ms / adamw_ms:.2f}x",
                                 f"parity {check}; graph capture {capture}"))
            except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
                traceback.print_exc()
                rows.append((spec, backend, "-", "n/a", "n/a", "n/a", f"error: {type(exc).__name__}: {exc}"[:160]))
    bandwidth = []
    for spec in filter(None, args.bandwidth.split(",")):
        try:
            bandwidth += pass_bandwidth(spec, parse_count(args.bandwidth_size), args.device, args.steps)
        except Exception as exc:  # noqa: BLE001 - reported, the step table still prints
            traceback.print_exc()
            bandwidth.append((spec, "-", args.bandwidth_size, "n/a", "n/a", "n/a", "n/a",
                              f"error: {type(exc).__name__}"[:80]))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (dry run)"
    print(f"\n## gpu_check on {name}, torch {torch.__version__}\n")
    if bandwidth:
        print("| spec | pass (cuda backend) | tensor | B/element | kernel (ms) | GB/s | of copy | copy GB/s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for row in bandwidth:
            print("| " + " | ".join(row) + " |")
        for spec in dict.fromkeys(row[0] for row in bandwidth if row[3] != "n/a"):
            total = sum(float(row[3]) for row in bandwidth if row[0] == spec)
            macs = mlp_multiply_adds(spec)
            print(f"\n{spec}: its passes move {total:g} B/element, fused AdamW {ADAMW_BYTES}: at equal bandwidth "
                  f"a step takes at least {total / ADAMW_BYTES:.2f}x AdamW's. Its MLP runs {macs} float32 "
                  f"multiply-adds per element: {2 * macs * parse_count(args.bandwidth_size) / 1e12:.2f} TFLOP "
                  f"per step at {args.bandwidth_size}.")
        print()
    print("| spec | backend | params | step (ms) | AdamW fused (ms) | x AdamW | checks |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
