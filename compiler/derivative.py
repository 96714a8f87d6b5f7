"""``dT/dscore`` and ``d(T + B)/d read``: symbolic differentiation of IR, IR -> IR.

The backward pass of a transform ``T(score)`` needs its derivative in ``score`` on every
tile. ``derivative(node)`` builds it as an IR expression (simplified), which the
kernels and the XLA path then emit like any other expression (``compiler/lowering.py``).
``derivative(node, wrt=read)`` differentiates by one tensor read (a ``Tensor`` node such
as ``s[h]``, treated as a variable): the kernels give float tensor parameters their
gradients with it (``TileProgram.read_derivative``).
"""

from __future__ import annotations

import math

from scoremod.dsl.ast import Binary, Call, IntLit, Node, RealLit, Tensor, Unary, Var, mentions, walk
from scoremod.compiler.rewrite import simplify

__all__ = ["derivative"]

_ZERO, _ONE = IntLit(0), IntLit(1)
_LN2 = RealLit(math.log(2.0))


def derivative(node: Node, var: str = "score", *, wrt: Tensor | None = None) -> Node:
    """Symbolic d node / d var as IR (simplified). Piecewise functions use the derivative
    of the active piece; floor/ceil/sign/comparisons have derivative 0.

    wrt: differentiate by this tensor read instead (every read equal to it is the
    variable; other reads, and reads at indices, are constants: indices are ints)."""
    target = Var(var) if wrt is None else wrt
    return simplify(_d(node, target), ["fold", "arithmetic"])


def _mentions(node: Node, target: Node) -> bool:
    if isinstance(target, Var):
        return mentions(node, target.name)
    return any(n == target for n in walk(node))


def _build(op: str, a: Node, b: Node) -> Node:
    """Binary node that drops the zeros and ones a derivative produces (0 * x is 0 here:
    a zero derivative times a finite factor)."""
    zero_a, zero_b = a == _ZERO, b == _ZERO
    if op == "+":
        return b if zero_a else a if zero_b else Binary(op, a, b)
    if op == "-":
        return a if zero_b else Unary("-", b) if zero_a else Binary(op, a, b)
    if op == "*":
        if zero_a or zero_b:
            return _ZERO
        return b if a == _ONE else a if b == _ONE else Binary(op, a, b)
    if op == "/" and zero_a:
        return _ZERO
    return Binary(op, a, b)


def _d(n: Node, v: Node) -> Node:
    if not _mentions(n, v):
        return _ZERO
    if n == v:
        return _ONE
    B = _build
    if isinstance(n, Unary):
        return _build("-", _ZERO, _d(n.operand, v))
    if isinstance(n, Binary):
        a, b = n.lhs, n.rhs
        da, db = _d(a, v), _d(b, v)
        if n.op in ("+", "-"):
            return B(n.op, da, db)
        if n.op == "*":
            return B("+", B("*", da, b), B("*", a, db))
        if n.op == "/":
            return B("-", B("/", da, b), B("/", B("*", a, db), B("*", b, b)))
        if n.op == "**":
            if not _mentions(b, v):
                return B("*", B("*", b, B("**", a, B("-", b, _ONE))), da)
            return B("*", n, B("+", B("*", db, Call("log", (a,))), B("/", B("*", b, da), a)))
        if n.op == "%":
            return B("-", da, B("*", Call("floor", (B("/", a, b),)), db))
        return _ZERO  # //, comparisons
    if isinstance(n, Call):
        args = n.args
        x = args[0]
        dx = _d(x, v)
        fn = n.fn
        if fn == "abs":
            return B("*", Call("sign", (x,)), dx)
        if fn == "exp":
            return B("*", n, dx)
        if fn == "exp2":
            return B("*", B("*", n, _LN2), dx)
        if fn == "log":
            return B("/", dx, x)
        if fn == "log2":
            return B("/", dx, B("*", x, _LN2))
        if fn == "sqrt":
            return B("/", dx, B("*", IntLit(2), n))
        if fn == "tanh":
            return B("*", B("-", _ONE, B("*", n, n)), dx)
        if fn == "sigmoid":
            return B("*", B("*", n, B("-", _ONE, n)), dx)
        if fn == "sin":
            return B("*", Call("cos", (x,)), dx)
        if fn == "cos":
            return B("-", _ZERO, B("*", Call("sin", (x,)), dx))
        if fn in ("floor", "ceil", "sign"):
            return _ZERO
        if fn == "min":
            return Call("where", (B("<=", args[0], args[1]), dx, _d(args[1], v)))
        if fn == "max":
            return Call("where", (B(">=", args[0], args[1]), dx, _d(args[1], v)))
        if fn == "clip":
            lo, hi = args[1], args[2]
            return Call("where", (B("<", x, lo), _d(lo, v),
                                  Call("where", (B(">", x, hi), _d(hi, v), dx))))
        if fn == "where":
            return Call("where", (args[0], _d(args[1], v), _d(args[2], v)))
    if isinstance(n, Tensor):
        # A read at an index that depends on the variable (t[clip(floor(score), 0, 7)], or
        # t[s[h]] by s[h]): indices are ints, so the value is piecewise constant in it.
        return _ZERO
    raise TypeError(f"cannot differentiate {type(n).__name__}")
