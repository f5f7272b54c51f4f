"""Emit a generated package: generated/<name>/{__init__.py, program.json, manifest.json}.

Output is deterministic (no timestamps), so `--check` can regenerate it in memory and
compare byte for byte. Writes are atomic: a temp folder, then a rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import jinja2

from . import __version__
from .ir.plan import plan_program, plan_to_dict
from .ir.program import Program
from .ir.serialize import program_to_json

TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")
HYPER_DOC = {"lr": "learning rate; p <- p - lr * step", "weight_decay": "weight decay (the spec's rule)",
             "num_steps": "the training horizon in steps"}


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["pydoc"] = docstring_text
    env.filters["comment"] = comment_text
    return env


def docstring_text(text: str) -> str:
    """Text from a spec as the inside of a Python triple-quoted string: the docstring's
    value is the text itself, and nothing in it can end the string or escape from it."""
    out = []
    for ch in str(text):
        if ch == "\\" or ch == '"':
            out.append("\\" + ch)
        elif ch != "\n" and (ord(ch) < 32 or ord(ch) == 127 or ch in "\u2028\u2029\x85"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def comment_text(text: str) -> str:
    """Text from a spec as one line of a C++ `//` comment: ASCII, escaped, no line breaks."""
    return str(text).encode("unicode_escape").decode("ascii")


def templates_sha256() -> str:
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(TEMPLATES)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, TEMPLATES).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


_TARGETS = {"auto": "TVM LLVM kernels for CPU tensors, the cuda backend's CUDA kernels (nvcc) for CUDA tensors",
            "tvm": "TVM kernels: LLVM for CPU tensors, CUDA (nvcc) for CUDA tensors",
            "reference": "torch (eager, any device)",
            "cuda": "CUDA C++ (nvcc) for CUDA tensors, its host C++ build for CPU tensors (tvm_ffi.cpp)"}


def render_package(program: Program, spec_path: str, backend: str = "auto") -> dict[str, str]:
    """File name -> content of the generated package."""
    description = program.description or f"the {program.name} learned optimizer"
    hyperparameters = [(n, repr(d) if d is not None else None) for n, d in program.hyperparameters.items()]
    init = _env().get_template("python/optimizer.py.j2").render(
        program=program, version=__version__, spec_path=spec_path, description=description,
        summary=description.split(".")[0].strip(), hyperparameters=hyperparameters,
        hyper_doc={n: HYPER_DOC.get(n, "a hyperparameter of the spec") for n, _ in hyperparameters})
    manifest = {
        "name": program.name, "class_name": program.class_name, "spec": spec_path,
        "spec_sha256": program.spec_sha256, "templates_sha256": templates_sha256(),
        "compiler_version": __version__, "backend": backend, "target": _TARGETS[backend],
        "plan": plan_to_dict(plan_program(program)),
    }
    # The CUDA kernel source and its binding are part of every package: readable,
    # reviewed in diffs, and checked for drift like the rest.
    from .backends.cuda.render import render_cuda_files  # late: it imports torch

    return {"__init__.py": init, "program.json": program_to_json(program), **render_cuda_files(program, spec_path),
            "manifest.json": json.dumps(manifest, indent=1) + "\n"}


def write_packages(packages: list[tuple[dict[str, str], str]], out_dir: str) -> list[str]:
    """Write several packages all or none: each is written whole into a temporary folder
    first; only when all are written do they replace the old ones (renames). An OSError
    (a read-only or missing place, a full disk) leaves out_dir as it was."""
    os.makedirs(out_dir, exist_ok=True)
    staged: list[tuple[str, str]] = []
    try:
        for files, name in packages:
            tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir)
            staged.append((tmp, name))
            for fname, content in files.items():
                with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                    f.write(content)
        marker = os.path.join(out_dir, "__init__.py")
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write('"""Optimizers emitted by lopt-compile, one package per spec."""\n')
    except BaseException:
        for tmp, _ in staged:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    targets = []
    for tmp, name in staged:
        target = os.path.join(out_dir, name)
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{name}.old.", dir=out_dir)
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
        if old:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        targets.append(target)
    return targets


def stale_files(files: dict[str, str], out_dir: str, name: str) -> list[str]:
    """Files of generated/<name> that differ from what the compiler emits now."""
    stale = []
    for fname, content in files.items():
        path = os.path.join(out_dir, name, fname)
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == content:
                    continue
        except OSError:
            pass
        stale.append(path)
    return stale
