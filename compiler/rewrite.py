"""Rewrite rules as data, run bottom-up to a fixpoint.

Each rule is a function ``node -> node | None`` (None: does not apply), listed in a
named rule set with a ``# lhs -> rhs`` comment. Rules must never change meaning:
tests/test_rewrite.py checks every rule set against the independent evaluator on
generated expressions.
"""

from __future__ import annotations

import math
import operator
from functools import lru_cache

from scoremod.dsl.ast import Binary, BoolLit, Call, IntLit, Node, RealLit, Tensor, Unary, Var, COMPARE_OPS
from scoremod.dsl.printer import to_source
from scoremod.dsl.typecheck import BOOL, INT, type_of

__all__ = ["RULE_SETS", "simplify", "fold_constant", "linear_form", "linear_bound"]

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


def _isop(n: Node, op: str) -> bool:
    return isinstance(n, Binary) and n.op == op


def _int_typed(n: Node) -> bool:
    try:
        return type_of(n) == INT
    except ValueError:
        return False


def _numeric(n: Node) -> bool:
    """An inner expression of type int, real or num (a top-level chain holding masks is not)."""
    try:
        return type_of(n) != BOOL
    except ValueError:
        return False


def _bool_typed(n: Node) -> bool:
    try:
        return type_of(n) == BOOL
    except ValueError:
        return False


# ---- helpers for the rules ----------------------------------------------------------------

def _isunary(n: Node, op: str) -> bool:
    return isinstance(n, Unary) and n.op == op


def _iscall(n: Node, fn: str) -> bool:
    return isinstance(n, Call) and n.fn == fn


def _bool_chain(node: Node, ops: tuple[str, ...]) -> list[Node]:
    """Operands of a chain of ``ops`` (``a & (b & c)`` -> [a, b, c]), left to right."""
    parts, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Binary) and n.op in ops:
            stack.append(n.rhs)
            stack.append(n.lhs)
        else:
            parts.append(n)
    return parts


def _chain(op: str, parts: list[Node], span) -> Node:
    """``parts`` joined left to right with ``op``; the root keeps ``span``."""
    out = parts[0]
    for p in parts[1:]:
        out = Binary(op, out, p)
    return Binary(op, out.lhs, out.rhs, span=span) if len(parts) > 1 else out


def _plus_const(x: Node, c: int, span) -> Node:
    """``x + c`` without negative literals (``x - 3``, not ``x + -3``; ``x`` for 0)."""
    if c == 0:
        return x
    return Binary("+", x, IntLit(c), span=span) if c > 0 else Binary("-", x, IntLit(-c), span=span)


def _reassociate(n: Node) -> Node | None:
    """``(x + a) ± b`` / ``(x - a) ± b`` with int literals a, b and pure-int x -> ``x + c``."""
    if not ((_isop(n, "+") or _isop(n, "-")) and isinstance(n.rhs, IntLit)):
        return None
    inner = n.lhs
    if not ((_isop(inner, "+") or _isop(inner, "-")) and isinstance(inner.rhs, IntLit) and _pure_int(inner.lhs)):
        return None
    a = inner.rhs.value if inner.op == "+" else -inner.rhs.value
    c = a + (n.rhs.value if n.op == "+" else -n.rhs.value)
    if not _INT32_MIN <= c <= _INT32_MAX:
        return None
    return _plus_const(inner.lhs, c, n.span)


_INT_OPS = ("+", "-", "*", "//", "%")


def _pure_int(node: Node) -> bool:
    """Built only from int literals, b/h/q/kv and int operations (no tensors, no reals)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, IntLit) or (isinstance(n, Var) and n.name != "score"):
            continue
        if isinstance(n, Binary) and n.op in _INT_OPS:
            stack.extend((n.lhs, n.rhs))
        elif isinstance(n, Unary) and n.op == "-":
            stack.append(n.operand)
        elif isinstance(n, Call) and n.fn in ("abs", "min", "max", "clip", "sign"):
            stack.extend(n.args)
        else:
            return False
    return True


def linear_form(node: Node) -> tuple[dict, int] | None:
    """A pure-int expression as ({atom: coefficient}, constant); non-linear parts
    (``abs(q - kv)``, ``q // 64``) are atoms. None when not pure int."""
    if isinstance(node, IntLit):
        return {}, node.value
    if isinstance(node, Binary) and node.op in ("+", "-"):
        a, b = linear_form(node.lhs), linear_form(node.rhs)
        if a is None or b is None:
            return None
        sign = 1 if node.op == "+" else -1
        terms = dict(a[0])
        for atom, c in b[0].items():
            terms[atom] = terms.get(atom, 0) + sign * c
        return {k: v for k, v in terms.items() if v}, a[1] + sign * b[1]
    if isinstance(node, Unary) and node.op == "-":
        a = linear_form(node.operand)
        return None if a is None else ({k: -v for k, v in a[0].items()}, -a[1])
    if isinstance(node, Binary) and node.op == "*" and (isinstance(node.lhs, IntLit) or isinstance(node.rhs, IntLit)):
        k, x = (node.lhs.value, node.rhs) if isinstance(node.lhs, IntLit) else (node.rhs.value, node.lhs)
        a = linear_form(x)
        return None if a is None else ({t: k * v for t, v in a[0].items() if k * v}, k * a[1])
    if _pure_int(node):
        return {node: 1}, 0
    return None


def linear_bound(node: Node):
    """A comparison of pure ints as ``(form, lo, hi)``: ``lo <= form <= hi`` (None = unbounded),
    with ``form`` a normalised linear form (sorted atoms, coprime coefficients, the first
    positive). ``q >= kv`` and ``kv <= q + 0`` give the same form. None for anything else."""
    if not (isinstance(node, Binary) and node.op in ("<", "<=", ">", ">=", "==")):
        return None
    lhs, rhs = linear_form(node.lhs), linear_form(node.rhs)
    if lhs is None or rhs is None:
        return None
    terms = dict(lhs[0])
    for atom, c in rhs[0].items():
        terms[atom] = terms.get(atom, 0) - c
    terms = {k: v for k, v in terms.items() if v}
    if not terms:
        return None  # a constant comparison: folding's job
    # sum(terms) + const  op  0
    const = lhs[1] - rhs[1]
    atoms = sorted(terms, key=to_source)
    g = 0
    for a in atoms:
        g = math.gcd(g, abs(terms[a]))
    sign = 1 if terms[atoms[0]] > 0 else -1
    form = tuple((a, sign * terms[a] // g) for a in atoms)
    # sign * g * form + const  op  0   <=>   form  op'  -sign * const / g
    op = node.op if sign > 0 else {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "=="}[node.op]
    num, den = -sign * const, g
    floor, ceil = num // den, -((-num) // den)
    if op == "<":
        return form, None, ceil - 1
    if op == "<=":
        return form, None, floor
    if op == ">":
        return form, floor + 1, None
    if op == ">=":
        return form, ceil, None
    if num % den:
        return form, 1, 0  # form == a fraction: never (an empty range)
    return form, num // den, num // den


@lru_cache(maxsize=4096)
def _facts(n: Node) -> tuple:
    """What the merging rules know of a mask: (bound, same quotient, zero residue)."""
    return linear_bound(n), _same_quotient(n), _zero_residue(n)


def _implies(fa: tuple, fb: tuple) -> bool:
    """Whether a mask with facts ``fa`` implies one with facts ``fb`` (sound, not complete)."""
    (ba, ca, ra), (bb, cb, rb) = fa, fb
    if ba is not None and bb is not None and ba[0] == bb[0]:
        lo_a, hi_a, lo_b, hi_b = ba[1], ba[2], bb[1], bb[2]
        return (lo_b is None or (lo_a is not None and lo_a >= lo_b)) and \
               (hi_b is None or (hi_a is not None and hi_a <= hi_b))
    # chunk: x // c == y // c implies x // (k c) == y // (k c) (positive c).
    if ca is not None and cb is not None and ca[:2] == cb[:2]:
        return cb[2] % ca[2] == 0
    # dilated: x % (k d) == 0 implies x % d == 0 (positive d).
    if ra is not None and rb is not None and ra[0] == rb[0]:
        return ra[1] % rb[1] == 0
    return False


def _same_quotient(n: Node):
    """``x // c == y // c`` with a positive literal c and pure-int x, y -> (x, y, c)."""
    if isinstance(n, Binary) and n.op == "==" and _isop(n.lhs, "//") and _isop(n.rhs, "//"):
        (x, c1), (y, c2) = (n.lhs.lhs, n.lhs.rhs), (n.rhs.lhs, n.rhs.rhs)
        if isinstance(c1, IntLit) and c1 == c2 and c1.value > 0 and _pure_int(x) and _pure_int(y):
            return x, y, c1.value
    return None


def _zero_residue(n: Node):
    """``x % d == 0`` with a positive literal d and pure-int x -> (x, d)."""
    if isinstance(n, Binary) and n.op == "==" and _isop(n.lhs, "%") and _is(n.rhs, 0) and isinstance(n.rhs, IntLit):
        x, d = n.lhs.lhs, n.lhs.rhs
        if isinstance(d, IntLit) and d.value > 0 and _pure_int(x):
            return x, d.value
    return None


def _disjoint(ba, bb) -> bool:
    """Whether two bounds on one form are never true together."""
    if ba is None or bb is None or ba[0] != bb[0]:
        return False
    lo = max(x for x in (ba[1], bb[1], -math.inf) if x is not None)
    hi = min(x for x in (ba[2], bb[2], math.inf) if x is not None)
    return lo > hi


def _cover(ba, bb) -> bool:
    """Whether one of two bounds on one form always holds (an upper and a lower bound that meet)."""
    if ba is None or bb is None or ba[0] != bb[0]:
        return False
    for x, y in ((ba, bb), (bb, ba)):
        if x[1] is None and y[2] is None and x[2] is not None and y[1] is not None and y[1] <= x[2] + 1:
            return True
    return False


def _is_not(a: Node, b: Node) -> bool:
    return (isinstance(a, Unary) and a.op == "~" and a.operand == b) or \
           (isinstance(b, Unary) and b.op == "~" and b.operand == a)


def merge_conjunction(n: Node) -> Node | None:
    """One pass over an ``&`` chain of masks: drop duplicates, implied parts, absorbed
    disjunctions (``a & (a | b)``); ``a & ~a`` or disjoint bounds -> false."""
    if not (isinstance(n, Binary) and n.op in ("&", "+")):
        return None
    parts = _bool_chain(n, ("&", "+"))
    facts = [_facts(p) for p in parts]
    contradiction = any(p == BoolLit(False) for p in parts) or any(
        _is_not(a, b) or _disjoint(facts[i][0], facts[j][0])
        for i, a in enumerate(parts) for j, b in enumerate(parts[i + 1:], i + 1))
    if contradiction:
        return BoolLit(False, span=n.span) if _bool_typed(n) else None

    def redundant(i, j):  # part i adds nothing to part j
        a, b = parts[i], parts[j]
        return _implies(facts[j], facts[i]) or (isinstance(a, Binary) and a.op == "|" and b in _bool_chain(a, ("|",)))
    kept = _keep_strongest(parts, redundant)
    if len(kept) == len(parts) or not _bool_typed(n):
        return None
    return _chain("&", kept, n.span)


def merge_disjunction(n: Node) -> Node | None:
    """One pass over a ``|`` chain: drop duplicates, parts implying another part, absorbed
    conjunctions (``a | (a & b)``); ``a | ~a`` or bounds covering everything -> true."""
    if not (isinstance(n, Binary) and n.op == "|"):
        return None
    parts = _bool_chain(n, ("|",))
    facts = [_facts(p) for p in parts]
    if any(_is_not(a, b) or _cover(facts[i][0], facts[j][0])
           for i, a in enumerate(parts) for j, b in enumerate(parts[i + 1:], i + 1)):
        return BoolLit(True, span=n.span)

    def redundant(i, j):  # part i adds nothing to part j
        a, b = parts[i], parts[j]
        return _implies(facts[i], facts[j]) or (
            isinstance(a, Binary) and a.op in ("&", "+") and b in _bool_chain(a, ("&", "+")))
    kept = _keep_strongest(parts, redundant)
    if len(kept) == len(parts):
        return None
    return _chain("|", kept, n.span)


def _keep_strongest(parts: list[Node], redundant) -> list[int]:
    """Drop each part made redundant by another kept part (``redundant(i, j)``: part i adds
    nothing to part j); of equal or equivalent parts the first stays."""
    dropped = [False] * len(parts)
    for i, a in enumerate(parts):
        for j, b in enumerate(parts):
            if i == j or dropped[j]:
                continue
            if a == b:
                if j < i:
                    dropped[i] = True
                    break
                continue
            if redundant(i, j) and not (redundant(j, i) and j > i):
                dropped[i] = True
                break
    return [p for p, d in zip(parts, dropped) if not d]


def _where_bool(n: Node, a_value: bool, b_value: bool) -> bool:
    return _iscall(n, "where") and n.args[1] == BoolLit(a_value) and n.args[2] == BoolLit(b_value)


def _int_pair(n: Node) -> bool:
    return _pure_int(n.lhs) and _pure_int(n.rhs)


def _on(keys, rule):
    """Tag ``rule`` with the node keys it can fire on (None: any node with children), so
    ``simplify`` tries each node only against its own rules. Keys: a Binary's op, a
    Call's function, or "u-"/"u~" for a Unary."""
    rule.keys = keys
    return rule


def _node_key(node: Node) -> str | None:
    if isinstance(node, Binary):
        return node.op
    if isinstance(node, Call):
        return node.fn
    if isinstance(node, Unary):
        return "u" + node.op
    return None


# ---- rule sets -------------------------------------------------------------------------

FOLD = [
    _on(None, fold_constant),  # op(literals) -> literal
]

ARITHMETIC = [
    _on(("+",), lambda n: n.lhs if _isop(n, "+") and _is(n.rhs, 0) and not _bool_typed(n.lhs) and _int_typed(n.rhs) else None),  # x + 0 -> x
    _on(("+",), lambda n: n.rhs if _isop(n, "+") and _is(n.lhs, 0) and not _bool_typed(n.rhs) and _int_typed(n.lhs) else None),  # 0 + x -> x
    _on(("-",), lambda n: n.lhs if _isop(n, "-") and isinstance(n.rhs, IntLit) and n.rhs.value == 0 else None),  # x - 0 -> x
    _on(("*",), lambda n: n.lhs if _isop(n, "*") and isinstance(n.rhs, IntLit) and n.rhs.value == 1 else None),  # x * 1 -> x
    _on(("*",), lambda n: n.rhs if _isop(n, "*") and isinstance(n.lhs, IntLit) and n.lhs.value == 1 else None),  # 1 * x -> x
    _on(("-",), lambda n: IntLit(0, span=n.span) if _isop(n, "-") and n.lhs == n.rhs and _int_typed(n.lhs) else None),  # x - x -> 0 (ints)
    _on(("u-",), lambda n: n.operand.operand if isinstance(n, Unary) and n.op == "-" and isinstance(n.operand, Unary) and n.operand.op == "-" else None),  # --x -> x
    _on(("+",), lambda n: Binary("-", n.lhs, n.rhs.operand, span=n.span) if _isop(n, "+") and isinstance(n.rhs, Unary) and n.rhs.op == "-" and _numeric(n.lhs) else None),  # x + -y -> x - y (x a number, not a top-level chain with masks)
    _on(("*",), lambda n: IntLit(0, span=n.span) if _isop(n, "*") and isinstance(n.rhs, IntLit) and n.rhs.value == 0 and _pure_int(n.lhs) else None),  # x * 0 -> 0 (ints)
    _on(("*",), lambda n: IntLit(0, span=n.span) if _isop(n, "*") and isinstance(n.lhs, IntLit) and n.lhs.value == 0 and _pure_int(n.rhs) else None),  # 0 * x -> 0 (ints)
    _on(("//",), lambda n: n.lhs if _isop(n, "//") and isinstance(n.rhs, IntLit) and n.rhs.value == 1 and _pure_int(n.lhs) else None),  # x // 1 -> x (ints)
    _on(("%",), lambda n: IntLit(0, span=n.span) if _isop(n, "%") and isinstance(n.rhs, IntLit) and n.rhs.value == 1 and _pure_int(n.lhs) else None),  # x % 1 -> 0 (ints)
    _on(("+", "-"), _reassociate),  # (x + a) + b -> x + (a + b); (x - a) + b -> x + (b - a) (int literals, pure-int x)
    _on(("u-",), lambda n: Binary("-", n.operand.rhs, n.operand.lhs, span=n.span) if _isunary(n, "-") and _isop(n.operand, "-") and _pure_int(n.operand) else None),  # -(a - b) -> b - a (ints)
    _on(("abs",), lambda n: Call("abs", (n.args[0].operand,), span=n.span) if _iscall(n, "abs") and _isunary(n.args[0], "-") else None),  # abs(-x) -> abs(x)
    _on(("abs",), lambda n: n.args[0] if _iscall(n, "abs") and _iscall(n.args[0], "abs") else None),  # abs(abs(x)) -> abs(x)
    _on(("min", "max"), lambda n: n.args[0] if (_iscall(n, "min") or _iscall(n, "max")) and n.args[0] == n.args[1] else None),  # min(x, x) -> x, max(x, x) -> x
]

LOGIC = [
    _on(("&",), lambda n: n.rhs if _isop(n, "&") and n.lhs == BoolLit(True) and _bool_typed(n.rhs) else None),  # true & x -> x
    _on(("&",), lambda n: n.lhs if _isop(n, "&") and n.rhs == BoolLit(True) and _bool_typed(n.lhs) else None),  # x & true -> x
    _on(("&",), lambda n: BoolLit(False, span=n.span) if _isop(n, "&") and BoolLit(False) in (n.lhs, n.rhs) and _bool_typed(n) else None),  # x & false -> false
    _on(("|",), lambda n: BoolLit(True, span=n.span) if _isop(n, "|") and BoolLit(True) in (n.lhs, n.rhs) else None),  # x | true -> true
    _on(("|",), lambda n: n.rhs if _isop(n, "|") and n.lhs == BoolLit(False) else None),  # false | x -> x
    _on(("|",), lambda n: n.lhs if _isop(n, "|") and n.rhs == BoolLit(False) else None),  # x | false -> x
    _on(("&",), lambda n: n.lhs if _isop(n, "&") and n.lhs == n.rhs and _bool_typed(n.lhs) else None),  # x & x -> x
    _on(("|",), lambda n: n.lhs if _isop(n, "|") and n.lhs == n.rhs else None),  # x | x -> x
    _on(("u~",), lambda n: n.operand.operand if isinstance(n, Unary) and n.op == "~" and isinstance(n.operand, Unary) and n.operand.op == "~" else None),  # ~~x -> x
    _on(("u~",), lambda n: Binary(_NEGATED[n.operand.op], n.operand.lhs, n.operand.rhs, span=n.span)
    if isinstance(n, Unary) and n.op == "~" and isinstance(n.operand, Binary) and n.operand.op in _NEGATED
    and _int_pair(n.operand) else None),  # ~(a < b) -> a >= b (ints: no NaN)
    _on(("where",), lambda n: n.args[1] if _iscall(n, "where") and n.args[0] == BoolLit(True) else None),  # where(true, a, b) -> a
    _on(("where",), lambda n: n.args[2] if _iscall(n, "where") and n.args[0] == BoolLit(False) else None),  # where(false, a, b) -> b
    _on(("where",), lambda n: n.args[1] if _iscall(n, "where") and n.args[1] == n.args[2] else None),  # where(c, a, a) -> a
    _on(("where",), lambda n: n.args[0] if _where_bool(n, True, False) else None),  # where(c, true, false) -> c
    _on(("where",), lambda n: Unary("~", n.args[0], span=n.span) if _where_bool(n, False, True) else None),  # where(c, false, true) -> ~c
    _on((*COMPARE_OPS,), lambda n: BoolLit(n.op in ("<=", ">=", "=="), span=n.span)
    if isinstance(n, Binary) and n.op in COMPARE_OPS and n.lhs == n.rhs and _pure_int(n.lhs) else None),  # x <= x -> true, x < x -> false (ints)
]
_NEGATED = {"<": ">=", ">=": "<", ">": "<=", "<=": ">", "==": "!=", "!=": "=="}

BOUNDS = [
    _on(("&",), merge_conjunction),  # a & b -> a when a implies b (tighter bound on one linear form, finer chunk, multiple dilation); a & (a | c) -> a; a & ~a -> false; disjoint bounds -> false
    _on(("|",), merge_disjunction),  # a | b -> b when a implies b; a | (a & c) -> a; a | ~a -> true; bounds covering every int -> true
]

RULE_SETS: dict[str, list] = {
    "fold": FOLD,
    "arithmetic": ARITHMETIC,
    "logic": LOGIC,
    "bounds": BOUNDS,
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


def _normalize(node: Node, rules, memo: dict) -> Node:
    """Rewrite the children, then the first rule that applies here, then the result again.

    ``memo`` maps ``id(node)`` to (node, normal form) for one ``simplify`` call, so
    unchanged subtrees are never rewritten twice (nodes are immutable)."""
    hit = memo.get(id(node))
    if hit is not None and hit[0] is node:
        return hit[1]
    original = node
    kids = node.children()
    if kids:
        new = [_normalize(c, rules, memo) for c in kids]
        if any(a is not b for a, b in zip(new, kids)):
            node = _rebuild(node, new)
    result = node
    for rule in rules.get(_node_key(node), ()) if kids else ():
        out = rule(node)
        if out is not None and out != node:
            result = _normalize(out, rules, memo)
            break
    memo[id(original)] = (original, result)
    memo[id(result)] = (result, result)
    return result


@lru_cache(maxsize=None)
def _rules_by_key(names: tuple[str, ...]) -> dict:
    """{node key: rules that may fire on it, in table order}."""
    ordered = [r for name in names for r in RULE_SETS[name]]
    keys = {k for r in ordered if r.keys for k in r.keys}
    return {k: [r for r in ordered if r.keys is None or k in r.keys] for k in keys | _ALL_KEYS}


_ALL_KEYS = set(COMPARE_OPS) | {"+", "-", "*", "/", "//", "%", "**", "&", "|", "u-", "u~",
                                "abs", "min", "max", "clip", "where", "exp", "exp2", "log", "log2",
                                "sqrt", "tanh", "sigmoid", "floor", "ceil", "sign"}


def simplify(node: Node, rule_sets=None) -> Node:
    """Run the named rule sets (all by default) to a fixpoint."""
    names = list(RULE_SETS) if rule_sets is None else list(rule_sets)
    rules = _rules_by_key(tuple(names))
    memo: dict = {}
    for _ in range(100):
        out = _normalize(node, rules, memo)
        if out == node:
            return out
        node = out
    return node
