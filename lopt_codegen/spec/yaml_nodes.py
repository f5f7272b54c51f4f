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


def _convert(node: yaml.Node, file: str, loader: yaml.SafeLoader) -> Any:
    mark = _mark(node, file)
    if node.tag == "!remove":
        if not isinstance(node, yaml.ScalarNode) or node.value:
            raise SpecError(mark, "!remove stands alone: `key: !remove` drops an inherited key")
        return Removed(mark)
    if isinstance(node, yaml.MappingNode):
        out = LDict()
        out.mark, out.key_marks = mark, {}
        out.flow = bool(node.flow_style)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, str):
                raise SpecError(_mark(key_node, file), f"keys must be names, got {key!r}")
            if key in out:
                raise SpecError(_mark(key_node, file), f"duplicate key '{key}'")
            out.key_marks[key] = _mark(key_node, file)
            out[key] = _convert(value_node, file, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        out_list = LList(_convert(item, file, loader) for item in node.value)
        out_list.mark = mark
        out_list.flow = bool(node.flow_style)
        return out_list
    value = loader.construct_object(node)
    if isinstance(value, str):
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
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        m = exc.problem_mark or exc.context_mark
        where = Mark(file, m.line + 1, m.column + 1) if m else Mark(file, 1, 1)
        raise SpecError(where, f"YAML syntax error: {exc.problem or exc.context}") from None
    finally:
        loader.dispose()
    if node is None:
        raise SpecError(Mark(file, 1, 1), "the spec is empty; expected a mapping with name, accumulators, features, mlp, update")
    return _convert(node, file, yaml.SafeLoader(""))
