"""Hostile and broken input (issue "Hardening"): spec text never becomes code, parser and
CLI limits end in `file:line:col` errors with exit 2, an unusable kernel cache falls back
to a private one, and dead builds' temporary folders go."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, SPECS
from lopt_codegen.cli import run as lopt_compile

SPEC = "name: {name}\nclass_name: {cls}\n{extra}update:\n  step: g\n"


def compile_text(tmp_path: Path, text: str, filename: str = "spec.yaml", capsys=None) -> tuple[int, str]:
    path = tmp_path / filename
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code = lopt_compile(["--out", str(tmp_path / "out" / "pkg"), str(path)])
    return code, capsys.readouterr().err if capsys else ""


def test_a_description_is_a_docstring_never_code(tmp_path, capsys):
    hostile = 'x """ ; import os; os.system("touch PWNED") ; """ \\x \\N{bad} \\u0000 tab\\t end\\'
    text = SPEC.format(name="evil", cls="Evil", extra="description: '" + hostile.replace("'", "''") + "'\n")
    code, err = compile_text(tmp_path, text, capsys=capsys)
    assert code == 0, err
    probe = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from pkg.evil import Evil; "
             "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3); Evil([p], backend='reference').step(); "
             "print(repr(Evil.__doc__.split(chr(10) + chr(10))[0]))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    import yaml

    assert eval(out.stdout) == yaml.safe_load(text)["description"]   # the docstring is the text, whole
    assert not (tmp_path / "PWNED").exists()


def test_a_spec_path_with_a_newline_stays_in_its_comment(tmp_path, capsys):
    code, err = compile_text(tmp_path, SPEC.format(name="nl", cls="Nl", extra=""), filename="a\nb\\.yaml",
                             capsys=capsys)
    assert code == 0, err
    package = tmp_path / "out" / "pkg" / "nl"
    source = (package / "nl.cu").read_text()
    escaped = str(tmp_path / "a\\nb\\\\.yaml")   # the name as the comment shows it: \n and \\ written out
    assert [line for line in source.splitlines() if escaped in line] == source.splitlines()[1:3]
    assert all(line.startswith("//") for line in source.splitlines()[:3])
    assert not any(line.startswith("b\\") for line in source.splitlines())
    for python_file in ("__init__.py", "cuda_binding.py"):
        compile((package / python_file).read_text(), python_file, "exec")   # no syntax broken by the name


@pytest.mark.parametrize("extra, name, cls, where, message", [
    ("", "evil", "class", "2:13", "class_name: 'class' is a Python keyword"),
    ("", "evil", "None", "2:13", "class_name: 'None' is a Python keyword"),
    ("", "evil", "LearnedOptimizer", "2:13", "a name the generated module uses"),
    ("", "class", "Evil", "1:7", "name: 'class' is a Python keyword"),
    ("", '"x\\n"', "Evil", "1:7", "name: 'x\\n' is not a valid name"),
    ("hyperparameters:\n  lambda: 1\n", "evil", "Evil", "4:3", "'lambda' is a Python keyword"),
    ("hyperparameters:\n  match: 1\n", "evil", "Evil", "4:3", "'match' is a Python keyword"),
    ("hyperparameters:\n  self: 1\n", "evil", "Evil", "4:3", "would clash with the optimizer's own"),
    ("hyperparameters:\n  params: 1\n", "evil", "Evil", "4:3", "would clash"),
    ("hyperparameters:\n  backend: 1\n", "evil", "Evil", "4:3", "would clash"),
    ("hyperparameters:\n  lr: .inf\n", "evil", "Evil", "4:7", "expected a finite number, got inf"),
    ("hyperparameters:\n  beta: .nan\n", "evil", "Evil", "4:9", "expected a finite number, got nan"),
    ("derived:\n  class: g\n", "evil", "Evil", "4:3", "'class' is a Python keyword"),
    ("weights:\n  groups:\n    'a b': {k: [1]}\n", "evil", "Evil", "5:5", "is not a valid name"),
])
def test_names_and_constants_that_would_break_the_package(tmp_path, capsys, extra, name, cls, where, message):
    code, err = compile_text(tmp_path, SPEC.format(name=name, cls=cls, extra=extra), capsys=capsys)
    assert code == 2 and f"spec.yaml:{where}" in err and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


LAUGHS = "".join(f"{a}: &{a} [{', '.join([f'*{p}'] * 10) if p else ', '.join(['lol'] * 10)}]\n"
                 for a, p in zip("abcdefg", [None, *"abcdef"]))


@pytest.mark.parametrize("text, where, message", [
    (LAUGHS + "name: x\n", "spec.yaml:", "expands to over 100000 YAML values"),
    ("a: &a [*a]\nname: x\n", "spec.yaml:1:4", "recursive alias"),
    ("q: " + "[" * 100 + "]" * 100 + "\n", "spec.yaml:1:", "nests deeper than 64 levels"),
    (SPEC.format(name="x", cls="X", extra="functions:\n  f: {args: [x], expr: f(x)}\n").replace("step: g", "step: f(g)"),
     "spec.yaml:4:24", "function 'f' calls itself (f -> f)"),
    (SPEC.format(name="x", cls="X", extra="functions:\n  f: {args: [x], expr: h(x)}\n  h: {args: [x], expr: f(x)}\n")
     .replace("step: g", "step: f(g)"), "spec.yaml:", "calls itself (f -> h -> f)"),
    (SPEC.format(name="x", cls="X", extra="").replace("step: g", "step: " + " + ".join(["g"] * 3000)),
     "spec.yaml:4:9", "nests"),
    (SPEC.format(name="x", cls="X", extra="").replace("step: g", "step: " + "-" * 100_000 + "g"),
     "spec.yaml:4:9", "characters long; the limit is 20000"),
    (SPEC.format(name="x", cls="X", extra="").replace("step: g", "step: g * 1e39"), "spec.yaml:4:13",
     "not a finite float32"),
    (SPEC.format(name="x", cls="X", extra="").replace("step: g", "step: g * [1, 1e39]"), "spec.yaml:4:17",
     "not a finite float32"),
    (SPEC.format(name="x", cls="X", extra="accumulators:\n  m: {ema: g, decays: [.nan]}\n"), "spec.yaml:4:24",
     "expected a finite number"),
    (SPEC.format(name="x", cls="X", extra="accumulators:\n  m: {ema: g, decays: [1.5]}\n"), "spec.yaml:4:24",
     "a decay is between 0 and 1"),
    (SPEC.format(name="x", cls="X", extra="accumulators:\n  m: {ema: g, decays: [1 - 2]}\n"), "spec.yaml:4:24",
     "this one is -1"),
    (b"\x00\x01name: x\n", "spec.yaml:1:1", "not a YAML text"),
    ("name: caf\xe9\n".encode("latin-1"), "spec.yaml:1:1", "is not UTF-8 text (byte 0xe9 at offset 9)"),
    ("name: !!python/object/apply:os.system [ls]\n", "spec.yaml:1:7", "YAML tag not allowed"),
])
def test_parser_limits_are_file_line_col_errors(tmp_path, capsys, text, where, message):
    start = time.monotonic()
    code, err = compile_text(tmp_path, text, capsys=capsys)
    assert code == 2 and err.startswith(f"lopt-compile: error: {tmp_path / where}") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert time.monotonic() - start < 60   # not a timing test: a guard against 48 s alias expansions


def test_out_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = lopt_compile(["--out", str(tmp_path / "afile" / "pkg"), os.path.join(SPECS, "adam.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write under --out" in err and "nothing was written" in err
    assert len(err.strip().splitlines()) == 1


def test_several_specs_are_written_all_or_none(tmp_path, capsys, monkeypatch):
    import lopt_codegen.emit as emit

    out = tmp_path / "out"
    specs = [os.path.join(SPECS, f"{n}.yaml") for n in ("adam", "small_fc_lopt")]
    assert lopt_compile(["--out", str(out), specs[0]]) == 0
    before = {p: p.read_bytes() for p in (out / "adam").iterdir()}
    real, calls = emit.tempfile.mkdtemp, []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(emit.tempfile, "mkdtemp", failing_second)
    assert lopt_compile(["--out", str(out), *specs]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "adam"]   # no small_fc_lopt, no temps
    assert {p: p.read_bytes() for p in (out / "adam").iterdir()} == before
    monkeypatch.undo()
    assert lopt_compile(["--out", str(out), specs[0], specs[0]]) == 2   # one package twice
    assert "two specs are named adam" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["a regular file", "under a regular file", "under /proc"])
def test_an_unusable_cache_falls_back_to_a_private_one_with_one_warning(tmp_path, kind):
    from lopt_codegen.backends.build_cache import BuildCache

    (tmp_path / "file").write_text("x")
    root = {"a regular file": tmp_path / "file", "under a regular file": tmp_path / "file" / "cache",
            "under /proc": Path("/proc/lopt_cache")}[kind]
    cache = BuildCache(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cache.get("k", {"x": 1}, "a.txt", lambda p: p.write_text("built"), lambda p: p.read_text())
        second = cache.get("k", {"x": 1}, "a.txt", lambda p: p.write_text("again"), lambda p: p.read_text())
    assert (first, second, cache.builds, cache.hits) == ("built", "built", 1, 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "LOPT_CACHE_DIR" in messages[0] and str(root) in messages[0]
    assert cache.path != root and cache.path.is_dir()


def test_builds_remove_the_temporary_folders_of_killed_builds(tmp_path):
    from lopt_codegen.backends.build_cache import BuildCache, key_digest

    cache = BuildCache(tmp_path / "cache")
    kind = tmp_path / "cache" / "k"
    digest = key_digest({"x": 2})
    killed = kind / f".{digest}.abc123"       # a build of this key killed mid-write
    other_old = kind / ".0123abcd.old999"      # another key's, two days old
    other_new = kind / ".4567cdef.new999"      # another key's, maybe building now
    for folder in (killed, other_old, other_new):
        folder.mkdir(parents=True)
        (folder / "partial.so").write_text("half")
    two_days = time.time() - 2 * 24 * 3600
    os.utime(other_old, (two_days, two_days))
    assert cache.get("k", {"x": 2}, "a.txt", lambda p: p.write_text("ok"), lambda p: p.read_text()) == "ok"
    assert not killed.exists() and not other_old.exists() and other_new.exists()


def test_a_parameter_twice_in_a_group_is_an_error():
    import torch

    from generated.adam import Adam

    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="a parameter appears twice in one param group"):
        Adam([p, p])
    opt = Adam([p])
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))] * 2})
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [p]})   # torch's own check, across groups


def test_one_cycle_lr_needs_cycle_momentum_off_for_a_spec_without_momentum():
    """torch's OneCycleLR cycles `momentum` or `betas` by default; a learned optimizer has
    neither: torch says so, and cycle_momentum=False schedules lr alone."""
    import torch

    from generated.small_fc_lopt import SmallFcLopt

    p = torch.nn.Parameter(torch.ones(3))
    opt = SmallFcLopt([p], weights="random")
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4, cycle_momentum=False)
    lrs = []
    for _ in range(4):
        p.grad = torch.ones(3)
        opt.step()
        schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) == 4 and torch.isfinite(p).all()
