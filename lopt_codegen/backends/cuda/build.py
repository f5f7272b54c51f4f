"""Build the rendered source with tvm_ffi.cpp (host C++ or nvcc), through the build
cache, and read ptxas's register/spill report.

Both builds are keyed by the sha256 of the source and the toolchain, so an unchanged
spec never recompiles; binaries live in the cache, never in generated/.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..build_cache import DEFAULT_CACHE, BuildCache

# No fast-math anywhere: IEEE expf/tanhf/division, as the reference computes them.
HOST_FLAGS = ["-O2", "-fno-fast-math"]
CUDA_FLAGS = ["-O3", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"]
DEFAULT_ARCHS = ("sm_80", "sm_90")


class ToolchainMissing(RuntimeError):
    """A compiler the requested build needs is not installed."""


@lru_cache(maxsize=1)
def cuda_home() -> str:
    """The CUDA toolkit folder. `nvcc` may be a wrapper script, so ask nvcc itself
    (its -dryrun prints TOP=<toolkit>/bin/..) rather than following the path."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise ToolchainMissing("the CUDA build needs nvcc on PATH (or CUDA_HOME set); it was not found")
    out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True).stderr
    match = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    if match is None:
        raise ToolchainMissing(f"could not find the CUDA toolkit folder from {nvcc} -dryrun")
    return str(Path(match.group(1).strip()).resolve())


@lru_cache(maxsize=1)
def nvcc_missing() -> str | None:
    """Why nothing can be built for CUDA here (None: nvcc was found)."""
    try:
        cuda_home()
    except ToolchainMissing as exc:
        return str(exc)
    return None


def _tvm_ffi_includes() -> list[str]:
    import tvm_ffi.libinfo as libinfo

    return [libinfo.find_include_path(), libinfo.find_dlpack_include_path()]


def _build_key(source: str, kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    import tvm_ffi

    return {"source_sha256": hashlib.sha256(source.encode()).hexdigest(), "kind": kind,
            "tvm_ffi": tvm_ffi.__version__, **extra}


def _load(path: Path):
    import tvm_ffi

    return tvm_ffi.load_module(str(path))


def build_host(source: str, name: str, cache: BuildCache | None = None):
    """The host (CPU) build: the generated passes as plain C++ loops."""
    import tvm_ffi.cpp

    def build(path: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="lopt-host-") as tmp:
            lib = tvm_ffi.cpp.build_inline(name, cpp_sources=source, extra_cflags=HOST_FLAGS, build_directory=tmp)
            shutil.copy(lib, path)

    key = _build_key(source, "host", {"cxx": os.environ.get("CXX", "c++"), "flags": HOST_FLAGS})
    return (cache or DEFAULT_CACHE).get("cuda-host", key, f"{name}.so", build, _load)


def nvcc_library(source: str, name: str, archs: tuple[str, ...], path: Path) -> None:
    """Compiles CUDA C++ with TVM-FFI entry points into the shared library `path` with
    nvcc for `archs` (e.g. ("sm_90",)); no GPU is needed."""
    import tvm_ffi.cpp

    env = {"CUDA_HOME": cuda_home(), "TVM_FFI_CUDA_ARCH_LIST": " ".join(f"{a[3:-1]}.{a[-1]}" for a in archs)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory(prefix="lopt-cuda-") as tmp:
            lib = tvm_ffi.cpp.build_inline(name, cuda_sources=source, extra_cuda_cflags=CUDA_FLAGS,
                                           build_directory=tmp)
            shutil.copy(lib, path)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_cuda(source: str, name: str, archs: tuple[str, ...], cache: BuildCache | None = None):
    """The nvcc build for the given archs (e.g. ("sm_90",))."""
    key = _build_key(source, "cuda", {"archs": list(archs), "cuda_home": cuda_home(), "flags": CUDA_FLAGS})
    return (cache or DEFAULT_CACHE).get("cuda-nvcc", key, f"{name}.so",
                                        lambda path: nvcc_library(source, name, archs, path), _load)


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_log(source: str, archs: tuple[str, ...], path: Path) -> None:
    """nvcc -c for each arch (no GPU needed), writing `-Xptxas -v`'s report to path."""
    nvcc = str(Path(cuda_home()) / "bin" / "nvcc")
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    with tempfile.TemporaryDirectory(prefix="lopt-ptxas-") as tmp:
        src = Path(tmp) / "kernels.cu"
        src.write_text(source)
        cmd = [nvcc, "-c", str(src), "-o", str(Path(tmp) / "kernels.o"), "-std=c++17", *CUDA_FLAGS,
               "-Xptxas", "-v", *gencode, *(f"-I{p}" for p in _tvm_ffi_includes())]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if ": error" in line]   # warnings can bury them
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n" + "\n".join(errors[:20]) + f"\n...\n{proc.stderr[-2000:]}")
    path.write_text(proc.stderr)


def ptxas_report(source: str, archs: tuple[str, ...] = DEFAULT_ARCHS,
                 cache: BuildCache | None = None) -> list[KernelReport]:
    """ptxas's registers and spills per kernel and arch (cached like a build: by the
    source hash and toolchain)."""
    key = _build_key(source, "ptxas", {"archs": list(archs), "cuda_home": cuda_home(), "flags": CUDA_FLAGS})
    log = (cache or DEFAULT_CACHE).get("cuda-ptxas", key, "ptxas.txt", lambda p: _ptxas_log(source, archs, p),
                                       lambda p: p.read_text())
    reports, current = [], None
    for line in log.splitlines():
        if (m := _ENTRY.search(line)) is not None:
            current = (m.group(1), m.group(2))
        elif current and (m := _FRAME.search(line)) is not None:
            frame = tuple(int(x) for x in m.groups())
        elif current and (m := _REGS.search(line)) is not None:
            reports.append(KernelReport(current[0], current[1], int(m.group(1)), frame[1], frame[2], frame[0]))
            current = None
    return reports
