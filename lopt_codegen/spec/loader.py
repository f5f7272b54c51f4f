"""Read a spec file: YAML -> schema check -> parsed expressions -> `Spec`."""
from __future__ import annotations

import keyword
import math
import os
from dataclasses import replace
from typing import Any

from .errors import Mark, SpecError
from .expr import FLOAT32_MAX, Expr, Num, parse_block, parse_expr
from .model import Accumulator, Function, LossBuffer, Mlp, Network, Route, Spec, TensorFunction, Variants, Weights
from ..weights.layouts import Derived
from .schema import SPEC_SCHEMA, validate
from .yaml_nodes import LDict, LScalar, LStr, Removed, load_located_yaml, mark_of, plain

from .names import CONSTRUCTOR_NAMES, MODULE_NAMES, RESERVED


def _expr(value: Any, fallback: Mark, strings: bool = False) -> Expr:
    mark = mark_of(value, fallback)
    if isinstance(value, LScalar):
        number = _number(value, "expression", mark)
        if abs(number) > FLOAT32_MAX:
            raise SpecError(mark, f"the number {value.value} is not a finite float32 (at most {FLOAT32_MAX:.4g})")
        return Num(mark, (number,))
    # A quoted scalar's text starts one column after its opening quote.
    start = mark.shifted(0, 1) if getattr(value, "quoted", False) else mark
    return parse_expr(str(value), start, strings=strings)


def _number(value: Any, where: str, fallback: Mark) -> float:
    raw = value.value if isinstance(value, LScalar) else value
    try:
        number = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(mark_of(value, fallback), f"{where}: expected a number, got {raw!r}") from None
    if not math.isfinite(number):
        raise SpecError(mark_of(value, fallback), f"{where}: expected a finite number, got {raw!r}")
    return number


def _variants(value: Any, fallback: Mark) -> Variants:
    mark = mark_of(value, fallback)
    if isinstance(value, LDict):
        return Variants(*(_expr(value[v], mark) if v in value else None for v in ("factored", "unfactored")), mark)
    expr = _expr(value, mark)
    return Variants(expr, expr, mark)


def _check_name(name: str, mark: Mark, taken: dict[str, Mark]) -> None:
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise SpecError(mark, f"'{name}' is a Python keyword; choose another name")
    if name in RESERVED:
        raise SpecError(mark, f"'{name}' is a built-in name ({', '.join(sorted(RESERVED))}); choose another")
    if name.startswith("__"):
        raise SpecError(mark, f"'{name}': names starting with __ are the compiler's own; choose another")
    if name in taken:
        raise SpecError(mark, f"'{name}' is already defined at {taken[name]}")
    taken[name] = mark


def _accumulator(name: str, acc: LDict, mark: Mark) -> Accumulator:
    if ("ema" in acc) == ("update" in acc):
        raise SpecError(acc.mark, f"accumulators.{name}: give either `ema:` with `decays:` (an exponential "
                        "moving average) or `update:` (any expression of prev(" + name + ") and this step's values)")
    if "ema" in acc:
        if "decays" not in acc:
            raise SpecError(acc.mark, f"accumulators.{name}: `ema:` needs `decays:` (one channel per decay)")
        decays = tuple(_expr(d, mark) for d in acc["decays"])
        return Accumulator(name, _variants(acc["ema"], mark), decays, None, mark)
    if "decays" in acc:
        raise SpecError(acc.key_marks["decays"], f"accumulators.{name}: `decays:` goes with `ema:`; an `update:` "
                        "writes its decay in the expression, e.g. beta * prev(" + name + ") + (1 - beta) * g")
    return Accumulator(name, None, (), _variants(acc["update"], mark), mark)


def _block(value: LStr, strings: bool = False) -> tuple:
    if value.block is not None:
        first, indent = value.block
        return parse_block(str(value), first, indent, strings)
    # A one-line body: its text starts where the scalar does (after a quote).
    start = value.mark.shifted(0, 1) if value.quoted else value.mark
    return parse_block(str(value), start, start.col - 1, strings)


def _network(net: LDict, taken: dict[str, Mark]) -> Network:
    for out in net.get("outputs", []):
        _check_name(str(out), mark_of(out, net.mark), taken)
    state = {}
    for name, value in net.get("state", {}).items():
        mark = net["state"].key_marks[name]
        state[name] = _expr(value["init"], mark, strings=True)
    return Network(tuple(_expr(e, net.mark) for e in net["inputs"]), state,
                   _block(net["body"], strings=True), tuple(str(o) for o in net.get("outputs", [])),
                   tuple(_expr(e, net.mark, strings=True) for e in net.get("mlp", [])), net.mark)


def _derived(value: Any) -> Derived:
    if isinstance(value, LStr):
        return Derived((str(value),))
    sources = value["from"]
    sources = (str(sources),) if isinstance(sources, LStr) else tuple(str(k) for k in sources)
    axis = int(value["axis"].value) if "axis" in value else 0
    transpose = bool(value["transpose"].value) if "transpose" in value else False
    return Derived(sources, axis, transpose)


def _mlp(doc: LDict) -> Mlp:
    w = doc["weights"]
    from_network = isinstance(w, LStr)
    return Mlp(tuple(int(s.value) for s in doc["sizes"]), str(doc.get("activation", "relu")),
               tuple(str(o) for o in doc["outputs"]), None if from_network else str(w["group"]),
               () if from_network else tuple(str(x) for x in w["layers"]), doc.mark)


def load_spec(path: str | os.PathLike) -> Spec:
    path = os.fspath(path)
    return parse_spec(_read(path, None), path)


def _read(path: str, mark: Mark | None) -> str:
    """A spec file's text; an unreadable or non-UTF-8 file is a SpecError (at `mark`, the
    `extends:` that names it, if any)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        where = f"extends: cannot read {path}" if mark else f"cannot read spec {path}"
        raise SpecError(mark, f"{where}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(mark or Mark(path, 1, 1), f"{path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                        f"{exc.start}): a spec is a YAML text file") from None


def _document(text: str, path: str, chain: tuple[str, ...] = ()) -> tuple[Any, str]:
    """The spec's YAML with the spec it `extends` merged under it, and the text of both
    (the program's hash covers the base too)."""
    doc = load_located_yaml(text, path)
    if not isinstance(doc, LDict) or "extends" not in doc:
        _no_removals(doc)
        return doc, text
    ref, mark = doc["extends"], doc.key_marks["extends"]
    if not isinstance(ref, LStr):
        raise SpecError(mark, "extends: the path of the spec this one builds on, relative to this file")
    for key in ("name", "class_name"):   # else it would be compiled over the base's package
        if key not in doc:
            raise SpecError(doc.mark, f"a spec that extends another needs its own `{key}`")
    base_path = os.path.join(os.path.dirname(path), str(ref))
    here = os.path.abspath(path)
    if os.path.abspath(base_path) in (*chain, here):
        raise SpecError(mark, f"extends: {ref} extends this spec back (a cycle)")
    base, base_source = _document(_read(base_path, mark), base_path, (*chain, here))
    child = LDict((k, v) for k, v in doc.items() if k != "extends")
    child.mark, child.flow = doc.mark, doc.flow
    child.key_marks = {k: m for k, m in doc.key_marks.items() if k != "extends"}
    return _merged(base, child), f"{text}\n# extends {ref}:\n{base_source}"


def _merged(base: Any, child: Any) -> Any:
    """Mappings merged key by key (the child's values win, `!remove` drops a key); any
    other value replaced whole. Keys keep the base's order; new ones follow."""
    if not (isinstance(base, LDict) and isinstance(child, LDict)):
        _no_removals(child)
        return child
    out = LDict(base)
    out.mark, out.flow, out.key_marks = child.mark, child.flow, dict(base.key_marks)
    for key, value in child.items():
        if isinstance(value, Removed):
            if key not in out:
                raise SpecError(value.mark, f"!remove: '{key}' is not in the spec this one extends")
            del out[key], out.key_marks[key]
            continue
        out[key] = _merged(out[key], value) if key in out else _merged(None, value)
        out.key_marks[key] = child.key_marks[key]
    return out


def _no_removals(value: Any) -> None:
    if isinstance(value, Removed):
        raise SpecError(value.mark, "!remove drops a key inherited through `extends:`; there is none here")
    if isinstance(value, dict):
        for v in value.values():
            _no_removals(v)
    elif isinstance(value, list):
        for v in value:
            _no_removals(v)


def parse_spec(text: str, path: str) -> Spec:
    doc, text = _document(text, path)
    top = Mark(path, 1, 1)
    validate(doc, SPEC_SCHEMA, "", top)
    keys = doc.key_marks
    taken: dict[str, Mark] = {}
    for key, reserved in (("name", set()), ("class_name", MODULE_NAMES)):
        value = str(doc[key])
        if keyword.iskeyword(value) or keyword.issoftkeyword(value) or value in reserved:
            raise SpecError(mark_of(doc[key], keys[key]), f"{key}: '{value}' is a Python keyword or a name the "
                            "generated module uses; choose another")

    hypers: dict[str, float | None] = {"lr": 1.0, "weight_decay": 0.0}
    for name, value in doc.get("hyperparameters", {}).items():
        mark = doc["hyperparameters"].key_marks[name]
        _check_name(name, mark, taken)
        if name in CONSTRUCTOR_NAMES:
            raise SpecError(mark, f"hyperparameter '{name}' would clash with the optimizer's own "
                            f"{', '.join(sorted(CONSTRUCTOR_NAMES))}; choose another name")
        is_null = isinstance(value, LScalar) and value.value is None
        hypers[name] = None if is_null else _number(value, f"hyperparameters.{name}", mark)

    functions = {}
    for name, fn in doc.get("functions", {}).items():
        mark = doc["functions"].key_marks[name]
        _check_name(name, mark, taken)
        functions[name] = Function(name, tuple(fn["args"]), _expr(fn["expr"], mark), mark)

    tensor_functions = {}
    for name, fn in doc.get("tensor_functions", {}).items():
        mark = doc["tensor_functions"].key_marks[name]
        _check_name(name, mark, taken)
        tensor_functions[name] = TensorFunction(name, tuple(fn["args"]), _block(fn["body"]), mark)

    loss_buffer = None
    if "loss_buffer" in doc:
        lb = doc["loss_buffer"]
        loss_buffer = LossBuffer({n: _expr(v["init"], lb["state"].key_marks[n], strings=True)
                                  for n, v in lb.get("state", {}).items()},
                                 _block(lb["body"], strings=True), lb.mark)
    network = None
    if "network" in doc:
        net = doc["network"]
        network = _network(net, taken)

    if ("features" in doc) != ("mlp" in doc):
        present, absent = ("features", "mlp") if "features" in doc else ("mlp", "features")
        raise SpecError(keys[present], f"`{present}` goes with `{absent}`: features are the MLP's inputs; "
                        f"add `{absent}:` or remove `{present}:` (a spec without an MLP writes its rule in "
                        "`update.step`)")
    feats = doc.get("features", LDict())
    mlp = None
    shared = dict(taken)   # names every route sees: hyperparameters, functions
    if "mlp" in doc:
        mlp = _mlp(doc["mlp"])
        for out in mlp.outputs:
            _check_name(out, mlp.mark, taken)
            shared[out] = mlp.mark
    rule = _rule(doc, taken, top)

    weights_doc = doc.get("weights", LDict())
    weights = Weights(
        groups={g: {k: tuple(plain(s)) for k, s in keys_.items()} for g, keys_ in weights_doc.get("groups", {}).items()},
        ignore={g: tuple(plain(p)) for g, p in weights_doc.get("ignore", {}).items()},
        builtin=plain(weights_doc["builtin"]) if "builtin" in weights_doc else None,
        layouts={g: {k: _derived(v) for k, v in keys_.items()} for g, keys_ in weights_doc.get("layouts", {}).items()},
        hub={str(g): str(repo) for g, repo in weights_doc.get("hub", {}).items()},
    )
    if feats.get("normalize_over") == "factored_axes" and "factored_axes" not in doc:
        raise SpecError(feats.key_marks["normalize_over"], "features.normalize_over: factored_axes needs a "
                        "`factored_axes` rule (adafactor, velo or last_two) to pick the axes")
    spec = Spec(
        path=path, source=text, name=str(doc["name"]), class_name=str(doc["class_name"]),
        description=str(doc.get("description", "")).strip(), hyperparameters=hypers,
        factored_axes=str(doc["factored_axes"]) if "factored_axes" in doc else None,
        functions=functions, tensor_functions=tensor_functions, loss_buffer=loss_buffer, network=network,
        normalized=tuple(_expr(e, feats.mark) for e in feats.get("normalized", [])),
        norm_eps=_number(feats["eps"], "features.eps", feats.mark) if "eps" in feats else 1e-5,
        normalize_over=str(feats.get("normalize_over", "tensor")),
        raw_features=tuple(_expr(e, feats.mark) for e in feats.get("raw", [])),
        mlp=mlp, weights=weights, marks={k: m for k, m in keys.items()}, **rule,
    )
    routes = tuple(_route(name, route, doc["routes"].key_marks[name], spec, shared)
                   for name, route in doc.get("routes", {}).items())
    for earlier, later in zip(routes, routes[1:]):
        if earlier.when is None:
            raise SpecError(later.mark, f"routes.{later.name} is never taken: routes.{earlier.name} before it has no "
                            "`when` and takes every parameter; move it last")
    if not routes and spec.step is None:
        raise SpecError(top, "spec: missing required key 'update' (or `routes`, each with its rule)")
    return replace(spec, routes=routes)


def _rule(doc: LDict, taken: dict[str, Mark], top: Mark, inherited: Spec | None = None) -> dict:
    """The sections of one update rule (a spec's, or a route's over the spec's): the
    Spec fields they give; a route's missing sections are the spec's."""
    out: dict = {}
    if "grad" in doc or inherited is None:
        grad = doc.get("grad", LDict())
        out["grad"] = _expr(grad["expr"], grad.mark) if "expr" in grad else parse_expr("grad", top)
        out["nonfinite"] = str(grad.get("nonfinite", "keep" if inherited is None else inherited.nonfinite))
        if inherited is not None and (out["nonfinite"] == "skip") != (inherited.nonfinite == "skip"):
            raise SpecError(mark_of(grad.get("nonfinite"), grad.mark), "grad.nonfinite: skip decides for the "
                            "whole step: set it in the spec's own `grad`, and not otherwise in a route's")
    if "accumulators" in doc or inherited is None:
        out["accumulators"] = {}
        for name, acc in doc.get("accumulators", {}).items():
            mark = doc["accumulators"].key_marks[name]
            _check_name(name, mark, taken)
            out["accumulators"][name] = _accumulator(name, acc, mark)
    if "derived" in doc or inherited is None:
        out["derived"] = {}
        for name, value in doc.get("derived", {}).items():
            mark = doc["derived"].key_marks[name]
            _check_name(name, mark, taken)
            out["derived"][name] = _variants(value, mark)
    if "update" in doc:
        update = doc["update"]
        out["step"] = _expr(update["step"], update.mark)
        out["weight_decay"] = str(update.get("weight_decay", "after_step"))
        out["lr_scale"] = _expr(update["lr_scale"], update.mark) if "lr_scale" in update else None
    elif inherited is None:
        out["step"], out["weight_decay"], out["lr_scale"] = None, "after_step", None
    return out


def _route(name: str, doc: LDict, mark: Mark, spec: Spec, shared: dict[str, Mark]) -> Route:
    taken = dict(shared)
    # A route's own accumulators and derived values replace the spec's; names the route
    # inherits stay taken.
    for section in ("accumulators", "derived"):
        if section not in doc:
            taken.update({n: mark for n in getattr(spec, section)})
    rule = _rule(doc, taken, mark, inherited=spec)
    route_spec = replace(spec, **rule)
    if route_spec.step is None:
        raise SpecError(mark, f"routes.{name}: no update rule: give the route `update:` or the spec one")
    when = _expr(doc["when"], mark) if "when" in doc else None
    return Route(name, when, route_spec, mark)
