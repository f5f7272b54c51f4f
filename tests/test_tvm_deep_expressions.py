"""Specs that nest NaN-propagating ops (min, max, relu, clip, exp) deeply, in element
values and inside means. TVM's LLVM codegen simplifies each Let value with the earlier
ones substituted in, so such expressions took it from 27 s to over 5 minutes per kernel
(now 0.3-2.5 s). The printer now computes values past printer.EXPANDED_LIMIT in stages of their own, read
back from tile buffers; these tests check that no stage's expression inlines past a
bound, and that the kernels still match the reference on generic and specialized views."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch
import tvm
from tvm import s_tir, te, tirx

from lopt_codegen.backends.tvm.signature import pass_signature
from lopt_codegen.backends.tvm.small_function import _inlined, _SmallStages, small_signatures
from lopt_codegen.backends.tvm.stages import build_pass_function
from lopt_codegen.backends.tvm.view import view_of
from lopt_codegen.cli import run as lopt_compile
from lopt_codegen.ir.plan import plan_program
from lopt_codegen.ir.program import is_factored

DEEP = """\
name: deep
class_name: Deep
hyperparameters:
  beta: 0.8
factored_axes: adafactor
accumulators:
  m: {ema: g, decays: [beta]}
  v: {update: '0.5 * prev(v) + 0.1 * tanh(g * prev(m))'}
derived:
  d: 'min(max(min(g, m), max(relu(v), p)), max(min(sign(g), v), min(m, relu(p))))'
  s:
    factored: 'mean_d0(d) + mean_d1(exp(clip(d, -5, 5)))'
    unfactored: '0.5'
update:
  step: 'd + mean(d * d) + s + exp(clip(max(d, relu(m)), -5, 5))'
"""
# Column values nested deep (each of a, b, c reads the one before 12 times): small work
# whose stages, were each inlined into its readers (small_function._inlined), would
# grow past any bound; those past printer.EXPANDED_LIMIT keep their stages.
DEEP_SMALL = """\
name: deep_small
class_name: DeepSmall
factored_axes: adafactor
accumulators:
  r: {ema: {factored: "mean_d1(g * g)", unfactored: "g * g"}, decays: [0.5]}
derived:
  a: 'min(max(min(r, 2 * r), max(relu(r), r + 1)), max(min(sign(r), r), min(r * r, relu(r))))'
  b: 'min(max(min(a, 2 * a), max(relu(a), a + 1)), max(min(sign(a), a), min(a * a, relu(a))))'
  c: 'min(max(min(b, 2 * b), max(relu(b), b + 1)), max(min(sign(b), b), min(b * b, relu(b))))'
update:
  step: 'g * c'
"""
# The largest stored expression's inlined size (inlined_size) was 2,426,595 before the
# fix and is 1,239 after it (exp's polynomial inlines its operand about 28 times).
INLINED_BOUND = 5_000
SHAPES = [(5, 3), (7,), (2, 3, 4), (), (64, 48), (256, 512), (300, 260)]


def compiled(root, name: str, text: str, class_name: str):
    (root / f"{name}.yaml").write_text(text)
    assert lopt_compile(["--out", str(root / f"pkg_{name}"), str(root / f"{name}.yaml")]) == 0
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(f"pkg_{name}.{name}")
    finally:
        sys.path.remove(str(root))
    return getattr(module, class_name)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return compiled(tmp_path_factory.mktemp("deep"), "deep", DEEP, "Deep")


def inlined_size(expr, bound: dict | None = None) -> int:
    """The node count of `expr` with every Let variable replaced by its value, as TVM's
    analyzer sees it; a buffer load counts 1 (its value is not looked into)."""
    bound = {} if bound is None else bound
    if isinstance(expr, tirx.Var):
        return bound.get(expr, 1)
    if isinstance(expr, tirx.Let):
        inner = dict(bound)
        inner[expr.var] = inlined_size(expr.value, bound)
        return inlined_size(expr.body, inner)
    if isinstance(expr, tvm.ir.TensorLoad):
        return 1
    children = [getattr(expr, name) for name in ("a", "b", "value", "condition", "true_value", "false_value")
                if hasattr(expr, name)]
    children += list(getattr(expr, "args", []))
    return 1 + sum(inlined_size(c, bound) for c in children if isinstance(c, tvm.ir.Expr))


def signatures(program, generic: bool):
    for variant, plan in plan_program(program).items():
        graph = program.variants[variant]
        shape, axes = ((256, 512), (0, 1)) if is_factored(variant) else ((70000,), None)
        view = view_of(shape, axes)
        for p in plan.passes:
            yield pass_signature(p, graph.new_param, graph.accumulators, view.generic() if generic else view,
                                 "float32", "float32")


def stored_values(func) -> dict[str, object]:
    """Every block's stored value in a function, by block name."""
    sch = s_tir.Schedule(func)
    out = {}
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(rv)
        if isinstance(block.body, tirx.BufferStore):
            out[block.name_hint] = block.body.value
    return out


@pytest.mark.parametrize("generic", [True, False], ids=["generic", "specialized"])
def test_no_stage_inlines_past_the_bound(deep, generic):
    own = 0
    for sig in signatures(deep.program, generic):
        pf = build_pass_function(sig)
        own += len(pf.tile_blocks) + sum(len(b) for b in pf.sum_blocks.values())
        for name, value in stored_values(pf.func).items():
            assert inlined_size(value) <= INLINED_BOUND, (sig.index, name)
    assert own >= 4   # the element values, the tensor mean and the row/col means each took some


def steps(optimizer, backend: str) -> tuple[list[torch.Tensor], object]:
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = optimizer(params, lr=0.1, backend=backend)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params], opt


def assert_matches_the_reference(optimizer) -> object:
    (got, opt), (want, _) = steps(optimizer, "tvm"), steps(optimizer, "reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
    return opt


def test_deep_expressions_match_the_reference(deep):
    assert_matches_the_reference(deep)


def test_small_functions_inline_their_stages_up_to_the_bound(tmp_path):
    """The small work's elementwise stages are inlined into their readers
    (small_function._inlined) while their expressions stay under the bound: DEEP_SMALL's
    column values keep some stages; every stored value stays under INLINED_BOUND (checked
    before any build: inlined past it, LLVM took over 10 minutes); the results match
    the reference."""
    optimizer = compiled(tmp_path, "deep_small", DEEP_SMALL, "DeepSmall")
    kept = inlined = 0
    for variant, plan in plan_program(optimizer.program).items():
        graph = optimizer.program.variants[variant]
        sigs = [pass_signature(p, graph.new_param, graph.accumulators, view_of((6, 5), (0, 1)).generic(), "float32",
                               "float32") for p in plan.passes] if is_factored(variant) else []
        for plain in (True, False):
            for sig in [s for s in small_signatures(graph, sigs, plain) if not s.empty] if sigs else []:
                stages = _SmallStages(sig)
                func = te.create_prim_func(stages.arguments())
                names, sizes = stages.inlined(), [*stages.sizes, stages.K, stages.L]
                func = _inlined(func, sizes, names)
                for name, value in stored_values(tirx.PrimFunc([*func.params, *sizes], func.body)).items():
                    assert inlined_size(value) <= INLINED_BOUND, name
                inlined += len(names)
                kept += sum(node.channels for node, _ in stages.stages.values()) - len(names)
    assert inlined >= 10 and kept >= 2, (inlined, kept)
    assert_matches_the_reference(optimizer)
