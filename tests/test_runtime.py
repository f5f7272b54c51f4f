"""The runtime contract of generated optimizers (torch.optim semantics, state, errors)."""
from __future__ import annotations

import copy
import gc
import io

import pytest
import torch

from generated.adam import Adam
from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO

SHAPES = [(), (5,), (4, 6), (6, 4), (3, 3), (2, 3, 4), (3, 2, 2, 2)]


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def build(name, params, **kw):
    if name == "small_fc_lopt":
        return SmallFcLopt(params, lr=0.1, weights="random", seed=1, **kw)
    if name == "velo":
        return VeLO(params, lr=0.1, num_steps=50, weights="random", seed=1, **kw)
    return Adam(params, lr=0.01, **kw)


def run(opt, params, steps, first_seed=0):
    for i in range(steps):
        set_grads(params, first_seed + i)
        opt.step(loss=torch.tensor(1.0 / (first_seed + i + 1)))


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo", "adam"])
def test_state_dict_round_trip_resumes_exactly(name):
    params = make_params()
    opt = build(name, params)
    run(opt, params, 3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    run(opt, params, 3, first_seed=3)  # the uninterrupted run

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [torch.nn.Parameter(p) for p in saved["params"]]
    resumed = build(name, resumed_params)
    resumed.load_state_dict(saved["opt"])
    run(resumed, resumed_params, 3, first_seed=3)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q), "resuming from a state_dict changed the trajectory"


def test_velo_state_includes_lstm_and_loss_buffer():
    params = make_params()
    opt = build("velo", params)
    run(opt, params, 2)
    sd = opt.state_dict()
    assert {"lstm_h", "lstm_c", "m", "v", "fr", "m_mean", "v_mean", "step"} <= set(sd["state"][0])
    assert float(sd["state"]["loss_buffer"]["loss_iteration"]) == 2.0
    assert float(sd["state"][0]["step"]) == 2.0


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_velo_network_state_is_read_from_its_rows_only_while_it_is_theirs(backend):
    """After a step the tensors' network states are rows of one tensor, which the next step
    reads and writes whole (reference.run_network); a run whose states are separate
    tensors before every step takes the same steps, bit for bit, and so does one whose
    states a user replaces midway (both runs alike)."""
    params, other = make_params(), make_params()
    opt, separate = (build("velo", ps, backend=backend) for ps in (params, other))
    for i in range(5):
        if i == 3:   # replaced by the user: new tensors, new values
            for o, ps in ((opt, params), (separate, other)):
                for p in ps:
                    o.state[p]["lstm_h"] = torch.full_like(o.state[p]["lstm_h"], 0.25)
        for p in other if i else ():   # (the state is made at the first step)
            for k in ("lstm_h", "lstm_c"):
                separate.state[p][k] = separate.state[p][k].clone()
        kept = [opt.state[p]["lstm_c"] for p in params] if i else []
        for o, ps in ((opt, params), (separate, other)):
            set_grads(ps, i)
            o.step(loss=torch.tensor(1.0 / (i + 1)))
        if i == 4:   # a step on the rows writes them in place: the same tensors stay the state
            assert all(a is opt.state[p]["lstm_c"] for a, p in zip(kept, params))
    for p, q in zip(params, other):
        assert torch.equal(p, q)
        for k in ("lstm_h", "lstm_c"):
            assert torch.equal(opt.state[p][k], separate.state[q][k])
    for k in ("lstm_h", "lstm_c"):
        assert len({opt.state[p][k].untyped_storage().data_ptr() for p in params}) == 1


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo"])
def test_small_states_of_a_group_are_its_rows_while_they_are_theirs(name):
    """The tvm backend makes the row, column and tensor statistics kept as state (fr, fc;
    VeLO's m_mean, v_mean too) of a group's tensors rows of one tensor (small_work.py:
    GroupStep._state_rows), read and written whole; a run whose states are separate
    tensors before every step takes the same steps, bit for bit, and so does one whose
    states a user replaces midway (both runs alike)."""
    shapes = [(6, 5), (6, 5), (6, 5), (4, 7), (4, 7), (9,)]
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=gen) for s in shapes]
    params, other = ([torch.nn.Parameter(p.clone()) for p in start] for _ in range(2))
    opt, separate = (build(name, ps, backend="tvm") for ps in (params, other))
    small = lambda o, p: [k for k, v in o.state[p].items() if k != "step" and v.numel() < p.numel()]  # noqa: E731
    for i in range(5):
        if i == 3:   # replaced by the user: new tensors, new values
            for o, ps in ((opt, params), (separate, other)):
                o.state[ps[1]]["fc"] = torch.full_like(o.state[ps[1]]["fc"], 0.25)
        for p in other if i else ():   # (the state is made at the first step)
            for k in small(separate, p):
                separate.state[p][k] = separate.state[p][k].clone()
        kept = {(id(p), k): opt.state[p][k] for p in params for k in small(opt, p)}
        for o, ps in ((opt, params), (separate, other)):
            set_grads(ps, i)
            o.step(loss=torch.tensor(1.0 / (i + 1)))
        if i == 4:   # a step on the rows writes them in place: the same tensors stay the state
            assert all(v is opt.state[p][k] for p in params for k in small(opt, p) for v in [kept[(id(p), k)]])
    keys = small(opt, params[0])
    assert {"fr", "fc"} <= set(keys)
    for p, q in zip(params, other):
        assert torch.equal(p, q)
        for k in small(opt, p):
            assert torch.equal(opt.state[p][k], separate.state[q][k]), k
    for group in (params[:3], params[3:5]):
        for k in keys:
            assert len({opt.state[p][k].untyped_storage().data_ptr() for p in group}) == 1, k


def test_bf16_params_keep_float32_state_through_load():
    params = make_params(torch.bfloat16)
    opt = build("small_fc_lopt", params)
    run(opt, params, 2)
    fresh = build("small_fc_lopt", params)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in params:
        for key, value in fresh.state[p].items():
            assert value.dtype == torch.float32, key
            assert torch.equal(value, opt.state[p][key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_float32_within_rounding(dtype):
    low = make_params(dtype)
    high = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_low, opt_high = build("small_fc_lopt", low), build("small_fc_lopt", high)
    set_grads(low, 0)
    for p, q in zip(low, high):
        q.grad = p.grad.float()
    opt_low.step()
    opt_high.step()
    eps = torch.finfo(dtype).eps
    for p, q in zip(low, high):
        assert p.dtype == dtype
        assert torch.allclose(p.float(), q.detach(), rtol=eps, atol=eps * q.abs().max().item())


def test_lr_scheduler_and_param_groups():
    a, b = make_params(seed=1), make_params(seed=2)
    opt = SmallFcLopt([{"params": a}, {"params": b, "lr": 0.0}], lr=0.1, weights="random")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 1 else 0.0)
    before_b = [p.detach().clone() for p in b]
    set_grads(a + b, 0)
    before_a = [p.detach().clone() for p in a]
    opt.step()
    sched.step()
    assert all(not torch.equal(p, q) for p, q in zip(a, before_a) if p.numel() > 0)
    assert all(torch.equal(p, q) for p, q in zip(b, before_b)), "a group with lr=0 moved"
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = [p.detach().clone() for p in a]
    set_grads(a + b, 1)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a, frozen)), "the scheduler's lr=0 was ignored"


def test_params_without_grads_are_skipped():
    params = make_params()
    opt = build("small_fc_lopt", params)
    set_grads(params, 0)
    params[2].grad = None
    before = params[2].detach().clone()
    opt.step()
    assert torch.equal(params[2], before) and len(opt.state[params[2]]) == 0
    assert float(opt.state[params[0]]["step"]) == 1.0


@pytest.mark.parametrize("backend", ["reference", "cuda", "tvm"])
def test_empty_params_are_skipped_and_do_not_touch_the_others(backend):
    """VeLO's network mixes tensors (a max over them): an empty tensor's NaN means would
    poison every update, so empty tensors are left out of the step."""
    with_empty, alone = make_params(seed=3), make_params(seed=3)
    empty = [torch.nn.Parameter(torch.randn(0, 5)), torch.nn.Parameter(torch.randn(4, 0, 2))]
    opt_a, opt_b = build("velo", with_empty + empty, backend=backend), build("velo", alone, backend=backend)
    for i in range(3):
        set_grads(with_empty + empty, i)
        set_grads(alone, i)
        opt_a.step(loss=torch.tensor(1.0))
        opt_b.step(loss=torch.tensor(1.0))
    for p, q in zip(with_empty, alone):
        assert torch.isfinite(p).all() and torch.equal(p, q)
    assert all(len(opt_a.state[e]) == 0 for e in empty)


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = build("small_fc_lopt", list(emb.parameters()))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="float32, bfloat16 and float16.*torch.float64"):
        build("adam", [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])


def test_velo_needs_loss_and_horizon():
    params = make_params()
    with pytest.raises(TypeError, match="needs num_steps"):
        VeLO(params, weights="random")
    opt = build("velo", params)
    set_grads(params, 0)
    with pytest.raises(ValueError, match=r"needs the training loss: call step\(loss=loss\) or step\(closure\)"):
        opt.step()


def test_velo_closure_supplies_the_loss():
    model = torch.nn.Linear(4, 2)
    opt = VeLO(model.parameters(), lr=0.01, num_steps=10, weights="random")
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and float(opt.state["loss_buffer"]["loss_iteration"]) == 1.0


def test_learned_optimizer_without_weights_says_how_to_get_them():
    """A spec that names no published repository has no default weights (the built-in
    ones default to weights="pretrained": tests/test_hub.py)."""
    from dataclasses import replace

    unpublished = type("Unpublished", (SmallFcLopt,), {"program": replace(SmallFcLopt.program, weight_hub={})})
    with pytest.raises(ValueError, match=r"needs meta-weights: weights=<path>.*weights='random'"):
        unpublished(make_params())
    with pytest.raises(ValueError, match=r"has no published weights \(its spec.s weights.hub names no repository\): pass weights=<path>"):
        unpublished(make_params(), weights="pretrained")


def test_unknown_backend_and_bad_hyperparameters():
    with pytest.raises(ValueError, match="unknown backend 'fpga'; available: auto, reference"):
        build("adam", make_params(), backend="fpga")
    with pytest.raises(ValueError, match="invalid lr -1"):
        Adam(make_params(), lr=-1)


def test_factored_state_shapes():
    p = torch.nn.Parameter(torch.randn(3, 5, 2))
    opt = build("small_fc_lopt", [p])
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    # d0 = axis 1 (largest), d1 = axis 0: row statistics drop d0, column statistics drop d1.
    assert state["m"].shape == (3, 3, 5, 2)
    assert state["fr"].shape == (3, 3, 1, 2) and state["fc"].shape == (3, 1, 5, 2)
    assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("backend", ["reference", "tvm", "cuda"])
@pytest.mark.parametrize("name", ["small_fc_lopt", "velo", "adam"])
def test_step_pauses_the_collector_and_leaves_no_cycles(name, backend):
    """step() runs with the cyclic GC off (runtime/optimizer.py: _gc_paused), which is
    only sound if a step frees all it allocates by refcounting: no reference cycles. The
    collector is on again afterwards, also when the step fails."""
    params = make_params()
    opt = build(name, params, backend=backend)
    seen = []
    original = opt.backend.step
    opt.backend.step = lambda batch: seen.append(gc.isenabled()) or original(batch)
    set_grads(params, 1)
    opt.step(loss=1.0)
    gc.collect()
    gc.disable()
    try:
        for step in range(3):
            set_grads(params, step + 2)
            opt.step(loss=1.0)
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert seen == [False] * 4 and gc.isenabled()


    def fail(batch):
        raise RuntimeError("kernel failed")

    opt.backend.step = fail
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step(loss=1.0)
    assert gc.isenabled()


def test_reference_step_compiles_with_torch_compile():
    """benchmarks/step_time.py compares against torch.compile of the reference backend's
    step: it must keep compiling (a functools.cached_property once broke dynamo) and match
    the eager step."""
    eager_params, compiled_params = make_params(), make_params()
    eager = build("adam", eager_params, backend="reference")
    compiled = build("adam", compiled_params, backend="reference")
    step = torch.compile(compiled.step)
    for seed in range(3):
        set_grads(eager_params, seed)
        set_grads(compiled_params, seed)
        eager.step()
        step()
    for p, q in zip(eager_params, compiled_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_a_state_without_an_accumulator_fails_to_load_and_leaves_the_state():
    """A state saved by an earlier VeLO (without the means it now keeps) is refused whole,
    naming what is missing; the optimizer's own state is untouched."""
    params = make_params()
    opt = build("velo", params)
    run(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        if isinstance(entry, dict):
            entry.pop("m_mean", None)
    run(opt, params, 1, first_seed=2)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params}
    with pytest.raises(ValueError, match="has no 'm_mean'.*another version of its spec"):
        opt.load_state_dict(saved)
    for p in params:
        for key, value in before[id(p)].items():
            assert torch.equal(opt.state[p][key], value), key
    assert float(opt.state[params[0]]["step"]) == 3.0
