"""The TVM (LLVM) backend against the reference backend: every built-in spec, the shape
matrix, 10 steps, both kinds of kernels (shape-generic and specialized per shape), low
precision parameters, misaligned and non-contiguous tensors."""
from __future__ import annotations

import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
import tvm
from tvm import s_tir, te

from conftest import SHAPES
from generated.adam import Adam
from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO
from lopt_codegen.backends.base import TensorTask
from lopt_codegen.backends.tvm import TvmBackend, small_work, unsupported_reason
from lopt_codegen.backends.tvm.build import compile_pass, llvm_target
from lopt_codegen.backends.tvm.printer import _BINARY, _UNARY, F32
from lopt_codegen.backends.tvm.view import LANES, OWN_LANES_FROM, SHORT_ROWS_MACS

STEPS = 10
RTOL = 1e-5
# Shapes whose specialized kernels take the vectorized paths (rows/cols multiples of 16).
VECTOR_SHAPES = [(48,), (32, 48), (48, 32), (2, 16, 32), (3, 384), (384, 3),   # (rows of 384: means in Q)
                 (12, 20), (40, 13), (3, 390), (5, 9, 2),   # padded rows (of 390: in Q); padded and strided by C
                 (3, 13), (2, 20),   # padded rows, sums in M (rows under 16: clamped; else vectors whole)
                 (45,), (100,), (401,)]   # flat, one padded row (sums in M, P, Q)
# Axes after Y, none between X and Y, Y whole vectors: folded views (View.folded), factored
# over d1 (X: axis 0 of (4, 16, 3)) and over d0 (X: axis 1 of (2, 32, 16, 3), A = 2).
FOLDED_SHAPES = [(4, 16, 3), (2, 32, 16, 3)]
# lr that makes each spec's update about as large as p, so that an error of RTOL of the
# update is not hidden below p's float32 rounding (see test_reference_vs_oracle.py).
CASES = {"adam": (Adam, 1.0, {}), "small_fc_lopt": (SmallFcLopt, 30.0, {"weights": "random"}),
         "velo": (VeLO, 300.0, {"weights": "random", "num_steps": 40})}


def make_pair(name: str, shapes, dtype=torch.float32, seed: int = 0, **backend_options):
    """Reference and TVM optimizers on the same random start; backend_options: TvmBackend's."""
    cls, lr, extra = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    ref_params = [torch.nn.Parameter(p.clone()) for p in start]
    tvm_params = [torch.nn.Parameter(p.clone()) for p in start]
    ref = cls(ref_params, lr=lr, weight_decay=0.1, backend="reference", **extra)
    opt = cls(tvm_params, lr=lr, weight_decay=0.1, backend="tvm", **extra)
    if backend_options:
        opt.backend = TvmBackend(cls.program, **backend_options)
    return ref_params, ref, tvm_params, opt, gen


def run_and_compare(ref_params, ref, tvm_params, opt, gen, steps=STEPS) -> float:
    worst = 0.0
    for step in range(steps):
        for p, q in zip(ref_params, tvm_params):
            g = (torch.randn(p.shape, generator=gen) * 10.0 ** (-(step % 3))).to(p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        before = [p.detach().float().clone() for p in ref_params]
        loss = 2.0 / (step + 1)
        ref.step(loss=loss)
        opt.step(loss=loss)
        for p, q, b in zip(ref_params, tvm_params, before):
            d_ref, d_tvm = p.detach().float() - b, q.detach().float() - b
            scale = float(d_ref.abs().max())
            rounding = 2 * torch.finfo(torch.float32).eps * max(float(b.abs().max()), float(p.detach().abs().max()))
            err = float((d_ref - d_tvm).abs().max())
            assert scale > 0, f"no update for shape {tuple(p.shape)} at step {step}"
            assert err <= RTOL * scale + rounding, f"shape {tuple(p.shape)}, step {step}: error {err:.3g} of {scale:.3g}"
            worst = max(worst, (err - rounding) / scale)
            # Continue both from the same point, so errors do not compound across steps.
            q.data.copy_(p.data)
        for p, q in zip(ref_params, tvm_params):
            for key, value in ref.state[p].items():
                opt.state[q][key].copy_(value)
    return worst


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """The kernels' row buffers (partial sums, values for the small work) made full of NaN:
    a kernel that leaves a partial sum unwritten fails, where fresh memory (zeros) hid it."""
    original = small_work.empty_rows_each

    def empty_rows_each(*args, **kwargs):
        return [rows.fill_(float("nan")) for rows in original(*args, **kwargs)]
    monkeypatch.setattr(small_work, "empty_rows_each", empty_rows_each)


@pytest.mark.parametrize("kernels", ["generic", "specialized", "generic, torch small work"])
@pytest.mark.parametrize("name", ["adam", "small_fc_lopt", "velo"])
def test_matches_reference_on_every_shape(name, kernels, poisoned_buffers):
    shapes = SHAPES + VECTOR_SHAPES + FOLDED_SHAPES
    # The larger shapes split their own loops across the cores (shape-generic: where their
    # rows split into chunks too), the smaller ones run whole per core (both kinds of CPU
    # parallel loop). Torch small work: the path CUDA groups take. Generic: every tensor
    # on them, also those that would take their own to run a heavy MLP in vectors.
    everyone = 1 << 40
    options = {"specialized": {"specialize_from": 0, "parallel_within_from": 64},
               "generic": {"parallel_within_from": 64, "own_lanes_from": everyone},
               "generic, torch small work": {"compiled_small_work": False, "own_lanes_from": everyone}}[kernels]
    pair = make_pair(name, shapes, **options)
    assert run_and_compare(*pair) <= RTOL
    backend = pair[3].backend
    compiled = {name for functions in backend._small.values() for name in functions}
    expected = {"pass0"} | ({"finish0", "finish1", "pass1", "accumulators"} if name != "adam" else set())
    assert (compiled >= expected) == backend.compiled_small_work, compiled
    # Matrices and flat tensors take the plain small functions, tensors with A, B or C > 1
    # the ones built for any sizes (SmallSignature.plain); Adam's tensors are all flat.
    plain = {small.sig.plain for functions in backend._small.values() for small in functions.values()}
    assert plain == (set() if not backend.compiled_small_work else {True} if name == "adam" else {True, False})
    views = {k.sig.view for ks in backend._kernels.values() for k in ks}
    if kernels == "specialized":   # built for their shapes, but where the shape-generic kernels split a
        # tensor across the cores: those are its own (TvmBackend.kernels)
        assert all(not v.symbolic or v.parallel_within for v in views)
        assert any(not v.symbolic for v in views) and any(v.symbolic for v in views)
    else:
        assert all(v.symbolic for v in views)
    if name != "adam" and kernels == "specialized":   # tensor means per row chunk (M), and over X (P) where
        # the rows split unevenly across the cores, at once
        assert {k.sig.means_in_m for ks in backend._kernels.values() for k in ks} == {False, True}
    assert {v.parallel_within for v in views} == ({False} if kernels == "generic, torch small work" else {False, True})
    if kernels != "specialized":   # shape-generic: vectorized where the dims allow (View.vectors), else scalar
        assert {v.vectors for v in views} == {False, True}
    if kernels == "specialized" and name != "adam":   # Adam's tensors are flat (unfactored)
        vectorized = [v for v in views if v.element_y is not None]
        assert any(v.element_y > v.dims[3] for v in vectorized), "no padded vector kernel tested"
        assert any(v.dims[4] > 1 and not v.folded for v in vectorized), "no strided vector kernel tested"
        assert {v.x_axis for v in views if v.folded} == {"d0", "d1"}, "folded kernels untested"


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo"])
@pytest.mark.parametrize("shapes", [[(3, 4), (2, 3, 4)], [(2, 5, 3), (5, 3)]], ids=["matrix first", "3-D first"])
def test_tensors_sharing_shape_generic_kernels_take_their_own_small_functions(name, shapes, poisoned_buffers):
    """Shape-generic kernels serve every shape of a kind, built with the first tensor's
    view; a matrix takes the plain small functions and a tensor with A = 2 the ones for
    any sizes, whichever comes first (the kernels' view once chose for both: NaN)."""
    pair = make_pair(name, shapes)
    assert run_and_compare(*pair, steps=3) <= RTOL
    backend = pair[3].backend
    assert len(backend._kernels) == 1, "the two tensors no longer share their kernels: the test tests nothing"
    assert {small.sig.plain for functions in backend._small.values() for small in functions.values()} == {True, False}


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo"])
def test_folded_kernels_match_reference_run_whole_per_core(name, poisoned_buffers):
    """Conv-like tensors take folded kernels (each row's Y x C elements as one contiguous
    axis); here each runs whole on a core (the test above splits their loops)."""
    pair = make_pair(name, FOLDED_SHAPES + [(16, 32, 3, 3)], specialize_from=0)
    assert run_and_compare(*pair, steps=4) <= RTOL
    views = {k.sig.view for ks in pair[3].backend._kernels.values() for k in ks}
    assert {(v.folded, v.parallel_within) for v in views} == {(True, False)}


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo"])
def test_folded_kernels_split_across_the_cores(name, poisoned_buffers):
    """Conv-like tensors of many rows, their loops split across the cores: each row's
    sums, outputs and copy of its sums (Q_rows to Q) by the core that runs the row."""
    pair = make_pair(name, [(64, 32, 3, 3), (2, 96, 16, 3)], specialize_from=0, parallel_within_from=64)
    assert run_and_compare(*pair, steps=3) <= RTOL
    views = {k.sig.view for ks in pair[3].backend._kernels.values() for k in ks}
    assert {(v.folded, v.parallel_within) for v in views} == {(True, True)}


@pytest.mark.parametrize("name", ["adam", "velo"])
def test_a_flat_tensor_of_odd_length_runs_in_whole_vectors(name):
    """A flat tensor whose length is not a multiple of 16 is one row padded to whole
    vectors: its kernels match the reference, and load whole vectors contiguously, the
    last one alone a lane at a time (clamping every vector's index made LLVM gather each
    vector; a lane at a time throughout: small_fc_lopt 5.7x slower on (50257,))."""
    pair = make_pair(name, [(4099,)])
    assert run_and_compare(*pair, steps=3) <= RTOL
    (kernels,) = pair[3].backend._kernels.values()
    assert {k.sig.view.dims for k in kernels} == {(1, 1, 1, 4099, 1)}
    for k in kernels:
        asm = compile_pass(k.sig, llvm_target()).mod.inspect_source("asm")
        assert "gather" not in asm and "zmm" in asm, k.sig.index


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo"])
def test_short_rows_run_in_vectors_in_a_pass_with_a_heavy_mlp(name):
    """Rows under LANES / 2 elements (a conv stem's 7, a depthwise conv's 3) run padded to
    a vector in a pass whose MLP takes SHORT_ROWS_MACS or more multiply-adds an element
    (small_fc_lopt's: its MLP a lane at a time took 4.7x as long on (64, 3, 7, 7)), a lane
    at a time elsewhere (VeLO's); every pass of a tensor lays its sums out alike (lanes),
    and the kernels match the reference."""
    pair = make_pair(name, [(5, 3), (4, 2, 3, 3)], specialize_from=0)
    assert run_and_compare(*pair, steps=3) <= RTOL
    kernels = [k for ks in pair[3].backend._kernels.values() for k in ks]
    heavy = {k.sig.index for k in kernels if k.sig.mlp is not None and
             pair[3].backend.plans["factored"].passes[k.sig.index].macs >= SHORT_ROWS_MACS}
    assert bool(heavy) == (name == "small_fc_lopt")
    for k in kernels:
        assert k.sig.view.dims[3] < 8 and k.sig.view.pad_short_rows == (k.sig.index in heavy)
        assert (k.sig.view.element_y == LANES) == (k.sig.index in heavy)
        assert k.sig.lanes == 1   # (the element stages' vectors: View.vector_y, schedule_llvm)
        assert k.sig.view.vector_y == (k.sig.index in heavy)


@pytest.mark.parametrize("name", ["small_fc_lopt", "velo"])
def test_small_tensors_of_a_heavy_mlp_take_their_own_vector_kernels(name):
    """Tensors under specialize_from share the shape-generic kernels, which run rows that
    are not whole vectors a lane at a time. Where a pass's MLP is heavy (small_fc_lopt's,
    not VeLO's) such a tensor of OWN_LANES_FROM or more elements takes its own kernels,
    which run vectors (a (33,) bias: 650 ns an element on the shared ones). Whole-vector
    rows and smaller tensors still share; all match the reference."""
    shapes = [(33,), (7, 5), (31,), (8, 16), (33,)]
    pair = make_pair(name, shapes, own_lanes_from=OWN_LANES_FROM)
    assert OWN_LANES_FROM == 32 and run_and_compare(*pair, steps=3) <= RTOL
    backend = pair[3].backend
    own = {key[2]: (key[0], kernels) for key, kernels in backend._kernels.items() if key[2] is not True}
    assert set(own) == ({(1, 1, 1, 33, 1), (1, 7, 1, 5, 1)} if name == "small_fc_lopt" else set())
    for dims, (variant, kernels) in own.items():
        heavy = [k for k in kernels if backend.plans[variant].passes[k.sig.index].macs >= SHORT_ROWS_MACS]
        assert heavy and all(k.sig.view.element_y == (48 if dims[3] == 33 else LANES) for k in heavy)


@pytest.mark.parametrize("kernels", ["specialized", "generic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["small_fc_lopt", "velo"])
def test_low_precision_params_within_rounding(name, dtype, kernels):
    # generic: (32, 48) split across the cores, in row chunks; specialized: (40, 3) padded
    # short rows in small_fc_lopt's MLP pass (View.pad_short_rows)
    shapes = [(7,), (5, 3), (32, 48), (40, 3)]
    options = {"specialize_from": 100} if kernels == "specialized" else {"specialize_from": 1 << 40,
                                                                          "parallel_within_from": 64}
    ref_params, ref, tvm_params, opt, gen = make_pair(name, shapes, dtype=dtype, **options)
    for step in range(3):
        for p, q in zip(ref_params, tvm_params):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        ref.step(loss=1.0)
        opt.step(loss=1.0)
        eps = torch.finfo(dtype).eps
        for p, q in zip(ref_params, tvm_params):
            assert q.dtype == dtype
            # Both round the same float32 result; they may differ by the one rounding step.
            torch.testing.assert_close(q.float(), p.float(), rtol=eps, atol=0)
            for key, value in ref.state[p].items():
                torch.testing.assert_close(opt.state[q][key], value, rtol=1e-5, atol=1e-7)
            q.data.copy_(p.data)
            for key, value in ref.state[p].items():
                opt.state[q][key].copy_(value)
    views = {k.sig.view for ks in opt.backend._kernels.values() for k in ks}
    assert any(v.symbolic and v.parallel_within for v in views) == (kernels == "generic")


def test_misaligned_views_and_state_loaded_from_a_checkpoint():
    """Kernels need 64-byte aligned buffers: a gradient that is a view at an odd offset
    into a bigger buffer (as DDP buckets make them) and state restored by load_state_dict
    must still give the reference's result."""
    shapes = [(5, 3), (33,), (32, 48)]
    ref_params, ref, tvm_params, opt, gen = make_pair("small_fc_lopt", shapes, specialize_from=100)
    run_and_compare(ref_params, ref, tvm_params, opt, gen, steps=2)
    opt.load_state_dict(ref.state_dict())
    for p, q in zip(ref_params, tvm_params):
        g = torch.randn(p.shape, generator=gen)
        bucket = torch.empty(g.numel() + 1)
        q.grad = bucket[1:].view(p.shape)
        q.grad.copy_(g)
        p.grad = g.clone()
    assert any(q.grad.data_ptr() % 64 for q in tvm_params)
    before = [p.detach().clone() for p in ref_params]
    ref.step(loss=1.0)
    opt.step(loss=1.0)
    for p, q, b in zip(ref_params, tvm_params, before):
        torch.testing.assert_close(q.detach() - b, p.detach() - b, rtol=1e-5, atol=1e-6)


def test_strided_gradients_and_misaligned_params_of_one_group():
    """The kernels get bare pointers (batched.py): a transposed gradient must be read as
    its values, not its memory, and same-shape params that are views at odd offsets into
    one flat buffer must each be written back."""
    shapes = [(32, 48), (32, 48), (32, 48)]
    ref_params, ref, tvm_params, opt, gen = make_pair("small_fc_lopt", shapes, specialize_from=100)
    flat = torch.empty(3 * 32 * 48 + 3)
    for i, q in enumerate(tvm_params):   # params at offsets 1, 2, 3 floats: none 64-byte aligned
        view = flat[1 + i * (32 * 48 + 1):][:32 * 48].view(32, 48)
        view.copy_(q.detach())
        q.data = view
    assert all(q.data_ptr() % 64 for q in tvm_params)
    for step in range(3):
        before = [p.detach().clone() for p in ref_params]
        for p, q in zip(ref_params, tvm_params):
            g = torch.randn(48, 32, generator=gen).t()   # strides (1, 32)
            p.grad, q.grad = g.contiguous(), g
        ref.step(loss=1.0)
        opt.step(loss=1.0)
        for p, q, b in zip(ref_params, tvm_params, before):
            torch.testing.assert_close(q.detach() - b, p.detach() - b, rtol=1e-5, atol=1e-6)
            q.data.copy_(p.data)
    opt.state[tvm_params[0]]["m"] = opt.state[tvm_params[0]]["m"].double()
    with pytest.raises(ValueError, match="accumulator 'm' must be float32"):
        opt.step(loss=1.0)


def test_an_accumulator_changed_in_place_is_checked_again():
    """Accumulators are checked at a tensor's first step and again when they change, also
    in place: `.data = ...` keeps the tensor object (and here its data pointer)."""
    p = torch.nn.Parameter(torch.randn(16, 16))
    opt = Adam([p], lr=0.1, backend="tvm")
    p.grad = torch.randn(16, 16)
    opt.step()
    m = opt.state[p]["m"]
    pointer = m.data_ptr()
    m.data = m.data.transpose(-1, -2)
    assert m.data_ptr() == pointer
    with pytest.raises(ValueError, match="accumulator 'm' must be float32"):
        opt.step()


def test_mlp_weights_written_in_place_reach_the_next_step():
    """The rows holding the shared MLP weights are copied again only when the weights
    changed: written in place (a new version) here, halfway through."""
    pair = make_pair("small_fc_lopt", [(8, 12), (12,)])
    ref_params, ref, tvm_params, opt, gen = pair
    assert run_and_compare(*pair, steps=2) <= RTOL
    for o in (ref, opt):
        for w in o._mlp_weights(torch.device("cpu")):
            w.mul_(1.5)
    assert run_and_compare(*pair, steps=2) <= RTOL


@pytest.mark.parametrize("name", ["adam", "velo"])
def test_hyperparameters_changed_between_steps_reach_the_kernels(name):
    """A schedule's lr (and VeLO's horizon) written into one param group between steps,
    kept for two steps, then changed again."""
    pair = make_pair(name, [(6, 10), (6, 10), (33,)])
    lr = CASES[name][1]
    for lr_scale in (1.0, 0.5, 0.5, 2.0):
        for o in (pair[1], pair[3]):
            o.param_groups[0]["lr"] = lr * lr_scale
            if name == "velo":
                o.param_groups[0]["num_steps"] = 40 * lr_scale
        assert run_and_compare(*pair, steps=1) <= RTOL


def test_param_groups_sharing_a_shape_keep_their_hyperparameters():
    """Tensors of one shape from two param groups run as one group of the kernels; each
    keeps its own lr, also when the two become equal and differ again."""
    ref_params, ref, tvm_params, opt, gen = make_pair("adam", [(6, 10), (6, 10), (6, 10)])
    for o, params in ((ref, ref_params), (opt, tvm_params)):
        o.param_groups[0]["params"] = params[:2]
        o.add_param_group({"params": params[2:], "lr": 0.3})
    for lr in (0.7, 1.0, 0.2):
        assert run_and_compare(ref_params, ref, tvm_params, opt, gen, steps=2) <= RTOL
        for o in (ref, opt):
            o.param_groups[1]["lr"] = lr


def test_non_contiguous_param_falls_back_with_one_warning():
    """Only the non-contiguous tensor of its group (same shape) takes the reference."""
    base = torch.randn(6, 8)
    p = torch.nn.Parameter(base[:, ::2])   # a non-contiguous leaf
    assert not p.is_contiguous()
    params = [torch.nn.Parameter(torch.randn(6, 4)), p, torch.nn.Parameter(torch.randn(6, 4))]
    copies = [torch.nn.Parameter(x.detach().clone()) for x in params]
    opt = Adam(params, lr=0.1, backend="tvm")
    ref = Adam(copies, lr=0.1, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for x, y in zip(params, copies):
                x.grad = torch.randn(x.shape)
                y.grad = x.grad.clone()
            opt.step()
            ref.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "non-contiguous" in messages[0] and "reference" in messages[0]
    for x, y in zip(params, copies):
        torch.testing.assert_close(x.detach(), y.detach())
    (group,) = opt.backend._kept.values()   # the two contiguous ones ran on the kernels
    assert group.kernels is not None and len(group.checked) == 4


def test_unsupported_tensors_say_why():
    meta = torch.empty(3, device="meta")
    task = TensorTask(meta, meta, {}, {}, "unfactored", None)
    assert "CPU" in unsupported_reason(task)
    empty = torch.empty(0)
    assert "empty" in unsupported_reason(TensorTask(empty, empty, {}, {}, "unfactored", None))


def test_cuda_tensors_take_tvm_cuda_kernels_given_nvcc():
    cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32, numel=lambda: 4,
                           is_contiguous=lambda: True)   # stands in for a CUDA tensor on this CPU build
    reason = unsupported_reason(TensorTask(cuda, cuda, {}, {}, "unfactored", None))
    assert reason is None if shutil.which("nvcc") else "nvcc" in reason


@pytest.mark.parametrize("op", ["min", "max"])
def test_vectorized_min_and_max_keep_nan_as_torch(op):
    """The kernels' min and max (printer._nan_first: one x86 min/max, and a NaN test of a
    bound that is not a constant) against torch's, NaN from either operand, infinities
    and signed zeros, with a varying bound and a constant one on either side."""
    edges = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5, -2.0, 3.0])
    a = torch.cat([edges.repeat_interleave(len(edges)), torch.randn(4096)])
    b = torch.cat([edges.repeat(len(edges)), torch.randn(4096)])
    A, B = (te.placeholder((a.numel(),), "float32", n) for n in "ab")
    rule = _BINARY[op]
    outs = te.compute(A.shape, lambda i: [rule(A[i], B[i]), rule(A[i], tvm.tirx.const(0.5, F32)),
                                          rule(tvm.tirx.const(-2.0, F32), A[i])], name="y")
    sch = s_tir.Schedule(te.create_prim_func([A, B, *outs]))
    (loop,) = sch.get_loops(sch.get_sblock("y_v0"))
    sch.vectorize(sch.split(loop, [None, 16])[1])
    got = [torch.empty_like(a) for _ in outs]
    tvm.compile(sch.mod, target=llvm_target())["main"](a, b, *got)
    torch_op = {"min": torch.minimum, "max": torch.maximum}[op]
    expected = [torch_op(a, b), torch_op(a, torch.tensor(0.5)), torch_op(torch.tensor(-2.0), a)]
    for y, ref in zip(got, expected):
        torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


def test_vectorized_exp_is_within_a_few_ulp():
    """The kernels' exp (printer.py: range reduction and a polynomial, so that LLVM keeps
    it in vectors) against torch.exp over the whole float range and at its edges."""
    edges = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.72, 88.73, -87.33, 1e-30, -1e-30]
    x = torch.cat([torch.linspace(-100, 100, 1 << 16), torch.randn(4096) * 30, torch.tensor(edges)])
    X = te.placeholder((x.numel(),), "float32", "x")
    sch = s_tir.Schedule(te.create_prim_func([X, te.compute(X.shape, lambda i: _UNARY["exp"](X[i]), name="y")]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    sch.vectorize(sch.split(loop, [None, 16])[1])
    y = torch.empty_like(x)
    tvm.compile(sch.mod, target=llvm_target())["main"](x, y)
    ref = torch.exp(x)
    normal = ref.abs() >= torch.finfo(torch.float32).tiny
    normal &= torch.isfinite(ref)
    ulp = torch.finfo(torch.float32).eps
    assert float(((y - ref).abs() / ref)[normal].max()) <= 4 * ulp
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert float((y - ref)[~normal & torch.isfinite(ref)].abs().max()) < torch.finfo(torch.float32).tiny
