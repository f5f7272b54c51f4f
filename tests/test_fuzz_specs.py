"""Fuzzing the compiler with hypothesis (derandomized, a few seconds in all):
- hostile text in every text field of a spec: `lopt-compile` either exits 2 with one
  `file:line:col` error, or writes a package that imports and steps; it writes nothing
  outside --out and runs nothing from the spec;
- random valid specs built from the language's parts: tvm, the cuda host build and the
  SIMT run of the CUDA kernels agree with the reference, NaN and inf in the same places."""
from __future__ import annotations

import importlib
import itertools
import re
import sys
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lopt_codegen.cli import run as lopt_compile
from test_cuda_simt import SimtBackend
from test_nonfinite import assert_same_nonfinite

def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HOSTILE = ['"""', "'''", "\\", "\\x", "\\N{x}", "\n", "\r", "\x00", "\x1b", "\u2028", "{{ x }}", "{% if %}", "*/",
           "//", "#", "import os", "__import__('os')", "os.system('touch PWNED')", "class", "None", "lambda",
           "self", "params", "μ", "$", "`", ";", "\t", " ", ":", "-", "[", "{", "&a", "*a", "!!python/object"]
TEXT = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=6)), min_size=1, max_size=4).map("".join)
_counter = itertools.count()
ERROR = re.compile(r"^lopt-compile: error: .+:\d+:\d+: .+$")


def quoted(text: str) -> str:
    """A YAML double-quoted scalar holding `text` exactly."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text) + '"'


def hostile_spec(field: str, text: str) -> str:
    values = {"name": "fuzz", "class_name": "Fuzz", "description": "d", "hyper": "beta", "derived": "d1",
              "group": "mlp", "repo": "a/b", "expr": "m * beta"}
    values[field] = text
    return "\n".join([
        f"name: {quoted(values['name'])}",
        f"class_name: {quoted(values['class_name'])}",
        f"description: {quoted(values['description'])}",
        "hyperparameters:",
        f"  {quoted(values['hyper'])}: 0.5",
        "accumulators:",
        "  m: {ema: g, decays: [0.9]}",
        "derived:",
        f"  {quoted(values['derived'])}: m",
        "weights:",
        f"  hub: {{{quoted(values['group'])}: {quoted(values['repo'])}}}",
        f"  groups: {{{quoted(values['group'])}: {{k: [1]}}}}",
        "update:",
        f"  step: {quoted(values['expr'])}",
    ]) + "\n"


@fuzz(60)
@given(field=st.sampled_from(["name", "class_name", "description", "hyper", "derived", "group", "repo", "expr"]),
       text=TEXT)
def test_hostile_text_is_an_error_or_a_working_package(tmp_path_factory, capsys, field, text):
    root = tmp_path_factory.mktemp("fuzz")
    spec = root / "spec.yaml"
    spec.write_text(hostile_spec(field, text), encoding="utf-8")
    package = f"fuzz_pkg_{next(_counter)}"
    code = lopt_compile(["--out", str(root / "out" / package), str(spec)])
    err = capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == (["out", "spec.yaml"] if code == 0 else ["spec.yaml"])
    if code != 0:
        assert code == 2 and ERROR.match(err.strip()) and len(err.strip().splitlines()) == 1, (field, text, err)
        return
    sys.path.insert(0, str(root / "out"))
    try:
        module = importlib.import_module(f"{package}.{next((root / 'out' / package).glob('*/__init__.py')).parent.name}")
    finally:
        sys.path.remove(str(root / "out"))
    cls = getattr(module, module.__all__[0])
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls([p], weights="random", backend="reference").step()
    assert torch.isfinite(p).all()
    if field == "description" and text.strip():   # the docstring holds the text (re-wrapped), whole
        assert " ".join(text.split()) in " ".join(cls.__doc__.split()), (text, cls.__doc__)
    assert not Path("PWNED").exists() and not (root / "PWNED").exists()


# --- random valid specs ---------------------------------------------------------------
LEAVES = ["g", "p", "m", "v", "t", "numel", "beta", "1.5", "0.25"]
OLD_LEAVES = ["g", "p", "prev(m)", "prev(v)", "t", "beta", "0.5"]   # what v's own update may read
UNARY = ["tanh({})", "sqrt(abs({}))", "exp(clip({}, -5, 5))", "sign({})", "relu({})", "abs({})", "mean({})",
         "rsqrt(abs({}) + 1e-3)"]
BINARY = ["({} + {})", "({} - {})", "({} * {})", "({} / (abs({}) + 0.5))", "min({}, {})", "max({}, {})",
          "where({} > {}, g, m)"]


def expressions(depth: int, leaves: list[str] = LEAVES) -> st.SearchStrategy[str]:
    if depth == 0:
        return st.sampled_from(leaves)
    sub = expressions(depth - 1, leaves)
    return st.one_of(st.sampled_from(leaves),
                     st.tuples(st.sampled_from(UNARY), sub).map(lambda t: t[0].format(t[1])),
                     st.tuples(st.sampled_from(BINARY), sub, sub).map(lambda t: t[0].format(t[1], t[2])))


def random_spec(name: str, step: str, accumulate: str, factored: bool) -> str:
    return (f"name: {name}\nclass_name: R{name}\nhyperparameters:\n  beta: 0.8\n"
            + ("factored_axes: adafactor\n" if factored else "")
            + f"accumulators:\n  m: {{ema: g, decays: [beta]}}\n  v: {{update: '{accumulate}'}}\n"
            + f"update:\n  step: '{step}'\n")


@fuzz(4)
@given(step=expressions(3), accumulate=expressions(2, OLD_LEAVES).map(lambda e: f"0.5 * prev(v) + 0.1 * tanh({e})"),
       factored=st.booleans(), poison=st.booleans())
def test_random_specs_agree_on_every_backend(tmp_path_factory, step, accumulate, factored, poison):
    root = tmp_path_factory.mktemp("random")
    name = f"random{next(_counter)}"
    (root / f"{name}.yaml").write_text(random_spec(name, step, accumulate, factored))
    code = lopt_compile(["--out", str(root / f"pkg_{name}"), str(root / f"{name}.yaml")])
    assert code == 0, (step, accumulate)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(f"pkg_{name}.{name}")
    finally:
        sys.path.remove(str(root))
    cls = getattr(module, module.__all__[0])
    shapes = [(5, 3), (7,), (2, 3, 4), ()]

    def run(backend: str) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = cls(params, lr=0.1, backend="cuda" if backend == "simt" else backend)
        if backend == "simt":   # the CUDA kernels themselves, under the SIMT emulation
            opt.backend = SimtBackend(cls.program)
        for step_index in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
                if poison and step_index == 1 and p.dim():
                    p.grad.view(-1)[0] = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
        out = {f"p{i}": p.detach().clone() for i, p in enumerate(params)}
        for i, state in opt.state_dict()["state"].items():
            out.update({f"s{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
        return out

    ref = run("reference")
    for backend in ("tvm", "cuda", "simt"):
        assert_same_nonfinite(run(backend), ref, f"{step} / {accumulate} on {backend}")
