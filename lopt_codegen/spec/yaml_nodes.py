"""YAML -> plain Python values that remember their position in the file.

PyYAML's composer keeps marks on nodes; we convert nodes to `Located*` values so that
every later check can point at file:line:col.
"""
from __future__ import annotations

from typing import Any

import yaml

from .errors import Mark, SpecError


class LDict(dict):
    mark: Mark
    key_marks: dict[str, Mark]
    flow: bool   # written inline, {a: b}: YAML splits it at every comma


class LList(list):
    mark: Mark
    flow: bool   # written inline, [a, b]: YAML splits it at every comma


class LStr(str):
    mark: Mark
    quoted: bool
    block: tuple[Mark, int] | None   # a `|` block: its first line and the column it starts at


class LScalar:
    """A non-string scalar (number, bool, null) with its position."""

    def __init__(self, value: Any, mark: Mark):
        self.value = value
        self.mark = mark

    def __repr__(self) -> str:
        return f"LScalar({self.value!r})"


class Removed:
    """`!remove`: in a spec that extends another, the key goes (it is not inherited)."""

    def __init__(self, mark: Mark):
        self.mark = mark


def mark_of(value: Any, default: Mark | None = None) -> Mark | None:
    return getattr(value, "mark", default)


def plain(value: Any) -> Any:
    """Strip positions: LDict -> dict, LScalar -> its value, LStr -> str."""
    if isinstance(value, LDict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, LList):
        return [plain(v) for v in value]
    if isinstance(value, LScalar):
        return value.value
    if isinstance(value, LStr):
        return str(value)
    return value


def _mark(node: yaml.Node, file: str) -> Mark:
    return Mark(file, node.start_mark.line + 1, node.start_mark.column + 1)


# Limits on a spec's YAML: far beyond any optimizer's, and small enough that alias
# expansion ("billion laughs") or deep nesting fail fast with a clean error.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null")}


def _check_unicode(text: str, mark: Mark) -> None:
    """A YAML escape such as "\\ud800" makes a lone surrogate, which no file can hold."""
    for ch in text:
        if "\ud800" <= ch <= "\udfff":
            raise SpecError(mark, f"the text holds a lone surrogate (\\u{ord(ch):04x}), which is not valid Unicode")


class _Budget:
    """What converting one document may still spend, and the aliases being expanded."""

    def __init__(self) -> None:
        self.nodes = 0
        self.open: set[int] = set()   # ids of the collection nodes being converted (a cycle check)


def _convert(node: yaml.Node, file: str, loader: yaml.SafeLoader, budget: _Budget | None = None,
             depth: int = 0) -> Any:
    mark = _mark(node, file)
    budget = budget or _Budget()
    budget.nodes += 1
    if budget.nodes > MAX_YAML_NODES:
        raise SpecError(mark, f"the spec expands to over {MAX_YAML_NODES} YAML values (aliases repeated inside "
                        "aliases?)")
    if depth > MAX_YAML_DEPTH:
        raise SpecError(mark, f"the spec nests deeper than {MAX_YAML_DEPTH} levels")
    if id(node) in budget.open:
        raise SpecError(mark, "a YAML alias refers to a value that contains it (a recursive alias)")
    if node.tag == "!remove":
        if not isinstance(node, yaml.ScalarNode) or node.value:
            raise SpecError(mark, "!remove stands alone: `key: !remove` drops an inherited key")
        return Removed(mark)
    if node.tag not in _PLAIN_TAGS:   # e.g. !!python/object: never constructed, refused outright
        raise SpecError(mark, f"YAML tag not allowed: {node.tag} (a spec holds plain mappings, lists, text "
                        "and numbers)")
    if isinstance(node, yaml.MappingNode):
        out = LDict()
        out.mark, out.key_marks = mark, {}
        out.flow = bool(node.flow_style)
        budget.open.add(id(node))
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(_mark(key_node, file), "keys must be names, not mappings or lists")
            key = loader.construct_object(key_node)
            if not isinstance(key, str):
                raise SpecError(_mark(key_node, file), f"keys must be names, got {key!r}")
            _check_unicode(key, _mark(key_node, file))
            if key in out:
                raise SpecError(_mark(key_node, file), f"duplicate key '{key}'")
            out.key_marks[key] = _mark(key_node, file)
            out[key] = _convert(value_node, file, loader, budget, depth + 1)
        budget.open.discard(id(node))
        return out
    if isinstance(node, yaml.SequenceNode):
        budget.open.add(id(node))
        out_list = LList(_convert(item, file, loader, budget, depth + 1) for item in node.value)
        budget.open.discard(id(node))
        out_list.mark = mark
        out_list.flow = bool(node.flow_style)
        return out_list
    value = loader.construct_object(node)
    if isinstance(value, str):
        _check_unicode(value, mark)
        s = LStr(value)
        s.mark = mark
        s.quoted = node.style in ("'", '"')
        s.block = _block_start(node, file) if node.style in ("|", ">") else None
        return s
    return LScalar(value, mark)


def _block_start(node: yaml.ScalarNode, file: str) -> tuple[Mark, int] | None:
    """Where a block scalar's text starts: the line after its `|` and that line's indent."""
    buffer, start = node.start_mark.buffer, node.start_mark.pointer
    if buffer is None:
        return None
    line_start = buffer.find("\n", start) + 1
    if line_start == 0:
        return None
    line = buffer[line_start:].split("\n", 1)[0]
    return Mark(file, node.start_mark.line + 2, 1), len(line) - len(line.lstrip(" "))


def load_located_yaml(text: str, file: str) -> Any:
    """Parse YAML text; syntax errors become SpecError with the position PyYAML reports."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)   # its reader refuses control characters (a binary file) here
        node = loader.get_single_node()
        if node is None:
            raise SpecError(Mark(file, 1, 1), "the spec is empty; expected a mapping with name, accumulators, "
                            "features, mlp, update")
        return _convert(node, file, yaml.SafeLoader(""))
    except yaml.MarkedYAMLError as exc:   # syntax, or a tag SafeLoader does not construct (!!python/...)
        m = exc.problem_mark or exc.context_mark
        where = Mark(file, m.line + 1, m.column + 1) if m else Mark(file, 1, 1)
        kind = "YAML tag not allowed" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise SpecError(where, f"{kind}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        position = getattr(exc, "position", None)
        where = "" if position is None else f" at character {position}"
        raise SpecError(Mark(file, 1, 1), f"not a YAML text{where}: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise SpecError(Mark(file, 1, 1), f"the spec nests deeper than {MAX_YAML_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()
