"""Step time of the generated optimizers, as ratios against torch's fused AdamW in the same run.

For every spec (small_fc_lopt, velo, adam), every backend (on CPU tensors: reference and
tvm; the cuda backend's host build is a testing path, --backends adds it) and every case
(one square matrix + bias of about 1M / 4M parameters; "many": 200 small tensors of
mixed rank; "gpt": a GPT-2-shaped model, 76 tensors, 13.9M parameters; "resnet": a
ResNet-18-shaped one, 62 tensors, 11.7M), the median time of `opt.step()` is measured
interleaved with torch.optim.AdamW(fused=True), the anchor of every ratio, and
AdamW(foreach=True), on tensors of the same shapes, so machine noise hits all alike.

Each spec also gets its floors in the same run: the traffic floor (the bytes its plan's
passes move over these tensors, at the bandwidth fused AdamW reached: 28 B/element), the
FMA floor (its MLP's multiply-adds over these tensors, and its network's, at the rate
torch.mm of 1024x1024 matrices reached, timed in turn with the steps) and the pass floor (each pass at the slower of the two, one pass after
another: a spec whose passes are some memory-bound, some FMA-bound cannot go below it).
`torch.compile(opt.step)` of the reference backend is
measured in a child process (a compile that fails or runs past --compile-timeout is
recorded as n/a with the reason), against its own fused AdamW.

Gradients are random, fixed, and set once before timing: only the optimizer step is timed.
Every optimizer steps under an LR schedule, as in training (each step's learning rate a
little lower than the last one's: its hyperparameters change at every step). VeLO gets
a constant loss. Writes results.md, results.json and (with matplotlib) a plot.

    python benchmarks/step_time.py                     # 1M, 4M, many, gpt, resnet; 20 timed steps
    python benchmarks/step_time.py --sizes 1M,16M --steps 10 --no-compile
    python benchmarks/step_time.py --quick --out /tmp/bench   # a tiny smoke run
"""
from __future__ import annotations

import argparse
import datetime
import itertools
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

# Steady steps are timed: each kernel is built when first needed, not in the background.
os.environ.setdefault("LOPT_BACKGROUND_BUILDS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

SPECS = ("small_fc_lopt", "velo", "adam")
DEFAULT_SIZES = "1M,4M,many,gpt,resnet"
QUICK_SIZES = "4K,many:8"
ADAMW_BYTES = 28   # fused AdamW per float32 element: reads p, g, m, v; writes p, m, v
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


def gpt_shapes(vocab: int = 8192, width: int = 384, context: int = 256, blocks: int = 6) -> list[tuple[int, ...]]:
    """GPT-2's tensors: token and position embeddings, per block two norms, attention
    (qkv, projection) and MLP (4x) weights with biases, and the final norm."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(blocks):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def resnet_shapes(classes: int = 1000) -> list[tuple[int, ...]]:
    """ResNet-18's tensors: the stem, 4 stages of 2 basic blocks (3x3 convs, batch norms,
    a 1x1 downsample where the width doubles) and the classifier."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    width = 64
    for out in (64, 128, 256, 512):
        for block in range(2):
            first = width if block == 0 else out
            shapes += [(out, first, 3, 3), (out,), (out,), (out, out, 3, 3), (out,), (out,)]
            if block == 0 and first != out:
                shapes += [(out, first, 1, 1), (out,), (out,)]
        width = out
    return shapes + [(classes, 512), (classes,)]


def case_shapes(token: str) -> list[tuple[int, ...]]:
    """A case token: '1M' (a square matrix of ~that many params + its bias), '512x2048'
    (that matrix + bias), 'many' (200 small tensors, ~1M params) or 'many:<count>',
    'gpt' or 'resnet' (those models' tensors)."""
    if token == "gpt":
        return gpt_shapes()
    if token == "resnet":
        return resnet_shapes()
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


def step_fn(opt, step: Callable | None = None, schedule: bool = False) -> Callable[[], object]:
    """One step of `opt` (with a loss where it needs one); with `schedule`, each step's
    learning rate a little lower than the last one's, as under a training run's LR
    schedule (the hyperparameters then change at every step)."""
    loss = torch.tensor(1.0, device=opt.param_groups[0]["params"][0].device)
    step = step or opt.step
    needs_loss = getattr(getattr(opt, "program", None), "needs_loss", False)
    once = (lambda: step(loss=loss)) if needs_loss else (lambda: step())
    if not schedule:
        return once
    groups, steps = opt.param_groups, itertools.count(1)

    def scheduled() -> object:
        decay = 1.0 - 1e-4 * (next(steps) % 1000)
        for group in groups:
            group["lr"] = LR * decay
        return once()
    return scheduled


def available_backends(device: str) -> list[str]:
    """Every backend that can run here; on CPU tensors not the cuda backend's host build
    (a single-threaded testing path, far slower than either)."""
    from lopt_codegen.backends import BACKENDS
    names = []
    for name, cls in BACKENDS.items():
        if name == "cuda" and not device.startswith("cuda"):
            continue
        check = getattr(cls, "available", None)
        if callable(check):
            try:
                if not check():
                    continue
            except Exception:  # noqa: BLE001 - an unavailable backend is skipped, not fatal
                continue
        names.append(name)
    return names


# --- floors -----------------------------------------------------------------------------
def plan_cost(spec: str, shapes: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """(bytes, multiply-adds) of each pass of one step over float32 tensors of `shapes`, from
    the spec's plan: what each tensor's passes read and write, and its MLP's work. Pass k of
    every tensor runs before pass k+1 of any (its small work needs pass k's sums). A spec's
    network (VeLO's LSTM) is one more round: its weights read once, its layers'
    multiply-adds once per tensor (its folded layers' as they run, FOLD_FROM_ROWS tensors
    or more: backends/network_fold.py)."""
    from lopt_codegen.backends.network_fold import FOLD_FROM_ROWS, folded_body
    from lopt_codegen.ir.network import network_cost
    from lopt_codegen.ir.plan import plan_program
    from lopt_codegen.runtime.axes import factored_axes
    from lopt_codegen.runtime.weights import resolve_weights

    program = import_spec(spec).program
    if program.routes:
        raise NotImplementedError(f"{spec}: the floors of a spec with routes need its routing rule")
    plans = plan_program(program)
    rounds: list[tuple[int, int]] = []
    for shape in shapes:
        variant = "unfactored" if factored_axes(shape, program.factored_axes) is None else "factored"
        for k, p in enumerate(plans[variant].passes):
            if k == len(rounds):
                rounds.append((0, 0))
            nbytes, macs = rounds[k]
            rounds[k] = (nbytes + math.prod(shape) * p.bytes_per_element, macs + math.prod(shape) * p.macs)
    if program.network is not None:
        weights = resolve_weights(program, "random", 0)
        each, once, floats = network_cost(program.network, {g: {k: tuple(v.shape) for k, v in weights[g].items()}
                                                            for g in program.network.groups})
        if len(shapes) >= FOLD_FROM_ROWS:
            for _, _, e in folded_body(program.network, weights):
                if e[0] == "folded_linear":
                    written, folded, bias = e[1].macs(weights)
                    each, once = each - written + folded, once + bias
        rounds.append((4 * floats, each * len(shapes) + once))
    return rounds


def pass_floor(rounds: list[tuple[int, int]], bandwidth: float, rate: float) -> float:
    """The step's floor with each pass at its own bound: its traffic at `bandwidth` or its
    multiply-adds at `rate`, whichever is slower, the passes one after another (units: those
    of bandwidth and rate, e.g. B/ms and MACs/ms give ms)."""
    return sum(max(nbytes / bandwidth, macs / rate) for nbytes, macs in rounds)


MM_SIZE = 1024   # torch.mm of MM_SIZE x MM_SIZE float32 matrices: the FMA rate this
# machine's BLAS reaches, the floor of an MLP-bound step


def mm_fn(device: str) -> Callable[[], object]:
    a, b = (torch.randn(MM_SIZE, MM_SIZE, device=device) for _ in range(2))
    return lambda: torch.mm(a, b)


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
    """Backends of one spec, both AdamWs and torch.mm (the FMA floor's rate) interleaved on
    one case: each floor's rate measured under the same load as the steps (torch.mm timed
    on its own after them moved the FMA floor by up to 30% between runs)."""
    shapes = case_shapes(token)
    base, grads = make_tensors(shapes, args.seed, args.device)
    fns, opts, errors = {}, {}, {}
    for name, flavour in (("adamw_fused", "fused"), ("adamw_foreach", "foreach")):
        fns[name] = step_fn(torch.optim.AdamW(clone_params(base, grads), lr=LR, **{flavour: True}), schedule=True)
    fns["torch.mm"] = mm_fn(args.device)
    for backend in backends:
        try:
            opts[backend] = make_optimizer(spec, backend, clone_params(base, grads))
            fns[backend] = step_fn(opts[backend], schedule=True)
        except Exception as exc:  # noqa: BLE001
            errors[backend] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    medians, run_errors = time_interleaved(fns, args.warmup, args.steps, args.device)
    errors.update(run_errors)
    if "torch.mm" not in medians:
        raise RuntimeError(f"torch.mm failed: {errors.get('torch.mm')}")
    return {"medians": medians, "errors": errors, "mm_rate": MM_SIZE ** 3 / medians.pop("torch.mm"),
            "finite": {b: all_finite(o) for b, o in opts.items() if b not in errors}}


def measure_compiled(spec: str, token: str, args) -> dict:
    """In this process: torch.compile(opt.step) of the reference backend vs fused AdamW."""
    shapes = case_shapes(token)
    base, grads = make_tensors(shapes, args.seed, args.device)
    adamw = torch.optim.AdamW(clone_params(base, grads), lr=LR, fused=True)
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
def cpu_model() -> str:
    """The CPU's name and LLVM's name for it (what the kernels are built for): the floors
    and ratios differ between CPUs (torch.mm: ~90 GMAC/s on 2 Zen 4 cores, ~175 on 2
    cores with two AVX-512 FMA units)."""
    from tvm.target.codegen import llvm_get_system_cpu
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({llvm_get_system_cpu()})"


def machine_info(device: str) -> dict:
    info = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": cpu_model(), "device": device,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _ratio(a, b):
    return a / b if a is not None and b else None


def run(args) -> dict:
    backends = args.backends or available_backends(args.device)
    tokens = [t.strip() for t in args.sizes.split(",") if t.strip()]
    rows = []
    for token in tokens:
        shapes = case_shapes(token)
        n_params = sum(math.prod(s) for s in shapes)
        case = {"case": token, "n_params": n_params, "n_tensors": len(shapes)}
        for spec in args.specs:
            print(f"[{token}: {n_params:,} params in {len(shapes)} tensors] {spec} ...", flush=True)
            res = measure_case_spec(spec, token, backends, args)
            fused = res["medians"].get("adamw_fused", 0.0) * 1e3 or None
            foreach = res["medians"].get("adamw_foreach", 0.0) * 1e3 or None
            rounds = plan_cost(spec, shapes)
            nbytes, macs = sum(b for b, _ in rounds), sum(m for _, m in rounds)
            # Fused AdamW's bandwidth (B/ms) and torch.mm's rate (MACs/ms), both of this run.
            bandwidth = ADAMW_BYTES * n_params / fused if fused else None
            floors = {"traffic_floor_ms": nbytes / bandwidth if bandwidth else None,
                      "fma_floor_ms": macs / (res["mm_rate"] / 1e3) if macs else None,
                      "pass_floor_ms": pass_floor(rounds, bandwidth, res["mm_rate"] / 1e3) if bandwidth else None,
                      "bandwidth_gbs": bandwidth / 1e6 if bandwidth else None,
                      "mm_gmacs": res["mm_rate"] / 1e9, "bytes_per_param": nbytes / n_params}
            spec_rows = []
            for backend in backends:
                ms = res["medians"].get(backend)
                ms = ms * 1e3 if ms is not None else None
                spec_rows.append({**case, "spec": spec, "method": backend, "ms": ms, "adamw_ms": fused,
                                  "foreach_ms": foreach, "ratio_adamw": _ratio(ms, fused),
                                  "ratio_foreach": _ratio(ms, foreach), **floors,
                                  "finite": res["finite"].get(backend), "note": res["errors"].get(backend)})
            if args.compile:
                c = run_compiled_child(spec, token, args)
                spec_rows.append({**case, "spec": spec, "method": COMPILED, "ms": c.get("ms"),
                                  "adamw_ms": c.get("adamw_ms"), "foreach_ms": None,
                                  "ratio_adamw": _ratio(c.get("ms"), c.get("adamw_ms")), "ratio_foreach": None,
                                  **floors, "compile_s": c.get("compile_s"), "finite": c.get("finite"),
                                  "note": c.get("error")})
            ref = next((r for r in spec_rows if r["method"] == "reference"), None)
            comp = next((r for r in spec_rows if r["method"] == COMPILED), None)
            for r in spec_rows:
                # Each ratio between methods is a ratio of their AdamW ratios: the compiled
                # step is timed in another process, against its own AdamW. The floors'
                # ratios too, so the child's are on its own anchor.
                r["ratio_reference"] = _ratio(r["ratio_adamw"], ref and ref["ratio_adamw"])
                r["ratio_compiled"] = _ratio(r["ratio_adamw"], comp and comp["ratio_adamw"])
                r["ratio_traffic"] = _ratio(r["ratio_adamw"], _ratio(r["traffic_floor_ms"], fused))
                r["ratio_fma"] = _ratio(r["ratio_adamw"], _ratio(r["fma_floor_ms"], fused))
                r["ratio_pass"] = _ratio(r["ratio_adamw"], _ratio(r["pass_floor_ms"], fused))
                print(f"    {r['method']:<26} " + (f"{r['ms']:9.3f} ms  x{r['ratio_adamw']:.1f} fused AdamW, "
                                                   f"x{r['ratio_traffic']:.2f} traffic floor"
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
             "torch.optim.AdamW(fused=True) and AdamW(foreach=True) on tensors of the same shapes; only `opt.step()` "
             "is timed (fixed random gradients), each step's learning rate a little lower than the last one's, "
             "as under a training run's LR schedule. Learned optimizers use weights=\"random\" (the work per step does "
             "not depend on the weights). `x fused` = step time / fused AdamW's step time, the anchor; `x foreach` "
             "the same against AdamW(foreach=True). Floors, per spec and case, in the same run: `traffic floor` = "
             f"the bytes its plan's passes move (and its network's weights, read once) / the bandwidth fused AdamW "
             f"reached ({ADAMW_BYTES} B/param); `FMA "
             "floor` = its MLP's multiply-adds (and its network's: VeLO's LSTM, once per tensor, its folded layer "
             f"as it runs) / the rate torch.mm of {MM_SIZE}x{MM_SIZE} matrices reached (timed in the same "
             "rotation as the steps); `x traffic` and "
             "`x FMA` = step time / that floor; `pass floor` = each pass at the slower of its traffic and "
             "its multiply-adds at those rates, the passes (and the network) one after another (pass k of every tensor "
             "before pass k+1: its small work needs pass k's sums), `x pass` = step time / that floor. `x ref` and `x compiled` divide this row's `x fused` by that of the "
             "reference backend and of `torch.compile(opt.step)` of the reference backend (timed in a child "
             "process against its own fused AdamW).", "",
             "| case | params | tensors | spec | method | step (ms) | fused AdamW (ms) | x fused | x foreach | "
             "traffic floor (ms) | x traffic | FMA floor (ms) | x FMA | pass floor (ms) | x pass | x ref | x compiled |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
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
                     f"{_fmt(r.get('ratio_foreach'), '.2f', 'x')} | {_fmt(r.get('traffic_floor_ms'))} | "
                     f"{_fmt(r.get('ratio_traffic'), '.2f', 'x')} | {_fmt(r.get('fma_floor_ms'))} | "
                     f"{_fmt(r.get('ratio_fma'), '.2f', 'x')} | {_fmt(r.get('pass_floor_ms'))} | "
                     f"{_fmt(r.get('ratio_pass'), '.2f', 'x')} | "
                     f"{_fmt(r.get('ratio_reference'), '.2f', 'x')} | {_fmt(r.get('ratio_compiled'), '.2f', 'x')} |")
    rates = {}
    for r in results["rows"]:
        if r.get("bandwidth_gbs") is not None:
            rates.setdefault(r["case"], []).append((r["bandwidth_gbs"], r["mm_gmacs"]))
    if rates:
        lines += ["", "The rates the floors use, per case (the range over its specs' runs): " + "; ".join(
            f"{case}: fused AdamW {min(b for b, _ in v):.0f}-{max(b for b, _ in v):.0f} GB/s, torch.mm "
            f"{min(g for _, g in v):.0f}-{max(g for _, g in v):.0f} GMAC/s" for case, v in rates.items()) + "."]
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
    ax.set_ylabel("step time / fused AdamW step time")
    m = results["machine"]
    ax.set_title(f"Optimizer step time / AdamW(fused) step time\n{m['device']}, {m['cores']} cores, "
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
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends (default: all that run here; on CPU not the cuda host build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="folder for results.md, results.json, step_time.png (default benchmarks/)")
    ap.add_argument("--compiled-child", nargs=2, metavar=("SPEC", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
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
