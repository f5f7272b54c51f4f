"""The cuda backend's kernels themselves (not its host loops) run on CPU tensors under
the SIMT emulation of tests/simt.h: every built-in spec against the reference, and the
row/col means of many line tiles (warp shuffle trees, block partials, shared weights).
No GPU needed; the emulation cannot show memory-model or timing faults."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lopt_codegen.backends.cuda import CudaBackend
from lopt_codegen.backends.cuda.build import build_host
from test_cuda_backend import LINE_SHAPES, MAKERS, assert_fp32_updates_match, run_both

HARNESS = Path(__file__).with_name("simt.h")


def simt_source(source: str, namespace: str, passes: list[str]) -> str:
    """The generated source built for the CPU with its kernels, and a `<pass>_simt(table,
    total_blocks)` launcher per pass."""
    launchers = [f"namespace {namespace} {{"]
    for name in passes:
        launchers.append(f"""
struct {name}_args {{ const int64_t* tab; int64_t rows; }};
void {name}_simt(tvm::ffi::TensorView table, int64_t total_blocks) {{
  check_table(table, {name}_fields, kDLCPU, "{name}_simt");
  {name}_args args{{static_cast<const int64_t*>(table.data_ptr()), table.size(0)}};
  lopt_simt::launch(total_blocks, kThreads, {name}_weights * sizeof(float), [](void* p) {{
    const auto* a = static_cast<{name}_args*>(p);
    {name}_kernel(a->tab, a->rows);
  }}, &args);
}}""")
    launchers.append("}")
    launchers += [f"TVM_FFI_DLL_EXPORT_TYPED_FUNC({n}_simt, {namespace}::{n}_simt);" for n in passes]
    return "#define LOPT_SIMT 1\n" + HARNESS.read_text() + source + "\n".join(launchers) + "\n"


class SimtBackend(CudaBackend):
    """The cuda backend with CPU tensors run by the kernels under emulation."""

    def driver(self, device: torch.device) -> str:
        return "simt"

    def module(self, device: torch.device):
        if "simt" not in self._modules:
            passes = [L.name for ls in self.rendered.layouts.values() for L in ls]
            namespace = f"lopt_{self.program.name}"
            self._modules["simt"] = build_host(simt_source(self.rendered.source, namespace, passes),
                                               f"{namespace}_simt")
        return self._modules["simt"]


@pytest.mark.parametrize("name", list(MAKERS))
def test_kernels_match_reference_under_simt(name):
    assert_fp32_updates_match(name, run_both(MAKERS[name], torch.float32, 11, backend=SimtBackend))


@pytest.mark.parametrize("name", ["velo", "small_fc_lopt"])
def test_kernel_row_col_means_under_simt(name):
    assert_fp32_updates_match(name, run_both(MAKERS[name], torch.float32, 32, shapes=LINE_SHAPES, steps=3,
                                             backend=SimtBackend))
