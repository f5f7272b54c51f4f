"""TVM's CUDA kernels checked without a GPU: the same stages, schedule (per-thread
partial sums over row chunks, lanes added in order, one sum per row over a warp's lanes,
padded sum buffers; not the MLP's per-thread registers and shared weights) and launches
(one per kernel over a group's pointer table, with its shape variables), with nothing
bound to threads, built for the CPU and run against the reference: every built-in spec, the shape
matrix plus shapes that span several row chunks, padded column tiles and padded rows,
10 steps. What only a GPU can check (thread binding, shared memory, barriers) is in
tests/test_gpu_backends.py."""
from __future__ import annotations

from typing import Callable

import pytest
import tvm

from conftest import SHAPES
from lopt_codegen.backends.base import TensorTask
from lopt_codegen.backends.tvm import TvmBackend
from lopt_codegen.backends.tvm.build import gpu_kernel_functions, in_order, llvm_target
from lopt_codegen.backends.tvm.signature import PassSignature
from lopt_codegen.backends.tvm.view import View, view_of
from test_tvm_backend import RTOL, make_pair, run_and_compare

# (300, 5): 3 row chunks with a masked tail; (5, 40) and (3, 70): column tiles and rows
# with a padded tail; (70, 3, 33): columns over B, Y, C; (64,) and (8192,): flat views
# with 32 lanes, the second over two chunks.
GPU_SHAPES = [(300, 5), (5, 40), (3, 70), (70, 3, 33), (64,), (8192,)]


def cpu_build(sig: PassSignature) -> Callable:
    """The pass's GPU kernels, each over the group's pointer table, built for the CPU."""
    kernels = {}
    for name, func in gpu_kernel_functions(sig, bind=False).items():
        with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
            kernels[name] = tvm.compile(tvm.IRModule({"main": func}), target=llvm_target())["main"]
    return in_order(kernels)


class GpuScheduleOnCpu(TvmBackend):
    """The TVM backend with the GPU kernels' views, sums and schedule, on CPU tensors."""

    def view(self, task: TensorTask) -> View:
        return view_of(tuple(task.param.shape), task.axes, gpu=True)

    def _load(self, variant: str, sigs: list[PassSignature], arch: str | None) -> list[Callable]:
        return [cpu_build(s) for s in sigs]


@pytest.mark.parametrize("name", ["adam", "small_fc_lopt", "velo"])
def test_gpu_schedule_matches_reference(name):
    ref_params, ref, params, opt, gen = make_pair(name, SHAPES + GPU_SHAPES)
    opt.backend = GpuScheduleOnCpu(type(opt).program)
    assert run_and_compare(ref_params, ref, params, opt, gen) <= RTOL
    kernels = [k for ks in opt.backend._kernels.values() for k in ks]
    assert kernels and all(k.sig.view.gpu for k in kernels)
    if name != "adam":   # the sums ran in their GPU form, with several row chunks somewhere
        assert any(k.sig.x_sums for k in kernels) and any(k.sig.y_sums for k in kernels)
        assert max(view_of(s, (0, 1) if len(s) > 1 else None, gpu=True).gpu_chunks() for s in GPU_SHAPES) > 1


@pytest.mark.parametrize("dims, launched", [
    ((1, 2, 1, 32, 1), ["pass0_P", "pass0_T"]),                  # 64 elements: no whole tile
    ((1, 256, 1, 32, 1), ["pass0_P", "pass0_E"]),                # 8192: no tail
    ((3, 100, 1, 5, 1), ["pass0_P", "pass0_E", "pass0_T"]),      # 1500: 5 tiles and 220 more
])
def test_element_kernels_launch_only_with_elements_to_cover(dims, launched):
    """CUDA refuses a launch of zero blocks: a pass leaves out its whole-tile element
    kernel below one tile (256 elements) and its tail at a multiple of one."""
    calls = []
    kernels = {name: (lambda name: lambda *args: calls.append((name, args)))(name)
               for name in ("pass0_P", "pass0_E", "pass0_T")}
    in_order(kernels)("table", *dims, 4)
    assert calls == [(name, ("table", *dims, 4)) for name in launched]
