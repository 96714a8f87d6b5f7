"""Typing of expanded IR (docs/language.md, "3. Types").

Types: ``bool`` (a mask), ``int``, ``real``, and ``num`` (a tensor element: int or
real, decided by the tensor's dtype at call time). The top-level chain of ``+``/``&``
is where a mask may act as a ``-inf`` bias; anywhere else that is an error.

A tensor read in a **mask position** (an operand of ``&``, ``|`` or ``~``, or the
condition of ``where``) is a mask: it means ``read != 0`` (docs/language.md, "3. Types":
tensor reads as masks). ``check`` types it so; ``read_masks`` writes the ``!= 0`` into the
IR, so everything after typing (canonical form, lowering, interval analysis, export) sees
an ordinary comparison.
"""

from __future__ import annotations

from scoremod.errors import ScoreModTypeError
from scoremod.dsl.ast import (
    Binary, BoolLit, Call, IntLit, Node, RealLit, Tensor, Unary, Var, COMPARE_OPS, make_error, mentions, with_children,
)

__all__ = ["BOOL", "INT", "REAL", "NUM", "check", "type_of", "top_level_parts", "read_masks", "promote"]

BOOL, INT, REAL, NUM = "bool", "int", "real", "num"
# The range of int (docs/language.md, "8. Arithmetic"): literals, positions, ids, offsets.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Messages quote an expression of at most this many characters (longer ones are cut, "...").
_MAX_SNIPPET = 60


def promote(a: str, b: str) -> str:
    """The type of an arithmetic result of types ``a`` and ``b`` (real > num > int)."""
    if REAL in (a, b):
        return REAL
    if NUM in (a, b):
        return NUM
    return INT


def top_level_parts(node: Node) -> list[Node]:
    """Operands of the top-level chain of ``+`` and ``&`` (however bracketed)."""
    parts, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Binary) and n.op in ("+", "&"):
            stack.append(n.rhs)
            stack.append(n.lhs)
        else:
            parts.append(n)
    return parts


class _Checker:
    def __init__(self, text: str | None, root: Node | None = None):
        self.text = text
        self.root = root
        self.memo: dict[int, str] = {}
        self._from_bodies: set[int] | None = None

    def snippet(self, node: Node) -> str:
        """How the message names ``node``: its text in the source where it was written
        there, else (a node from a definition's body, which carries the call's span) its
        printed form."""
        if self.text is not None and node.span is not None and id(node) not in self.from_bodies():
            s = self.text[node.span[0]:node.span[1]]
            if len(s) <= _MAX_SNIPPET:
                return s
        s = str(node)
        return s if len(s) <= _MAX_SNIPPET else s[:_MAX_SNIPPET - 3] + "..."

    def from_bodies(self) -> set[int]:
        """Nodes whose parent has the same span: they were expanded from a definition's body."""
        if self._from_bodies is None:
            self._from_bodies = set()
            stack = [self.root] if self.root is not None else []
            while stack:
                n = stack.pop()
                for c in n.children():
                    if c.span is not None and c.span == n.span:
                        self._from_bodies.add(id(c))
                    stack.append(c)
        return self._from_bodies

    def error(self, message, node, hint=None):
        raise make_error(ScoreModTypeError, message, source=self.text, span=node.span, hint=hint)

    def top(self, node: Node) -> str:
        """Type of the whole expression, where masks may act as -inf biases."""
        return self._top(node)[0]

    def _top(self, node: Node) -> tuple[str, bool]:
        """(type, whether the chain under ``node`` has a mask part) of a top-level chain of
        ``+``/``&``. '&' needs a mask somewhere on one of its sides: ``softcap(30) & causal +
        alibi(8)`` means the same as ``(softcap(30) & causal) + alibi(8)`` (docs/language.md,
        "1. Meaning": the top-level chain, however it is bracketed), while
        ``alibi(8) & alibi(4)`` is a mistake for '+'."""
        if isinstance(node, Binary) and node.op in ("+", "&"):
            if node.op == "&":
                (a, ma), (b, mb) = self._top_and_operand(node.lhs), self._top_and_operand(node.rhs)
            else:
                (a, ma), (b, mb) = self._top(node.lhs), self._top(node.rhs)
            if a == BOOL and b == BOOL:
                return BOOL, True
            if node.op == "&" and not ma and not mb:
                ka, kb = _kind_word(node.lhs), _kind_word(node.rhs)
                kinds = ka if ka == kb else f"{ka} and {kb}"
                self.error(f"'&' needs a mask on at least one side; {self.snippet(node.lhs)} and "
                           f"{self.snippet(node.rhs)} are {kinds}", node, "add biases with '+'")
            if BOOL in (a, b):
                return REAL, True  # the mask reads as a bias: 0 where it holds, -inf elsewhere
            return promote(a, b), ma or mb
        t = self.inner(node)
        return t, t == BOOL

    def _top_and_operand(self, node: Node) -> tuple[str, bool]:
        """An operand of '&' in the top-level chain: a tensor read there is a mask."""
        if isinstance(node, Tensor):
            return self.mask(node, "'&'"), True
        return self._top(node)

    def inner(self, node: Node) -> str:
        key = id(node)
        if key not in self.memo:
            self.memo[key] = self._inner(node)
        return self.memo[key]

    def number(self, node: Node, what: str) -> str:
        t = self.inner(node)
        if t == BOOL:
            self.error(f"{what} needs numbers, but {self.snippet(node)} is a mask", node,
                       "to choose values by a mask use where(mask, a, b)")
        return t

    def mask(self, node: Node, what: str) -> str:
        """Type of ``node`` in a mask position: bool, or an error. A tensor read there is a
        mask (``read != 0``, see ``read_masks``)."""
        t = self.inner(node)
        if isinstance(node, Tensor):
            return BOOL
        if t != BOOL:
            self.error(f"{what} needs masks, but {self.snippet(node)} is a number", node,
                       f"compare it to make a mask, e.g. {self.snippet(node)} != 0")
        return t

    def _inner(self, node: Node) -> str:
        if isinstance(node, BoolLit):
            return BOOL
        if isinstance(node, IntLit):
            return INT
        if isinstance(node, RealLit):
            return REAL
        if isinstance(node, Var):
            return REAL if node.name == "score" else INT
        if isinstance(node, Tensor):
            for i in node.indices:
                t = self.inner(i)
                if t == BOOL:
                    self.error(f"index {self.snippet(i)} of '{node.name}' is a mask", i, "indices are ints")
                if t == REAL:
                    self.error(f"index {self.snippet(i)} of '{node.name}' is a real", i,
                               "indices are ints; round with floor(...)")
            return NUM
        if isinstance(node, Unary):
            if node.op == "~":
                try:
                    return self.mask(node.operand, "'~'")
                except ScoreModTypeError as exc:
                    raise self._not_precedence_hint(node, exc) from None
            return self.number(node.operand, "unary '-'")
        if isinstance(node, Binary):
            return self._binary(node)
        if isinstance(node, Call):
            return self._call(node)
        raise TypeError(f"unexpected node {type(node).__name__}")

    def _not_precedence_hint(self, node: Unary, exc: ScoreModTypeError) -> ScoreModTypeError:
        """``~a + b`` is ``~(a + b)``: when that is what went wrong, say so."""
        operand = node.operand
        if not (isinstance(operand, Binary) and operand.op == "+" and self.text and node.span and operand.span):
            return exc
        before = self.text[node.span[0] + 1:operand.span[0]].strip()
        after = self.text[operand.span[1]:].lstrip()[:1]
        if before == "(" and after == ")":  # ~(a + b), written as meant
            return exc
        return make_error(ScoreModTypeError, exc.message, source=exc.source, span=exc.span,
                          hint="'~' binds more loosely than '+': ~a + b means ~(a + b); write (~a) + b")

    def _binary(self, node: Binary) -> str:
        op = node.op
        if op in ("&", "+"):
            if op == "&":   # a tensor read under '&' is a mask (read != 0)
                a, b = (self.mask(x, "'&'") if isinstance(x, Tensor) else self.inner(x)
                        for x in (node.lhs, node.rhs))
            else:
                a, b = self.inner(node.lhs), self.inner(node.rhs)
            if a == BOOL and b == BOOL:
                return BOOL
            if BOOL in (a, b):
                m = node.lhs if a == BOOL else node.rhs
                read = f" (a tensor read under '&' means {self.snippet(m)} != 0)" if isinstance(m, Tensor) else ""
                self.error(f"{self.snippet(m)} is a mask{read}; a mask acts as a -inf bias only at the top level, "
                           f"not inside another expression", node,
                           "move it to the top level (mask & (...)), or use where(mask, a, b)")
            if op == "&":
                self.error(f"'&' needs a mask on at least one side; {self.snippet(node.lhs)} and "
                           f"{self.snippet(node.rhs)} are numbers", node, "add numbers with '+'")
            return promote(a, b)
        if op == "|":
            self.mask(node.lhs, "'|'")
            self.mask(node.rhs, "'|'")
            return BOOL
        if op in COMPARE_OPS:
            a, b = self.inner(node.lhs), self.inner(node.rhs)
            if (a == BOOL) != (b == BOOL):
                m = node.lhs if a == BOOL else node.rhs
                self.error(f"'{op}' compares a mask with a number ({self.snippet(m)} is a mask)", node,
                           "compare numbers with numbers; combine masks with & and |")
            if a == BOOL and op not in ("==", "!="):
                self.error(f"'{op}' needs numbers; masks can only be compared with == and !=", node,
                           "combine masks with &, | and ~")
            return BOOL
        a = self.number(node.lhs, f"'{op}'")
        b = self.number(node.rhs, f"'{op}'")
        if op in ("/", "//", "%") and isinstance(node.rhs, (IntLit, RealLit)) and node.rhs.value == 0:
            self.error(f"{self.snippet(node)} divides by zero", node,
                       "a literal divisor must not be 0 (a divisor that is a tensor may be: see docs/language.md, "
                       "\"8. Arithmetic\")")
        if op in ("/", "**"):
            return REAL
        return promote(a, b)

    def _call(self, node: Call) -> str:
        fn, args = node.fn, node.args
        if fn == "where":
            self.mask(args[0], "where's first argument")
            a, b = self.inner(args[1]), self.inner(args[2])
            if (a == BOOL) != (b == BOOL):
                self.error("where's branches must both be masks or both be numbers", node,
                           "to use a mask as a number write where(mask, 1, 0)")
            return BOOL if a == BOOL else promote(a, b)
        types = [self.number(a, f"{fn}()") for a in args]
        if fn in ("abs", "sign", "min", "max", "clip"):
            t = types[0]
            for u in types[1:]:
                t = promote(t, u)
            return t
        if fn in ("floor", "ceil"):
            return INT if types[0] == INT else (NUM if types[0] == NUM else INT)
        return REAL  # exp exp2 log log2 sqrt tanh sigmoid sin cos


def _kind_word(node: Node) -> str:
    return "transforms" if mentions(node, "score") else "biases"


def _mask_positions(node: Node) -> tuple[bool, ...]:
    """For each child of ``node``: whether it is in a mask position (an operand of ``&``,
    ``|``, ``~``, or ``where``'s condition), where a tensor read means ``read != 0``."""
    if isinstance(node, Binary) and node.op in ("&", "|"):
        return (True, True)
    if isinstance(node, Unary) and node.op == "~":
        return (True,)
    if isinstance(node, Call) and node.fn == "where":
        return (True, False, False)
    return (False,) * len(node.children())


def read_masks(node: Node) -> tuple[Node, tuple[str, ...]]:
    """``node`` with every tensor read in a mask position replaced by ``read != 0``, and the
    names of the tensors read so (in order of first use).

    ``causal & m[b, q, kv]`` becomes ``causal & m[b, q, kv] != 0``; ``causal + m[b, q, kv]``
    and a read anywhere else (``m[b, q, kv]`` alone, ``where(c, m[q], 0)``) stay numbers.
    The position is syntactic, in the expanded IR: a read that a definition's parameter
    puts under '&' (``f(x) = causal & x``, ``f(m[b, q, kv])``) is a mask too, and
    ``bias(t)`` under '&' (``causal & bias(t)``) is the mask ``t[b, h, q, kv] != 0``.
    Iterative (trees may be deep); a subtree shared by several parents is rebuilt once.
    """
    done: dict[int, Node] = {}
    keep: list[Node] = []   # holds the nodes whose ids key ``done``
    names: dict[str, None] = {}
    stack = [(node, False)]
    while stack:
        n, ready = stack.pop()
        if id(n) in done:
            continue
        kids = n.children()
        if not ready and kids:
            stack.append((n, True))
            stack.extend((k, False) for k in kids if id(k) not in done)
            continue
        new = []
        for k, is_mask in zip(kids, _mask_positions(n)):
            c = done[id(k)]
            if is_mask and isinstance(k, Tensor):
                names.setdefault(k.name)
                c = Binary("!=", c, IntLit(0, span=c.span), span=c.span)
            new.append(c)
        changed = any(a is not b for a, b in zip(new, kids))
        done[id(n)] = with_children(n, new) if changed else n
        keep.append(n)
    return done[id(node)], tuple(names)


def check(node: Node, text: str | None = None) -> str:
    """Type of the top-level expression ``node``; raises ``ScoreModTypeError``.

    ``text`` is the source ``node`` was expanded from (for carets and snippets).
    """
    return _Checker(text, node).top(node)


def type_of(node: Node) -> str:
    """Type of an inner (non-top-level) expression."""
    return _Checker(None).inner(node)
