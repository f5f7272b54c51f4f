"""The tables of docs/spec-language.md, printed from the compiler's own tables (the JSON
Schema, the built-in names and functions), so that the reference cannot drift from the
language: a test compares them, and

    python -m lopt_codegen.spec.doc_tables docs/spec-language.md

rewrites each table between its `<!-- table:NAME -->` and `<!-- /table -->` markers."""
from __future__ import annotations

import re
import sys

from ..ir.network import NETWORK_FUNCTIONS
from ..ir.tensor_function import MATRIX_FUNCTIONS, MATRIX_MEANINGS
from .names import BUILTIN_NAMES, FUNCTIONS
from .schema import SPEC_SCHEMA, _describe

_SECTION = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _kind(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(dict.fromkeys(_kind(s) for s in schema["anyOf"]))
    if schema.get("type") == "object" and "additionalProperties" in schema and \
            isinstance(schema["additionalProperties"], dict) and not schema.get("properties"):
        return "a mapping of names"
    return _describe(schema)


def _key_rows(schema: dict, path: str) -> list[str]:
    rows = []
    required = set(schema.get("required", ()))
    for key, sub in schema.get("properties", {}).items():
        here = f"{path}.{key}" if path else key
        need = "yes" if key in required else ""
        rows.append(f"| `{here}` | {need} | {_cell(_kind(sub))} | {_cell(sub.get('description', ''))} |")
        rows += _key_rows(sub, here)
        named = sub.get("additionalProperties")
        if isinstance(named, dict) and named.get("type") == "object" and "properties" in named:
            rows += _key_rows(named, f"{here}.<name>")
    return rows


def tables() -> dict[str, str]:
    """Table name -> its markdown."""
    keys = ["| key | required | value | meaning |", "|---|---|---|---|", *_key_rows(SPEC_SCHEMA, "")]
    names = ["| name | values | meaning |", "|---|---|---|"]
    names += [f"| `{n}` | one per {b.level} | {_cell(b.meaning)} |" for n, b in BUILTIN_NAMES.items()]
    functions = ["| function | meaning |", "|---|---|"]
    functions += [f"| `{n}({', '.join(f.args)})` | {_cell(f.meaning)} |" for n, f in FUNCTIONS.items()]
    matrix = ["| in a tensor function | meaning |", "|---|---|"]
    matrix += [f"| `{_signature(n)}` | {_cell(meaning)} |" for n, meaning in MATRIX_MEANINGS.items()]
    network = ["| in a network body | meaning |", "|---|---|"]
    network += [f"| `{n}` | {_cell(meaning)} |" for n, meaning in NETWORK_FUNCTIONS.items()]
    return {"keys": "\n".join(keys) + "\n", "names": "\n".join(names) + "\n",
            "functions": "\n".join(functions) + "\n", "tensor_functions": "\n".join(matrix) + "\n",
            "network_functions": "\n".join(network) + "\n"}


def _signature(name: str) -> str:
    return f"{name}({', '.join(MATRIX_FUNCTIONS[name])})" if name in MATRIX_FUNCTIONS else name


def stale_tables(text: str) -> list[str]:
    """The names of the tables in `text` that differ from the compiler's, and of those missing."""
    current = tables()
    found = {m.group(2): m.group(3) for m in _SECTION.finditer(text)}
    return [name for name, table in current.items() if found.get(name) != table]


def rewrite(text: str) -> str:
    current = tables()
    return _SECTION.sub(lambda m: m.group(1) + current.get(m.group(2), m.group(3)) + m.group(4), text)


def main(argv: list[str]) -> int:
    for path in argv:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(rewrite(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
