"""The TVM backend's replay of a steady CPU step (backends/tvm/replay.py): a step whose
tensors, state and MLP weights are as at the last step (runtime/steady.py) repeats its
recorded calls, with its gradients' new addresses written into the recorded pointer
tables, its hyperparameters' new values and the loss's features into the leaves, and
its network run again. Checked against the same optimizer stepped without replay, bit
for bit, through every change a training loop makes between steps; each change either
keeps the replay (gradients written in place or made anew, as backward after
zero_grad() makes them) or is noticed."""
from __future__ import annotations

import copy
import functools
from typing import Callable

import numpy as np
import pytest
import torch

from generated.adam import Adam
from generated.elo import ELO
from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO
from lopt_codegen.backends.tvm import replay, small_work
from lopt_codegen.backends.tvm.batched import ALIGNMENT
from lopt_codegen.runtime.steady import SteadyTasks

SHAPES = [(5, 3), (5, 3), (7,), (4, 4), (2, 3, 4), ()]
# (VeLO and ELO run a network every step; VeLO's reads the loss)
CLASSES = {"adam": (Adam, {"weight_decay": 0.1}),
           "small_fc_lopt": (SmallFcLopt, {"weights": "random", "weight_decay": 0.1}),
           "velo": (VeLO, {"weights": "random", "weight_decay": 0.1, "num_steps": 40}),
           "elo": (ELO, {"weights": "random"})}


class Run:
    """One optimizer, its params and what the changes keep alive (so that a new tensor
    cannot take a freed one's address)."""

    def __init__(self, name: str, start: list[torch.Tensor]):
        cls, extra = CLASSES[name]
        self.params = [torch.nn.Parameter(p.clone()) for p in start]
        self.opt = cls(self.params, lr=0.1, backend="tvm", **extra)
        self.kept: list = []
        self.saved: dict | None = None
        self.first_grads: list[torch.Tensor] = []   # the first step's (its tables point to them)


def _new_grads(run: Run, grads: list[torch.Tensor]) -> None:
    """New gradient tensors (the old ones kept alive: new addresses for sure)."""
    run.kept += [p.grad for p in run.params]
    for p, g in zip(run.params, grads):
        p.grad = g.clone()
    run.first_grads = run.first_grads or [p.grad for p in run.params]


def _grads_in_place(run: Run, grads: list[torch.Tensor]) -> None:
    for p, g in zip(run.params, grads):
        if p.grad is not None:
            p.grad.copy_(g.reshape(p.grad.shape))


def _lr(value: float, group: int = 0) -> Callable[[Run, list], None]:
    """A schedule's change: new gradients and a new learning rate."""
    def change(run: Run, grads: list[torch.Tensor]) -> None:
        _new_grads(run, grads)
        run.opt.param_groups[group]["lr"] = value
    change.__name__ = f"lr {value} in group {group}"
    return change


def _first_grads_and_state_dict(run: Run, grads: list[torch.Tensor]) -> None:
    """The first step's gradient tensors again, at the addresses for which the step not
    replayed before built its tables (replays wrote others in), in a step not replayed (a
    parameter's state dict replaced by one holding the same tensors)."""
    for p, g, first in zip(run.params, grads, run.first_grads):
        p.grad = first
        p.grad.copy_(g)
    run.kept.append(run.opt.state[run.params[0]])
    run.opt.state[run.params[0]] = dict(run.opt.state[run.params[0]])


def _misaligned_grads(run: Run, grads: list[torch.Tensor]) -> None:
    """Gradients at odd offsets into a bigger buffer (DDP's buckets): copied, not replayed."""
    run.kept += [p.grad for p in run.params]
    for p, g in zip(run.params, grads):
        bucket = torch.empty(g.numel() + 1)
        p.grad = bucket[1:].view(g.shape)
        p.grad.copy_(g)


def _param_moved(run: Run, grads: list[torch.Tensor]) -> None:
    _grads_in_place(run, grads)
    run.kept.append(run.params[1].data)
    run.params[1].data = run.params[1].data.clone()


def _save(run: Run, grads: list[torch.Tensor]) -> None:
    _grads_in_place(run, grads)
    run.saved = copy.deepcopy(run.opt.state_dict())


def _load(run: Run, grads: list[torch.Tensor]) -> None:
    _grads_in_place(run, grads)
    run.kept.append([dict(s) for s in run.opt.state.values()])
    run.opt.load_state_dict(run.saved)


def _step_count_replaced(run: Run, grads: list[torch.Tensor]) -> None:
    _grads_in_place(run, grads)
    state = run.opt.state[run.params[0]]
    run.kept.append(state["step"])
    state["step"] = torch.tensor(50.0)


def _weights_written(run: Run, grads: list[torch.Tensor]) -> None:
    """The MLP's shared weights written in place (not replayed: the record holds their
    copies), or where the network gives each tensor its MLP, the network's (replayed:
    it reads them at every step)."""
    _grads_in_place(run, grads)
    device = torch.device("cpu")
    shared = run.opt._mlp_weights(device)
    written = shared if shared is not None else \
        [w for group in run.opt._network(device).weights.values() for w in group.values()]
    for w in written:
        w.mul_(1.25)


def _network_mlp(run: Run) -> bool:
    """Whether the network gives each tensor its MLP weights (the spec shares none)."""
    return run.opt._mlp_weights(torch.device("cpu")) is None


def _one_grad_gone(run: Run, grads: list[torch.Tensor]) -> None:
    _grads_in_place(run, grads)
    run.kept.append(run.params[2].grad)
    run.params[2].grad = None


def _grad_back(run: Run, grads: list[torch.Tensor]) -> None:
    """Every unset gradient set again."""
    for p in run.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _grads_in_place(run, grads)


def _param_added(run: Run, grads: list[torch.Tensor]) -> None:
    _grads_in_place(run, grads)
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 10).reshape(2, 5))
    extra.grad = torch.linspace(0.5, -0.3, 10).reshape(2, 5)
    run.params.append(extra)
    run.opt.add_param_group({"params": [extra], "lr": 0.05})
    grads.append(extra.grad)


def _forget(opt: torch.optim.Optimizer) -> None:
    """The next step found again, as before replays and steady tasks (runtime/steady.py)."""
    opt.backend._record = None
    opt._steady = SteadyTasks()


@pytest.fixture
def replays(monkeypatch) -> list[int]:
    """Torch's thread count at each replay of a step, as the replay starts."""
    seen: list[int] = []
    original = replay.StepRecord.replay

    def counted(record: replay.StepRecord, batch, grads: list[int]) -> None:
        seen.append(torch.get_num_threads())
        original(record, batch, grads)
    monkeypatch.setattr(replay.StepRecord, "replay", counted)
    return seen


# (change before the step, whether the step replays the last one (or what tells it, of the Run))
CHANGES = [(_new_grads, False), (_grads_in_place, True), (_new_grads, True), (_new_grads, True),
           (_first_grads_and_state_dict, False), (_new_grads, True), (_save, True), (_lr(0.05), True),
           (_grads_in_place, True), (_lr(0.1), True), (_lr(0.09), True), (_param_moved, False),
           (_grads_in_place, True), (_misaligned_grads, False), (_misaligned_grads, False), (_new_grads, False),
           (_new_grads, True), (_load, False), (_step_count_replaced, False), (_weights_written, _network_mlp),
           (_one_grad_gone, False), (_grads_in_place, True), (_grad_back, False), (_param_added, False),
           (_grads_in_place, True), (_lr(0.02, group=1), True), (_lr(0.08), True), (_grads_in_place, True)]


@pytest.mark.parametrize("name", list(CLASSES))
def test_replayed_steps_match_steps_without_replay_through_every_change(name, replays):
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    replaying, plain = Run(name, start), Run(name, start)
    for step, (change, replays_now) in enumerate(CHANGES):
        grads = [torch.randn(p.shape, generator=gen) for p in replaying.params]
        loss = 2.0 + torch.rand((), generator=gen).item()   # (new features every step: VeLO reads them)
        for run in (replaying, plain):
            change(run, list(grads))
        replays.clear()
        replaying.opt.step(loss=loss)
        expected = replays_now(replaying) if callable(replays_now) else replays_now
        assert len(replays) == expected, f"step {step} ({change.__name__})"
        plain.opt.step(loss=loss)
        _forget(plain.opt)
        for p, q in zip(replaying.params, plain.params):
            assert torch.equal(p.detach(), q.detach()), f"step {step} ({change.__name__}): param {tuple(p.shape)}"
            for key, value in plain.opt.state[q].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(replaying.opt.state[p][key], value), f"step {step}: state {key}"


@pytest.fixture(scope="module")
def adam_skip(tmp_path_factory) -> type:
    """Adam under `grad.nonfinite: skip`: its skip flag is a value of the step."""
    from conftest import SPECS
    from test_examples import compile_and_import

    out = tmp_path_factory.mktemp("skip")
    (out / "adam_skip.yaml").write_text(f"extends: {SPECS}/adam.yaml\nname: adam_skip\nclass_name: AdamSkip\n"
                                        "grad:\n  nonfinite: skip\n")
    return compile_and_import(str(out), "lopt_replay_skip", [str(out / "adam_skip.yaml")])["adam_skip"]


@pytest.mark.parametrize("name", ["adam_skip", *CLASSES])
def test_a_backend_records_steps_only_where_it_says_it_replays_them(name, request):
    """Steps under a skip flag are never replayed, and their task generations leave the
    state's addresses out (Backend.replays_steps); the others are, networks too."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 4), (9,)]]
    cls, extra = (request.getfixturevalue("adam_skip"), {}) if name == "adam_skip" else CLASSES[name]
    opt = cls(params, lr=0.1, backend="tvm", **extra)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step(loss=1.0)
    assert opt.backend.replays_steps == (name != "adam_skip")
    assert (opt.backend._record is not None) == opt.backend.replays_steps


@pytest.mark.parametrize("name", list(CLASSES))
def test_a_training_loop_replays_its_steps(name, replays):
    """zero_grad() then backward: new gradient tensors every step, mostly at new
    addresses. The steps after the first replay it, and match steps without replay."""
    cls, extra = CLASSES[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    twin = copy.deepcopy(model)
    replaying = cls(model.parameters(), lr=0.01, backend="tvm", **extra)
    plain = cls(twin.parameters(), lr=0.01, backend="tvm", **extra)
    x, y = torch.randn(16, 12), torch.randn(16, 3)
    for _ in range(6):
        for m, opt in ((model, replaying), (twin, plain)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step(loss=loss)
        _forget(plain)
    assert len(replays) == 5
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_replayed_steps_on_a_busy_machine_run_on_one_thread(replays, monkeypatch, quiet_machine):
    """A replay takes the busy machine's single thread as the step it repeats did, and
    gives torch its threads back after."""
    from lopt_codegen.backends.tvm.threads import CONTENTION
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 10), (10,)]]
    opt = Adam(params, lr=0.1, backend="tvm")
    for busy in (False, True):
        if busy:
            monkeypatch.setattr(CONTENTION, "probe", lambda: 64)
            monkeypatch.setattr(CONTENTION, "steps", 0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape)
            opt.step()
            assert torch.get_num_threads() == 2
    # The first step records; busy or not, the rest replay (the machine busy from the step
    # after the look that first found it so: Contention looks again before it believes it).
    assert replays == [2, 2, 2, 1, 1]


@pytest.mark.parametrize("width", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pick", ["evenly spaced", "one", "unevenly spaced", "reversed", "two bases", "not views"])
def test_stacked_into_writes_the_sources_as_they_are_when_it_runs(pick, dtype, width):
    """stacked_into's op (the step counts' and small states' copies, recorded for replays)
    copies the sources' values at each run: from one strided view of their base where
    there is one or they are evenly spaced views of it (numpy's copy for float32, torch's
    else: into float32 rows), by one numpy gather where they are single float32 elements
    of one base (the step counts of a group), else stacked."""
    gen = torch.Generator().manual_seed(4)
    base, other = (torch.randn(12, width, generator=gen, dtype=dtype) for _ in range(2))
    rows = {"evenly spaced": [base[1], base[4], base[7], base[10]], "one": [base[5]],
            "unevenly spaced": [base[1], base[4], base[6], base[10]], "reversed": [base[9], base[6], base[3]],
            "two bases": [base[0], other[2], base[4]],
            "not views": [torch.randn(width, generator=gen, dtype=dtype) for _ in range(3)]}[pick]
    dst = torch.empty(len(rows), 1, width)
    op = replay.stacked_into(dst, rows)
    for _ in range(2):
        op()
        assert torch.equal(dst, torch.stack(rows).reshape(dst.shape).float())
        base.mul_(-1.5)   # (the next run sees the new values)
        other.add_(1.0)
    one_copy = isinstance(op, functools.partial) and op.func in (torch.Tensor.copy_, np.copyto)
    assert one_copy == (pick in ("evenly spaced", "one"))
    if one_copy:
        assert (op.func is np.copyto) == (dtype == torch.float32)
    gathered = isinstance(op, functools.partial) and op.func is replay._take
    assert gathered == (pick in ("unevenly spaced", "reversed") and dtype == torch.float32 and width == 1)


def test_row_buffers_made_together_are_aligned_apart_and_pointed_at():
    """empty_rows_each's buffers (one allocation) start each row on ALIGNMENT, overlap no
    other buffer, and row_pointers gives each row's address."""
    shapes = [(5, 3), (5, 1, 17), (2, 16), (7, 2, 2, 1), (1, 33)]
    rows = small_work.empty_rows_each(shapes)
    assert [tuple(r.shape) for r in rows] == shapes
    for k, r in enumerate(rows):
        r.fill_(k)
        assert all(row.data_ptr() % ALIGNMENT == 0 for row in r)
    assert all(torch.all(r == k) for k, r in enumerate(rows))   # (none overwrote another)
    table = small_work.row_pointers(5, rows[:2])
    assert table.tolist() == [[rows[0][i].data_ptr(), rows[1][i].data_ptr()] for i in range(5)]
