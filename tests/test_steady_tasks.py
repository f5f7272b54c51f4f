"""A step whose tasks are the last step's (runtime/steady.py): the optimizer takes the last
step's tasks, their gradients and hyperparameters set anew, when nothing else it reads
changed. Checked against the same optimizer finding its tasks afresh at every step, bit
for bit, through every change a training loop (or a user) makes between steps; each
change either keeps the tasks (a schedule, new gradients) or is noticed."""
from __future__ import annotations

import copy
import gc
import weakref
from typing import Callable

import pytest
import torch

from conftest import InfShape
from generated.adam import Adam
from generated.celo2 import CELO2
from generated.mulo import MuLO
from generated.small_fc_lopt import SmallFcLopt
from lopt_codegen.runtime.steady import SteadyTasks
from test_tvm_replay import _grad_back, _grads_in_place, _one_grad_gone, _param_moved

SHAPES = [(5, 3), (5, 3), (7,), (4, 4), (2, 3, 4), ()]


def _adam(params, backend):
    return Adam([{"params": params[:3]}, {"params": params[3:], "lr": 0.05}], lr=0.1, weight_decay=0.1,
                backend=backend)


def _small_fc_lopt(params, backend):
    return SmallFcLopt(params, lr=0.1, weights="random", backend=backend)


def _mulo(params, backend):
    for p in params[:3]:
        p.infshape = InfShape(2, 4.0)
    return MuLO(params, lr=0.5, weights="random", backend=backend)


MAKERS = {"adam": _adam, "small_fc_lopt": _small_fc_lopt, "mulo": _mulo}


class Run:
    """One optimizer, its params and what the changes keep alive (so that a new tensor
    cannot take a freed one's address)."""

    def __init__(self, name: str, backend: str, start: list[torch.Tensor]):
        self.params = [torch.nn.Parameter(p.clone()) for p in start]
        self.opt = MAKERS[name](self.params, backend)
        self.kept: list = []


def _new_grads(run: Run, grads: list[torch.Tensor]) -> None:
    run.kept += [p.grad for p in run.params]
    for p, g in zip(run.params, grads):
        p.grad = g.to(p.dtype if p.grad is None else p.grad.dtype, copy=True)


def _hyper(name: str, value: float, group: int = 0) -> Callable[[Run, list], None]:
    def change(run: Run, grads: list[torch.Tensor]) -> None:
        _new_grads(run, grads)
        run.opt.param_groups[group][name] = value
    change.__name__ = f"{name}={value} in group {group}"
    return change


def _state_reset(run: Run, grads: list[torch.Tensor]) -> None:
    """`opt.state[p] = {}`: the parameter starts afresh (the state keeps its size)."""
    _grads_in_place(run, grads)
    run.kept.append(run.opt.state[run.params[1]])
    run.opt.state[run.params[1]] = {}


def _state_dict_copied(run: Run, grads: list[torch.Tensor]) -> None:
    """A parameter's state dict replaced by a copy holding the same tensors."""
    _new_grads(run, grads)
    run.kept.append(run.opt.state[run.params[2]])
    run.opt.state[run.params[2]] = dict(run.opt.state[run.params[2]])


def _state_tensor_moved(run: Run, grads: list[torch.Tensor]) -> None:
    """`.data = ...` on a state tensor: the same object at a new address."""
    _grads_in_place(run, grads)
    state = run.opt.state[run.params[0]]
    name = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    run.kept.append(state[name].data)
    state[name].data = state[name].data.clone()


def _param_to_bf16(run: Run, grads: list[torch.Tensor]) -> None:
    _new_grads(run, grads)
    p = run.params[3]
    run.kept.append(p.data)
    p.data = p.data.to(torch.bfloat16)
    p.grad = p.grad.to(torch.bfloat16)


def _scalar_made_vector(run: Run, grads: list[torch.Tensor]) -> None:
    """A 0-D parameter viewed as (1,), its state viewed along: only their shapes tell."""
    _grads_in_place(run, grads)
    p = run.params[5]
    p.data = p.data.view(1)
    p.grad = grads[5].reshape(1).clone()
    for value in run.opt.state[p].values():
        if isinstance(value, torch.Tensor) and value.dim():
            value.data = value.data.view(*value.shape, 1)


def _state_value_replaced_by_a_view(run: Run, grads: list[torch.Tensor]) -> None:
    """A state tensor replaced by another object on the same memory: noticed (the key
    holds objects, not only addresses)."""
    _new_grads(run, grads)
    state = run.opt.state[run.params[4]]
    name = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    run.kept.append(state[name])
    state[name] = state[name].view(state[name].shape)


def _grad_in_float32(run: Run, grads: list[torch.Tensor]) -> None:
    """A bfloat16 parameter's gradient in float32 (grad_dtype=None allows it)."""
    _grads_in_place(run, grads)
    p = run.params[3]
    p.grad_dtype = None
    run.kept.append(p.grad)
    p.grad = p.grad.float()


def _param_transposed(run: Run, grads: list[torch.Tensor]) -> None:
    """`.data = p.data.t()` on a square matrix: only its layout tells."""
    _grads_in_place(run, grads)
    p = run.params[3]
    p.data = p.data.t()


def _grads_strided(run: Run, grads: list[torch.Tensor]) -> None:
    """A gradient that is a transposed view (its values the same)."""
    _new_grads(run, grads)
    p = run.params[3]
    p.grad = p.grad.t().contiguous().t()


def _grad_moved(run: Run, grads: list[torch.Tensor]) -> None:
    """One parameter's gradient unset and another's set (as many as before, of one kind)."""
    _grads_in_place(run, grads)
    run.params[2].grad = grads[2].clone()
    run.kept.append(run.params[4].grad)
    run.params[4].grad = None


def _param_appended(run: Run, grads: list[torch.Tensor]) -> None:
    """A parameter appended to a param group's list in place."""
    _grads_in_place(run, grads)
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 6).reshape(2, 3))
    extra.grad = torch.linspace(0.5, -0.3, 6).reshape(2, 3)
    run.params.append(extra)
    run.opt.param_groups[-1]["params"].append(extra)
    grads.append(extra.grad)


def _infshape_replaced(run: Run, grads: list[torch.Tensor]) -> None:
    """μP's width multiplier of a parameter (read only by MuLO) replaced."""
    _new_grads(run, grads)
    run.params[1].infshape = InfShape(2, 2.0)


# (change before the step, whether the step takes the last step's tasks; "replays": unless
# the backend replays steps through the state's addresses)
# (change before the step, whether the step takes the last step's tasks; "replays": unless
# the backend replays steps through the state's addresses)
CHANGES = [(_new_grads, False), (_new_grads, True), (_grads_in_place, True), (_hyper("lr", 0.07), True),
           (_hyper("lr", 0.06), True), (_hyper("lr", 0.02, group=-1), True), (_state_reset, False),
           (_new_grads, True), (_state_dict_copied, False), (_new_grads, True), (_state_tensor_moved, "replays"), (_new_grads, True), (_param_moved, False),
           (_new_grads, True), (_param_to_bf16, False), (_new_grads, True), (_grad_in_float32, False),
           (_grads_in_place, True), (_scalar_made_vector, False), (_new_grads, True),
           (_state_value_replaced_by_a_view, False), (_grads_in_place, True), (_one_grad_gone, False),
           (_grads_in_place, True), (_grad_moved, False), (_grad_back, False), (_infshape_replaced, None),
           (_new_grads, True), (_param_appended, False), (_hyper("lr", 0.03), True), (_new_grads, True),
           (_param_transposed, False), (_grads_in_place, True), (_grads_strided, False), (_grads_strided, True),
           (_new_grads, False)]


@pytest.mark.parametrize("name, backend", [("adam", "reference"), ("adam", "tvm"), ("small_fc_lopt", "reference"),
                                           ("mulo", "reference")])
def test_steps_on_the_last_steps_tasks_match_steps_that_find_them_afresh(name, backend):
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    steady, afresh = Run(name, backend, start), Run(name, backend, start)
    for step, (change, keeps) in enumerate(CHANGES):
        grads = [torch.randn(p.shape, generator=gen) for p in steady.params]
        for run in (steady, afresh):
            change(run, list(grads))
        before = steady.opt._steady.generation
        steady.opt.step()
        afresh.opt.step()
        afresh.opt._steady = SteadyTasks()   # (its next step finds its tasks afresh)
        if keeps is None:   # (what reads it: MuLO's tasks do, the others' do not)
            keeps = name != "mulo"
        elif keeps == "replays":   # (state addresses: only a backend that replays steps reads them)
            keeps = not steady.opt.backend.replays_steps
        assert (steady.opt._steady.generation == before) == keeps, f"step {step} ({change.__name__})"
        for p, q in zip(steady.params, afresh.params):
            assert torch.equal(p.detach(), q.detach()), f"step {step} ({change.__name__}): param {tuple(p.shape)}"
            for key, value in afresh.opt.state[q].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(steady.opt.state[p][key], value), f"step {step}: state {key}"


def test_a_flag_that_keeps_every_route_keeps_the_tasks_and_one_that_changes_a_route_is_an_error():
    """CELO2 routes by its flags: use_adamw_for_1d leaves matrices where they are (their
    tasks kept, the new value theirs), is_embedding moves them to AdamW's graph."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 5))]
    opt = CELO2(params, weights="random", backend="reference")
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        if step == 2:
            opt.param_groups[0]["use_adamw_for_1d"] = 0.0
        generation = opt._steady.generation
        opt.step()
    assert opt._steady.generation == generation
    assert all(t.hyper["use_adamw_for_1d"] == 0.0 for t in opt._steady.tasks)
    opt.param_groups[0].update(use_adamw_for_1d=1.0, is_embedding=1.0)
    with pytest.raises(RuntimeError, match="now takes 'adamw_factored', but its state belongs to 'celo2_factored'"):
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_the_optimizer_holds_no_gradient_after_its_step(backend):
    """zero_grad() frees the gradients: the tasks kept for the next step do not hold them."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = _adam(params, backend)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        gone = [weakref.ref(p.grad) for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(g() is None for g in gone)


def test_a_loaded_state_frees_the_old_one():
    """The last step's tasks hold the state they were found with: load_state_dict drops
    them, so that the old state's tensors go with it."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = _small_fc_lopt(params, "reference")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    old = [weakref.ref(v) for state in opt.state.values() for v in state.values()   # (the accumulators)
           if isinstance(v, torch.Tensor) and v.dim()]
    opt.load_state_dict(saved)
    gc.collect()
    assert old and all(v() is None for v in old)


def test_two_optimizers_never_share_a_generation():
    """A backend repeats what it did at the last step of the same generation: generations
    are unique across optimizers."""
    seen = set()
    for _ in range(2):
        params = [torch.nn.Parameter(torch.randn(3, 2))]
        params[0].grad = torch.randn(3, 2)
        opt = _adam(params, "reference")
        opt.step()
        seen.add(opt._steady.generation)
    assert len(seen) == 2


def test_a_sparse_gradient_after_steady_steps_is_still_refused():
    p = torch.nn.Parameter(torch.randn(6, 3))
    opt = _small_fc_lopt([p], "reference")
    for _ in range(2):
        p.grad = torch.randn(6, 3)
        opt.step()
    p.grad = torch.randn(6, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
