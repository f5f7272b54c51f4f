"""Step time of the generated optimizers, as ratios against torch AdamW in the same run.

For every spec (small_fc_lopt, velo, adam), every backend in
`lopt_codegen.backends.BACKENDS` and every case (one square matrix + bias of about
1M / 4M parameters, and "many": 200 small tensors of mixed rank, ~1M parameters), the
median time of `opt.step()` is measured interleaved with torch.optim.AdamW(foreach=True)
on tensors of the same shapes, so machine noise hits both alike. `torch.compile(opt.step)`
of the reference backend is measured in a child process (a compile that fails or runs
past --compile-timeout is recorded as n/a with the reason), also against its own AdamW.

Gradients are random, fixed, and set once before timing: only the optimizer step is timed.
VeLO gets a constant loss. Writes results.md, results.json and (with matplotlib) a plot.

    python benchmarks/step_time.py                     # 1M, 4M, many; 20 timed steps
    python benchmarks/step_time.py --sizes 1M,16M --steps 10 --no-compile
    python benchmarks/step_time.py --quick --out /tmp/bench   # a tiny smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

SPECS = ("small_fc_lopt", "velo", "adam")
DEFAULT_SIZES = "1M,4M,many"
QUICK_SIZES = "4K,many:8"
VELO_NUM_STEPS = 10_000
LR = 1e-3  # small, so params stay finite over many timed steps (the lr does not change the work)
COMPILED = "reference+torch.compile"

# "many": a cycle of small shapes of mixed rank, ~5k parameters each on average.
_MANY_SHAPES = [(64, 128), (128,), (96, 96), (256,), (128, 64), (32, 16, 3, 3), (33,), (32, 256),
                (512,), (100, 60)]


# --- cases ------------------------------------------------------------------------------
def parse_count(text: str) -> int:
    """'1M' -> 2**20, '4K' -> 4096, '1000' -> 1000."""
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def case_shapes(token: str) -> list[tuple[int, ...]]:
    """A case token: '1M' (a square matrix of ~that many params + its bias), '512x2048'
    (that matrix + bias), 'many' (200 small tensors, ~1M params) or 'many:<count>'."""
    if token.startswith("many"):
        count = int(token.split(":")[1]) if ":" in token else 200
        return [_MANY_SHAPES[i % len(_MANY_SHAPES)] for i in range(count)]
    if "x" in token:
        rows, cols = (int(v) for v in token.split("x"))
    else:
        rows = cols = max(1, round(math.sqrt(parse_count(token))))
    return [(rows, cols), (rows,)]


def make_tensors(shapes, seed: int, device: str):
    """Base parameter values and fixed random gradients (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=gen) * 0.1).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 0.01).to(device) for s in shapes]
    return params, grads


def clone_params(base, grads) -> list[torch.nn.Parameter]:
    out = []
    for b, g in zip(base, grads):
        p = torch.nn.Parameter(b.clone())
        p.grad = g.clone()
        out.append(p)
    return out


# --- optimizers -------------------------------------------------------------------------
def import_spec(spec: str):
    module = __import__(f"generated.{spec}", fromlist=["*"])
    return getattr(module, module.__all__[0])


def make_optimizer(spec: str, backend: str, params):
    cls = import_spec(spec)
    if spec == "adam":
        return cls(params, lr=LR, backend=backend)
    kwargs = {"num_steps": VELO_NUM_STEPS} if spec == "velo" else {}
    return cls(params, lr=LR, weights="random", seed=0, backend=backend, **kwargs)


def step_fn(opt, step: Callable | None = None) -> Callable[[], object]:
    loss = torch.tensor(1.0, device=opt.param_groups[0]["params"][0].device)
    step = step or opt.step
    needs_loss = getattr(getattr(opt, "program", None), "needs_loss", False)
    return (lambda: step(loss=loss)) if needs_loss else (lambda: step())


def available_backends() -> list[str]:
    from lopt_codegen.backends import BACKENDS
    names = []
    for name, cls in BACKENDS.items():
        check = getattr(cls, "available", None)
        if callable(check):
            try:
                if not check():
                    continue
            except Exception:  # noqa: BLE001 - an unavailable backend is skipped, not fatal
                continue
        names.append(name)
    return names


# --- timing -----------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, steps: int, device: str):
    """Median seconds per call of each fn; the fns take turns (rotating order) so slow
    phases of a noisy machine hit all of them. A fn that raises is reported, not timed."""
    errors: dict[str, str] = {}
    fns = dict(fns)
    for _ in range(warmup):
        for name in list(fns):
            try:
                fns[name]()
            except Exception as exc:  # noqa: BLE001 - recorded as n/a with the reason
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                del fns[name]
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(steps):
        k = i % max(1, len(names))
        for name in names[k:] + names[:k]:
            if name in errors:
                continue
            start = time.perf_counter()
            try:
                fns[name]()
                _sync(device)
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                continue
            times[name].append(time.perf_counter() - start)
    medians = {n: statistics.median(t) for n, t in times.items() if n not in errors and t}
    return medians, errors


def all_finite(opt) -> bool:
    return all(bool(torch.isfinite(p).all()) for g in opt.param_groups for p in g["params"])


def measure_case_spec(spec: str, token: str, backends: list[str], args) -> dict:
    """Backends of one spec and AdamW, interleaved on one case."""
    shapes = case_shapes(token)
    base, grads = make_tensors(shapes, args.seed, args.device)
    fns, opts, errors = {}, {}, {}
    adamw = torch.optim.AdamW(clone_params(base, grads), lr=LR, foreach=True)
    fns["adamw"] = step_fn(adamw)
    for backend in backends:
        try:
            opts[backend] = make_optimizer(spec, backend, clone_params(base, grads))
            fns[backend] = step_fn(opts[backend])
        except Exception as exc:  # noqa: BLE001
            errors[backend] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    medians, run_errors = time_interleaved(fns, args.warmup, args.steps, args.device)
    errors.update(run_errors)
    return {"medians": medians, "errors": errors,
            "finite": {b: all_finite(o) for b, o in opts.items() if b not in errors}}


def measure_compiled(spec: str, token: str, args) -> dict:
    """In this process: torch.compile(opt.step) of the reference backend vs AdamW."""
    shapes = case_shapes(token)
    base, grads = make_tensors(shapes, args.seed, args.device)
    adamw = torch.optim.AdamW(clone_params(base, grads), lr=LR, foreach=True)
    opt = make_optimizer(spec, "reference", clone_params(base, grads))
    step_fn(opt)()  # the first step creates the state eagerly; the compiled step sees it
    compiled = step_fn(opt, torch.compile(opt.step))
    start = time.perf_counter()
    compiled()
    _sync(args.device)
    compile_s = time.perf_counter() - start
    medians, errors = time_interleaved({"compiled": compiled, "adamw": step_fn(adamw)},
                                       args.warmup, args.steps, args.device)
    if errors:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in errors.items()))
    return {"ms": medians["compiled"] * 1e3, "adamw_ms": medians["adamw"] * 1e3,
            "compile_s": compile_s, "finite": all_finite(opt)}


def run_compiled_child(spec: str, token: str, args) -> dict:
    """measure_compiled in a child process, killed (with its whole process group) after
    --compile-timeout seconds. Returns its result or {"error": reason}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--compiled-child", spec, token,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--device", args.device]
    # A fresh inductor cache per case: compile times are cold-start times, comparable across runs.
    with tempfile.TemporaryDirectory(prefix="lopt_bench_inductor_") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, env=env, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=args.compile_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return {"error": f"compile+run took over {args.compile_timeout:.0f} s (--compile-timeout)"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        lines = [line for line in err.splitlines() if line.strip() and not line[0].isspace()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Unsupported|Interrupt)\b", line)]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1][:200]
        return {"error": f"torch.compile failed: {reason}"}
    return json.loads(lines[-1])


# --- the run ----------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    info = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "device": device,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _ratio(a, b):
    return a / b if a is not None and b else None


def run(args) -> dict:
    backends = available_backends()
    tokens = [t.strip() for t in args.sizes.split(",") if t.strip()]
    rows = []
    for token in tokens:
        shapes = case_shapes(token)
        n_params = sum(math.prod(s) for s in shapes)
        case = {"case": token, "n_params": n_params, "n_tensors": len(shapes)}
        for spec in args.specs:
            print(f"[{token}: {n_params:,} params in {len(shapes)} tensors] {spec} ...", flush=True)
            res = measure_case_spec(spec, token, backends, args)
            adamw_ms = res["medians"].get("adamw", 0.0) * 1e3 or None
            spec_rows = []
            for backend in backends:
                ms = res["medians"].get(backend)
                ms = ms * 1e3 if ms is not None else None
                spec_rows.append({**case, "spec": spec, "method": backend, "ms": ms, "adamw_ms": adamw_ms,
                                  "ratio_adamw": _ratio(ms, adamw_ms),
                                  "finite": res["finite"].get(backend), "note": res["errors"].get(backend)})
            if args.compile:
                c = run_compiled_child(spec, token, args)
                spec_rows.append({**case, "spec": spec, "method": COMPILED, "ms": c.get("ms"),
                                  "adamw_ms": c.get("adamw_ms"), "ratio_adamw": _ratio(c.get("ms"), c.get("adamw_ms")),
                                  "compile_s": c.get("compile_s"), "finite": c.get("finite"), "note": c.get("error")})
            ref = next((r for r in spec_rows if r["method"] == "reference"), None)
            comp = next((r for r in spec_rows if r["method"] == COMPILED), None)
            for r in spec_rows:
                # Each ratio between methods is a ratio of their AdamW ratios: the compiled
                # step is timed in another process, against its own AdamW.
                r["ratio_reference"] = _ratio(r["ratio_adamw"], ref and ref["ratio_adamw"])
                r["ratio_compiled"] = _ratio(r["ratio_adamw"], comp and comp["ratio_adamw"])
                print(f"    {r['method']:<26} " + (f"{r['ms']:9.3f} ms  x{r['ratio_adamw']:.1f} AdamW"
                                                   if r["ms"] is not None else f"n/a: {r['note']}"), flush=True)
            rows.extend(spec_rows)
    return {"machine": machine_info(args.device),
            "config": {"sizes": tokens, "specs": list(args.specs), "steps": args.steps, "warmup": args.warmup,
                       "compile": args.compile, "backends": backends, "lr": LR, "seed": args.seed,
                       "velo_num_steps": VELO_NUM_STEPS},
            "rows": rows}


def _fmt(v, spec=".2f", suffix=""):
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def to_markdown(results: dict) -> str:
    m, cfg = results["machine"], results["config"]
    lines = ["# Optimizer step time", "",
             f"Median of {cfg['steps']} steps after {cfg['warmup']} warmup steps, interleaved with "
             "torch.optim.AdamW(foreach=True) on tensors of the same shapes; only `opt.step()` is timed "
             "(fixed random gradients). Learned optimizers use weights=\"random\" (the work per step does not "
             "depend on the weights). `x AdamW` = step time / AdamW step time; `x ref` and `x compiled` divide "
             "this row's `x AdamW` by that of the reference backend and of `torch.compile(opt.step)` of the "
             "reference backend (timed in a child process against its own AdamW).", "",
             "| case | params | tensors | spec | method | step (ms) | AdamW (ms) | x AdamW | x ref | x compiled |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for r in results["rows"]:
        method = r["method"]
        if r.get("note"):
            notes.append(f"{r['case']} / {r['spec']} / {method}: {r['note']}")
            method += f" [{len(notes)}]"
        elif r.get("finite") is False:
            notes.append(f"{r['case']} / {r['spec']} / {method}: non-finite parameters after timing")
            method += f" [{len(notes)}]"
        if r.get("compile_s") is not None:
            method += f" (compile {r['compile_s']:.0f} s)"
        lines.append(f"| {r['case']} | {r['n_params']:,} | {r['n_tensors']} | {r['spec']} | {method} | "
                     f"{_fmt(r['ms'])} | {_fmt(r['adamw_ms'], '.3f')} | {_fmt(r['ratio_adamw'], '.1f', 'x')} | "
                     f"{_fmt(r.get('ratio_reference'), '.2f', 'x')} | {_fmt(r.get('ratio_compiled'), '.2f', 'x')} |")
    if not cfg["compile"]:
        lines += ["", "torch.compile was not measured (--no-compile)."]
    if notes:
        lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    lines += ["", f"Machine: {m['cores']} cores ({m['torch_threads']} torch threads), {m['processor']}, "
                  f"{m['platform']}, device {m.get('gpu', m['device'])}; torch {m['torch']}, "
                  f"Python {m['python']}; {m['date']}. Backends: {', '.join(cfg['backends'])}.", ""]
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): the plot was skipped")
        return False
    rows = [r for r in results["rows"] if r["ratio_adamw"] is not None]
    cases = list(dict.fromkeys(r["case"] for r in results["rows"]))
    series = list(dict.fromkeys((r["spec"], r["method"]) for r in results["rows"]))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(cases) * len(series) + 2), 5.5))
    width = 0.8 / max(1, len(series))
    colors = plt.get_cmap("tab20").colors   # 12+ series: the default 10 colors would repeat
    for i, (spec, method) in enumerate(series):
        values = [next((r["ratio_adamw"] for r in rows if r["case"] == c and r["spec"] == spec
                        and r["method"] == method), float("nan")) for c in cases]
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(cases))]
        ax.bar(xs, values, width, label=f"{spec} / {method}", color=colors[i % len(colors)])
        for x, v in zip(xs, values):
            if math.isnan(v):
                ax.text(x, 1.05, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c}\n{next(r['n_params'] for r in results['rows'] if r['case'] == c):,} params"
                        for c in cases])
    ax.set_ylabel("step time / AdamW step time")
    m = results["machine"]
    ax.set_title(f"Optimizer step time / AdamW(foreach) step time\n{m['device']}, {m['cores']} cores, "
                 f"torch {m['torch']}", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help=f"comma-separated cases: 1M, 4M, 16M (square matrix + bias), "
                    f"512x2048, many, many:<count> (default {DEFAULT_SIZES}; --quick: {QUICK_SIZES})")
    ap.add_argument("--specs", default=",".join(SPECS), help="comma-separated specs (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20; --quick: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip torch.compile of the reference backend")
    ap.add_argument("--compile-timeout", type=float, default=300.0,
                    help="seconds for one torch.compile case (compile + timing) before it is n/a")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="folder for results.md, results.json, step_time.png (default benchmarks/)")
    ap.add_argument("--compiled-child", nargs=2, metavar=("SPEC", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    unknown = [s for s in args.specs if s not in SPECS]
    if unknown:
        ap.error(f"unknown spec(s) {', '.join(unknown)}; known: {', '.join(SPECS)}")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compiled_child:
        print(json.dumps(measure_compiled(*args.compiled_child, args)), flush=True)
        return {}
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(to_markdown(results))
    png = os.path.join(args.out, "step_time.png")
    wrote_png = plot(results, png)
    print(f"wrote {os.path.join(args.out, 'results.md')}, results.json" + (", step_time.png" if wrote_png else ""))
    return results


if __name__ == "__main__":
    main()
