"""The spec language's structure: one JSON Schema, used both to validate specs (with
file:line:col in every message) and, printed by `lopt-compile --schema`, by editors."""
from __future__ import annotations

import re
from typing import Any

from .errors import Mark, SpecError
from .yaml_nodes import LDict, LList, LScalar, LStr, mark_of

IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
EXPR = {"type": "string", "description": "an expression: numbers, [lists of numbers] (one channel each), "
        "names, + - * / **, comparisons, and calls such as rsqrt, exp, clip, where, mean, sum, mean_d0, "
        "size, prev (docs/spec-language.md)"}
NUMBER = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": r"^[-+]?[0-9.]+(e[-+]?[0-9]+)?$"}]}
NUMBER_OR_EXPR = {"anyOf": [{"type": "number"}, EXPR]}
VARIANTS = {
    "type": "object", "minProperties": 1, "additionalProperties": False,
    "description": "different expressions for factored (rank >= 2) and unfactored (rank < 2) tensors",
    "properties": {"factored": NUMBER_OR_EXPR, "unfactored": NUMBER_OR_EXPR},
}
EXPR_OR_VARIANTS = {"anyOf": [NUMBER_OR_EXPR, VARIANTS]}
SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 1}}
WEIGHT_GROUPS = {"type": "object", "propertyNames": {"pattern": IDENT},
                 "additionalProperties": {"type": "object", "additionalProperties": SHAPE}}


def _names(values: Any, description: str) -> dict:
    return {"type": "object", "propertyNames": {"pattern": IDENT}, "additionalProperties": values,
            "description": description}


SPEC_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lopt_codegen optimizer spec",
    "type": "object",
    "required": ["name", "class_name"],
    "additionalProperties": False,
    "properties": {
        "extends": {"type": "string",
                    "description": "a spec this one builds on (a path relative to this file): its keys are "
                                   "merged under this one's, mapping by mapping; `!remove` drops one"},
        "name": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$",
                 "description": "package name under generated/"},
        "class_name": {"type": "string", "pattern": IDENT, "description": "the optimizer class"},
        "description": {"type": "string"},
        "hyperparameters": _names(
            {"anyOf": [NUMBER, {"type": "null"}]},
            "constructor arguments with defaults (null: the user must give it); lr and "
            "weight_decay always exist"),
        "factored_axes": {"enum": ["adafactor", "velo", "last_two"],
                          "description": "how the two factored axes d0, d1 of a rank >= 2 tensor are picked: "
                          "adafactor (the largest, the second largest), velo (the same, swapped on a tie), "
                          "last_two (the last axis, the one before: torch.optim.Adafactor's)"},
        "functions": _names({
            "type": "object", "required": ["args", "expr"], "additionalProperties": False,
            "properties": {"args": {"type": "array", "items": {"type": "string", "pattern": IDENT}},
                           "expr": EXPR}}, "helper functions, inlined where they are called"),
        "tensor_functions": _names({
            "type": "object", "required": ["args", "body"], "additionalProperties": False,
            "properties": {"args": {"type": "array", "items": {"type": "string", "pattern": IDENT}},
                           "body": {"type": "string", "description": "statements: assignments, "
                                    "`for _ in range(n):`, `if`/`else`, a final `return`; `@` multiplies matrices"}}},
            "programs over whole tensors (Newton-Schulz...), run once per group of same-shape tensors"),
        "grad": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "expr": {**EXPR, "description": "g from the raw gradient `grad` (clipping, L2 decay...)"},
                "nonfinite": {"enum": ["keep", "zero", "skip"],
                              "description": "keep NaN/inf (IEEE arithmetic, alike on every backend), zero: "
                                             "replace them by 0 before `expr`, skip: a step whose gradients "
                                             "hold any changes nothing (counted in state['skipped_steps'])"}}},
        "accumulators": _names({
            "type": "object", "additionalProperties": False,
            "description": "either `ema` with `decays`, or `update`",
            "properties": {
                "ema": {**EXPR_OR_VARIANTS, "description": "the value averaged: acc <- b acc + (1 - b) ema"},
                "decays": {"type": "array", "minItems": 1, "items": NUMBER_OR_EXPR,
                           "description": "with `ema`: one channel per decay b"},
                "update": {**EXPR_OR_VARIANTS,
                           "description": "the new value from prev(<name>) (the value before this step) "
                           "and this step's values"}}},
            "values kept in the optimizer state across steps, zero before the first step"),
        "derived": _names(EXPR_OR_VARIANTS, "named expressions"),
        "loss_buffer": {
            "type": "object", "required": ["body"], "additionalProperties": False,
            "properties": {
                "state": _names({"type": "object", "required": ["init"], "additionalProperties": False,
                                 "properties": {"init": NUMBER_OR_EXPR}},
                                "the buffer's state and its value before the first step"),
                "body": {"type": "string", "description": "assignments over `loss`, the state and hyperparameters "
                         "that set `loss_features`"}},
            "description": "step-level statistics of the training loss; makes `loss_features` available"},
        "network": {
            "type": "object", "required": ["inputs", "body"], "additionalProperties": False,
            "properties": {
                "inputs": {"type": "array", "minItems": 1, "items": EXPR,
                           "description": "per-tensor (tensor- or step-level) inputs, concatenated: `x`"},
                "state": _names({"type": "object", "required": ["init"], "additionalProperties": False,
                                 "properties": {"init": NUMBER_OR_EXPR}},
                                "per-tensor network state and its value before the first step (a weight "
                                "\"group:key\", numbers)"),
                "body": {"type": "string", "description": "assignments over all tensors' rows: linear(v, "
                         "\"group:layer\"), project, weight, concat, slice, max_over_tensors, sum_over_tensors, element-wise functions"},
                "outputs": {"type": "array", "items": {"type": "string", "pattern": IDENT},
                            "description": "body variables the spec's expressions read, one value per tensor"},
                "mlp": {"type": "array", "items": EXPR,
                        "description": "each tensor's MLP weights w0, b0, w1, b1, ... (with mlp.weights: network)"}},
            "description": "a per-tensor network run once per step over all tensors"},
        "features": {
            "description": "the MLP's input channels (with `mlp`)",
            "type": "object", "additionalProperties": False, "required": ["normalized"],
            "properties": {
                "normalized": {"type": "array", "items": EXPR,
                               "description": "channels scaled by rsqrt(mean(x^2) + eps) over the tensor"},
                "eps": NUMBER,
                "normalize_over": {"enum": ["tensor", "factored_axes"],
                                   "description": "the mean(x^2) of `normalized` over the whole tensor (default), "
                                                  "or over the two factored axes, per index of the others (a "
                                                  "batch of matrices: CELO2's; unfactored tensors: the whole "
                                                  "tensor)"},
                "raw": {"type": "array", "items": EXPR,
                        "description": "channels appended without normalization"}}},
        "mlp": {
            "description": "the per-element network; optional: a spec without it needs no meta-weights",
            "type": "object", "required": ["sizes", "outputs", "weights"], "additionalProperties": False,
            "properties": {
                "sizes": {"type": "array", "minItems": 2, "items": {"type": "integer", "minimum": 1}},
                "activation": {"enum": ["relu", "tanh", "sigmoid"]},
                "outputs": {"type": "array", "items": {"type": "string", "pattern": IDENT}},
                "weights": {"anyOf": [
                    {"const": "network"},
                    {"type": "object", "required": ["group", "layers"], "additionalProperties": False,
                     "properties": {"group": {"type": "string"},
                                    "layers": {"type": "array", "items": {"type": "string"}}}}]}}},
        "weights": {
            "type": "object", "required": ["groups"], "additionalProperties": False,
            "properties": {
                "groups": WEIGHT_GROUPS,
                "ignore": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                "builtin": {"type": "object", "additionalProperties": {"type": "object"},
                            "description": "analytic weights used when the user gives none"},
                "hub": {"type": "object",
                        "additionalProperties": {"type": "string", "pattern": r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
                                                 "patternMessage": "a Hugging Face repository id (owner/name)"},
                        "description": "each group's published Hugging Face Hub repository (owner/name, a PyLO "
                                       "hub folder): weights='pretrained', the default when every group has one"},
                "layouts": {"type": "object", "description": "keys derived from a group's file keys on load",
                            "additionalProperties": {"type": "object", "additionalProperties": {"anyOf": [
                                {"type": "string"},
                                {"type": "object", "required": ["from"], "additionalProperties": False,
                                 "properties": {
                                     "from": {"anyOf": [{"type": "string"},
                                                        {"type": "array", "minItems": 1, "items": {"type": "string"}}],
                                              "description": "a file key, or keys to concatenate"},
                                     "axis": {"type": "integer", "description": "the axis to concatenate along (0)"},
                                     "transpose": {"type": "boolean",
                                                   "description": "transpose the (concatenated) matrix"}}}]}}}}},
        "update": {
            "type": "object", "required": ["step"], "additionalProperties": False,
            "properties": {
                "step": {**EXPR, "description": "p <- p - lr * step"},
                "lr_scale": {**NUMBER_OR_EXPR, "description": "this tensor's learning rate is lr * lr_scale, "
                             "for the step and the weight decay (one value per tensor, e.g. μP's 1 / width_mult)"},
                "weight_decay": {"enum": ["after_step", "decoupled", "none"],
                                 "description": "after_step: p <- p - lr wd p on the updated p; "
                                 "decoupled: on p before the step"}}},
    },
}


_RULE_KEYS = ("grad", "accumulators", "derived", "update")
SPEC_SCHEMA["properties"]["routes"] = _names({
    "type": "object", "additionalProperties": False,
    "properties": {
        "when": {**EXPR, "description": "which parameters take the route: shape facts (ndim, numel, size(k)...), "
                 "hyperparameters (flags set per param group) and numbers; none: every parameter"},
        **{k: SPEC_SCHEMA["properties"][k] for k in _RULE_KEYS}}},
    "update rules by kind of parameter, tried in order (the first whose `when` holds); each "
    "route's grad, accumulators, derived and update replace the spec's, the rest is shared")


def _type_name(value: Any) -> str:
    if isinstance(value, LDict):
        return "a mapping"
    if isinstance(value, LList):
        return "a list"
    if isinstance(value, LStr):
        return f"the text '{value}'"
    if isinstance(value, LScalar):
        return "null" if value.value is None else f"{value.value!r}"
    return repr(value)


def _matches_type(value: Any, kind: str) -> bool:
    raw = value.value if isinstance(value, LScalar) else value
    return {
        "object": isinstance(value, LDict),
        "array": isinstance(value, LList),
        "string": isinstance(value, LStr),
        "number": isinstance(raw, (int, float)) and not isinstance(raw, bool) and not isinstance(value, LStr),
        "integer": isinstance(raw, int) and not isinstance(raw, bool) and not isinstance(value, LStr),
        "null": isinstance(value, LScalar) and raw is None,
        "boolean": isinstance(value, LScalar) and isinstance(raw, bool),
    }[kind]


def _describe(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_describe(s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    if "const" in schema:
        return f"'{schema['const']}'"
    return {"object": "a mapping", "array": "a list", "string": "a text", "number": "a number",
            "integer": "an integer", "null": "null", "boolean": "true or false"}[schema["type"]]


def validate(value: Any, schema: dict, path: str, mark: Mark) -> None:
    """Check a located YAML value against SPEC_SCHEMA's subset of JSON Schema."""
    here = mark_of(value, mark)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                validate(value, option, path, mark)
                return
            except SpecError as exc:
                errors.append(exc)
        # Prefer the error of the option whose type matched: it is the more specific one.
        specific = [e for e in errors if e.mark != here]
        raise specific[0] if len(specific) == 1 else SpecError(
            here, f"{path}: expected {_describe(schema)}, got {_type_name(value)}")
    if "const" in schema:
        if value != schema["const"]:
            raise SpecError(here, f"{path}: expected {_describe(schema)}, got {_type_name(value)}")
        return
    if "enum" in schema:
        if not (isinstance(value, LStr) and value in schema["enum"]):
            raise SpecError(here, f"{path}: expected {_describe(schema)}, got {_type_name(value)}")
        return
    if not _matches_type(value, schema["type"]):
        raise SpecError(here, f"{path}: expected {_describe(schema)}, got {_type_name(value)}")
    if "pattern" in schema and not re.fullmatch(schema["pattern"], value):
        what = schema.get("patternMessage", "a valid name (letters, digits, _)")
        raise SpecError(here, f"{path}: {str(value)!r} is not {what}")
    if "minimum" in schema and value.value < schema["minimum"]:
        raise SpecError(here, f"{path}: expected at least {schema['minimum']}, got {value.value}")
    if schema["type"] == "array":
        _check_flow_split(value, path)
        if len(value) < schema.get("minItems", 0):
            raise SpecError(here, f"{path}: expected at least {schema['minItems']} item(s)")
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]", here)
    if schema["type"] == "object":
        _validate_object(value, schema, path, here)


def _unbalanced(text: str) -> bool:
    return text.count("(") != text.count(")") or text.count("[") != text.count("]")


def _check_flow_split(value: LList, path: str) -> None:
    """An expression with commas in a flow list ([clip(g, -1, 1)]) reaches us split into
    items at its commas: say so, rather than that an item is not a text."""
    if not getattr(value, "flow", False):
        return
    for i, item in enumerate(value):
        text = str(item) if isinstance(item, LStr) else ""
        if _unbalanced(text):
            raise SpecError(mark_of(item, value.mark),
                            f"{path}[{i}]: '{text}' has unbalanced brackets: a YAML flow list [a, b] splits "
                            "at every comma, so quote each expression that holds commas, e.g. "
                            "[\"clip(g, -0.1, 0.1)\"], or write the list one item per line")


def _validate_object(value: LDict, schema: dict, path: str, here: Mark) -> None:
    props = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in value:
            raise SpecError(here, f"{path or 'spec'}: missing required key '{key}'")
    if len(value) < schema.get("minProperties", 0):
        raise SpecError(here, f"{path}: expected at least one of: {', '.join(props)}")
    extra = schema.get("additionalProperties", True)
    name_rule = schema.get("propertyNames", {}).get("pattern")
    for key, item in value.items():
        key_mark = value.key_marks[key]
        sub = f"{path}.{key}" if path else key
        if key in props:
            validate(item, props[key], sub, key_mark)
        elif extra is False:
            hint = ""
            if getattr(value, "flow", False) and _unbalanced(key):
                hint = ("; a YAML flow mapping {a: b} splits at every comma: quote an expression that holds "
                        "commas, e.g. {init: 'full(10, 0)'}")
            raise SpecError(key_mark, f"{path or 'spec'}: unknown key '{key}'; expected one of: {', '.join(props)}{hint}")
        else:
            if name_rule and not re.match(name_rule, key):
                raise SpecError(key_mark, f"{path}: '{key}' is not a valid name (letters, digits, _)")
            if isinstance(extra, dict):
                validate(item, extra, sub, key_mark)
