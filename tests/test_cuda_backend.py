"""The cuda backend's host build (the generated element functions and pass loops,
compiled as C++ through tvm_ffi.cpp) against the reference backend: every built-in spec,
every shape of the matrix, random weights and gradients, 12 steps, 1e-5 relative error
on each step's update; bf16 and fp16 params within their rounding."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SHAPES
from generated.adam import Adam
from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO
from lopt_codegen.backends.cuda import CudaBackend
from lopt_codegen.backends.network_fold import FOLD_FROM_ROWS
from oracle import SMALL_FC_SHAPES, VELO_MLP_SHAPES, VELO_RNN_SHAPES
from test_reference_vs_oracle import as_torch, seeded_weights

STEPS = 12
RTOL = 1e-5


# Learning rates make each update a sizable fraction of |p|, so an error of RTOL of the
# update is not hidden below p's float32 rounding; `decay` is lr * weight_decay.
def _small_fc(ps, backend, decay=0.0):
    return SmallFcLopt(ps, lr=500.0, weight_decay=decay / 500.0, backend=backend,
                       weights={"mlp": as_torch(seeded_weights(SMALL_FC_SHAPES, seed=1))})


def _velo(ps, backend, decay=0.0):
    return VeLO(ps, lr=3e4, weight_decay=decay / 3e4, num_steps=40, backend=backend,
                weights={"mlp": as_torch(seeded_weights(VELO_MLP_SHAPES, seed=4)),
                         "rnn": as_torch(seeded_weights(VELO_RNN_SHAPES, seed=5))})


def _adam(ps, backend, decay=0.0):
    return Adam(ps, lr=5.0, weight_decay=decay / 5.0, backend=backend)


MAKERS: dict[str, Callable] = {"small_fc_lopt": _small_fc, "velo": _velo, "adam": _adam}


# Factored shapes that cut into several line tiles (runtime.cuh.j2: LineTiles): [A, X, B,
# Y, C] with partial row segments and column strips, d0 = X and d0 = Y, A > 1, B > 1,
# C between 1 and 32 (strips not aligned with C), C > 32, 32 columns, and narrow tiles
# (Y*C = 1 and 12: a warp takes 32 or 2 rows at a time; in (70, 4, 3), C = 3 does not divide 16).
LINE_SHAPES = [(70, 45), (33, 100), (3, 40, 50), (40, 3, 36), (36, 34, 5), (34, 40, 7, 7), (65, 1), (1, 65),
               (64, 32), (70, 3, 2, 2), (70, 4, 3)]


def run_both(make: Callable, dtype: torch.dtype, seed: int, decay: float = 0.0,
             shapes: list[tuple] = SHAPES, steps: int = STEPS, backend: Callable | None = None):
    """Step the reference and the cuda backend (or `backend(program)`) on the same random
    gradients; yield per step and tensor (shape, update ours, update reference, p before,
    p after)."""
    rng = np.random.default_rng(seed)
    start = [torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=np.float32)).to(dtype) for s in shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt_ours, opt_ref = make(ours, "cuda", decay), make(ref, "reference", decay)
    if backend is not None:
        opt_ours.backend = backend(opt_ours.program)
    assert isinstance(opt_ours.backend, CudaBackend)
    for step in range(steps):
        loss = float(2.0 / (step + 1) + rng.uniform(0, 0.1))
        before_ours = [p.detach().float().clone() for p in ours]
        before_ref = [p.detach().float().clone() for p in ref]
        for p, q, s in zip(ours, ref, shapes):
            g = torch.from_numpy(np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0), dtype=np.float32))
            p.grad, q.grad = g.to(dtype), g.to(dtype)
        opt_ours.step(loss=loss)
        opt_ref.step(loss=loss)
        for s, p, q, bo, br in zip(shapes, ours, ref, before_ours, before_ref):
            yield step, s, p.detach().float() - bo, q.detach().float() - br, br, q.detach().float()


def assert_fp32_updates_match(name: str, updates) -> None:
    worst = 0.0
    for step, shape, d_ours, d_ref, before, after in updates:
        scale = float(d_ref.abs().max())
        # Both write p - lr * step in float32: allow that rounding (2 ulp of p) on top.
        rounding = 2 * float(np.finfo(np.float32).eps) * max(float(before.abs().max()), float(after.abs().max()))
        err = float((d_ours - d_ref).abs().max())
        assert scale > 0, f"the reference's update is zero for shape {shape} at step {step}"
        assert err <= RTOL * scale + rounding, f"{name} shape {shape}, step {step}: error {err:.3g}, update {scale:.3g}"
        worst = max(worst, (err - rounding) / scale)
    assert worst <= RTOL


@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("name", list(MAKERS))
def test_host_build_matches_reference_fp32(name, decay):
    assert_fp32_updates_match(name, run_both(MAKERS[name], torch.float32, 11, decay))


@pytest.mark.parametrize("name", ["velo", "small_fc_lopt"])
def test_host_build_row_col_means_over_many_line_tiles(name):
    """The factored passes sum rows and columns per line tile; these shapes cut into
    many tiles, partial ones and every layout case."""
    assert_fp32_updates_match(name, run_both(MAKERS[name], torch.float32, 13, shapes=LINE_SHAPES, steps=5))


# (VeLO's test lr grows p ~60% a step: past float16's range within 12 steps.)
@pytest.mark.parametrize("name, dtype", [(n, torch.bfloat16) for n in MAKERS] +
                         [("small_fc_lopt", torch.float16), ("adam", torch.float16)],
                         ids=lambda x: {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x, x))
def test_host_build_low_precision_params(name, dtype):
    """Same math in float32; p is rounded to its dtype once per step, as the reference
    does: at most one rounding step of the dtype apart."""
    ulp = float(torch.finfo(dtype).eps)
    for step, shape, d_ours, d_ref, before, after in run_both(MAKERS[name], dtype, 12):
        err = float((d_ours - d_ref).abs().max())
        assert err <= ulp * float(after.abs().max()) + 1e-6, (
            f"{name} {dtype} shape {shape}, step {step}: error {err:.3g}")


def test_every_ir_op_has_a_cpp_rule():
    from lopt_codegen.backends.cuda.printer import BINARY, UNARY
    from lopt_codegen.ir.nodes import BINARY as IR_BINARY, UNARY as IR_UNARY

    assert set(UNARY) == IR_UNARY and set(BINARY) == IR_BINARY


def test_literals_round_trip_float32():
    from lopt_codegen.backends.cuda.printer import literal

    assert literal(1.0) == "1.0f" and literal(1e-30) == "1e-30f" and literal(-0.5) == "(-0.5f)"
    assert np.float32(literal(0.54202735)[:-1]) == np.float32(0.54202735)
    with pytest.raises(ValueError, match="non-finite"):
        literal(float("inf"))


@pytest.mark.parametrize("name, variant, inputs", [
    ("small_fc_lopt", "factored", 28),   # 39 features less the 11 step-level time features
    ("velo", "factored", 30), ("velo", "unfactored", 30), ("adam", "unfactored", 1)])
def test_mlp_first_layer_is_folded(programs, name, variant, inputs):
    from lopt_codegen.backends.cuda.render import render_cuda

    last = render_cuda(programs[name], name).layouts[variant][-1]
    assert last.mlp is not None and last.fold.features == inputs
    # every normalized feature is `x * rsqrt(mean(x * x) + eps)`: its scale goes into W0
    n_normalized = {"small_fc_lopt": 12, "velo": 14, "adam": 0}[name]
    assert sum(scale is not None for _, scale, _, _ in last.fold.element_parts) == n_normalized


def test_pass_traffic_counts_inputs_writes_and_line_sums(programs):
    """gpu_check rates each pass's bandwidth by this count: Adam's one pass reads g, p, m,
    v and writes m, v, p; VeLO's factored first pass reads g and p and sums one row/col
    mean argument (two floats per 32 elements)."""
    from lopt_codegen.backends.cuda.render import render_cuda

    (adam,) = render_cuda(programs["adam"], "adam").layouts["unfactored"]
    assert adam.element_bytes() == 7 * 4
    assert adam.element_bytes(param_size=2, grad_size=2) == 4 * 4 + 3 * 2   # m, v stay float32
    velo_first = render_cuda(programs["velo"], "velo").layouts["factored"][0]
    assert velo_first.element_bytes() == 2 * 4 + 2 * 4 / 32


class _CountOps(TorchDispatchMode):
    """Counts the torch calls that compute (views and detaches are free)."""

    FREE = {"view", "_unsafe_view", "slice", "select", "expand", "permute", "detach", "alias", "unsqueeze",
            "squeeze", "t", "transpose", "as_strided", "unbind", "split", "unflatten"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in self.FREE
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(MAKERS))
def test_torch_work_per_step_does_not_grow_with_same_shape_tensors(name):
    """The host side (small values, MLP fold, finishing reductions) runs per group of
    same-shape tensors: on a GPU each torch call is a launch, so a model's many equal
    layers must not multiply them. (A network folds a layer from FOLD_FROM_ROWS tensors,
    network_fold.py: its calls are compared on each side of that count.)"""
    def calls(copies: int) -> int:
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(40, 24), (24,)] * copies]
        opt = MAKERS[name](params, "cuda")
        for step in range(3):   # the last one counted: buffers and caches are warm
            for p in params:
                p.grad = torch.randn_like(p)
            with _CountOps() as counter:
                opt.step(loss=torch.tensor(1.0))
        return counter.count

    few, many = FOLD_FROM_ROWS // 2 - 1, FOLD_FROM_ROWS // 2   # (copies of two tensors)
    assert calls(few) == calls(1)
    assert calls(many + 2) == calls(many)


def test_rejects_non_contiguous_params():
    base = torch.randn(4, 6)
    p = torch.nn.Parameter(base.t())   # a view with transposed strides
    p.grad = torch.randn(6, 4)
    opt = _adam([p], "cuda")
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()


def test_unsupported_device_type_is_named():
    backend = CudaBackend(_adam([torch.nn.Parameter(torch.ones(2))], "reference").program)
    with pytest.raises(ValueError, match="meta tensors"):
        backend.module(torch.device("meta"))


def test_state_leaves_have_their_variants_level(programs):
    """Compiled passes trust node levels: `state fr` is row-level for factored tensors
    but element-level for unfactored ones, so the two must be different nodes."""
    from lopt_codegen.ir.nodes import topo_order

    for name, program in programs.items():
        for variant, graph in program.variants.items():
            for node in topo_order(graph.roots()):
                if node.op == "state":
                    assert program.state_levels[node.attrs[0]][variant][0] == node.level, (name, variant, node)


def test_generated_binding_loads_the_committed_source():
    from generated.adam import cuda_binding

    module = cuda_binding.load()
    for names in cuda_binding.PASSES.values():
        for name in names:
            assert getattr(module, f"{name}_host") is not None


def test_fast_division_is_exact_below_2_pow_31():
    """runtime.cuh's quotient (multiply-high, add, shift), which line_index uses for
    tensors under 2^31 elements, against integer division: every divisor up to 300 with
    numerators at both ends, powers of two and their neighbours, and random pairs."""
    from lopt_codegen.backends.cuda.build import build_host
    from lopt_codegen.emit import _env

    source = _env().get_template("cuda/runtime.cuh.j2").render() + """
void quotients(tvm::ffi::TensorView n, tvm::ffi::TensorView d, tvm::ffi::TensorView q) {
  const int64_t* ns = static_cast<const int64_t*>(n.data_ptr());
  const int64_t* ds = static_cast<const int64_t*>(d.data_ptr());
  int64_t* qs = static_cast<int64_t*>(q.data_ptr());
  for (int64_t k = 0; k < n.size(0); ++k) qs[k] = lopt::quotient(static_cast<uint32_t>(ns[k]), lopt::fast_div(ds[k]));
}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(quotients, quotients);
"""
    module = build_host(source, "lopt_fast_division_test")
    top = 2**31 - 1
    rng = np.random.default_rng(3)
    small = np.arange(1, 301)
    ends = np.concatenate([np.arange(0, 2000), top - np.arange(0, 2000)])
    powers = np.array([2**b + e for b in range(31) for e in (-2, -1, 0, 1, 2) if 1 <= 2**b + e <= top])
    pairs = [(np.repeat(ends, len(small)), np.tile(small, len(ends))),
             (rng.integers(0, top + 1, 200_000), np.repeat(powers, 200_000 // len(powers) + 1)[:200_000]),
             (rng.integers(0, top + 1, 500_000), rng.integers(1, top + 1, 500_000))]
    d_big = rng.integers(1, top + 1, 100_000)
    multiples = (rng.integers(0, top + 1, 100_000) // d_big) * d_big   # exact multiples and one below
    pairs += [(multiples, d_big), (np.maximum(multiples - 1, 0), d_big)]
    for n, d in pairs:
        n, d = torch.from_numpy(n.astype(np.int64)), torch.from_numpy(d.astype(np.int64))
        q = torch.empty_like(n)
        module.quotients(n, d, q)
        assert torch.equal(q, n // d), (n[q != n // d][:5], d[q != n // d][:5])
