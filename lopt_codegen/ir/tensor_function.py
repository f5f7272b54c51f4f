"""Tensor functions in the IR: a spec's `tensor_functions` checked and turned into plain
nested tuples (JSON-able, in program.json) that backends/tensor_program.py runs with
torch, once per group of same-shape tensors.

Every value in a body has a kind: `element` (the parameter's shape), `matrix` (the
2-D view `matrix(x)` and what is computed from it), `matrices` (the batch of matrices
over the factored axes, `matrices(x)`, and what is computed from it) or `scalar` (one
value per tensor).

    statements   ("set", var, expr) | ("loop", count, body) | ("if", test, body, orelse)
                 | ("return", expr)
    expressions  ("arg", i) | ("var", name) | ("const", value) | ("hyper", name) | ("step",)
                 | ("shape", *fact) | ("op", name, (args...))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..spec.errors import Mark, SpecError
from ..spec.expr import Assign, Branch, Call, Expr, Loop, Name, Num, Return, whole_number
from ..spec.model import TensorFunction
from ..spec.names import SHAPE_FACTS

ELEMENTWISE_UNARY = {"neg", "rsqrt", "sqrt", "exp", "log", "tanh", "abs", "sign", "relu", "sigmoid"}
ELEMENTWISE_BINARY = {"add", "sub", "mul", "div", "pow", "min", "max", "lt", "le", "gt", "ge", "eq", "ne"}
# The element-wise functions a body calls by name (operators such as + and < aside).
ELEMENTWISE_CALLS = ELEMENTWISE_UNARY - {"neg"} | {"min", "max", "where", "clip"}
REDUCTIONS = {"norm", "sum", "mean"}   # (x): over the whole value; (x, axis): along one axis of a matrix
MATRIX_KINDS = {"matrix", "matrices"}

# What a tensor function body may call, beyond the element-wise functions (a table the
# language reference prints).
MATRIX_FUNCTIONS = {
    "matrix": ("x",), "unmatrix": ("x",), "matrices": ("x",), "unmatrices": ("x",), "transpose": ("x",),
    "rows": ("x",), "cols": ("x",), "norm": ("x", "[axis]"), "sum": ("x", "[axis]"), "mean": ("x", "[axis]"),
}
MATRIX_MEANINGS = {
    "matrix": "the 2-D view of a parameter-shaped value: (size(0), numel / size(0)); a vector is a column",
    "unmatrix": "a matrix back to the parameter's shape (the same number of elements)",
    "matrices": "a factored tensor as a batch of matrices over its factored axes (rows: the lower-numbered axis), "
                "one per index of the other axes; a 2-D tensor is one matrix",
    "unmatrices": "a batch of matrices back to the parameter's shape",
    "transpose": "a matrix's transpose (each matrix's, for a batch)",
    "rows": "the number of rows of a matrix (a whole number; usable in a test)",
    "cols": "the number of columns of a matrix (a whole number; usable in a test)",
    "norm": "the Frobenius norm (one value per tensor; per matrix for a batch); with an axis, the norms along it "
            "(kept as a row or column)",
    "sum": "the sum (one value per tensor; per matrix for a batch); with an axis, the sums along it",
    "mean": "the mean (one value per tensor; per matrix for a batch); with an axis, the means along it",
    "x @ y": "the matrix product",
}


@dataclass(frozen=True)
class FunctionIR:
    name: str
    args: tuple[str, ...]
    body: tuple


def _join(kinds: list[str], mark: Mark, what: str) -> str:
    shaped = {k for k in kinds if k != "scalar"}
    if len(shaped) > 1:
        raise SpecError(mark, f"{what} mixes values of different kinds ({', '.join(sorted(shaped))}): convert with "
                        "matrix(x) / unmatrix(x) or matrices(x) / unmatrices(x) first")
    return shaped.pop() if shaped else "scalar"


class _Checker:
    def __init__(self, fn: TensorFunction, arg_kinds: tuple[str, ...], hyperparameters: set[str], factored: bool):
        self.fn, self.arg_kinds, self.hypers, self.factored = fn, arg_kinds, hyperparameters, factored
        self.static_vars: set[str] = set()   # variables known on the host (from numbers and shape facts)

    def expr(self, e: Expr, scope: dict[str, str], static: bool = False) -> tuple[tuple, str]:
        """(IR, kind). static: only numbers and shape facts (a branch's test)."""
        if isinstance(e, Num):
            if len(e.values) != 1:
                raise SpecError(e.mark, "a tensor function computes with single numbers, not channel lists")
            return ("const", e.values[0]), "scalar"
        if isinstance(e, Name):
            return self.name(e, scope, static)
        assert isinstance(e, Call)
        f = e.func
        if f in ("rows", "cols"):   # static: from the value's shape, on the host
            if len(e.args) != 1:
                raise SpecError(e.mark, f"{f}() takes 1 argument, got {len(e.args)}")
            x, kind = self.expr(e.args[0], scope)
            if kind not in MATRIX_KINDS:
                raise SpecError(e.mark, f"{f}() takes a matrix, got a {kind}")
            return ("op", f, (x,)), "scalar"
        if f == "size":
            if len(e.args) != 1:
                raise SpecError(e.mark, f"size() takes 1 argument, got {len(e.args)}")
            return ("shape", "size", _whole_number(e.args[0], "size() takes an axis number, e.g. size(0)")), "scalar"
        if static and f not in ELEMENTWISE_BINARY | ELEMENTWISE_UNARY | {"where", "clip"}:
            raise SpecError(e.mark, f"a test may only compare numbers and shape facts; {f}() is not one")
        if f in REDUCTIONS:
            return self.reduction(e, scope)
        args = [self.expr(a, scope, static) for a in e.args]
        kinds = [k for _, k in args]
        irs = tuple(ir for ir, _ in args)
        arity = {"matrix": 1, "unmatrix": 1, "matrices": 1, "unmatrices": 1, "transpose": 1, "matmul": 2,
                 "where": 3, "clip": 3}
        expected = 1 if f in ELEMENTWISE_UNARY else 2 if f in ELEMENTWISE_BINARY else arity.get(f)
        if expected is None:
            known = sorted(ELEMENTWISE_CALLS | set(MATRIX_FUNCTIONS) | {"size"})
            raise SpecError(e.mark, f"unknown function '{f}' in a tensor function; known: {', '.join(known)}")
        if len(args) != expected:
            raise SpecError(e.mark, f"{f}() takes {expected} argument{'s' if expected != 1 else ''}, got {len(args)}")
        if f == "matrix":
            if kinds[0] != "element":
                raise SpecError(e.mark, f"matrix() takes a parameter-shaped value, got a {kinds[0]}")
            return ("op", f, irs), "matrix"
        if f == "unmatrix":
            if kinds[0] != "matrix":
                raise SpecError(e.mark, f"unmatrix() takes a matrix, got a {kinds[0]}")
            return ("op", f, irs), "element"
        if f == "matrices":
            if kinds[0] != "element":
                raise SpecError(e.mark, f"matrices() takes a parameter-shaped value, got a {kinds[0]}")
            if not self.factored:
                raise SpecError(e.mark, "matrices() needs a factored tensor (rank >= 2 under a factored_axes rule): "
                                "call this function from a `factored:` variant only")
            return ("op", f, irs), "matrices"
        if f == "unmatrices":
            if kinds[0] != "matrices":
                raise SpecError(e.mark, f"unmatrices() takes a batch of matrices, got a {kinds[0]}")
            return ("op", f, irs), "element"
        if f == "transpose":
            if kinds[0] not in MATRIX_KINDS:
                raise SpecError(e.mark, f"transpose() takes a matrix, got a {kinds[0]} (use matrix(x) first)")
            return ("op", f, irs), kinds[0]
        if f == "matmul":
            if kinds[0] not in MATRIX_KINDS or kinds[0] != kinds[1]:
                raise SpecError(e.mark, f"@ multiplies two matrices (or two batches), got a {kinds[0]} and a "
                                f"{kinds[1]} (use matrix(x) for a parameter-shaped value)")
            return ("op", f, irs), kinds[0]
        if f == "clip":
            inner = ("op", "max", irs[:2])
            return ("op", "min", (inner, irs[2])), _join(kinds, e.mark, "clip()")
        return ("op", f, irs), _join(kinds, e.mark, f"{f}()")

    def reduction(self, e: Call, scope: dict[str, str]) -> tuple[tuple, str]:
        if len(e.args) not in (1, 2):
            raise SpecError(e.mark, f"{e.func}() takes a value and optionally an axis, got {len(e.args)} arguments")
        x, kind = self.expr(e.args[0], scope)
        if len(e.args) == 1:
            if kind == "scalar":
                raise SpecError(e.mark, f"{e.func}() of a single number")
            if kind == "matrices":   # one value per matrix, kept as a 1 x 1 matrix
                return ("op", e.func + "_each", (x,)), "matrices"
            return ("op", e.func, (x,)), "scalar"
        if kind not in MATRIX_KINDS:
            raise SpecError(e.mark, f"{e.func}(x, axis) takes a matrix, got a {kind}")
        axis = _whole_number(e.args[1], f"{e.func}(x, axis): the axis is 0 or 1 (-1, -2)")
        if axis not in (0, 1, -1, -2):
            raise SpecError(e.args[1].mark, f"{e.func}(x, axis): a matrix has axes 0 and 1 (or -2, -1), got {axis}")
        return ("op", e.func, (x, ("const", float(axis)))), kind

    def name(self, e: Name, scope: dict[str, str], static: bool) -> tuple[tuple, str]:
        n = e.name
        if n in SHAPE_FACTS:
            if n in ("size_d0", "size_d1") and not self.factored:
                raise SpecError(e.mark, f"{n} is the size of a factored axis, but this call is for unfactored tensors")
            return ("shape", n), "scalar"
        if static:
            if n in scope and n in self.static_vars:
                return ("var", n), "scalar"
            raise SpecError(e.mark, f"a test may only compare numbers and shape facts; '{n}' is not one")
        if n in self.fn.args:
            i = self.fn.args.index(n)
            return ("arg", i), self.arg_kinds[i]
        if n in scope:
            return ("var", n), scope[n]
        if n in self.hypers:
            return ("hyper", n), "scalar"
        if n == "t":
            return ("step",), "scalar"
        known = [*self.fn.args, *scope, *sorted(self.hypers), "t", *SHAPE_FACTS]
        raise SpecError(e.mark, f"unknown name '{n}' in tensor function '{self.fn.name}'; known here: "
                        f"{', '.join(known)} (pass other values as arguments)")

    def block(self, body: tuple, scope: dict[str, str], top: bool) -> tuple[tuple, str | None]:
        """(statements, kind of the value returned or None)."""
        out, returned = [], None
        for i, st in enumerate(body):
            if returned is not None:
                raise SpecError(st.mark, "nothing may follow `return`")
            if isinstance(st, Assign):
                if st.target in self.fn.args or st.target in SHAPE_FACTS or st.target in self.hypers:
                    raise SpecError(st.mark, f"'{st.target}' is an argument, a hyperparameter or a built-in name; "
                                    "assign to a new name")
                ir, kind = self.expr(st.value, scope)
                if st.target in scope and scope[st.target] != kind:
                    raise SpecError(st.mark, f"'{st.target}' was a {scope[st.target]}, now a {kind}: use a new name")
                if _static(ir, self.static_vars):
                    if st.target in scope and st.target not in self.static_vars:
                        raise SpecError(st.mark, f"'{st.target}' holds a computed value; a number known from the "
                                        "shape (for a test) needs a new name")
                    self.static_vars.add(st.target)
                elif st.target in self.static_vars:
                    raise SpecError(st.mark, f"'{st.target}' holds a number known from the shape (a test may read "
                                    "it); assign a computed value to a new name")
                scope[st.target] = kind
                out.append(("set", st.target, ir))
            elif isinstance(st, Loop):
                count = st.count
                if isinstance(count, Name) and count.name in self.hypers:
                    count_ir = ("hyper", count.name)
                else:
                    n = _whole_number(count, "a loop count is a whole number or a hyperparameter")
                    if n < 0:
                        raise SpecError(count.mark, f"a loop count cannot be negative, got {n}")
                    count_ir = ("const", float(n))
                inner = dict(scope)
                ir, _ = self.block(st.body, inner, top=False)
                out.append(("loop", count_ir, ir))   # names first set inside do not outlive it
                self.static_vars &= set(scope)
            elif isinstance(st, Branch):
                test, _ = self.expr(st.test, scope, static=True)
                yes, no = dict(scope), dict(scope)
                body_ir, _ = self.block(st.body, yes, top=False)
                else_ir, _ = self.block(st.orelse, no, top=False)
                for n in set(yes) & set(no):
                    if yes[n] != no[n]:
                        raise SpecError(st.mark, f"'{n}' is a {yes[n]} in one branch and a {no[n]} in the other")
                    scope[n] = yes[n]
                self.static_vars &= set(scope)
                out.append(("if", test, body_ir, else_ir))
            else:
                assert isinstance(st, Return)
                if not top or i != len(body) - 1:
                    raise SpecError(st.mark, "a tensor function returns once, as its last statement")
                ir, returned = self.expr(st.value, scope)
                if returned in MATRIX_KINDS:
                    undo = "unmatrix" if returned == "matrix" else "unmatrices"
                    raise SpecError(st.mark, "a tensor function returns a parameter-shaped value or a single "
                                    f"number per tensor: `return {undo}(X)`")
                out.append(("return", ir))
        if top and returned is None:
            raise SpecError(self.fn.mark, f"tensor function '{self.fn.name}' has no `return` at its end")
        return tuple(out), returned


def _static(ir: tuple, static_vars: set[str]) -> bool:
    """Whether an expression's value is known on the host: numbers, shape facts, a
    matrix's rows or cols, and variables holding such values."""
    kind = ir[0]
    if kind in ("const", "shape"):
        return True
    if kind == "var":
        return ir[1] in static_vars
    if kind == "op":
        return ir[1] in ("rows", "cols") or all(_static(a, static_vars) for a in ir[2])
    return False


def _whole_number(e: Expr, message: str) -> int:
    n = whole_number(e)
    if n is None:
        raise SpecError(e.mark, message)
    return n


def check_call(fn: TensorFunction, arg_kinds: tuple[str, ...], hyperparameters: set[str],
               factored: bool) -> tuple[FunctionIR, str]:
    """The function's IR and the kind of its result for arguments of these kinds
    ("element" or "scalar")."""
    body, kind = _Checker(fn, arg_kinds, hyperparameters, factored).block(fn.body, {}, top=True)
    return FunctionIR(fn.name, fn.args, body), kind
