"""The expression language: Python syntax, parsed with `ast`, restricted to a whitelist.

An expression string becomes a small tree of `Expr` nodes that keep their file position,
so that later checks (unknown names, arity, channels, cycles) can point at the culprit.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass

from .errors import Mark, SpecError

BINARY_OPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.Pow: "pow"}
COMPARE_OPS = {ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge", ast.Eq: "eq", ast.NotEq: "ne"}
FLOAT32_MAX = 3.4028234663852886e38
# Limits on one expression (or tensor function body): far beyond any optimizer's, and
# small enough that parsing, checking and lowering never exhaust the stack or memory.
MAX_TEXT = 20_000    # characters
MAX_DEPTH = 200      # nested operations
MAX_NODES = 5_000    # operations and leaves

@dataclass(frozen=True)
class Expr:
    mark: Mark


@dataclass(frozen=True)
class Num(Expr):
    values: tuple[float, ...]  # one value per channel; a list literal gives several


@dataclass(frozen=True)
class Name(Expr):
    name: str


@dataclass(frozen=True)
class Text(Expr):
    """A quoted text: a weight reference "group:key" in a network body."""

    value: str


@dataclass(frozen=True)
class Call(Expr):
    func: str  # a builtin (names.FUNCTIONS), an operator name, or a spec-defined function
    args: tuple[Expr, ...]


def _describe(node: ast.AST) -> str:
    return type(node).__name__.lower()


@dataclass(frozen=True)
class Assign:
    mark: Mark
    target: str
    value: Expr


@dataclass(frozen=True)
class Loop:
    """`for _ in range(count):` with a fixed count (a number or a hyperparameter)."""

    mark: Mark
    count: Expr
    body: tuple


@dataclass(frozen=True)
class Branch:
    mark: Mark
    test: Expr
    body: tuple
    orelse: tuple


@dataclass(frozen=True)
class Return:
    mark: Mark
    value: Expr


class _Converter:
    def __init__(self, base: Mark, text: str, matmul: bool = False, indent: int | None = None,
                 strings: bool = False):
        self.base = base
        self.text = text
        self.matmul = matmul     # `@` is allowed (tensor functions)
        self.strings = strings   # quoted texts are allowed (weight references in networks)
        self.indent = indent     # a block's column: its lines map to base.line + lineno - 1

    def mark(self, node: ast.AST) -> Mark:
        line = getattr(node, "lineno", 1) - 1
        col = getattr(node, "col_offset", 0)
        if self.indent is not None:
            return Mark(self.base.file, self.base.line + line, self.indent + col + 1)
        return self.base.shifted(line, col) if line == 0 else Mark(self.base.file, self.base.line + line, col + 1)

    def fail(self, node: ast.AST, message: str) -> SpecError:
        return SpecError(self.mark(node), f"{message} in expression '{self.text}'")

    def number(self, node: ast.AST) -> float:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.number(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return self.finite(node)
        raise self.fail(node, "a list may hold only numbers (it makes one channel per number)")

    def finite(self, node: ast.Constant) -> float:
        """A literal as a float32 value: finite, within float32's range."""
        try:
            value = float(node.value)
        except OverflowError:
            value = math.inf
        if not abs(value) <= FLOAT32_MAX:
            raise self.fail(node, f"the number {node.value} is not a finite float32 (at most {FLOAT32_MAX:.4g})")
        return value

    def convert(self, node: ast.AST) -> Expr:
        mark = self.mark(node)
        if isinstance(node, ast.Constant):
            if self.strings and isinstance(node.value, str):
                return Text(mark, node.value)
            if type(node.value) not in (int, float):
                raise self.fail(node, f"expected a number, got {node.value!r}")
            return Num(mark, (self.finite(node),))
        if isinstance(node, (ast.List, ast.Tuple)):
            if not node.elts:
                raise self.fail(node, "an empty list has no channels")
            return Num(mark, tuple(self.number(e) for e in node.elts))
        if isinstance(node, ast.Name):
            return Name(mark, node.id)
        if isinstance(node, ast.BinOp):
            op = BINARY_OPS.get(type(node.op))
            if isinstance(node.op, ast.MatMult):
                if not self.matmul:
                    raise self.fail(node, "the matrix product @ is allowed only in `tensor_functions`")
                op = "matmul"
            if op is None:
                raise self.fail(node, f"operator {_describe(node.op)} is not allowed; use + - * / **")
            return Call(mark, op, (self.convert(node.left), self.convert(node.right)))
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return Call(mark, "neg", (self.convert(node.operand),))
            if isinstance(node.op, ast.UAdd):
                return self.convert(node.operand)
            if isinstance(node.op, ast.Not):   # 1 where x is 0, else 0
                return Call(mark, "eq", (self.convert(node.operand), Num(mark, (0.0,))))
            raise self.fail(node, f"operator {_describe(node.op)} is not allowed")
        if isinstance(node, ast.BoolOp):   # `and`: the product of the truths, `or`: their max
            truths = [Call(mark, "ne", (self.convert(v), Num(mark, (0.0,)))) for v in node.values]
            combined = truths[0]
            for truth in truths[1:]:
                combined = Call(mark, "mul" if isinstance(node.op, ast.And) else "max", (combined, truth))
            return combined
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1:
                raise self.fail(node, "chained comparisons are not allowed; compare two values")
            op = COMPARE_OPS.get(type(node.ops[0]))
            if op is None:
                raise self.fail(node, f"comparison {_describe(node.ops[0])} is not allowed")
            return Call(mark, op, (self.convert(node.left), self.convert(node.comparators[0])))
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise self.fail(node, "only plain function names can be called")
            if node.keywords:
                raise self.fail(node, "keyword arguments are not allowed")
            return Call(mark, node.func.id, tuple(self.convert(a) for a in node.args))
        raise self.fail(node, f"{_describe(node)} is not part of the expression language "
                        "(numbers, lists of numbers, names, + - * / **, comparisons, function calls)")


def whole_number(e: Expr) -> int | None:
    """The value of a literal whole number (-1 parses as neg(1)), else None."""
    sign = 1
    if isinstance(e, Call) and e.func == "neg" and len(e.args) == 1:
        sign, e = -1, e.args[0]
    if isinstance(e, Num) and len(e.values) == 1 and float(e.values[0]).is_integer():
        return sign * int(e.values[0])
    return None


def parse_expr(text: str, mark: Mark, strings: bool = False) -> Expr:
    """Parse one expression; `mark` is where its first character sits in the file."""
    stripped = text.strip()
    if not stripped:
        raise SpecError(mark, "empty expression")
    tree = _parse(stripped, mark, "eval", "expression")
    return _Converter(mark, stripped, strings=strings).convert(tree.body)


def _parse(text: str, mark: Mark, mode: str, what: str) -> ast.AST:
    """ast.parse within the limits: a clean error for text too long or nested too deep."""
    if len(text) > MAX_TEXT:
        raise SpecError(mark, f"the {what} is {len(text)} characters long; the limit is {MAX_TEXT} "
                        "(split it into named derived values)")
    try:
        tree = ast.parse(text, mode=mode)
    except SyntaxError as exc:
        col = (exc.offset or 1) - 1
        raise SpecError(mark.shifted(0, col), f"syntax error in {what} '{_short(text)}': {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise SpecError(mark, f"the {what} nests too deeply to parse (limit {MAX_DEPTH} levels)") from None
    _check_size(tree, mark, what)
    return tree


def _check_size(tree: ast.AST, mark: Mark, what: str) -> None:
    """At most MAX_NODES nodes and MAX_DEPTH levels (iteratively: no recursion here)."""
    count, stack = 0, [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise SpecError(mark, f"the {what} nests {MAX_DEPTH}+ operations deep; split it into named derived "
                            "values")
        if count > MAX_NODES:
            raise SpecError(mark, f"the {what} has over {MAX_NODES} operations and values; split it into named "
                            "derived values")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


class _BlockConverter(_Converter):
    """Statements of a tensor function body: assignments, `for _ in range(n):`, `if`/`else`
    and one final `return`."""

    def fail(self, node: ast.AST, message: str) -> SpecError:
        return SpecError(self.mark(node), message)

    def statements(self, nodes: list[ast.stmt]) -> tuple:
        return tuple(self.statement(n) for n in nodes)

    def statement(self, node: ast.stmt):
        mark = self.mark(node)
        if isinstance(node, ast.Assign):
            if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
                raise self.fail(node, "assign to one name: `x = ...`")
            return Assign(mark, node.targets[0].id, self.convert(node.value))
        if isinstance(node, ast.For):
            it = node.iter
            if not (isinstance(node.target, ast.Name) and isinstance(it, ast.Call) and isinstance(it.func, ast.Name)
                    and it.func.id == "range" and len(it.args) == 1 and not it.keywords) or node.orelse:
                raise self.fail(node, "a loop is `for _ in range(count):` with a fixed count")
            return Loop(mark, self.convert(it.args[0]), self.statements(node.body))
        if isinstance(node, ast.If):
            return Branch(mark, self.convert(node.test), self.statements(node.body), self.statements(node.orelse))
        if isinstance(node, ast.Return):
            if node.value is None:
                raise self.fail(node, "`return` needs a value")
            return Return(mark, self.convert(node.value))
        raise self.fail(node, f"{_describe(node)} is not allowed in a tensor function (assignments, "
                        "`for _ in range(n):`, `if`/`else`, `return`)")


def parse_block(text: str, first_line: Mark, indent: int, strings: bool = False) -> tuple:
    """Parse a tensor function's body: `first_line` is the mark of its first line, whose
    text starts at column `indent` + 1 in the file (YAML strips that indentation)."""
    if not text.strip():
        raise SpecError(first_line, "empty tensor function body")
    if len(text) > MAX_TEXT:
        raise SpecError(first_line, f"the body is {len(text)} characters long; the limit is {MAX_TEXT}")
    try:
        tree = ast.parse(text, mode="exec")
    except SyntaxError as exc:
        where = Mark(first_line.file, first_line.line + (exc.lineno or 1) - 1, indent + (exc.offset or 1))
        raise SpecError(where, f"syntax error in tensor function: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise SpecError(first_line, f"the body nests too deeply to parse (limit {MAX_DEPTH} levels)") from None
    _check_size(tree, first_line, "body")
    return _BlockConverter(first_line, text, matmul=not strings, indent=indent, strings=strings).statements(tree.body)
