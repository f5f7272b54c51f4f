"""The one device check for a lent GPU machine: build, parity against the reference on
the device, CUDA-graph capture of a step, step time against torch's fused AdamW at
10M and 100M parameters, and the bandwidth each pass of the cuda backend achieves
(VeLO, small_fc_lopt) against a device copy. Prints the tables last (commit them with
the closing note).

    python benchmarks/gpu_check.py                               # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --sizes 64K --steps 2   # dry run, no GPU
    python benchmarks/gpu_check.py --prebuild-only   # fill the kernel cache (nvcc, parallel)

Backends: "cuda" (Jinja-templated kernels) and "tvm" (TVM's CUDA kernels, built with nvcc).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

# Steady steps are timed: each kernel is built when first needed, not in the background.
os.environ.setdefault("LOPT_BACKGROUND_BUILDS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.step_time import import_spec, parse_count  # noqa: E402

SPECS = ("small_fc_lopt", "velo", "adam", "mulo", "elo", "celo2", "elo_celo2")
PARITY_SHAPES = [(), (7,), (5, 3), (3, 5), (4, 2, 3, 3), (257, 129)]


def optimizer(spec: str, params, backend: str, lr: float):
    cls = import_spec(spec)
    extra = {"num_steps": 1000} if spec == "velo" else {}
    weights = {"weights": "random"} if cls.program.weight_groups else {}
    return cls(params, lr=lr, backend=backend, **weights, **extra)


def _prebuild_job(job: tuple[str, str, str, str, str]) -> str:
    """One build into the kernel cache: ("cuda", spec, arch, "", "") or
    ("tvm", spec, arch, dtype, tensor kind)."""
    backend, spec, arch, dtype, kind = job
    start = time.perf_counter()
    program = import_spec(spec).program
    if backend == "cuda":
        from lopt_codegen.backends.cuda.backend import CudaBackend
        from lopt_codegen.backends.cuda.build import build_cuda

        build_cuda(CudaBackend(program).rendered.source, f"lopt_{program.name}", (arch,))
    else:
        from lopt_codegen.backends.tvm.backend import generic_signatures
        from lopt_codegen.backends.tvm.build import cuda_kernels_path

        sigs = generic_signatures(program, dtype, gpu=True)[kind]
        cuda_kernels_path(program, kind.split("-")[0], sigs, arch)
    return f"{backend} {spec} {dtype} {kind} {arch}: {time.perf_counter() - start:.0f} s"


def prebuild(specs: list[str], backends: list[str], arch: str, workers: int) -> None:
    """Every kernel the check runs, built in parallel processes (nvcc per spec and tensor
    kind) before anything is timed: one cold build at a time would take minutes."""
    import concurrent.futures
    import multiprocessing

    jobs = [("cuda", s, arch, "", "") for s in specs if "cuda" in backends]
    if "tvm" in backends:
        from lopt_codegen.backends.tvm.backend import generic_signatures

        jobs += [("tvm", s, arch, d, kind) for s in specs for d in ("float32", "bfloat16")
                 for kind in generic_signatures(import_spec(s).program, d, gpu=True)]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_prebuild_job, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            try:
                print("prebuilt", future.result(), flush=True)
            except Exception as exc:  # noqa: BLE001 - the check itself reports the broken case
                print("prebuild failed", futures[future], f"{type(exc).__name__}: {exc}"[:300], flush=True)
    print(f"prebuild: {len(jobs)} builds in {time.perf_counter() - start:.0f} s", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parity(spec: str, backend: str, device: str, steps: int) -> str:
    """Largest error of a step's update against the reference, relative to the update."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in PARITY_SHAPES]
    lr = {"adam": 1.0, "velo": 300.0}.get(spec, 30.0)
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
                if isinstance(value, torch.Tensor):
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
    backend, dev = opt.backend, p.device   # cuda:0, as the launches are keyed
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


def profile(spec: str, count: int, device: str, steps: int = 3) -> tuple[str, ...]:
    """Where a steady cuda-backend step's time goes (torch.profiler over `steps` steps on one
    square matrix): wall ms, GPU busy ms and kernel launches per step, the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    n = int(count ** 0.5)
    p = torch.nn.Parameter(torch.randn(n, n, device=device))
    p.grad = torch.randn_like(p) * 1e-3
    opt = optimizer(spec, [p], "cuda", 1e-4)
    for _ in range(3):
        opt.step(loss=1.0)
    sync(device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step(loss=1.0)
        sync(device)
        wall = (time.perf_counter() - t0) / steps
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    launches = sum(e.count for e in kernels) / steps
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]
    costliest = "; ".join(f"{e.key[:40]} {e.self_device_time_total / steps / 1e3:.3f}" for e in top)
    return spec, f"{n}x{n}", f"{wall * 1e3:.3f}", f"{busy:.3f}", f"{launches:g}", costliest


def mlp_multiply_adds(spec: str) -> int:
    """Per element, of the (folded) MLP of the first variant that has one (0: none): the
    compute a step cannot avoid."""
    from lopt_codegen.backends.cuda.render import render_cuda

    program = import_spec(spec).program
    if program.mlp is None:
        return 0
    L = next((L for ls in render_cuda(program, spec).layouts.values() for L in ls if L.mlp is not None), None)
    if L is None:
        return 0
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
    ap.add_argument("--profile", default="",
                    help="specs whose steady cuda-backend step is profiled at --bandwidth-size ('' skips)")
    ap.add_argument("--prebuild", action="store_true",
                    help="first build every kernel of --specs and --backends in parallel processes")
    ap.add_argument("--prebuild-only", action="store_true", help="fill the kernel cache and stop")
    ap.add_argument("--arch", default=None, help="CUDA arch to prebuild for (default: the device's)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel prebuild processes")
    args = ap.parse_args(argv)
    args.bandwidth_size = args.bandwidth_size or max(args.sizes.split(","), key=parse_count)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --device cpu for a dry run")
    if args.prebuild or args.prebuild_only:
        arch = args.arch or "sm_{}{}".format(*torch.cuda.get_device_capability())
        prebuild(args.specs.split(","), args.backends.split(","), arch, args.workers)
    if args.prebuild_only:
        return
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
    profiles = []
    for spec in filter(None, args.profile.split(",")):
        try:
            profiles.append(profile(spec, parse_count(args.bandwidth_size), args.device))
        except Exception as exc:  # noqa: BLE001 - reported, the other tables still print
            traceback.print_exc()
            profiles.append((spec, "-", "n/a", "n/a", "n/a", f"error: {type(exc).__name__}"[:80]))
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
    if profiles:
        print("| spec (cuda backend) | tensor | step wall (ms) | GPU busy (ms) | launches | costliest kernels (ms) |")
        print("|---|---:|---:|---:|---:|---|")
        for row in profiles:
            print("| " + " | ".join(row) + " |")
        print()
    print("| spec | backend | params | step (ms) | AdamW fused (ms) | x AdamW | checks |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
