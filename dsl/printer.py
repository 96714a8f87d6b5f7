"""Print AST/IR nodes as source text with the fewest parentheses that parse back
to an equal tree (``parse(to_source(n)) == n``)."""

from __future__ import annotations

import math

from scoremod.dsl.ast import (
    deep_recursion,
    Binary, BoolLit, Call, Index, IntLit, Name, Node, RealLit, Tensor, Unary, Var,
    COMPARE_OPS,
)

# Precedence levels of docs/language.md "2. Syntax" (lowest first).
_LEVEL = {"|": 1, "&": 2, "+": 5, "-": 5, "*": 6, "/": 6, "//": 6, "%": 6, "**": 8}
for _op in COMPARE_OPS:
    _LEVEL[_op] = 4
_ATOM = 9


def format_real(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(float(value))
    return text


def _level(node: Node) -> int:
    if isinstance(node, Binary):
        return _LEVEL[node.op]
    if isinstance(node, Unary):
        return 3 if node.op == "~" else 7
    if isinstance(node, IntLit) and node.value < 0:
        return 7
    if isinstance(node, RealLit) and (node.value < 0 or math.copysign(1.0, node.value) < 0):
        return 7
    return _ATOM


def to_source(node: Node) -> str:
    """Source text for ``node``."""
    with deep_recursion():   # one level of recursion per level of the tree
        return _emit(node, 0)


def _emit(node: Node, min_level: int) -> str:
    text = _emit_bare(node)
    return f"({text})" if _level(node) < min_level else text


def _emit_bare(node: Node) -> str:
    if isinstance(node, BoolLit):
        return "true" if node.value else "false"
    if isinstance(node, IntLit):
        return str(node.value)
    if isinstance(node, RealLit):
        return format_real(node.value)
    if isinstance(node, (Var, Name)):
        return node.name
    if isinstance(node, Tensor):
        if not node.indices:
            return node.name
        return f"{node.name}[{', '.join(_emit(i, 0) for i in node.indices)}]"
    if isinstance(node, Index):
        return f"{_emit(node.base, _ATOM)}[{', '.join(_emit(i, 0) for i in node.indices)}]"
    if isinstance(node, Call):
        return f"{node.fn}({', '.join(_emit(a, 0) for a in node.args)})"
    if isinstance(node, Unary):
        if node.op == "~":
            return "~" + _emit(node.operand, 3)
        inner = _emit(node.operand, 7)
        # `--x` would lex as two minus signs too; the space keeps it readable.
        return "-" + inner if not inner.startswith("-") else "- " + inner
    if isinstance(node, Binary):
        level = _LEVEL[node.op]
        if node.op == "**":  # right-associative; the exponent is a unary
            return f"{_emit(node.lhs, _ATOM)} ** {_emit(node.rhs, 7)}"
        if node.op in COMPARE_OPS:  # not chainable: both sides are sums
            return f"{_emit(node.lhs, 5)} {node.op} {_emit(node.rhs, 5)}"
        return f"{_emit(node.lhs, level)} {node.op} {_emit(node.rhs, level + 1)}"
    raise TypeError(f"cannot print {type(node).__name__}")
