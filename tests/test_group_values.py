"""Same-shape tensors share their small work (backends/group_values.py) in both compiled
backends, and still get their own values."""
from __future__ import annotations

import pytest
import torch

from lopt_codegen.backends.group_values import GroupValues
from lopt_codegen.runtime.axes import factored_axes
from test_tvm_backend import CASES, RTOL


@pytest.mark.parametrize("backend", ["tvm", "cuda"])
@pytest.mark.parametrize("name", ["adam", "small_fc_lopt", "velo"])
def test_same_shape_tensors_share_small_work_but_keep_their_own_values(name, backend, monkeypatch):
    """Tensors of one shape run their small work as one group (group_values.py); each
    must still get its own hyperparameters (two param groups), step count (a tensor
    without a gradient is skipped and falls behind), state and network outputs."""
    cls, lr, extra = CASES[name]
    shapes = [(5, 3), (7,), (5, 3), (32, 48), (7,), (5, 3), (32, 48)]
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=gen) for s in shapes]
    ref_params = [torch.nn.Parameter(p.clone()) for p in start]
    our_params = [torch.nn.Parameter(p.clone()) for p in start]

    def groups(params):
        return [{"params": params[0::2], "lr": lr, "weight_decay": 0.1},
                {"params": params[1::2], "lr": lr / 3, "weight_decay": 0.0}]

    ref = cls(groups(ref_params), backend="reference", **extra)
    opt = cls(groups(our_params), backend=backend, **extra)
    sizes = []
    monkeypatch.setattr(GroupValues, "__len__", lambda self: sizes.append(len(self.tasks)) or len(self.tasks))
    for step in range(6):
        for i, (p, q) in enumerate(zip(ref_params, our_params)):
            g = torch.randn(p.shape, generator=gen) if i != step % len(shapes) else None
            p.grad, q.grad = g, None if g is None else g.clone()
        before = [p.detach().clone() for p in ref_params]
        ref.step(loss=1.0 / (step + 1))
        opt.step(loss=1.0 / (step + 1))
        for i, (p, q, b) in enumerate(zip(ref_params, our_params, before)):
            d_ref, d_ours = p.detach() - b, q.detach() - b
            if i == step % len(shapes):
                assert not d_ours.any(), "a tensor without a gradient was updated"
                continue
            rounding = 2 * torch.finfo(torch.float32).eps * max(float(b.abs().max()), float(p.detach().abs().max()))
            err = float((d_ref - d_ours).abs().max())
            assert err <= RTOL * float(d_ref.abs().max()) + rounding, f"tensor {i} {tuple(p.shape)}, step {step}: {err:.3g}"
            q.data.copy_(p.data)
        for p, q in zip(ref_params, our_params):
            for key, value in ref.state[p].items():
                torch.testing.assert_close(opt.state[q][key], value, rtol=1e-5, atol=1e-6)
                opt.state[q][key].copy_(value)
    assert max(sizes) == 3, "same-shape tensors were not grouped"


@pytest.mark.parametrize("name", ["adam", "small_fc_lopt", "velo"])
def test_tvm_cpu_kernels_take_a_group_in_one_call(name):
    """One kernel call per group of same-shape tensors and pass (tvm/batched.py), not
    one per tensor."""
    cls, lr, extra = CASES[name]
    shapes = [(5, 3), (7,), (5, 3), (32, 48), (7,), (5, 3), (32, 48)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt = cls(params, lr=lr, backend="tvm", **extra)
    opt.step(loss=1.0)
    opt.backend._record = None   # (the step found again, not a replay of the recorded calls)
    calls = []
    for kernels in opt.backend._kernels.values():
        for k in kernels:
            k.func = (lambda f: lambda *a: calls.append(a[0].shape[0]) or f(*a))(k.func)
    opt.step(loss=1.0)
    expected = []
    for shape, size in (((5, 3), 3), ((7,), 2), ((32, 48), 2)):
        variant = "unfactored" if factored_axes(shape, cls.program.factored_axes) is None else "factored"
        expected += [size] * len(opt.backend.plans[variant].passes)
    assert sorted(calls) == sorted(expected)


def test_tvm_group_keeps_its_pointer_table_until_a_tensor_moves():
    """An unchanged group reuses its pass's pointer table (on a GPU: already in device
    memory); a gradient in new memory gets a new table, and the step stays right."""
    cls, lr, extra = CASES["velo"]
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(s, generator=gen) for s in [(5, 3), (5, 3), (9,)]]
    ref_params = [torch.nn.Parameter(p.clone()) for p in start]
    our_params = [torch.nn.Parameter(p.clone()) for p in start]
    ref = cls(ref_params, lr=lr, backend="reference", **extra)
    opt = cls(our_params, lr=lr, backend="tvm", **extra)
    for p, q in zip(ref_params, our_params):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()

    def step_and_tables() -> dict:
        ref.step(loss=1.0)
        opt.backend._record = None   # (the step found again, not a replay of the recorded calls)
        opt.step(loss=1.0)
        for p, q in zip(ref_params, our_params):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
        return {(key, index): kept.table for key, group in opt.backend._kept.items()
                for index, kept in group.passes.items()}

    first = step_and_tables()
    assert len(first) == 2 * 3   # two groups, three passes each
    second = step_and_tables()
    assert all(second[key] is first[key] for key in first)
    our_params[1].grad = our_params[1].grad.clone()   # same values, new memory
    third = step_and_tables()
    moved = {key for key in first if third[key] is not second[key]}
    factored = {key for key in first if key[0][1] == (5, 3)}
    assert moved == factored
