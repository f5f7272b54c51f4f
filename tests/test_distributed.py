"""Distributed steps on 2 gloo processes, for every built-in spec on the reference and tvm
backends: the sharded data-parallel step (`shard=True`) and FSDP2 (`fully_shard`) each
equal one process stepping the ranks' mean gradient with their mean loss; each rank of
`shard=True` keeps only its tensors' state; the collectives per step do not grow with
the number of tensors; torch.distributed.checkpoint resumes a run on another world size."""
from __future__ import annotations

import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from distributed_runs import (CLASSES, WORLD, Case, dcp_worker, ddp_training, fsdp2_oracle, make_params, optimizer,
                              parameter_state_numel, single_process_run, worker)
from lopt_codegen.ir.nodes import topo_order

CASES = [Case(spec, backend, reduce_grads) for spec in CLASSES for backend in ("reference", "tvm")
         for reduce_grads in (False, True)]
FSDP2 = [Case(spec, backend, model=model) for spec in CLASSES for backend in ("reference", "tvm")
         for model in ("conv", "deep")] + [Case(spec, "cuda") for spec in ("velo", "celo2")]   # the host build
EDGES = [
    Case("velo", model="one"), Case("elo", model="one", reduce_grads=True),   # a rank owns no tensor
    Case("small_fc_lopt", model="bf16", reduce_grads=True), Case("velo", "tvm", model="bf16"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def skip_cases(tmp_path_factory) -> list[Case]:
    """Adam and VeLO under `grad.nonfinite: skip`, a NaN in one rank's gradient at step 4."""
    from conftest import SPECS
    from test_examples import compile_and_import

    out = tmp_path_factory.mktemp("skip")
    paths = []
    for name in ("adam", "velo"):
        path = out / f"{name}_skip.yaml"
        path.write_text(f"extends: {SPECS}/{name}.yaml\nname: {name}_skip\nclass_name: {name.title()}Skip\n"
                        "grad:\n  nonfinite: skip\n")
        paths.append(str(path))
    compile_and_import(str(out), "lopt_dist_skip", paths)
    return [Case(f"{name}_skip", reduce_grads=reduce_grads, poison_at=4, module=f"lopt_dist_skip.{name}_skip",
                 path=str(out)) for name in ("adam", "velo") for reduce_grads in (False, True)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, skip_cases):
    """The oracle per case, then every case on 2 ranks (one spawn for all: a rank's start-up,
    importing torch and TVM, is most of a case's time). The oracle runs first, so the
    ranks load its compiled kernels from the build cache."""
    cases = CASES + EDGES + skip_cases
    fsdp2_cases = FSDP2 + [replace(c, model="conv") for c in skip_cases]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the ranks: torch's sums (means, a convolution's gradient) in the same order
    try:
        oracle = {case: single_process_run(case) for case in cases}
        oracle.update({("fsdp2", case): fsdp2_oracle(case) for case in fsdp2_cases})
        oracle["ddp"] = ddp_training(None)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(worker, args=(_free_port(), str(out), cases, fsdp2_cases), nprocs=WORLD, join=True)
    ranks = {case: [torch.load(out / f"{case.name}-{r}.pt") for r in range(WORLD)] for case in cases}
    ranks.update({("fsdp2", case): [torch.load(out / f"fsdp2-{case.name}-{r}.pt") for r in range(WORLD)]
                  for case in fsdp2_cases})
    ranks["ddp"] = [{"params": torch.load(out / f"ddp-{r}.pt")} for r in range(WORLD)]
    oracle["fsdp2"] = oracle["ddp"]
    ranks["fsdp2"] = [{"params": torch.load(out / f"fsdp2-{r}.pt")} for r in range(WORLD)]
    return oracle, ranks


def _assert_equals_one_process(runs, case: Case | str | tuple) -> None:
    oracle, ranks = runs
    for rank, result in enumerate(ranks[case]):
        for i, (got, want) in enumerate(zip(result["params"], oracle[case])):
            got, want = got.float(), want.float()
            scale = want.abs().max().clamp_min(1e-30)
            err = ((got - want).abs().max() / scale).item()
            assert err <= 1e-6, f"rank {rank}, tensor {i} {tuple(want.shape)}: relative error {err:.2e}"
    first, second = ranks[case][0]["params"], ranks[case][1]["params"]
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "the ranks' parameters differ after the all-gather"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sharded_step_equals_one_process(runs, case):
    _assert_equals_one_process(runs, case)


@pytest.mark.parametrize("case", EDGES, ids=[c.name for c in EDGES])
def test_a_rank_without_tensors_and_bf16_params(runs, case):
    _assert_equals_one_process(runs, case)


def test_distributed_data_parallel_training_in_one_line(runs):
    """DDP averages the gradients; VeLO(..., shard=True) steps each rank's share and averages
    the loss: the same as one process over both ranks' batches."""
    _assert_equals_one_process(runs, "ddp")


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(runs, skip_cases):
    for case in skip_cases:
        _assert_equals_one_process(runs, case)
        assert [r["skipped"] for r in runs[1][case]] == [1.0] * WORLD, case.name
        _assert_equals_one_process(runs, ("fsdp2", replace(case, model="conv")))


@pytest.mark.parametrize("case", FSDP2, ids=[c.name for c in FSDP2])
def test_fsdp2_step_equals_one_process(runs, case):
    """fully_shard's DTensor parameters, each rank stepping its rows: uneven shards, an empty
    one, a conv kernel and 1-D parameters; the compiled backends step them in their own
    kernels (no tensor sent to the reference), equal to one process on the same backend."""
    _assert_equals_one_process(runs, ("fsdp2", case))
    assert all(r["fallbacks"] == [] for r in runs[1][("fsdp2", case)]), runs[1][("fsdp2", case)][0]["fallbacks"]


@pytest.mark.parametrize("backend", ["reference", "tvm"])
@pytest.mark.parametrize("spec", list(CLASSES))
def test_fsdp2_collectives_do_not_grow_with_the_tensors(runs, spec, backend):
    """8 tensors or 24: the same collectives, per round of whole-tensor values one
    all-reduce (reductions; none for Adam, all element-wise) and one all-gather (CELO2's
    Newton-Schulz arguments), and one all-reduce for the loss; fewer than one per tensor."""
    _, ranks = runs
    small, deep = (ranks[("fsdp2", Case(spec, backend, model=m))][0]["collectives"] for m in ("conv", "deep"))
    assert small == deep and set(small) <= {"all_reduce", "all_gather"}, (small, deep)
    assert (spec == "adam") == (not small) and sum(small.values()) < 8, small
    assert ("all_gather" in small) == spec.endswith("celo2"), small


def test_fsdp2_training_with_the_optimizer_unchanged(runs):
    """fully_shard(model), then VeLO(model.parameters()): FSDP2 averages the gradients, the
    optimizer averages the loss; the same as one process over both ranks' batches."""
    _assert_equals_one_process(runs, "fsdp2")


@pytest.mark.parametrize("spec", list(CLASSES))
def test_each_rank_keeps_only_its_tensors_state(runs, spec):
    _, ranks = runs
    results = ranks[Case(spec)]
    owned = [r["owned"] for r in results]
    assert sum(owned) == len(make_params()) and all(0 < n < len(make_params()) for n in owned)
    params = make_params()
    whole = optimizer(Case(spec), params)
    for p in params:
        p.grad = torch.randn_like(p)
    whole.step(loss=torch.tensor(1.0)) if whole.program.needs_loss else whole.step()
    total = parameter_state_numel(whole)
    assert sum(r["state_numel"] for r in results) == total
    assert max(r["state_numel"] for r in results) < 0.75 * total


def _over_tensors_count(program) -> int:
    """The network's reductions over tensors (max/mean/sum_over_tensors) per step."""
    def count(e) -> int:
        if not isinstance(e, tuple):
            return 0
        return (e[0] == "over_tensors") + sum(count(a) for a in e[1:])
    return 0 if program.network is None else sum(count(expr) for _, _, expr in program.network.body)


@pytest.mark.parametrize("case", [c for c in CASES if c.backend == "reference"],
                         ids=[c.name for c in CASES if c.backend == "reference"])
def test_one_collective_per_whole_step_value(runs, case):
    """12 tensors, and never one collective per tensor: the gradients' reduce-scatter (under
    reduce_grads), one all-reduce of the loss and skip flag, one per network reduction over
    tensors, one all-gather of the parameters."""
    _, ranks = runs
    program = optimizer(case, make_params()).program
    skips = any(n.op == "skip_step" for g in program.variants.values() for n in topo_order(g.roots()))
    all_reduces = int(program.needs_loss or skips) + _over_tensors_count(program)
    expected = {"all_gather": 1, **({"all_reduce": all_reduces} if all_reduces else {}),
                **({"reduce_scatter": 1} if case.reduce_grads else {})}
    for result in ranks[case]:
        assert result["collectives"] == expected


def test_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        optimizer(Case("adam"), make_params(), shard=True)


def test_reduce_grads_needs_shard():
    with pytest.raises(ValueError, match="shard=True"):
        optimizer(Case("adam"), make_params(), reduce_grads=True)



@pytest.mark.parametrize("kind", ["fsdp2", "shard"])
@pytest.mark.parametrize("spec", list(CLASSES))
def test_dcp_checkpoint_resumes_on_another_world_size(dcp_runs, spec, kind):
    """torch.distributed.checkpoint with get/set_optimizer_state_dict, under FSDP2 and under
    shard=True: 5 steps on 2 ranks, resumed on 1 for 5 more, and 1 -> 2; both equal 10
    uninterrupted steps of one process (the state, the network state and the loss buffer
    all carried)."""
    oracle, results = dcp_runs
    for world in (1, 2):
        for i, (got, want) in enumerate(zip(results[(kind, spec, world)], oracle[(kind, spec)])):
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            assert err <= 1e-6, f"resumed on {world} rank(s), tensor {i} {tuple(want.shape)}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def dcp_runs(tmp_path_factory):
    cases = [Case(spec) for spec in CLASSES]
    out = str(tmp_path_factory.mktemp("dcp"))
    for world, first_half in ((2, True), (1, True), (1, False), (2, False)):
        mp.spawn(dcp_worker, args=(world, _free_port(), out, cases, first_half), nprocs=world, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        oracle = {("fsdp2", case.spec): fsdp2_oracle(case) for case in cases}
        oracle.update({("shard", case.spec): single_process_run(case) for case in cases})
    finally:
        torch.set_num_threads(threads)
    return oracle, {(kind, case.spec, world): torch.load(f"{out}/b-{kind}-{world}-{case.name}.pt")
                    for kind in ("fsdp2", "shard") for case in cases for world in (1, 2)}
