"""Training runs for the distributed tests: the same run in one process (the oracle) and
on the ranks of a gloo process group (torch.multiprocessing.spawn's workers, importable
by module name)."""
from __future__ import annotations

import gc
import importlib
import os
import sys
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

STEPS = 10
WORLD = 2
CLASSES = {"adam": "Adam", "small_fc_lopt": "SmallFcLopt", "velo": "VeLO", "elo": "ELO", "celo2": "CELO2",
           "elo_celo2": "ELO_CELO2", "mulo": "MuLO"}


@dataclass(frozen=True)
class Case:
    """One distributed run: an optimizer class (a generated module, found under `path` when
    not in generated/), a backend, and the model and gradients it steps."""

    spec: str
    backend: str = "reference"
    reduce_grads: bool = False
    model: str = "conv"                 # make_params' kind
    poison_at: int | None = None        # a step whose rank-1 gradient holds a NaN
    module: str = ""                    # default generated.<spec>
    path: str = ""

    @property
    def name(self) -> str:
        return "-".join([self.spec, self.backend, "reduce_grads" if self.reduce_grads else "ddp", self.model,
                         *([f"nan@{self.poison_at}"] if self.poison_at is not None else [])])


def make_params(kind: str = "conv") -> list[torch.nn.Parameter]:
    """"conv": a small convolutional model's parameters: conv kernels (4-D), 1-D biases and
    scales, odd linear layers, a 3-D one and a 0-D scale, split unevenly between 2 ranks;
    the shapes of tests/conftest.py's SHAPES, whose tvm kernels other tests share. "bf16":
    the same in bfloat16. "one": one tensor (a rank owns none)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 2, 3, 3), (7,), (7,), (5, 3), (3, 5), (3, 3, 2, 2), (), (4, 4), (1,), (1, 6), (2, 3, 4), (6, 1)]
    if kind == "one":
        shapes = [(5, 7)]
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def grads_of(case: Case, rank: int, step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank `rank`'s gradients at `step` (its own batch)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    if step == case.poison_at and rank == 1:
        grads[-1].view(-1)[0] = float("nan")
    return grads


def loss_of(rank: int, step: int) -> torch.Tensor:
    return torch.tensor(2.0 - 0.1 * step + 0.05 * rank)


def optimizer_class(case: Case) -> type:
    if case.path and case.path not in sys.path:
        sys.path.insert(0, case.path)
    module = importlib.import_module(case.module or f"generated.{case.spec}")
    return getattr(module, CLASSES.get(case.spec) or module.__all__[0])


def optimizer(case: Case, params: list[torch.Tensor], **options):
    cls = optimizer_class(case)
    kwargs = {"num_steps": 50} if "num_steps" in cls.program.hyperparameters else {}
    if cls.program.weight_groups and not cls.program.builtin_weights:
        kwargs["weights"] = "random"
    return cls(params, lr=0.01, backend=case.backend, **kwargs, **options)


def step(opt, loss: torch.Tensor) -> list[str]:
    """One step; returns its warnings (auto's reasons, hub notices: not errors here)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(loss=loss) if opt.program.needs_loss else opt.step()
    return [str(w.message) for w in caught]


def single_process_run(case: Case, params: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The oracle: one process steps every tensor (of make_params, or `params`) with the
    ranks' mean gradient and loss."""
    params = make_params(case.model) if params is None else params
    opt = optimizer(case, params)
    for t in range(STEPS):
        for p, g in zip(params, mean_grads(case, t, params)):
            p.grad = g
        step(opt, sum(loss_of(r, t) for r in range(WORLD)) / WORLD)
    return [p.detach().clone() for p in params]


def mean_grads(case: Case, step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ranks' mean gradient of each tensor at `step`, as DDP or FSDP2 leave it."""
    per_rank = [grads_of(case, r, step, params) for r in range(WORLD)]
    return [_mean(list(gs)) for gs in zip(*per_rank)]


def _mean(grads: list[torch.Tensor]) -> torch.Tensor:
    """As the sharded step averages: a float32 sum, divided by the ranks, in the grad's dtype."""
    return (sum(g.float() for g in grads) / len(grads)).to(grads[0].dtype)


def sharded_run(rank: int, case: Case) -> dict:
    """One rank's run of the sharded step: its own gradients (averaged by the optimizer) under
    reduce_grads, else the mean gradient (as DistributedDataParallel leaves it)."""
    params = make_params(case.model)
    opt = optimizer(case, params, shard=True, reduce_grads=case.reduce_grads)
    calls: Counter = Counter()
    for t in range(STEPS):
        grads = grads_of(case, rank, t, params) if case.reduce_grads else mean_grads(case, t, params)
        for p, g in zip(params, grads):
            p.grad = g
        with _counting(calls) if t == STEPS - 1 else nullcontext():
            step(opt, loss_of(rank, t))
    return {"params": [p.detach().clone() for p in params], "collectives": dict(calls),
            "state_numel": parameter_state_numel(opt),
            "owned": sum(1 for p in params if p in opt.state and opt.state[p]),
            "skipped": float(opt.state["skipped_steps"]) if "skipped_steps" in opt.state else None}


def conv_model(blocks: int = 0) -> torch.nn.Module:
    """A conv layer, an odd linear layer, a norm, `blocks` more linear + norm pairs, and a
    1-output layer (under FSDP2 on 2 ranks: rows split 3 + 2, and 1 + 0). Every parameter
    random, the norms' too: a tensor that starts at zero holds only its few updates, whose
    rounding (sums taken in another order on 2 ranks) is then large relative to it."""
    torch.manual_seed(0)
    extra = [m for _ in range(blocks) for m in (torch.nn.Linear(5, 5), torch.nn.LayerNorm(5))]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 5), torch.nn.LayerNorm(5), *extra, torch.nn.Linear(5, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return model


def batch_of(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7000 + 100 * step + rank)
    return torch.randn(8, 3, 6, 6, generator=gen), torch.randn(8, 1, generator=gen)


BLOCKS = {"conv": 0, "deep": 4}   # fsdp2 cases' models: 8 tensors, 24


def _fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))


def ddp_training(rank: int | None, spec: str = "velo", wrap: str = "ddp") -> list[torch.Tensor]:
    """Training under DistributedDataParallel with the optimizer adopted in one line
    (shard=True), or under FSDP2 (wrap "fsdp2": the optimizer unchanged); rank None: the
    oracle, one process averaging the ranks' gradients."""
    model = conv_model()
    if rank is None:
        net, options = model, {}
    elif wrap == "ddp":
        net, options = torch.nn.parallel.DistributedDataParallel(model), {"shard": True}
    else:
        net, options = _fsdp2(model), {}
    opt = optimizer(Case(spec), model.parameters(), **options)
    for t in range(STEPS):
        if rank is None:
            per_rank = []
            for r in range(WORLD):
                model.zero_grad()
                x, y = batch_of(r, t)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                per_rank.append(([p.grad.clone() for p in model.parameters()], loss.detach()))
            for i, p in enumerate(model.parameters()):
                p.grad = _mean([g[i] for g, _ in per_rank])
            mean_loss = sum(loss for _, loss in per_rank) / WORLD
        else:
            opt.zero_grad()
            x, y = batch_of(rank, t)
            mean_loss = torch.nn.functional.mse_loss(net(x), y)
            mean_loss.backward()
            mean_loss = mean_loss.detach()   # the optimizer averages it over the ranks
        step(opt, mean_loss)
    return [_whole(p) for p in model.parameters()]


def _whole(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def fsdp2_run(rank: int, case: Case) -> dict:
    """One rank's run under FSDP2 (the conv model's parameters as DTensors, sharded on dim 0:
    uneven, and empty on rank 1 for the last layer), the ranks' mean gradient as FSDP2's
    reduce-scatter leaves it; with the warnings of tensors stepped on the reference backend
    instead of the case's."""
    from torch.distributed.tensor import distribute_tensor

    model = _fsdp2(conv_model(BLOCKS[case.model]))
    params = list(model.parameters())
    opt = optimizer(case, params)
    calls: Counter = Counter()
    fallbacks = set()
    for t in range(STEPS):
        for p, g in zip(params, mean_grads(case, t, params)):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        with _counting(calls) if t == STEPS - 1 else nullcontext():
            fallbacks.update(m for m in step(opt, loss_of(rank, t)) if "reference backend" in m)
    return {"params": [_whole(p) for p in params], "collectives": dict(calls), "fallbacks": sorted(fallbacks)}


def fsdp2_oracle(case: Case) -> list[torch.Tensor]:
    return single_process_run(case, list(conv_model(BLOCKS[case.model]).parameters()))


def parameter_state_numel(opt) -> int:
    """Floats of per-parameter state (global state, such as the loss buffer, is on every rank)."""
    return sum(v.numel() for p, s in opt.state.items() if torch.is_tensor(p) for v in s.values() if torch.is_tensor(v))


class _counting:
    """Counts the collectives torch.distributed runs inside the block, by name."""

    # torch's names (old and new) -> the collective's kind
    NAMES = {"all_reduce": "all_reduce", "broadcast": "broadcast", "all_gather": "all_gather",
             "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
             "reduce_scatter": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
             "reduce_scatter_tensor": "reduce_scatter"}

    def __init__(self, calls: Counter):
        self.calls, self.saved = calls, {}

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                original = self.saved[name] = getattr(dist, name)
                setattr(dist, name, self._counted(self.NAMES[name], original))
        return self

    def _counted(self, kind, original):
        def call(*args, **kwargs):
            self.calls[kind] += 1
            return original(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)
        return False


def fsdp2_resumed(case: Case, steps: range, load: str | None, save: str | None) -> list[torch.Tensor]:
    """Steps `steps` of the FSDP2 run on this world (its data: the 2 ranks' mean gradient and
    loss, whatever the world), resumed from the DCP checkpoint `load`, saved to `save`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.tensor import distribute_tensor

    model = _fsdp2(conv_model(BLOCKS[case.model]))
    params = list(model.parameters())
    opt = optimizer(case, params)
    if load:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=load)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    for t in steps:
        for p, g in zip(params, mean_grads(case, t, params)):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        step(opt, sum(loss_of(r, t) for r in range(WORLD)) / WORLD)
    if save:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=save)
    return [_whole(p) for p in params]


def sharded_resumed(case: Case, steps: range, load: str | None, save: str | None) -> list[torch.Tensor]:
    """fsdp2_resumed's run with shard=True (make_params' tensors, on this world)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    params = make_params(case.model)
    model = torch.nn.ParameterList(params)
    opt = optimizer(case, params, shard=True)
    if load:
        state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=load)
        model.load_state_dict(state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    for t in steps:
        for p, g in zip(params, mean_grads(case, t, params)):
            p.grad = g
        step(opt, sum(loss_of(r, t) for r in range(WORLD)) / WORLD)
    if save:
        dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=save)
    return [p.detach().clone() for p in params]


RESUMED = {"fsdp2": fsdp2_resumed, "shard": sharded_resumed}


def dcp_worker(rank: int, world: int, port: int, out_dir: str, cases: list[Case], first_half: bool) -> None:
    """On `world` ranks, under FSDP2 and under shard=True: first_half: every case's steps 0-4,
    checkpointed (a-<kind>-<world>-<case>); else resumed from the other world's checkpoint
    for steps 5-9 (results b-<kind>-<world>-<case>)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for case in cases:
            for kind, resumed in RESUMED.items():
                if first_half:
                    resumed(case, range(STEPS // 2), None, os.path.join(out_dir, f"a-{kind}-{world}-{case.name}"))
                else:
                    other = os.path.join(out_dir, f"a-{kind}-{3 - world}-{case.name}")
                    params = resumed(case, range(STEPS // 2, STEPS), other, None)
                    if rank == 0:
                        torch.save(params, os.path.join(out_dir, f"b-{kind}-{world}-{case.name}.pt"))
    finally:
        close_process_group()


def close_process_group() -> None:
    """Collect garbage first: cycles (FSDP2's hooks, DTensors) that still hold the process
    group, freed at interpreter exit after the group is gone, abort the process (gloo's
    threads: "terminate called without an active exception"), one run in three."""
    gc.collect()
    dist.destroy_process_group()


def worker(rank: int, port: int, out_dir: str, cases: list[Case], fsdp2_cases: list[Case]) -> None:
    """torch.multiprocessing.spawn's entry: every case on this rank, results saved per case."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for case in cases:
            torch.save(sharded_run(rank, case), os.path.join(out_dir, f"{case.name}-{rank}.pt"))
        torch.save(ddp_training(rank), os.path.join(out_dir, f"ddp-{rank}.pt"))
        torch.save(ddp_training(rank, wrap="fsdp2"), os.path.join(out_dir, f"fsdp2-{rank}.pt"))
        for case in fsdp2_cases:
            torch.save(fsdp2_run(rank, case), os.path.join(out_dir, f"fsdp2-{case.name}-{rank}.pt"))
    finally:
        close_process_group()

