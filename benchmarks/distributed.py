"""Distributed optimizer steps on 2 CPU processes (gloo, one thread each): `shard=True`
(each rank steps its own whole tensors; gradients averaged by DDP, or by the optimizer
with reduce_grads=True) and FSDP2 (fully_shard's DTensors, each rank its rows of every
tensor), against the same step in one process (one thread), and against AdamW under the
same sharding (torch's ZeroRedundancyOptimizer for shard=True).

A GPT-2-shaped set of tensors (embeddings, 4 blocks of attention and MLP weights, biases
and norm scales) gets fixed random gradients, set once: only `opt.step()` is timed, the
median of --steps after a warm-up, each rank's time taken after a barrier (the slower
rank's median is the step's). Bytes per step are the sizes of the buffers of the
collectives one rank runs in one step (all-gather: the gathered buffer).

    python benchmarks/distributed.py                 # writes benchmarks/distributed.md
    python benchmarks/distributed.py --steps 5 --out /tmp/d.md
    python benchmarks/distributed.py --quick --out /tmp/d.md   # a tiny smoke run
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings

# Steady steps are timed: each kernel is built when first needed, not in the background.
os.environ.setdefault("LOPT_BACKGROUND_BUILDS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
OURS = [("Adam (ours)", "adam"), ("VeLO", "velo"), ("small_fc_lopt", "small_fc_lopt")]
# Rows: (optimizer, how it is made: "adamw" or "ours:<spec>:<backend>", sharding).
# "zero": shard=True on gradients averaged by DDP (AdamW: ZeroRedundancyOptimizer);
# "reduce_grads": shard=True, reduce_grads=True; "fsdp2": fully_shard's DTensors, the
# optimizer unchanged.
ROWS = [("AdamW (fused)", "adamw", "zero")] + [(f"{name}, tvm", f"ours:{spec}:tvm", mode)
                                              for mode in ("zero", "reduce_grads") for name, spec in OURS] + \
    [("AdamW (foreach)", "adamw", "fsdp2")] + [(f"{name}, tvm", f"ours:{spec}:tvm", "fsdp2") for name, spec in OURS]
CLASSES = {"adam": "Adam", "velo": "VeLO", "small_fc_lopt": "SmallFcLopt"}
QUICK = {"vocab": 64, "width": 16, "context": 8, "blocks": 1}


def gpt_shapes(vocab: int = 8192, width: int = 256, context: int = 256, blocks: int = 4) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(blocks):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def make_params(shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def make_optimizer(kind: str, params: list[torch.Tensor], mode: str, sharded: bool):
    """A row's optimizer (mode: its sharding), on 2 ranks or (sharded False) in one process."""
    if kind == "adamw":
        if sharded and mode == "zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3, fused=True)
        return torch.optim.AdamW(params, lr=1e-3, **({"foreach": True} if mode == "fsdp2" else {"fused": True}))
    _, spec, backend = kind.split(":")
    module = __import__(f"generated.{spec}", fromlist=[CLASSES[spec]])
    cls = getattr(module, CLASSES[spec])
    kwargs = {"num_steps": 10_000} if spec == "velo" else {}
    if cls.program.weight_groups:
        kwargs["weights"] = "random"
    if sharded and mode in ("zero", "reduce_grads"):
        kwargs.update(shard=True, reduce_grads=mode == "reduce_grads")
    return cls(params, lr=1e-3, backend=backend, **kwargs)


def fsdp2_params(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """make_params' tensors sharded by fully_shard (DTensors), their gradients sharded alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    params = make_params(shapes)
    grads = [p.grad for p in params]
    module = torch.nn.ParameterList(params)
    for p in module.parameters():
        p.grad = None
    fully_shard(module, mesh=init_device_mesh("cpu", (WORLD,)))
    sharded = list(module.parameters())
    for p, g in zip(sharded, grads):
        p.grad = distribute_tensor(g, p.device_mesh, p.placements)
    return sharded


def _step(opt) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(loss=torch.tensor(1.0)) if getattr(opt, "program", None) is not None and opt.program.needs_loss \
            else opt.step()


class ByteCounter:
    """Sizes of the buffers of the collectives run inside the block (one rank's view)."""

    NAMES = ("all_reduce", "broadcast", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
             "reduce_scatter_tensor", "_broadcast_coalesced")

    def __init__(self):
        self.bytes, self.calls, self.saved = 0, 0, {}

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                self.saved[name] = original = getattr(dist, name)
                setattr(dist, name, self._counted(original))
        return self

    def _counted(self, original):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            self.bytes += max(t.numel() * t.element_size() for t in tensors)   # all-gather: its output
            self.calls += 1
            return original(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)
        return False


def time_steps(opt, steps: int, barrier: bool) -> float:
    _step(opt)   # warm-up: kernels loaded, state made
    times = []
    for _ in range(steps):
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        _step(opt)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_main(rank: int, port: int, steps: int, out: str, shapes: list[tuple[int, ...]]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows = {}
    try:
        for label, kind, mode in ROWS:
            params = fsdp2_params(shapes) if mode == "fsdp2" else make_params(shapes)
            opt = make_optimizer(kind, params, mode, sharded=True)
            seconds = time_steps(opt, steps, barrier=True)
            with ByteCounter() as counter:
                _step(opt)
            rows[(label, mode)] = (seconds, counter.bytes, counter.calls)
        torch.save(rows, os.path.join(out, f"rank{rank}.pt"))
    finally:
        close_process_group()


def close_process_group() -> None:
    """Garbage first: cycles still holding the process group (FSDP2's hooks, DTensors),
    freed at exit after it is gone, abort the process now and then."""
    gc.collect()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: 1 block of width 16, 2 steps")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "distributed.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 2
    torch.set_num_threads(1)   # as each rank
    shapes = gpt_shapes(**QUICK) if args.quick else gpt_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    single = {}   # (kind, AdamW's flavour) -> one process's step
    for label, kind, mode in ROWS:
        key = (kind, mode == "fsdp2" and kind == "adamw")
        if key not in single:
            opt = make_optimizer(kind, make_params(shapes), mode, sharded=False)
            single[key] = time_steps(opt, args.steps, barrier=False)
            print(f"one process: {label}: {single[key] * 1e3:.1f} ms", flush=True)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(_free_port(), args.steps, out, shapes), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
    step = {key: max(r[key][0] for r in ranks) for key in ranks[0]}   # the slower rank's
    adamw = {"zero": step[("AdamW (fused)", "zero")], "reduce_grads": step[("AdamW (fused)", "zero")],
             "fsdp2": step[("AdamW (foreach)", "fsdp2")]}
    sharding = {"zero": "shard=True, DDP's gradients", "reduce_grads": "shard=True, reduce_grads=True",
                "fsdp2": "FSDP2 (fully_shard)"}
    lines = [f"# Sharded step on {WORLD} CPU processes (gloo, 1 thread each)", "",
             f"{len(shapes)} tensors, {numel / 1e6:.2f}M parameters (GPT-2-shaped: embeddings and attention and MLP "
             f"blocks); median of {args.steps} steps; torch {torch.__version__}. AdamW under shard=True is "
             "torch's ZeroRedundancyOptimizer; \"vs AdamW\" compares with AdamW under the same sharding.", "",
             "| optimizer | sharding | one process | 2 ranks | speed-up | vs AdamW | collectives | bytes/step/rank |",
             "|---|---|---|---|---|---|---|---|"]
    for label, kind, mode in ROWS:
        seconds = step[(label, mode)]
        _, nbytes, calls = ranks[0][(label, mode)]
        one = single[(kind, mode == "fsdp2" and kind == "adamw")]
        lines.append(f"| {label} | {sharding[mode]} | {one * 1e3:.1f} ms | {seconds * 1e3:.1f} ms | "
                     f"{one / seconds:.2f}x | {seconds / adamw[mode]:.1f}x | {calls} | "
                     f"{nbytes / 2 ** 20:.2f} MiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
