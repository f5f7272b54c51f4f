"""IR element nodes -> TIR expressions, one rule per op (the TVM twin of the reference
backend's op tables; no optimizer math lives here).

A printer serves one output expression of one kernel stage: `load(node, channel)` says
how a leaf, a stored accumulator or a coarser (row/col/tensor/step) value is read at the
current element. Shared subexpressions are Let-bound so they are computed once. The MLP
is not printed here: its layers are stages of their own (mlp_stages.py).
"""
from __future__ import annotations

import functools
import itertools
import math
import operator
from typing import Callable

from tvm import tirx

from ...ir.nodes import LEAVES, Level, Node

F32 = "float32"
_NAMES = itertools.count()   # Let variables need unique names across a module


def _f(v: float) -> tirx.PrimExpr:
    return tirx.const(float(v), F32)


def _flag(cond: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Select(cond, _f(1), _f(0))


# exp(x) = 2^n exp(r), n = round(x / ln 2) capped at 127 (so 2^n is one normal float),
# r = x - n ln 2 (ln 2 in two parts, so r is exact; |r| <= ln 2 / 2, up to ln 2 where the
# cap holds), exp(r) by its Taylor polynomial to r^8 in Estrin's form: within 1.5 ulp of
# exp over the float range (against float64). Written out because LLVM turns a vector exp
# into one libm expf call per lane: measured 16 calls per 16-lane vector, most of VeLO's
# apply pass. The exp ends VeLO's MLP pass, whose loop is bound by its chains of dependent
# operations more than by their count: Estrin's 4 steps after r^2 (Horner's 7, to r^7)
# and one factor 2^n (two, halves of n, to reach n = 128) made that pass 3-4% faster.
_EXP_HI, _EXP_LO = 88.72283, -87.33654   # beyond: inf, and 0 in place of denormals
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06
_TAYLOR = [1 / math.factorial(k) for k in range(9)]   # the coefficient of r^k


def _pow2(n: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^n for an int32 n in [-127, 127] (-127: 0), built from its exponent bits."""
    return tirx.reinterpret(F32, (n + 127) << 23)


def _let(value: tirx.PrimExpr, body: Callable[[tirx.Var], tirx.PrimExpr]) -> tirx.PrimExpr:
    var = tirx.Var(f"e{next(_NAMES)}", F32)
    return tirx.Let(var, value, body(var))


def _exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    # x is not clamped to the range first: that took two operations on every element's
    # chain. Beyond the range n and r are meaningless and the Selects discard them; n is
    # bounded below (-127: 2^n is 0) only where it becomes an int, so that the conversion
    # is defined (CUDA C too). VeLO's MLP pass 0.8-1.3% faster, interleaved at 1M and 4M
    # (2.5-3.6% without that bound, with an undefined conversion beyond the range).
    def scaled(x: tirx.Var) -> tirx.PrimExpr:
        n = tirx.min(tirx.floor(x * _f(1.4426950408889634) + _f(0.5)), _f(127))
        return _let(n, lambda n: _let(x - n * _f(_LN2_HI) - n * _f(_LN2_LO), lambda r:
                                      _taylor(r) * _pow2(tirx.max(n, _f(-127)).astype("int32"))))

    out = _let(x, scaled)
    out = tirx.Select(x > _f(_EXP_HI), _f(float("inf")), tirx.Select(x < _f(_EXP_LO), _f(0), out))
    return tirx.Select(_is_nan(x), x, out)


def _taylor(r: tirx.PrimExpr) -> tirx.PrimExpr:
    """sum c_k r^k, k <= 8, as ((c0 + c1 r) + (c2 + c3 r) r^2) + ((c4 + c5 r) + (c6 + c7 r +
    c8 r^2) r^2) r^4: 4 dependent steps after r^2 where Horner's form takes 8."""
    c = [_f(v) for v in _TAYLOR]
    return _let(r * r, lambda r2: _let(r2 * r2, lambda r4:
                (c[0] + c[1] * r + (c[2] + c[3] * r) * r2)
                + (c[4] + c[5] * r + (c[6] + c[7] * r + c[8] * r2) * r2) * r4))


def _nan_first(a: tirx.PrimExpr, b: tirx.PrimExpr, op: str) -> tirx.PrimExpr:
    """min or max of a and b, or the NaN among them, as torch: b where it is beyond a, else
    a, a Select that LLVM makes one x86 min/max (which returns its second operand, a, when
    either is NaN), plus a NaN test of b where b is not a constant (hoisted out of loops
    where b does not change in them). Selects of tirx.min/max behind NaN tests of both
    operands took five instructions: VeLO's first pass on the GPT-2 set 4.2 -> 3.7 ms.
    NaN tests read the bits: tirx.isnan inside the vectorized specialized kernels gave
    wrong values (small_fc_lopt on (48,)). (TVM's simplifier folds a Select on a > b
    and b >= a as if no value were NaN: no Select here tests both.)"""
    if isinstance(a, tirx.FloatImm):
        a, b = b, a
    beyond = (lambda x, y: y < x) if op == "min" else (lambda x, y: y > x)
    if isinstance(b, tirx.FloatImm):   # a constant is never NaN here (the spec's are finite)
        return _let(a, lambda va: tirx.Select(beyond(va, b), b, va))
    # Bound to variables: CUDA C reads a float's bits through its address.
    return _let(a, lambda va: _let(b, lambda vb: tirx.Select(
        _is_nan(vb), vb, tirx.Select(beyond(va, vb), vb, va))))


def _is_nan(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """From the bits (exponent all ones, mantissa not zero)."""
    return tirx.bitwise_and(tirx.reinterpret("int32", x), tirx.const(0x7FFFFFFF, "int32")) > \
        tirx.const(0x7F800000, "int32")


_UNARY: dict[str, Callable] = {
    "neg": lambda x: -x,
    "exp": _exp, "log": tirx.log, "sqrt": tirx.sqrt,
    # tirx.rsqrt is miscompiled in vectorized tuple reductions (tests/test_tvm_backend.py)
    "rsqrt": lambda x: _f(1) / tirx.sqrt(x),
    "tanh": tirx.tanh,
    "abs": tirx.abs,
    # NaN in, NaN out, as torch (LLVM's min/max return the other operand of a NaN)
    "sign": lambda x: tirx.Select(x > _f(0), _f(1), tirx.Select(x < _f(0), _f(-1), x)),
    # NaN in, NaN out (NaN < 0 is false), in one instruction: LLVM makes the Select an x86
    # max that returns its second operand, x, when either is NaN. (_nan_first took five;
    # Adam's pass: 12.1 -> 10.7 ms on 16.8M elements, fused AdamW 9.6 ms.)
    "relu": lambda x: _let(x, lambda v: tirx.Select(v < _f(0), _f(0), v)),
    "sigmoid": lambda x: _f(1) / (_f(1) + _exp(-x)),
    "zero_nonfinite": lambda x: tirx.Select(tirx.isfinite(x), x, _f(0)),
}
_BINARY: dict[str, Callable] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": tirx.power,
    "min": lambda a, b: _nan_first(a, b, "min"),
    "max": lambda a, b: _nan_first(a, b, "max"),
    "lt": lambda a, b: _flag(a < b), "le": lambda a, b: _flag(a <= b),
    "gt": lambda a, b: _flag(a > b), "ge": lambda a, b: _flag(a >= b),
    "eq": lambda a, b: _flag(a == b), "ne": lambda a, b: _flag(a != b),
}
ACTIVATIONS: dict[str, Callable] = {"relu": _UNARY["relu"], "tanh": tirx.tanh, "sigmoid": _UNARY["sigmoid"]}
ELEMENTWISE = {*_UNARY, *_BINARY, "where"}


def op_expr(op: str, args: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """One channel of an elementwise op (ELEMENTWISE) of its args' channels."""
    if op in _UNARY:
        return _UNARY[op](args[0])
    if op in _BINARY:
        return _BINARY[op](*args)
    if op == "where":
        return tirx.Select(args[0] != _f(0), args[1], args[2])
    raise NotImplementedError(f"TVM backend: no rule for op '{op}'")


# About how many times each rule above reads its operands (the NaN tests read them too).
# TVM's LLVM codegen simplifies every Let value with the earlier ones substituted in, so
# its work grows with the product of these along a chain of Lets: min(max(min(...))).
_READS = {"min": 3, "max": 3, "relu": 2, "sign": 3, "exp": 5, "sigmoid": 5, "zero_nonfinite": 2}
# Past this size a value is computed by a stage of its own (stages.py), read back from its
# tile buffer, which the simplifier does not look into. Measured: min/max/relu nested four
# deep compiled in 0.3 s a kernel instead of 30 s, VeLO with grad.nonfinite: skip in 23 s
# instead of 87 s over the tests' 11 shapes, and the built-in specs' steps kept their time
# (VeLO on the GPT-2 set 104 against 108 ms, within noise).
EXPANDED_LIMIT = 60


def expanded_sizes(roots: list[Node], is_read: Callable[[Node], bool], limit: int = EXPANDED_LIMIT
                   ) -> tuple[dict[int, int], list[Node]]:
    """The size of each element-level node's expression with every Let inlined, and the
    nodes to compute in stages of their own (producers first) so that none exceeds `limit`."""
    sizes: dict[int, int] = {}
    own: list[Node] = []

    def size(node: Node) -> int:
        got = sizes.get(id(node))
        if got is None:
            if node.op == "const" or is_read(node):
                got = 1
            elif node.op in ELEMENTWISE:
                got = 1 + _READS.get(node.op, 1) * sum(size(a) for a in node.args)
                if got > limit:
                    own.append(node)
                    got = 1
            else:   # concat, channel: the args' channels themselves
                got = max(size(a) for a in node.args)
            sizes[id(node)] = got
        return got

    for root in roots:
        size(root)
    return sizes, own


class ElementPrinter:
    def __init__(self, load: Callable[[Node, int], tirx.PrimExpr], stored: set[int],
                 mlp_output: Callable[[int], tirx.PrimExpr] | None = None,
                 shared: frozenset[int] | set[int] = frozenset()):
        self.load, self.stored = load, stored   # stored: ids of accumulators read from memory
        self.mlp_output = mlp_output            # channel -> the MLP stage's output here
        self.shared = shared                    # ids of values more than one value reads
        self.memo: dict[int, list] = {}
        self.lets: list[tuple[tirx.Var, tirx.PrimExpr]] = []

    def bind(self, value: tirx.PrimExpr, name: str = "t") -> tirx.PrimExpr:
        if isinstance(value, (tirx.Var, tirx.FloatImm, tirx.IntImm)):
            return value
        var = tirx.Var(f"{name}{next(_NAMES)}", F32)
        self.lets.append((var, value))
        return var

    def wrap(self, expr: tirx.PrimExpr) -> tirx.PrimExpr:
        """`expr` inside every Let bound so far."""
        for var, value in reversed(self.lets):
            expr = tirx.Let(var, value, expr)
        return expr

    def expr(self, node: Node, channel: int) -> tirx.PrimExpr:
        """One channel of `node` as a closed expression."""
        return self.wrap(self.channel(node, channel))

    def channel(self, node: Node, c: int) -> tirx.PrimExpr:
        values = self.emit(node)
        return values[c if len(values) > 1 else 0]

    def emit(self, node: Node) -> list:
        got = self.memo.get(id(node))
        if got is None:
            got = self._emit(node)
            self.memo[id(node)] = got
        return got

    def _factors(self, node: Node) -> list[Node]:
        """The factors of a product of element values: its args, and theirs where an arg is
        itself such a product (printed here, not stored), read by this product alone (a
        product another value reads too is computed anyway: a factor as it is)."""
        out = []
        for a in node.args:
            own = id(a) not in self.stored and id(a) not in self.shared
            out += self._factors(a) if a.op == "mul" and a.level == Level.ELEMENT and own else [a]
        return out

    def _emit(self, node: Node) -> list:
        op = node.op
        if op == "const":
            return [_f(v) for v in node.attrs]
        if op in LEAVES or node.level < Level.ELEMENT or id(node) in self.stored:
            return [self.load(node, c) for c in range(node.channels)]
        if op == "div" and node.args[1].level <= Level.TENSOR:
            # x / s as x * (1 / s) for s the same at every element: LLVM hoists 1 / s out of
            # the loop, and a vector division costs ~10 cycles (Adam's pass had three per
            # element; 13.9 -> 12.1 ms on 16.8M elements). Within an ulp of x / s, except
            # where 1 / s overflows (|s| < 3e-39).
            return [self.bind(self.channel(node.args[0], c) * (_f(1) / self.channel(node.args[1], c)))
                    for c in range(node.channels)]
        if op == "mul":
            factors = self._factors(node)
            same = [f.level < Level.ELEMENT or f.op == "const" for f in factors]   # at every element
            if any(same) and same != sorted(same, reverse=True):
                # A product of element values and values the same at every element (the
                # spec's constants, step and tensor values) as the latter's product, which
                # LLVM hoists out of the loop, times the former in their order (within an
                # ulp or two of the order written). VeLO's update, lr_mult * param_scale *
                # direction * exp(..) * 0.001, multiplied every element by 0.001 after the
                # exp, ending its chain: the MLP pass 1.3-1.8% faster, 2 multiplies fewer.
                ordered = [f for f, s in zip(factors, same) if s] + [f for f, s in zip(factors, same) if not s]
                return [self.bind(functools.reduce(operator.mul, [self.channel(f, c) for f in ordered]))
                        for c in range(node.channels)]
        if op in ELEMENTWISE:
            return [self.bind(op_expr(op, [self.channel(a, c) for a in node.args])) for c in range(node.channels)]
        if op == "concat":
            return [self.channel(a, c) for a in node.args for c in range(a.channels)]
        if op == "channel":
            return [self.emit(node.args[0])[node.attrs[0]]]
        if op == "mlp":
            if self.mlp_output is None:
                raise NotImplementedError("TVM backend: the MLP may only feed stored values, not a reduction")
            return [self.mlp_output(c) for c in range(node.channels)]
        raise NotImplementedError(f"TVM backend: no rule for element-level op '{op}'")
