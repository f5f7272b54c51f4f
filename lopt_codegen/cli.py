"""lopt-compile: compile optimizer specs into generated/<name>/ packages."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .emit import render_package, stale_files, write_packages
from .ir import lower_spec
from .ir.plan import explain
from .spec import SPEC_SCHEMA, SpecError, load_spec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lopt-compile", description="Compile learned-optimizer specs "
                                "into importable PyTorch optimizers under generated/.")
    p.add_argument("specs", nargs="*", metavar="SPEC", help="YAML spec files, e.g. specs/velo.yaml")
    p.add_argument("--out", default="generated", help="output folder (default: generated)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "tvm", "cuda"],
                   help="backend the package is emitted for (auto: TVM kernels on CPU, else the reference); "
                        "tvm also pre-builds the shape-generic kernels into the cache")
    p.add_argument("--target", default="cpu", choices=["cpu", "cuda"],
                   help="with --backend tvm: which kernels to pre-build (default cpu; cuda needs nvcc, not a GPU)")
    p.add_argument("--arch", action="append", metavar="SM",
                   help="with --target cuda: a CUDA arch to build for, e.g. sm_90 (repeatable; default sm_80 and sm_90)")
    p.add_argument("--explain", action="store_true", help="print the pass plan instead of writing files")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if the files under --out are stale against the specs and templates")
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of the spec language")
    return p


def _spec_path(path: str) -> str:
    """The spec path as recorded in generated files: relative to the cwd when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.schema:
        print(json.dumps(SPEC_SCHEMA, indent=2))
        return 0
    if not args.specs:
        _parser().print_usage(sys.stderr)
        print("lopt-compile: error: give at least one SPEC (or --schema)", file=sys.stderr)
        return 2
    bad = [a for a in args.arch or [] if not re.fullmatch(r"sm_\d{2,3}", a)]
    if bad:
        print(f"lopt-compile: error: --arch {bad[0]}: expected a CUDA arch like sm_80 or sm_90", file=sys.stderr)
        return 2
    if args.arch and (args.backend, args.target) != ("tvm", "cuda"):
        print("lopt-compile: error: --arch goes with --backend tvm --target cuda", file=sys.stderr)
        return 2
    try:
        programs = [(path, lower_spec(load_spec(path))) for path in args.specs]
    except SpecError as exc:
        print(f"lopt-compile: error: {exc}", file=sys.stderr)
        return 2
    names = [program.name for _, program in programs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice and not (args.explain or args.check):
        print(f"lopt-compile: error: two specs are named {twice[0]}: they would write the same package",
              file=sys.stderr)
        return 2
    if args.explain:
        for _, program in programs:
            print(explain(program))
        return 0
    rendered = [(path, program, render_package(program, _spec_path(path), args.backend)) for path, program in programs]
    if args.check:
        status = 0
        for path, program, files in rendered:
            stale = stale_files(files, args.out, program.name)
            if stale:
                print(f"stale: {', '.join(stale)} (run: lopt-compile {path})", file=sys.stderr)
                status = 1
            else:
                print(f"up to date: {os.path.join(args.out, program.name)}")
        return status
    try:   # all packages or none
        targets = write_packages([(files, program.name) for _, program, files in rendered], args.out)
    except OSError as exc:
        print(f"lopt-compile: error: cannot write under --out {args.out}: {exc.strerror or exc} "
              f"({exc.filename or args.out}); nothing was written", file=sys.stderr)
        return 2
    status = 0
    for (path, program, _), target in zip(rendered, targets):
        print(f"{path} -> {target}/ ({program.class_name})")
        if args.backend == "tvm":
            status = max(status, _prebuild(program, args.target, tuple(args.arch or ("sm_80", "sm_90"))))
    return status


def _prebuild(program, target: str, archs: tuple[str, ...]) -> int:
    from .backends.cuda.build import ToolchainMissing
    from .backends.tvm import prebuild   # imports TVM: only when asked for
    try:
        count, seconds = prebuild(program, target=target, archs=archs)
    except ToolchainMissing as exc:
        print(f"lopt-compile: error: {exc}", file=sys.stderr)
        return 2
    where = "CPU" if target == "cpu" else f"CUDA ({', '.join(archs)})"
    print(f"  {count} shape-generic TVM {where} kernels for {program.class_name} in the cache ({seconds:.1f} s)")
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
if __name__ == "__main__":
    main()
