"""Rewrite rules as data, run bottom-up to a fixpoint.

A rule is a pair ``(pattern, rhs)`` in a named rule set, with a ``# lhs -> rhs`` comment.
The pattern (a ``Pat``, after tinygrad's UPat) matches a node's class and op or function
and binds named sub-nodes, under optional predicates; ``rhs`` gets the bindings as keyword
arguments and returns the new node (None: the rule does not apply after all). Rules must
never change meaning: tests/test_rewrite.py checks every rule set against the independent
evaluator on generated expressions.
"""

from __future__ import annotations

import math
import operator
import struct
import threading
from functools import lru_cache

from scoremod.dsl.ast import Binary, BoolLit, Call, IntLit, Node, RealLit, Unary, Var, COMPARE_OPS, with_children
from scoremod.dsl.printer import to_source
from scoremod.dsl.typecheck import BOOL, INT, INT32_MAX, INT32_MIN, type_of

__all__ = ["RULE_SETS", "Pat", "simplify", "conjunction", "fold_constant", "linear_form", "linear_bound"]

_FLOAT32_MAX = 3.4028234663852886e38


# ---- patterns --------------------------------------------------------------------------------

_ANY = object()


class Pat:
    """A pattern over IR nodes.

    Matches a node that is an instance of ``cls`` (None: any node), whose op (a Binary's or
    Unary's ``op``, a Call's ``fn``) is one of ``ops``, whose ``value`` (literals) equals
    ``value``, whose children match ``src`` one to one (None: any children), and for which
    ``where(node)`` holds; binds the node to ``name``. A name bound twice must bind equal
    nodes (``x - x``). ``commute=True`` (a Binary at the root of a rule) also tries the
    swapped operands.
    """

    __slots__ = ("cls", "attr", "ops", "value", "src", "name", "where", "commute", "_match")

    def __init__(self, cls=None, ops=None, src=None, *, value=_ANY, name=None, where=None,
                 commute=False):
        if value is not _ANY and cls not in (BoolLit, IntLit, RealLit):
            raise ValueError("a pattern with a value needs a literal class")
        if commute and (cls is not Binary or src is None):
            raise ValueError("commute needs a Binary pattern with operands")
        self.cls = Node if cls is None else cls
        self.attr = "fn" if cls is Call else "op"
        self.ops = (ops,) if isinstance(ops, str) else (None if ops is None else tuple(ops))
        self.value, self.src, self.name, self.where, self.commute = value, src, name, where, commute
        self._match = None

    def match(self, node: Node) -> dict | None:
        """The bindings ``{name: node}`` when ``node`` matches, else None."""
        if self._match is None:
            self._match = _compile(self, root_known=False)
        return self._match(node)

    def keys(self) -> tuple[str, ...] | None:
        """The keys rules are looked up by (a Binary's op, a Call's function, "u-"/"u~" for a
        Unary) of the nodes this pattern can match; None: not restricted."""
        if self.ops is None or self.cls not in (Binary, Unary, Call):
            return None
        return tuple("u" + op for op in self.ops) if self.cls is Unary else self.ops

    def variants(self) -> list[Pat]:
        """This pattern, and with ``commute`` the one with the operands swapped."""
        if not self.commute:
            return [self]
        return [Pat(self.cls, self.ops, src, value=self.value, name=self.name, where=self.where)
                for src in (self.src, self.src[::-1])]

    def __repr__(self) -> str:
        head = self.cls.__name__ if self.cls is not Node else "_"
        parts = [repr(self.ops[0] if len(self.ops) == 1 else self.ops)] if self.ops else []
        if self.value is not _ANY:
            parts.append(repr(self.value))
        parts += [repr(s) for s in self.src or ()] + (["commute"] if self.commute else [])
        text = f"{head}({', '.join(parts)})" if parts or self.cls is not Node else "_"
        return f"{self.name}={text}" if self.name and text != "_" else (self.name or text)


_FIELDS = {Binary: ("lhs", "rhs"), Unary: ("operand",)}


def _compile(pat: Pat, root_known: bool):
    """``pat`` as one straight-line function ``node -> bindings | None`` (as tinygrad
    compiles its UPats): first the shape (classes, ops, values, arity), then the equality of
    names bound twice, then the predicates, each in pre-order. ``root_known``: the caller
    has checked the root's class and op already (rules are looked up by them)."""
    consts: dict = {}
    shape: list[str] = []
    equal: list[str] = []
    preds: list[str] = []
    bound: dict[str, str] = {}

    def const(value) -> str:
        consts[f"k{len(consts)}"] = value
        return f"k{len(consts) - 1}"

    def walk(p: Pat, var: str, checked: bool) -> None:
        if not checked and p.cls is not Node:
            shape.append(f"if not isinstance({var}, {const(p.cls)}): return None")
        if not checked and p.ops is not None:
            shape.append(f"if {var}.{p.attr} not in {const(p.ops)}: return None")
        if p.value is not _ANY:
            shape.append(f"if {var}.value != {const(p.value)}: return None")
        if p.name in bound:
            equal.append(f"if {var} is not {bound[p.name]} and {var} != {bound[p.name]}: return None")
        elif p.name is not None:
            bound[p.name] = var
        if p.where is not None:
            preds.append(f"if not {const(p.where)}({var}): return None")
        if p.src is None:
            return
        if p.cls in _FIELDS and len(p.src) == len(_FIELDS[p.cls]):
            kids = [f"{var}.{f}" for f in _FIELDS[p.cls]]
        else:
            shape.append(f"{var}_k = {var}.children()")
            shape.append(f"if len({var}_k) != {len(p.src)}: return None")
            kids = [f"{var}_k[{i}]" for i in range(len(p.src))]
        for i, (sp, kid) in enumerate(zip(p.src, kids)):
            shape.append(f"{var}_{i} = {kid}")
            walk(sp, f"{var}_{i}", False)

    walk(pat, "n", root_known)
    result = ", ".join(f"{name!r}: {var}" for name, var in bound.items())
    body = shape + equal + preds + [f"return {{{result}}}"]
    namespace = dict(consts)
    exec("def match(n):\n" + "".join(f"    {line}\n" for line in body), namespace)
    return namespace["match"]


def V(name: str, where=None) -> Pat:
    """Any node, bound to ``name``."""
    return Pat(name=name, where=where)


def Int(name: str, where=None) -> Pat:
    """An int literal, bound to ``name``."""
    return Pat(IntLit, name=name, where=where)


def Bin(op, lhs: Pat | None = None, rhs: Pat | None = None, **kw) -> Pat:
    return Pat(Binary, op, None if lhs is None else (lhs, rhs), **kw)


def Un(op, operand: Pat | None = None, **kw) -> Pat:
    return Pat(Unary, op, None if operand is None else (operand,), **kw)


def Fn(fn, *args: Pat, **kw) -> Pat:
    return Pat(Call, fn, args or None, **kw)


ANY = Pat()
X, Y, A, B, C = V("x"), V("y"), V("a"), V("b"), V("c")
ZERO, ONE = Pat(IntLit, value=0), Pat(IntLit, value=1)
TRUE, FALSE = Pat(BoolLit, value=True), Pat(BoolLit, value=False)


# ---- constant folding ------------------------------------------------------------------------

def _lit(value, span=None) -> Node:
    if isinstance(value, bool):
        return BoolLit(value, span=span)
    if isinstance(value, int):
        return IntLit(value, span=span)
    return RealLit(float(value), span=span)


def _is_lit(node: Node) -> bool:
    return isinstance(node, (BoolLit, IntLit, RealLit))


def _floordiv(a, b):
    return a // b if isinstance(a, int) and isinstance(b, int) else math.floor(a / b)


_BINARY = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": lambda a, b: a / b,
    "//": _floordiv, "%": lambda a, b: a - _floordiv(a, b) * b, "**": lambda a, b: float(a) ** b,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
}


def _as_float32(x) -> float:
    """``x`` rounded to float32, as the kernels see a real (an int promotes the same way)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _of_float32(fn):
    """``fn`` folded only for an argument that is a float32 value: sin/cos of a large real
    depend on its last bits (``sin(16777217)`` is ``sin(16777216.0)`` in float32), so an
    argument the kernels would round first (or an infinite one, ``math.sin`` raises) is
    left unfolded."""
    def fold(x):
        if _as_float32(x) != x:
            raise ValueError("not a float32 value")
        return fn(x)
    return fold


_UNARY_FN = {
    "abs": abs, "exp": math.exp, "exp2": lambda x: 2.0 ** x, "log": math.log, "log2": math.log2,
    "sqrt": math.sqrt, "tanh": math.tanh, "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)),
    "floor": math.floor, "ceil": math.ceil, "sign": lambda x: (x > 0) - (x < 0),
    "sin": _of_float32(math.sin), "cos": _of_float32(math.cos),
}


def fold_constant(node: Node) -> Node | None:
    """Evaluate an operation whose operands are all literals (kept when the result would be
    NaN, out of int32 range, or a Python error such as division by zero; ``sin``/``cos`` also
    of an argument that is no float32 value, see ``_of_float32``)."""
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
                elif node.fn in ("exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid", "sin", "cos"):
                    result = float(result)
                if result is None:
                    return None
            if node.fn in ("min", "max", "clip") and any(isinstance(v, float) for v in vals):
                result = float(result)
        else:
            return None
    except (ArithmeticError, ValueError):
        return None
    if isinstance(result, complex):   # (-1) ** 0.5: not a real
        return None
    if isinstance(result, float) and (math.isnan(result) or (math.isfinite(result) and abs(result) > _FLOAT32_MAX)):
        return None   # NaN, or a literal float32 cannot hold (it would not parse back)
    if isinstance(result, int) and not isinstance(result, bool) and not INT32_MIN <= result <= INT32_MAX:
        return None
    return _lit(result, node.span)


# ---- predicates ------------------------------------------------------------------------------

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


def _isop(n: Node, op: str) -> bool:
    return isinstance(n, Binary) and n.op == op


def _not_bool(n: Node) -> bool:
    return not _bool_typed(n)


def _positive(n: IntLit) -> bool:
    return n.value > 0


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


# ---- helpers for the rules -------------------------------------------------------------------

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


def _plus_const(x: Node, c: int, span) -> Node:
    """``x + c`` without negative literals (``x - 3``, not ``x + -3``; ``x`` for 0)."""
    if c == 0:
        return x
    return Binary("+", x, IntLit(c), span=span) if c > 0 else Binary("-", x, IntLit(-c), span=span)


def _reassociate(n: Binary, i: Binary, x: Node, a: IntLit, b: IntLit) -> Node | None:
    """``n = i ± b`` with ``i = x ± a`` -> ``x + c`` (None when c leaves int32)."""
    c = (a.value if i.op == "+" else -a.value) + (b.value if n.op == "+" else -b.value)
    if not INT32_MIN < c <= INT32_MAX:   # x - 2147483648 would print a literal past int32
        return None
    return _plus_const(x, c, n.span)


def _power_of_two(k: int) -> bool:
    return k > 0 and k & (k - 1) == 0


def _scales_exactly(m: Binary, a: int, divisor: int) -> bool:
    """Whether the int ``m = a * x`` can be divided by ``divisor`` (a divisor of ``a``, or a
    multiple of it) in another order without changing a kernel's float32 result: ``m`` never
    wraps int32 (``int_range``; e.g. alibi's ``-8 * (h + 1)``: heads are bounded), and either
    ``|m| <= 2**24`` (every int involved is a float32 value) or the factor moved is a power of
    two (scaling by it is exact in float32)."""
    # Deferred: intervals imports NumPy, and `import scoremod` stays light.
    from scoremod.compiler.intervals import int_range
    bounds = int_range(m)
    if bounds is None:
        return False
    return max(-bounds[0], bounds[1]) <= 1 << 24 or _power_of_two(divisor)


def _signed(x: Node, sign: int, span) -> Node:
    return x if sign > 0 else Unary("-", x, span=span)


def _divide_by_factor(n: Binary, m: Binary, a: IntLit, x: Node, b: IntLit) -> Node | None:
    """``(a * x) / b`` -> ``x / (b / a)`` (``-x`` for a negative ``a``) when ``a`` divides
    ``b`` (b > |a|) and that is exact (``_scales_exactly``)."""
    k = abs(a.value)
    if k == 0 or b.value <= k or b.value % k or not _scales_exactly(m, a.value, k):
        return None
    return Binary("/", _signed(x, a.value, m.span), IntLit(b.value // k), span=n.span)


def _fold_quotient(f: Call, m: Binary, a: IntLit, x: Node, b: IntLit) -> Node | None:
    """``f((a * x) / b)`` -> ``f(a / b * x)`` for a real function ``f`` (its int argument is
    promoted to the same float32 value) when ``b`` divides ``a`` and that is exact
    (``_scales_exactly``): alibi(8)'s ``exp2(-8 * (h + 1) / 8)`` is ``exp2(-(h + 1))``."""
    if a.value % b.value or not _scales_exactly(m, a.value, b.value):
        return None
    k = a.value // b.value
    arg = _signed(x, k, m.span) if abs(k) == 1 else Binary("*", IntLit(k), x, span=m.span)
    return Call(f.fn, (arg,), span=f.span)


def linear_form(node: Node) -> tuple[dict, int] | None:
    """A pure-int expression as ({atom: coefficient}, constant); non-linear parts
    (``abs(q - kv)``, ``q // 64``) are atoms. None when not pure int."""
    done: list[tuple[dict, int]] = []  # forms of finished operands, in post-order
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        n, operands_done = stack.pop()
        if isinstance(n, Binary) and n.op in ("+", "-"):
            if not operands_done:
                stack += ((n, True), (n.rhs, False), (n.lhs, False))
                continue
            b, a = done.pop(), done.pop()
            sign = 1 if n.op == "+" else -1
            terms = dict(a[0])
            for atom, c in b[0].items():
                terms[atom] = terms.get(atom, 0) + sign * c
            done.append(({k: v for k, v in terms.items() if v}, a[1] + sign * b[1]))
        elif isinstance(n, Unary) and n.op == "-":
            if not operands_done:
                stack += ((n, True), (n.operand, False))
                continue
            a = done.pop()
            done.append(({k: -v for k, v in a[0].items()}, -a[1]))
        elif _isop(n, "*") and (isinstance(n.lhs, IntLit) or isinstance(n.rhs, IntLit)):
            k, x = (n.lhs.value, n.rhs) if isinstance(n.lhs, IntLit) else (n.rhs.value, n.lhs)
            if not operands_done:
                stack += ((n, True), (x, False))
                continue
            a = done.pop()
            done.append(({t: k * v for t, v in a[0].items() if k * v}, k * a[1]))
        elif isinstance(n, IntLit):
            done.append(({}, n.value))
        elif _pure_int(n):
            done.append(({n: 1}, 0))
        else:
            return None  # one operand is not pure int: neither is the whole
    return done[0]


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


# x // c == y // c with a positive literal c and pure-int x, y
_SAME_QUOTIENT = Bin("==", Bin("//", V("x", _pure_int), Int("c", _positive)),
                     Bin("//", V("y", _pure_int), V("c")))
# x % d == 0 with a positive literal d and pure-int x
_ZERO_RESIDUE = Bin("==", Bin("%", V("x", _pure_int), Int("d", _positive)), ZERO)


# Facts kept per IR node seen by the rewriter (small tuples; nodes of the mods in use).
FACTS_CACHE = 4096


@lru_cache(maxsize=FACTS_CACHE)
def _facts(n: Node) -> tuple:
    """What the merging rules know of a mask: (bound, same quotient, zero residue), with
    same quotient ``(x, y, c)`` and zero residue ``(x, d)`` as in the patterns above."""
    same = _SAME_QUOTIENT.match(n)
    zero = _ZERO_RESIDUE.match(n)
    bound = linear_bound(n)
    # Equal forms and expressions become one object (_interned): comparing them is then O(1).
    if bound is not None:
        bound = (_interned(bound[0]),) + bound[1:]
    return (bound, same and (_interned(same["x"]), _interned(same["y"]), same["c"].value),
            zero and (_interned(zero["x"]), zero["d"].value))


@lru_cache(maxsize=FACTS_CACHE)
def _interned(value):
    """The first object equal to ``value`` seen (while it stays in the cache)."""
    return value


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


# ---- merging whole chains --------------------------------------------------------------------
# ``merge_conjunction`` and ``merge_disjunction`` compare the parts of a chain pairwise. Rules
# run bottom-up, so at ``n = lhs op rhs`` a side that is itself an ``op`` node was merged
# already (had two of its parts interacted, one would be gone): only pairs across the sides,
# and pairs within a side that is no ``op`` node (one part, or a ``+`` chain of masks), need
# comparing. Of those, only pairs that can interact are looked at: a part publishes and
# probes keys (``_part_keys``), two parts can interact only when one probes a key the other
# publishes, and a chain's parts sit in a ``_ChainIndex`` by key. A merged chain node keeps
# its index (``_CHAIN_VIEWS``), so ``chain & part`` finds the part's partners with a few
# dict lookups: a chain of n parts merges in O(n) lookups, not O(n^2) comparisons.

# The parts one chain flattens over, and the nested chains a part of it can absorb.
_FLATTENS = {"&": ("&", "+"), "|": ("|",)}
_NESTED = {"&": ("|",), "|": ("&", "+")}
# Key kinds that every part probing them also publishes (see ``_part_keys``).
_SYMMETRIC = frozenset({"form", "point", "quotient", "residue"})
# Key kinds whose parts interact only when one's number divides the other's: where the number
# sits in the facts (``_facts``: the quotient's c, the residue's d).
_DIVIDING = {"quotient": (1, 2), "residue": (2, 1)}


class _ChainIndex:
    """The parts of a chain of ``op``, in order, by the keys they publish and probe.

    ``published[key]`` / ``probed[key]``: the positions (ascending) of the parts that publish /
    probe ``key``. Parts are only appended: a chain node is a view ``(index, count)``, its
    first ``count`` parts, and a chain built on a merged prefix extends the prefix's index
    (a copy of it when another chain extended it first).
    """

    def __init__(self, op: str):
        self.op = op
        self.parts: list[Node] = []
        self.infos: list[tuple] = []   # per part: (facts, published keys, probed keys)
        self.published: dict[tuple, list[int]] = {}
        self.probed: dict[tuple, list[int]] = {}

    def append(self, part: Node, info: tuple) -> None:
        """Add ``part`` (with its ``_part_keys``) at the end."""
        position = len(self.parts)
        self.parts.append(part)
        self.infos.append(info)
        for table, keys in ((self.published, info[1]), (self.probed, info[2])):
            for key in keys:
                table.setdefault(key, []).append(position)

    def partners(self, info: tuple, below: int) -> set[int]:
        """Positions under ``below`` of the parts that can interact with a part with ``info``."""
        found = set()
        # Parts probing a key of a symmetric kind also publish it: found by the first lookup.
        for table, keys, skip in ((self.published, info[2], ()), (self.probed, info[1], _SYMMETRIC)):
            for key in keys:
                if key[0] in skip:
                    continue
                positions = table.get(key, ())
                if key[0] in _DIVIDING:
                    found.update(self._dividing(key[0], info, positions, below))
                    continue
                for position in positions:
                    if position >= below:
                        break
                    found.add(position)
        return found

    def _dividing(self, kind: str, info: tuple, positions: list[int], below: int):
        """Of ``positions`` under ``below``, those whose number (chunk size, dilation) divides
        the number of the part with ``info`` or is divided by it (else neither implies the
        other: a long chain of chunks or dilations is compared only where it matters)."""
        fact, place = _DIVIDING[kind]
        k = info[0][fact][place]
        infos = self.infos
        for position in positions:
            if position >= below:
                break
            m = infos[position][0][fact][place]
            if m % k == 0 or k % m == 0:
                yield position

    def prefix(self, count: int) -> "_ChainIndex":
        """A new index of the first ``count`` parts."""
        copy = _ChainIndex(self.op)
        for part, info in zip(self.parts[:count], self.infos[:count]):
            copy.append(part, info)
        return copy


@lru_cache(maxsize=FACTS_CACHE)
def _part_keys(part: Node, op: str) -> tuple:
    """(facts, published keys, probed keys) of ``part`` in a chain of ``op``. Two parts can
    interact (be equal, one the other's negation, one a nested chain holding the other; bounds
    on one form, quotients of one pair, residues of one expression) only when one probes a key
    the other publishes. In a chain of ``|`` a point (``kv - q == 3``) meets only an equal
    point or a range on its form, so a long chain of points finds each part's partners at once;
    in a chain of ``&`` any two bounds on one form may be disjoint."""
    facts = _facts(part)
    bound, quotient, residue = facts
    published, probed = [("is", part)], [("is", part)]
    if isinstance(part, Unary) and part.op == "~":
        probed.append(("is", part.operand))
    if isinstance(part, Binary) and part.op in _NESTED[op]:
        probed += [("is", member) for member in _bool_chain(part, _NESTED[op])]
    if bound is not None:
        form, lo, hi = bound
        if op == "&":
            published.append(("form", form))
            probed.append(("form", form))
        elif lo is not None and lo == hi:
            published += [("point", form, lo), ("points", form)]
            probed += [("point", form, lo), ("ranges", form)]
        else:
            published.append(("ranges", form))
            probed += [("ranges", form), ("points", form)]
    if quotient:
        published.append(("quotient",) + quotient[:2])
        probed.append(("quotient",) + quotient[:2])
    if residue:
        published.append(("residue", residue[0]))
        probed.append(("residue", residue[0]))
    return facts, tuple(published), tuple(probed)


# Merged chain nodes, by id: (node, its view (index, count)), or (node, _NOT_A_MASK) for a
# conjunction that is no mask; the oldest go first. By identity, not value: telling two big
# equal trees apart walks them. An entry holds its node (so the id stays its own) and its
# chain's index (shared by the chain's nodes).
CHAIN_VIEWS_CACHE = 4096
_CHAIN_VIEWS: dict[int, tuple[Node, tuple]] = {}
_NOT_A_MASK = (None, 0)
_CHAIN_VIEWS_LOCK = threading.Lock()   # indexes are extended in place


def _remember(node: Node, view: tuple) -> None:
    if len(_CHAIN_VIEWS) >= CHAIN_VIEWS_CACHE:
        del _CHAIN_VIEWS[next(iter(_CHAIN_VIEWS))]
    _CHAIN_VIEWS[id(node)] = (node, view)


def _view(node: Node) -> tuple | None:
    """The remembered view of the merged chain ``node``, if any."""
    hit = _CHAIN_VIEWS.get(id(node))
    return hit[1] if hit is not None and hit[0] is node else None


def _is_mask_operand(x: Node) -> bool:
    """Whether ``x`` types as a mask as an operand of ``&`` (a tensor read there is one)."""
    return _bool_typed(Binary("&", x, BoolLit(True)))


def _chain_pairs(n: Binary, op: str) -> tuple[_ChainIndex, int, list[tuple[int, int]]] | None:
    """The chain under ``n`` as (index, count of its parts, the pairs (i, j), i < j, that
    need comparing and can interact); None for a conjunction that is no mask (merging leaves
    those alone)."""
    lhs_done = _isop(n.lhs, op)
    view = _view(n.lhs) if lhs_done else None
    if op == "&" and (view is _NOT_A_MASK or not _is_mask_operand(n.rhs) or
                      (view is None and not _is_mask_operand(n.lhs))):
        _remember(n, _NOT_A_MASK)
        return None
    pairs: list[tuple[int, int]] = []
    if view is not None:
        index, left = view
    else:
        index, left = _ChainIndex(op), 0
        for part in _bool_chain(n.lhs, _FLATTENS[op]):
            info = _part_keys(part, op)
            if not lhs_done:
                pairs += [(j, left) for j in index.partners(info, left)]
            index.append(part, info)
            left += 1
    rhs_done = _isop(n.rhs, op)
    rhs_parts = _bool_chain(n.rhs, _FLATTENS[op])
    extend = len(index.parts) == left
    if not extend and (len(index.parts) < left + len(rhs_parts) or
                       any(a is not b for a, b in zip(index.parts[left:], rhs_parts))):
        index, extend = index.prefix(left), True
    for position, part in enumerate(rhs_parts, start=left):
        info = _part_keys(part, op)
        pairs += [(j, position) for j in index.partners(info, left if rhs_done else position)]
        if extend:
            index.append(part, info)
    return index, left + len(rhs_parts), pairs


def merge_conjunction(n: Binary) -> Node | None:
    """One pass over the ``&`` (and ``+``) chain of masks under ``n``: drop duplicates, implied
    parts, absorbed disjunctions (``a & (a | b)``); ``a & ~a`` or disjoint bounds -> false."""
    with _CHAIN_VIEWS_LOCK:
        if _view(n) is not None:
            return None
        chain = _chain_pairs(n, "&")
        if chain is None:
            return None
        dropped = _dropped(*chain)
        if dropped is None:
            return BoolLit(False, span=n.span)
        return _without(n, chain[0], chain[1], dropped)


def merge_disjunction(n: Binary) -> Node | None:
    """One pass over the ``|`` chain under ``n``: drop duplicates, parts implying another part,
    absorbed conjunctions (``a | (a & b)``); ``a | ~a`` or bounds covering everything -> true."""
    with _CHAIN_VIEWS_LOCK:
        if _view(n) is not None:
            return None
        chain = _chain_pairs(n, "|")
        dropped = _dropped(*chain)
        if dropped is None:
            return BoolLit(True, span=n.span)
        return _without(n, chain[0], chain[1], dropped)


def conjunction(parts: list[Node]) -> Node:
    """``parts`` joined by ``&`` left to right (``true`` for none), merged as the ``bounds``
    rules merge that chain, to the same result, in one pass: each part is compared with the
    parts kept before it, and the chain is built once (the rules, which rewrite the chain node
    by node, rebuild it above every part they drop). ``simplify`` of the result finds it
    merged already. ``parts``: in normal form, none of them ``true``."""
    if len(parts) < 2 or not all(_is_mask_operand(p) for p in parts):
        out = parts[0] if parts else BoolLit(True)
        for p in parts[1:]:
            out = Binary("&", out, p)
        return out
    return _merge_chain("&", parts)


def _merge_chain(op: str, parts: list[Node], span=None) -> Node:
    """``parts`` (two or more, in normal form, no chain of ``op`` and no literal among them;
    for ``&`` masks) joined by ``op`` left to right and merged in one pass, as the ``bounds``
    rules merge that chain node by node: ``conjunction``, and the rewriter's merge of a chain
    nested in an expression (``_Run._merged``). The root gets ``span``."""
    with _CHAIN_VIEWS_LOCK:
        index, gone = _ChainIndex(op), set()
        for position, part in enumerate(parts):
            info = _part_keys(part, op)
            pairs = [(j, position) for j in index.partners(info, position) if j not in gone]
            index.append(part, info)
            dropped = _dropped(index, position + 1, pairs)
            if dropped is None:
                return BoolLit(op == "|", span=span)
            gone |= dropped
        kept = _kept(index, len(parts), gone)
        out = kept.parts[0]
        for p in kept.parts[1:]:
            out = Binary(op, out, p)
        if len(kept.parts) > 1 and span is not None:
            out = Binary(op, out.lhs, out.rhs, span=span)
        _remember_spine(out, kept)
        return out


def _dropped(index: _ChainIndex, count: int, pairs: list[tuple[int, int]]) -> set[int] | None:
    """The positions of the parts to drop from the chain of ``index.op`` whose parts are the
    first ``count`` of ``index``, comparing the ``pairs`` (i < j) that can interact; None when
    the chain is ``false`` (``&``: a ``false`` part, ``a & ~a``, disjoint bounds) or ``true``
    (``|``: ``a | ~a``, bounds covering every int)."""
    parts, infos = index.parts, index.infos
    if index.op == "&":
        false_at = index.published.get(("is", BoolLit(False)), ())
        if (false_at and false_at[0] < count) or any(
                _is_not(parts[i], parts[j]) or _disjoint(infos[i][0][0], infos[j][0][0]) for i, j in pairs):
            return None

        def redundant(i, j):  # part i adds nothing to part j
            a, b = parts[i], parts[j]
            return _implies(infos[j][0], infos[i][0]) or (_isop(a, "|") and b in _bool_chain(a, ("|",)))
    else:
        if any(_is_not(parts[i], parts[j]) or _cover(infos[i][0][0], infos[j][0][0]) for i, j in pairs):
            return None

        def redundant(i, j):  # part i adds nothing to part j
            a, b = parts[i], parts[j]
            return _implies(infos[i][0], infos[j][0]) or (
                isinstance(a, Binary) and a.op in ("&", "+") and b in _bool_chain(a, ("&", "+")))
    return _keep_strongest(parts, pairs, redundant)


def _without(n: Binary, index: _ChainIndex, count: int, dropped: set[int]) -> Node | None:
    """The chain under ``n`` (its parts the first ``count`` of ``index``) without the
    ``dropped`` parts: None when none is (``n`` is then remembered as merged)."""
    if not dropped:
        _remember(n, (index, count))
        return None
    op = index.op
    out = _rechain(op, _FLATTENS[op], n, index.parts[:count], [i in dropped for i in range(count)])
    _remember_spine(out, _kept(index, count, dropped))
    return out


def _kept(index: _ChainIndex, count: int, dropped: set[int]) -> _ChainIndex:
    """A new index of the first ``count`` parts of ``index`` but the ``dropped`` ones."""
    kept = _ChainIndex(index.op)
    for i in range(count):
        if i not in dropped:
            kept.append(index.parts[i], index.infos[i])
    return kept


def _remember_spine(node: Node, kept: _ChainIndex) -> None:
    """Remember the chain ``node`` of the parts of ``kept``, joined left to right, and its
    left spine (down to a node remembered already) as merged. Sound: the parts kept passed
    every comparison merging would make between them (against the other side's kept parts
    at the merge that kept them, within a side before), so merging them again drops nothing."""
    count = len(kept.parts)
    while count >= 2 and isinstance(node, Binary) and node.op == kept.op and _view(node) is None:
        _remember(node, (kept, count))
        node, count = node.lhs, count - 1


def _rechain(op: str, ops: tuple[str, ...], n: Binary, parts: list[Node], dropped: list[bool]) -> Node:
    """The chain under ``n`` without its dropped parts, joined with ``op``; the root keeps
    ``n``'s span. The parts before the first dropped one are kept as the very node of ``n``
    that holds them when there is one (a left-deep prefix joined with ``op`` only), so the
    rewriter finds it already in normal form instead of rewriting a copy of it."""
    first = dropped.index(True)
    node, count = n, len(parts)
    while count > first and isinstance(node, Binary) and node.op in ops:
        right = len(_bool_chain(node.rhs, ops))
        if count - right < first:
            break
        node, count = node.lhs, count - right
    prefix = None
    if first > 0 and count == first and _spine_is(node, op, ops, first):
        prefix = node
    rest = [p for i, p in enumerate(parts) if not dropped[i] and (prefix is None or i >= first)]
    out = prefix
    for p in rest:
        out = p if out is None else Binary(op, out, p)
    if isinstance(out, Binary) and out is not prefix:
        return Binary(out.op, out.lhs, out.rhs, span=n.span)
    return out


def _spine_is(node: Node, op: str, ops: tuple[str, ...], count: int) -> bool:
    """Whether ``node`` is ``count`` parts (nodes that are no ``ops`` chain) joined left to
    right by ``op`` alone: what rebuilding them would make, so reusing it changes nothing."""
    def is_chain(x):
        return isinstance(x, Binary) and x.op in ops
    for _ in range(count - 1):
        if not (isinstance(node, Binary) and node.op == op) or is_chain(node.rhs):
            return False
        node = node.lhs
    return not is_chain(node)


def _keep_strongest(parts: list[Node], pairs: list[tuple[int, int]], redundant) -> set[int]:
    """The positions of the parts to drop: each part made redundant by another kept part
    (``redundant(i, j)``: part i adds nothing to part j); of equal or equivalent parts the
    first stays. Only ``pairs`` (i < j) are compared: parts in no pair are kept."""
    partners: dict[int, list[int]] = {}
    for i, j in pairs:
        partners.setdefault(i, []).append(j)
        partners.setdefault(j, []).append(i)
    dropped: set[int] = set()
    for i in sorted(partners):
        for j in sorted(partners[i]):
            if j in dropped:
                continue
            if parts[i] == parts[j]:
                if j < i:
                    dropped.add(i)
                    break
                continue
            if redundant(i, j) and not (redundant(j, i) and j > i):
                dropped.add(i)
                break
    return dropped


# ---- rule sets -------------------------------------------------------------------------------
# Every rule returns a strictly smaller tree (fewer nodes) than the one it matched: this is
# what makes ``simplify`` terminate (see there). A new rule must keep to that;
# tests/test_rewrite.py (test_every_rule_shrinks_the_tree) checks it on generated sources.

FOLD = [
    (V("node"), fold_constant),  # op(literals) -> literal
]

_ADD_SUB = ("+", "-")

# Functions of a real whose result stays real for an int argument (promoted, same value).
_REAL_FUNCTIONS = ("exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid", "sin", "cos")

ARITHMETIC = [
    (Bin("+", V("x", _not_bool), ZERO), lambda x: x),  # x + 0 -> x
    (Bin("+", ZERO, V("x", _not_bool)), lambda x: x),  # 0 + x -> x
    (Bin("-", X, ZERO), lambda x: x),  # x - 0 -> x
    (Bin("*", X, ONE), lambda x: x),  # x * 1 -> x
    (Bin("*", ONE, X), lambda x: x),  # 1 * x -> x
    (Bin("-", V("x", _int_typed), X, name="n"), lambda n, x: IntLit(0, span=n.span)),  # x - x -> 0 (ints)
    (Un("-", Un("-", X)), lambda x: x),  # --x -> x
    (Bin("+", V("x", _numeric), Un("-", Y), name="n"),
     lambda n, x, y: Binary("-", x, y, span=n.span)),  # x + -y -> x - y (x a number, not a chain with masks)
    (Bin("*", V("x", _pure_int), ZERO, name="n"), lambda n, x: IntLit(0, span=n.span)),  # x * 0 -> 0 (ints)
    (Bin("*", ZERO, V("x", _pure_int), name="n"), lambda n, x: IntLit(0, span=n.span)),  # 0 * x -> 0 (ints)
    (Bin("//", V("x", _pure_int), ONE), lambda x: x),  # x // 1 -> x (ints)
    (Bin("%", V("x", _pure_int), ONE, name="n"), lambda n, x: IntLit(0, span=n.span)),  # x % 1 -> 0 (ints)
    (Bin(_ADD_SUB, Bin(_ADD_SUB, V("x", _pure_int), Int("a"), name="i"), Int("b"), name="n"),
     _reassociate),  # (x + a) + b -> x + (a + b); (x - a) + b -> x + (b - a) (int literals, pure-int x)
    (Un("-", Bin("-", A, B, where=_pure_int), name="n"),
     lambda n, a, b: Binary("-", b, a, span=n.span)),  # -(a - b) -> b - a (ints)
    (Fn("abs", Un("-", X), name="n"), lambda n, x: Call("abs", (x,), span=n.span)),  # abs(-x) -> abs(x)
    (Fn("abs", Fn("abs", name="a")), lambda a: a),  # abs(abs(x)) -> abs(x)
    (Fn(("min", "max"), X, X), lambda x: x),  # min(x, x) -> x, max(x, x) -> x
    (Bin("/", Bin("*", Int("a"), V("x", _int_typed), name="m"), Int("b", _positive), name="n"),
     _divide_by_factor),  # (a * x) / b -> x / (b / a) when a | b (ints, exact: see _scales_exactly)
    (Fn(_REAL_FUNCTIONS, Bin("/", Bin("*", Int("a"), V("x", _int_typed), name="m"), Int("b", _positive)), name="f"),
     _fold_quotient),  # f((a * x) / b) -> f(a / b * x) when b | a, f real (exp2, ...; exact: see _scales_exactly)
]

_NEGATED = {"<": ">=", ">=": "<", ">": "<=", "<=": ">", "==": "!=", "!=": "=="}

LOGIC = [
    (Bin("&", TRUE, V("x", _bool_typed)), lambda x: x),  # true & x -> x
    (Bin("&", V("x", _bool_typed), TRUE), lambda x: x),  # x & true -> x
    (Bin("&", ANY, FALSE, commute=True, name="n", where=_bool_typed),
     lambda n: BoolLit(False, span=n.span)),  # x & false -> false
    (Bin("|", ANY, TRUE, commute=True, name="n"), lambda n: BoolLit(True, span=n.span)),  # x | true -> true
    (Bin("|", FALSE, X), lambda x: x),  # false | x -> x
    (Bin("|", X, FALSE), lambda x: x),  # x | false -> x
    (Bin("&", V("x", _bool_typed), X), lambda x: x),  # x & x -> x
    (Bin("|", X, X), lambda x: x),  # x | x -> x
    (Un("~", Un("~", X)), lambda x: x),  # ~~x -> x
    (Un("~", Bin(tuple(_NEGATED), V("a", _pure_int), V("b", _pure_int), name="c"), name="n"),
     lambda n, c, a, b: Binary(_NEGATED[c.op], a, b, span=n.span)),  # ~(a < b) -> a >= b (ints: no NaN)
    (Fn("where", TRUE, A, B), lambda a, b: a),  # where(true, a, b) -> a
    (Fn("where", FALSE, A, B), lambda a, b: b),  # where(false, a, b) -> b
    (Fn("where", ANY, A, A), lambda a: a),  # where(c, a, a) -> a
    (Fn("where", C, TRUE, FALSE), lambda c: c),  # where(c, true, false) -> c
    (Fn("where", C, FALSE, TRUE, name="n"),
     lambda n, c: Unary("~", c, span=n.span)),  # where(c, false, true) -> ~c
    (Bin(COMPARE_OPS, V("x", _pure_int), X, name="n"),
     lambda n, x: BoolLit(n.op in ("<=", ">=", "=="), span=n.span)),  # x <= x -> true, x < x -> false (ints)
]

# a & b -> a when a implies b: a tighter bound on one linear form, a finer chunk, a multiple
# dilation; a & (a | c) -> a; a & ~a -> false; disjoint bounds -> false.
# a | b -> b when a implies b; a | (a & c) -> a; a | ~a -> true; bounds covering every int -> true.
BOUNDS = [
    (Bin("&", name="n"), merge_conjunction),  # a & b -> a when a implies b, ... (see above)
    (Bin("|", name="n"), merge_disjunction),  # a | b -> b when a implies b, ... (see above)
]

RULE_SETS: dict[str, list] = {
    "fold": FOLD,
    "arithmetic": ARITHMETIC,
    "logic": LOGIC,
    "bounds": BOUNDS,
}


# ---- the rewriter ----------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _rules_by_key(names: tuple[str, ...]) -> tuple[dict, list]:
    """({node key: rules that may fire on it, in table order}, the rules for any other key).
    A rule is ``(match, rhs, label)``: its pattern compiled (the root's class and op are
    the key's), and a label naming it for errors."""
    ordered = [(p.keys(), _compile(p, root_known=p.keys() is not None), rhs,
                f"RULE_SETS[{name!r}][{i}], {pat!r}")
               for name in names for i, (pat, rhs) in enumerate(RULE_SETS[name]) for p in pat.variants()]
    keys = {k for r in ordered for k in r[0] or ()}
    by_key = {k: [r[1:] for r in ordered if r[0] is None or k in r[0]] for k in keys}
    return by_key, [r[1:] for r in ordered if r[0] is None]



def _tree_size(root: Node) -> int:
    """Nodes in ``root`` counted as a tree (a shared subtree once per use)."""
    sizes: dict[int, int] = {}
    stack = [root]
    while stack:
        n = stack[-1]
        if id(n) in sizes:
            stack.pop()
            continue
        kids = n.children()
        missing = [k for k in kids if id(k) not in sizes]
        if missing:
            stack += missing
            continue
        sizes[id(n)] = 1 + sum(sizes[id(k)] for k in kids)
        stack.pop()
    return sizes[id(root)]


_CHAINS = ("&", "|")


class _Run:
    """One ``simplify`` call: the rules, the memo and the count of rewrites so far."""

    def __init__(self, root: Node, names: tuple[str, ...]):
        self.root, self.names = root, names
        self.by_key, self.any_key = _rules_by_key(names)
        # ``memo`` maps ``id(node)`` to (node, normal form), so unchanged subtrees are never
        # rewritten twice (nodes are immutable; holding the node keeps its id unique).
        self.memo: dict[int, tuple[Node, Node]] = {}
        # Past ``limit`` rewrites, ``_over_limit`` counts the nodes (rarely worth it before).
        self.rewrites, self.limit = 0, 10_000
        # Chain nodes (by id, held) that the rules rewrite one at a time: merged in one pass
        # already, or not a chain ``_merged`` can merge.
        self.by_rules: dict[int, Node] = {}
        # Chains are merged in one pass only where the rules are all of them, in table order
        # (what ``_merged`` stands in for: fold, logic, then bounds on an ``&`` or ``|``).
        self.chains = names == tuple(RULE_SETS)

    def normal_form(self, root: Node) -> Node:
        """Rewrite the children, then the first rule that applies here, then the result again:
        post-order with an explicit stack. A frame ``(node, None)`` asks for ``node``'s normal
        form; ``(node, out)`` waits for that of ``out``, which a rule rewrote ``node`` to.
        Leaves are their own normal forms (no rule applies to a leaf)."""
        memo = self.memo
        stack: list[tuple[Node, Node | None]] = [(root, None)]
        while stack:
            node, out = stack[-1]
            if out is not None:
                result = memo[id(out)][1]
            else:
                hit = memo.get(id(node))
                if hit is not None and hit[0] is node:  # a shared subtree, done meanwhile
                    stack.pop()
                    continue
                kids = node.children()
                result = node
                chain = self.chains and type(node) is Binary and node.op in _CHAINS
                parts = self._chain_parts(node) if chain else None
                if parts is not None:
                    todo = [(k, None) for k in parts
                            if not ((hit := memo.get(id(k))) is not None and hit[0] is k) and k.children()]
                    if todo:
                        stack += reversed(todo)
                        continue
                    normal = [memo[id(k)][1] if id(k) in memo and memo[id(k)][0] is k else k for k in parts]
                    out = self._merged(node, normal)
                    if out is None:   # not a chain merging alone settles: rule by rule
                        continue
                    result = self._settled(stack, node, out)
                    if result is None:
                        continue
                    kids = ()
                if kids:
                    new, todo = [], []
                    for k in kids:
                        hit = memo.get(id(k))
                        if hit is not None and hit[0] is k:
                            new.append(hit[1])
                        elif k.children():
                            todo.append((k, None))
                        else:
                            new.append(k)
                    if todo:
                        stack += reversed(todo)
                        continue
                    for a, b in zip(new, kids):
                        if a is not b:
                            result = with_children(node, new)
                            break
                    out = self.rewrite(result)
                    if out is not None:
                        result = self._settled(stack, node, out)
                        if result is None:
                            continue
            stack.pop()
            memo[id(node)] = (node, result)
            memo[id(result)] = (result, result)
        return memo[id(root)][1]

    def _settled(self, stack: list, node: Node, out: Node) -> Node | None:
        """What ``node`` rewrote to (``out``) comes to: its normal form when known (memo) or
        when it is a leaf; otherwise None, with ``out`` pushed to be normalized first (the
        top of ``stack`` becomes ``(node, out)``, to be finished when ``out`` is)."""
        hit = self.memo.get(id(out))
        if hit is not None and hit[0] is out:
            return hit[1]
        if not out.children():
            return out
        stack[-1] = (node, out)
        stack.append((out, None))
        return None

    def _chain_parts(self, node: Binary) -> list[Node] | None:
        """The parts of the chain of ``&`` or ``|`` at ``node`` when it may be merged in one
        pass (``_merged``): a left spine of that one op whose right operands are no chain of
        it (``_FLATTENS``), not merged already. Otherwise None, and the nodes of the spine down
        to the first that is no such chain node are left to the rules (the chain below it is
        tried on its own)."""
        if id(node) in self.by_rules or _view(node) is not None:
            return None
        op, flat = node.op, _FLATTENS[node.op]
        spine, parts, n = [], [], node
        while isinstance(n, Binary) and n.op in flat:
            spine.append(n)
            if n.op != op or (isinstance(n.rhs, Binary) and n.rhs.op in flat):
                self._by_rules(spine)
                return None
            parts.append(n.rhs)
            n = n.lhs
        parts.append(n)
        parts.reverse()
        return parts

    def _by_rules(self, spine) -> None:
        for n in spine:
            self.by_rules[id(n)] = n

    def _merged(self, node: Binary, parts: list[Node]) -> Node | None:
        """The chain ``node`` of ``parts`` (now in normal form) merged in one pass, as the
        ``bounds`` rules merge it node by node (which rebuild the chain above every part they
        drop: quadratic in a long chain, e.g. ``~(dilated(1) & ... & dilated(989))``), to the
        same result. None (and the chain is left to the rules) where other rules would act
        too: literal parts (but ``true`` in a chain of ``&`` of bool masks: dropped, as
        ``true & x -> x``), parts that are chains of ``op`` themselves, or a conjunction of
        non-masks."""
        op = node.op
        flat = _FLATTENS[op]
        ok = not any(isinstance(p, Binary) and p.op in flat for p in parts)
        if ok and any(isinstance(p, BoolLit) for p in parts):
            ok = op == "&" and all(isinstance(p, BoolLit) and p.value or
                                   (not isinstance(p, BoolLit) and _bool_typed(p)) for p in parts)
            parts = [p for p in parts if not isinstance(p, BoolLit)]
            ok = ok and len(parts) > 0
        if ok and op == "&":
            ok = all(_is_mask_operand(p) for p in parts)
        if not ok:
            n = node
            while isinstance(n, Binary) and n.op in flat:
                self.by_rules[id(n)] = n
                n = n.lhs
            return None
        out = parts[0] if len(parts) == 1 else _merge_chain(op, parts, node.span)
        n = out   # merged: the rules only check it
        while isinstance(n, Binary) and n.op == op:
            self.by_rules[id(n)] = n
            n = n.lhs
        return out

    def rewrite(self, node: Node) -> Node | None:
        """What the first rule that applies makes of ``node`` (its children in normal form)."""
        if isinstance(node, Binary):
            rules = self.by_key.get(node.op, self.any_key)
        elif isinstance(node, Call):
            rules = self.by_key.get(node.fn, self.any_key)
        elif isinstance(node, Unary):
            rules = self.by_key.get("u" + node.op, self.any_key)
        else:
            return None
        for match, rhs, label in rules:
            env = match(node)
            if env is None:
                continue
            out = rhs(**env)
            if out is not None and out != node:
                self.rewrites += 1
                if self.rewrites > self.limit:
                    self.limit = self._over_limit(label)
                return out
        return None

    def _over_limit(self, label: str) -> int:
        """Each rule shrinks the tree, so there are fewer rewrites than nodes in the input
        (counted as a tree): that bound as the new limit, or an internal error when the
        rewrites went past it (a rule that does not shrink: rules undoing each other, ...)."""
        bound = _tree_size(self.root)
        if self.rewrites > bound:
            raise RuntimeError(
                f"internal error: rule sets {list(self.names)} made {self.rewrites} rewrites of an "
                f"expression of {bound} nodes without reaching a fixpoint (last: {label}); "
                f"a rule does not shrink the tree: {to_source(self.root)[:200]}")
        return bound


def simplify(node: Node, rule_sets=None) -> Node:
    """Run the named rule sets (all by default) to a fixpoint.

    Terminates, with no limit on passes: every rule returns a smaller tree than it matched,
    so each rewrite takes at least one node off the whole tree, and there are fewer rewrites
    than ``node`` has nodes (counted as a tree). ``_Run`` still checks that bound and raises
    an internal error past it (a rule that broke the promise), so a result is never short of
    the fixpoint. One pass already reaches it (each result is rewritten again until no rule
    applies); the loop makes sure (a second pass finds everything in the memo).
    """
    names = tuple(RULE_SETS) if rule_sets is None else tuple(rule_sets)
    run = _Run(node, names)
    while True:
        out = run.normal_form(node)
        if out is node or out == node:
            return out
        node = out
