"""AST and IR nodes: frozen, hashable, compared by value (spans are ignored).

The parser produces ``Name``/``Index``/``Call`` nodes for identifiers; expansion
(``dsl.definitions``) resolves them into ``Var``, ``Tensor`` and built-in ``Call``
nodes. The expanded tree is the IR the compiler consumes.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import lru_cache
from operator import attrgetter
from typing import Callable

Span = tuple[int, int]

POSITION_VARIABLES = ("b", "h", "q", "kv")
VARIABLES = POSITION_VARIABLES + ("score",)
CONSTANTS = ("true", "false", "inf")

COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")

# Passes over the IR (typing, expansion, printing, equality of nodes) recurse once per
# level; sources may nest up to the parser's MAX_DEPTH levels.
RECURSION_LIMIT = 20_000


@lru_cache(maxsize=None)
def _compared_fields(cls) -> Callable:
    """A getter of the fields ``cls`` compares (``operator.attrgetter``: C speed)."""
    names = tuple(f.name for f in fields(cls) if f.compare)
    return attrgetter(*names) if names else (lambda node: ())


@contextmanager
def deep_recursion(limit: int = RECURSION_LIMIT):
    """Raise Python's recursion limit to ``limit`` for the block (restored after)."""
    old = sys.getrecursionlimit()
    if old < limit:
        sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        if old < limit:
            sys.setrecursionlimit(old)


@dataclass(frozen=True, eq=False)
class Node:
    """Equal by type and compared fields (not spans). The hash is computed once, from the
    children's hashes, when a node is built: hashing and telling nodes apart cost O(1),
    which the compiler's caches and the chain merging of long masks rely on."""
    span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash((type(self).__name__, self._compared())))

    def _compared(self):
        """The fields equality looks at (a tuple, or the value of a class's only field)."""
        return _compared_fields(type(self))(self)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        return self._hash == other._hash and self._compared() == other._compared()

    def __getstate__(self):   # the hash is recomputed on unpickling (str hashes differ by process)
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        self.__post_init__()

    def children(self) -> tuple["Node", ...]:
        return ()

    def __str__(self) -> str:
        from scoremod.dsl.printer import to_source  # import cycle: the printer imports these nodes
        return to_source(self)


@dataclass(frozen=True, eq=False)
class BoolLit(Node):
    value: bool


@dataclass(frozen=True, eq=False)
class IntLit(Node):
    value: int


@dataclass(frozen=True, eq=False)
class RealLit(Node):
    value: float


@dataclass(frozen=True, eq=False)
class Var(Node):
    """A position variable (b, h, q, kv) or ``score``."""
    name: str


@dataclass(frozen=True, eq=False)
class Name(Node):
    """An identifier as written (parser output; resolved by expansion)."""
    name: str


@dataclass(frozen=True, eq=False)
class Index(Node):
    """``base[i, ...]`` as written (parser output; resolved by expansion)."""
    base: Node
    indices: tuple[Node, ...]

    def children(self):
        return (self.base,) + self.indices


@dataclass(frozen=True, eq=False)
class Tensor(Node):
    """A tensor parameter read at ``indices`` (right-aligned; ``()`` = a scalar)."""
    name: str
    indices: tuple[Node, ...] = ()

    def children(self):
        return self.indices


@dataclass(frozen=True, eq=False)
class Call(Node):
    """``fn(args)``: a built-in after expansion; any name before."""
    fn: str
    args: tuple[Node, ...]

    def children(self):
        return self.args


@dataclass(frozen=True, eq=False)
class Unary(Node):
    """``-x`` or ``~x``."""
    op: str
    operand: Node

    def children(self):
        return (self.operand,)


@dataclass(frozen=True, eq=False)
class Binary(Node):
    """Arithmetic, logic (``&``, ``|``) and comparisons."""
    op: str
    lhs: Node
    rhs: Node

    def children(self):
        return (self.lhs, self.rhs)


@dataclass(frozen=True)
class Definition:
    """``name(params) = body``; ``doc`` comes from the comment lines above it."""
    name: str
    params: tuple[str, ...]
    body: Node
    doc: str = field(default="", compare=False)
    text: str = field(default="", compare=False, repr=False)
    span: Span | None = field(default=None, compare=False, repr=False)
    origin: str = field(default="source", compare=False)  # "prelude", "global", "source"
    name_span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def arity(self) -> int:
        return len(self.params)

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(self.params)})" if self.params else self.name

    def __str__(self) -> str:
        return f"{self.signature} = {self.body}"


@dataclass(frozen=True)
class Source:
    """A parsed source: definitions, then one expression."""
    definitions: tuple[Definition, ...]
    expr: Node
    text: str = field(default="", compare=False, repr=False)


# Names and numbers in messages are clipped to this many characters.
_MAX_WORD = 40
_LONG_WORD = re.compile(r"[A-Za-z0-9_.]{%d,}" % (_MAX_WORD + 1))


def clip_long_words(text: str | None) -> str | None:
    """Shorten names and numbers over ``_MAX_WORD`` characters, so a message about
    a 100 kB name stays one line (the caret line is clipped separately)."""
    if text is None:
        return None
    return _LONG_WORD.sub(lambda m: m.group()[:_MAX_WORD - 3] + "...", text)


def make_error(cls, message: str, *, source: str | None = None, span: Span | None = None,
               hint: str | None = None):
    """A ``cls`` (a ScoreModError) with long words in its message and hint clipped."""
    return cls(clip_long_words(message), source=source, span=span, hint=clip_long_words(hint))


def with_children(node: Node, children) -> Node:
    """``node`` rebuilt with ``children`` in place of its own (same kind, op, name, span);
    a leaf is returned as it is."""
    if isinstance(node, Binary):
        return Binary(node.op, children[0], children[1], span=node.span)
    if isinstance(node, Unary):
        return Unary(node.op, children[0], span=node.span)
    if isinstance(node, Call):
        return Call(node.fn, tuple(children), span=node.span)
    if isinstance(node, Tensor):
        return Tensor(node.name, tuple(children), span=node.span)
    return node


def walk(node: Node):
    """Every node of the tree, parents before children (iterative: trees may be deep)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.children()))


def depth(node: Node) -> int:
    """Nesting depth, computed without recursion."""
    best = 0
    stack = [(node, 1)]
    while stack:
        n, d = stack.pop()
        best = max(best, d)
        stack.extend((c, d + 1) for c in n.children())
    return best


def mentions(node: Node, var: str) -> bool:
    """Whether ``Var(var)`` occurs in the tree."""
    return any(isinstance(n, Var) and n.name == var for n in walk(node))


def tensor_names(node: Node) -> tuple[str, ...]:
    """Tensor parameters read by the tree, in order of first use."""
    seen: dict[str, None] = {}
    for n in walk(node):
        if isinstance(n, Tensor):
            seen.setdefault(n.name)
    return tuple(seen)
