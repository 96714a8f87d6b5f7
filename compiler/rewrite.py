"""Rewrite rules as data, run bottom-up to a fixpoint.

Each rule is a function ``node -> node | None`` (None: does not apply), listed in a
named rule set with a ``# lhs -> rhs`` comment. Rules must never change meaning:
tests/test_rewrite.py checks every rule set against the independent evaluator on
generated expressions.
"""

from __future__ import annotations

import math
import operator

from scoremod.dsl.ast import Binary, BoolLit, Call, IntLit, Node, RealLit, Tensor, Unary, Var
from scoremod.dsl.typecheck import BOOL, INT, type_of

__all__ = ["RULE_SETS", "simplify", "fold_constant"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _lit(value, span=None) -> Node:
    if isinstance(value, bool):
        return BoolLit(value, span=span)
    if isinstance(value, int):
        return IntLit(value, span=span)
    return RealLit(float(value), span=span)


def _value(node: Node):
    return node.value if isinstance(node, (BoolLit, IntLit, RealLit)) else None


def _is_lit(node: Node) -> bool:
    return isinstance(node, (BoolLit, IntLit, RealLit))


def _is(node: Node, value) -> bool:
    """``node`` is a numeric literal equal to ``value`` (not a bool)."""
    return isinstance(node, (IntLit, RealLit)) and node.value == value


def _floordiv(a, b):
    return a // b if isinstance(a, int) and isinstance(b, int) else math.floor(a / b)


_BINARY = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": lambda a, b: a / b,
    "//": _floordiv, "%": lambda a, b: a - _floordiv(a, b) * b, "**": lambda a, b: float(a) ** b,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
}
_UNARY_FN = {
    "abs": abs, "exp": math.exp, "exp2": lambda x: 2.0 ** x, "log": math.log, "log2": math.log2,
    "sqrt": math.sqrt, "tanh": math.tanh, "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)),
    "floor": math.floor, "ceil": math.ceil, "sign": lambda x: (x > 0) - (x < 0),
}


def fold_constant(node: Node) -> Node | None:
    """Evaluate an operation whose operands are all literals (kept when the result would be
    NaN, out of int32 range, or a Python error such as division by zero)."""
    try:
        if isinstance(node, Binary) and _is_lit(node.lhs) and _is_lit(node.rhs):
            a, b = node.lhs.value, node.rhs.value
            if node.op in ("&", "|"):
                if isinstance(a, bool) and isinstance(b, bool):
                    return _lit((a and b) if node.op == "&" else (a or b), node.span)
                return None
            if isinstance(a, bool) or isinstance(b, bool):
                return None
            result = _BINARY[node.op](a, b)
            if node.op in ("//", "%") and isinstance(a, int) and isinstance(b, int):
                result = int(result)
            elif node.op in ("//", "%"):
                result = float(result)
        elif isinstance(node, Unary) and _is_lit(node.operand):
            a = node.operand.value
            if node.op == "~":
                return _lit(not a, node.span) if isinstance(a, bool) else None
            if isinstance(a, bool):
                return None
            result = -a
        elif isinstance(node, Call) and node.args and all(_is_lit(x) for x in node.args):
            vals = [x.value for x in node.args]
            if any(isinstance(v, bool) for v in vals[1:] if node.fn == "where") and node.fn != "where":
                return None
            if node.fn == "where":
                return node.args[1] if vals[0] else node.args[2]
            if any(isinstance(v, bool) for v in vals):
                return None
            if node.fn == "min":
                result = min(vals)
            elif node.fn == "max":
                result = max(vals)
            elif node.fn == "clip":
                result = min(max(vals[0], vals[1]), vals[2])
            else:
                result = _UNARY_FN[node.fn](vals[0])
                if node.fn in ("floor", "ceil"):
                    result = int(result) if math.isfinite(result) else None
                elif node.fn in ("exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid"):
                    result = float(result)
                if result is None:
                    return None
            if node.fn in ("min", "max", "clip") and any(isinstance(v, float) for v in vals):
                result = float(result)
        else:
            return None
    except (ArithmeticError, ValueError):
        return None
    if isinstance(result, float) and math.isnan(result):
        return None
    if isinstance(result, int) and not isinstance(result, bool) and not _INT32_MIN <= result <= _INT32_MAX:
        return None
    return _lit(result, node.span)


def _binop(op):
    return lambda n: isinstance(n, Binary) and n.op == op


def _int_typed(n: Node) -> bool:
    try:
        return type_of(n) == INT
    except ValueError:
        return False


def _bool_typed(n: Node) -> bool:
    try:
        return type_of(n) == BOOL
    except ValueError:
        return False


# ---- rule sets -------------------------------------------------------------------------

FOLD = [
    fold_constant,  # op(literals) -> literal
]

ARITHMETIC = [
    lambda n: n.lhs if _binop("+")(n) and _is(n.rhs, 0) and not _bool_typed(n.lhs) and _int_typed(n.rhs) else None,  # x + 0 -> x
    lambda n: n.rhs if _binop("+")(n) and _is(n.lhs, 0) and not _bool_typed(n.rhs) and _int_typed(n.lhs) else None,  # 0 + x -> x
    lambda n: n.lhs if _binop("-")(n) and isinstance(n.rhs, IntLit) and n.rhs.value == 0 else None,  # x - 0 -> x
    lambda n: n.lhs if _binop("*")(n) and isinstance(n.rhs, IntLit) and n.rhs.value == 1 else None,  # x * 1 -> x
    lambda n: n.rhs if _binop("*")(n) and isinstance(n.lhs, IntLit) and n.lhs.value == 1 else None,  # 1 * x -> x
    lambda n: IntLit(0, span=n.span) if _binop("-")(n) and n.lhs == n.rhs and _int_typed(n.lhs) else None,  # x - x -> 0 (ints)
    lambda n: n.operand.operand if isinstance(n, Unary) and n.op == "-" and isinstance(n.operand, Unary) and n.operand.op == "-" else None,  # --x -> x
    lambda n: Binary("-", n.lhs, n.rhs.operand, span=n.span) if _binop("+")(n) and isinstance(n.rhs, Unary) and n.rhs.op == "-" else None,  # x + -y -> x - y
]

LOGIC = [
    lambda n: n.rhs if _binop("&")(n) and n.lhs == BoolLit(True) and _bool_typed(n.rhs) else None,  # true & x -> x
    lambda n: n.lhs if _binop("&")(n) and n.rhs == BoolLit(True) and _bool_typed(n.lhs) else None,  # x & true -> x
    lambda n: BoolLit(False, span=n.span) if _binop("&")(n) and BoolLit(False) in (n.lhs, n.rhs) and _bool_typed(n) else None,  # x & false -> false
    lambda n: BoolLit(True, span=n.span) if _binop("|")(n) and BoolLit(True) in (n.lhs, n.rhs) else None,  # x | true -> true
    lambda n: n.rhs if _binop("|")(n) and n.lhs == BoolLit(False) else None,  # false | x -> x
    lambda n: n.lhs if _binop("|")(n) and n.rhs == BoolLit(False) else None,  # x | false -> x
    lambda n: n.lhs if _binop("&")(n) and n.lhs == n.rhs and _bool_typed(n.lhs) else None,  # x & x -> x
    lambda n: n.lhs if _binop("|")(n) and n.lhs == n.rhs else None,  # x | x -> x
    lambda n: n.operand.operand if isinstance(n, Unary) and n.op == "~" and isinstance(n.operand, Unary) and n.operand.op == "~" else None,  # ~~x -> x
    lambda n: Binary(_NEGATED[n.operand.op], n.operand.lhs, n.operand.rhs, span=n.span)
    if isinstance(n, Unary) and n.op == "~" and isinstance(n.operand, Binary) and n.operand.op in _NEGATED
    and not _bool_typed(n.operand.lhs) else None,  # ~(a < b) -> a >= b (numbers)
]
_NEGATED = {"<": ">=", ">=": "<", ">": "<=", "<=": ">", "==": "!=", "!=": "=="}

RULE_SETS: dict[str, list] = {
    "fold": FOLD,
    "arithmetic": ARITHMETIC,
    "logic": LOGIC,
}


def _rebuild(node: Node, children: list[Node]) -> Node:
    if isinstance(node, Binary):
        return Binary(node.op, children[0], children[1], span=node.span)
    if isinstance(node, Unary):
        return Unary(node.op, children[0], span=node.span)
    if isinstance(node, Call):
        return Call(node.fn, tuple(children), span=node.span)
    if isinstance(node, Tensor):
        return Tensor(node.name, tuple(children), span=node.span)
    return node


def _rewrite_once(node: Node, rules) -> Node:
    """Rewrite children, then apply rules at this node until none applies."""
    kids = node.children()
    if kids:
        new = [_rewrite_once(c, rules) for c in kids]
        if any(a is not b for a, b in zip(new, kids)):
            node = _rebuild(node, new)
    changed = True
    while changed:
        changed = False
        for rule in rules:
            out = rule(node)
            if out is not None and out != node:
                node = _rewrite_once(out, rules) if out.children() else out
                changed = True
                break
    return node


def simplify(node: Node, rule_sets=None) -> Node:
    """Run the named rule sets (all by default) to a fixpoint."""
    names = list(RULE_SETS) if rule_sets is None else list(rule_sets)
    rules = [r for name in names for r in RULE_SETS[name]]
    for _ in range(100):
        out = _rewrite_once(node, rules)
        if out == node:
            return out
        node = out
    return node
