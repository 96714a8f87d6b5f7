"""Definitions (macros with arity overloading) and their expansion into IR.

Three layers are searched in order: the source's own definitions, the global ones
added with ``scoremod.define``, then the prelude. Expansion substitutes arguments for
parameters (call by name); nodes that come from a definition's body take the span of
the call, so every later error points into the user's text.
"""

from __future__ import annotations

import difflib
import threading
from functools import lru_cache

from scoremod.errors import ScoreModDefinitionError, ScoreModNameError, ScoreModTypeError
from scoremod.grammar import prelude_text
from scoremod.dsl.ast import (
    Binary, BoolLit, Call, Definition, Index, IntLit, Name, Node, RealLit, Tensor, Unary, Var,
    CONSTANTS, POSITION_VARIABLES, VARIABLES, walk,
)
from scoremod.dsl.parser import parse_definitions

__all__ = [
    "BUILTINS", "RESERVED_TENSOR_NAMES", "DefinitionTable", "prelude", "global_definitions",
    "define", "undefine", "expand", "MAX_EXPANDED_NODES",
]

# name -> allowed numbers of arguments (LANGUAGE.md §4).
BUILTINS: dict[str, tuple[int, ...]] = {
    "abs": (1,), "min": (2,), "max": (2,), "clip": (3,), "where": (3,), "exp": (1,),
    "exp2": (1,), "log": (1,), "log2": (1,), "sqrt": (1,), "tanh": (1,), "sigmoid": (1,),
    "floor": (1,), "ceil": (1,), "sign": (1,),
}
BUILTIN_SIGNATURES = {
    "abs": "abs(x)", "min": "min(x, y)", "max": "max(x, y)", "clip": "clip(x, lo, hi)",
    "where": "where(mask, a, b)", "exp": "exp(x)", "exp2": "exp2(x)", "log": "log(x)",
    "log2": "log2(x)", "sqrt": "sqrt(x)", "tanh": "tanh(x)", "sigmoid": "sigmoid(x)",
    "floor": "floor(x)", "ceil": "ceil(x)", "sign": "sign(x)",
}
BUILTIN_DOCS = {
    "abs": "absolute value", "min": "smaller of two numbers", "max": "larger of two numbers",
    "clip": "x limited to [lo, hi]", "where": "a where mask holds, else b",
    "exp": "e ** x", "exp2": "2 ** x", "log": "natural logarithm", "log2": "base-2 logarithm",
    "sqrt": "square root", "tanh": "hyperbolic tangent", "sigmoid": "1 / (1 + exp(-x))",
    "floor": "largest int <= x", "ceil": "smallest int >= x", "sign": "-1, 0 or 1",
}

# Keywords of attention()/paged_attention(): a tensor parameter may not take these names.
RESERVED_TENSOR_NAMES = frozenset({
    "query", "key", "value", "mod", "scale", "q_offset", "kv_offset", "implementation",
    "return_lse", "block_sizes", "interpret", "k_pages", "v_pages", "block_tables", "lengths",
})

MAX_EXPANDED_NODES = 100_000


class DefinitionTable:
    """Definitions by (name, arity)."""

    def __init__(self, definitions=()):
        self._by_name: dict[str, dict[int, Definition]] = {}
        for d in definitions:
            self.add(d)

    def add(self, d: Definition) -> None:
        self._by_name.setdefault(d.name, {})[d.arity] = d

    def remove(self, name: str, arity: int | None = None) -> None:
        if arity is None:
            self._by_name.pop(name, None)
        else:
            self._by_name.get(name, {}).pop(arity, None)
            if not self._by_name.get(name):
                self._by_name.pop(name, None)

    def get(self, name: str, arity: int) -> Definition | None:
        return self._by_name.get(name, {}).get(arity)

    def overloads(self, name: str) -> list[Definition]:
        return [self._by_name[name][a] for a in sorted(self._by_name.get(name, {}))]

    def names(self) -> list[str]:
        return list(self._by_name)

    def __iter__(self):
        for name in self._by_name:
            yield from self.overloads(name)

    def copy(self) -> "DefinitionTable":
        return DefinitionTable(list(self))


@lru_cache(maxsize=None)
def prelude() -> DefinitionTable:
    """The prelude's definitions (grammar/prelude.sm)."""
    defs = parse_definitions(prelude_text())
    return DefinitionTable(Definition(d.name, d.params, d.body, doc=d.doc, text=d.text, span=d.span,
                                      origin="prelude", name_span=d.name_span) for d in defs)


_GLOBALS = DefinitionTable()
_GLOBALS_LOCK = threading.Lock()
_GLOBALS_VERSION = [0]


def global_definitions() -> DefinitionTable:
    """The definitions added with ``define`` (a copy)."""
    with _GLOBALS_LOCK:
        return _GLOBALS.copy()


def globals_version() -> int:
    """Bumped by every ``define``/``undefine``; compile caches key on it."""
    return _GLOBALS_VERSION[0]


def define(text: str, *, override: bool = False) -> tuple[Definition, ...]:
    """Add global definitions (``name(params) = expr``, one per line or ``;``-separated).

    Each is validated like a source: it must parse, every call must name a known
    function with the right number of arguments, and it may not be recursive. A
    definition that shadows a built-in function or a prelude name (same arity) is an
    error unless ``override=True``.
    """
    defs = parse_definitions(text)
    with _GLOBALS_LOCK:
        table = _GLOBALS.copy()
        for d in defs:
            _check_shadowing(d, table if override else None, override)
            table.add(Definition(d.name, d.params, d.body, doc=d.doc, text=d.text, span=d.span,
                                 origin="global", name_span=d.name_span))
        for d in defs:
            _validate_definition(d, _Scope((table, prelude()), override_builtins=override))
        for d in defs:
            _GLOBALS.add(table.get(d.name, d.arity))
        _GLOBALS_VERSION[0] += 1
    return defs


def undefine(name: str, arity: int | None = None) -> None:
    """Remove a global definition (all arities unless ``arity`` is given)."""
    with _GLOBALS_LOCK:
        _GLOBALS.remove(name, arity)
        _GLOBALS_VERSION[0] += 1


def _check_shadowing(d: Definition, _table, override: bool) -> None:
    span = d.name_span or d.span
    if d.name in VARIABLES or d.name in CONSTANTS:
        raise ScoreModDefinitionError(f"'{d.name}' is a built-in name and cannot be defined",
                                      source=d.text, span=span, hint="choose another name")
    if override:
        return
    if d.name in BUILTINS:
        raise ScoreModDefinitionError(
            f"definition '{d.signature}' shadows the built-in function {BUILTIN_SIGNATURES[d.name]}",
            source=d.text, span=span, hint="choose another name, or pass override=True")
    existing = prelude().get(d.name, d.arity)
    if existing is not None:
        raise ScoreModDefinitionError(
            f"definition '{d.signature}' shadows the prelude's {existing.signature} = {existing.body}",
            source=d.text, span=span, hint="choose another name, or pass override=True")


class _Scope:
    """Where names are looked up during expansion."""

    def __init__(self, tables, override_builtins: bool = False):
        self.tables = tables
        self.override_builtins = override_builtins

    def lookup(self, name: str, arity: int) -> Definition | None:
        # A definition named like a built-in exists only if it was made with override=True.
        for t in self.tables:
            d = t.get(name, arity)
            if d is not None:
                return d
        return None

    def overloads(self, name: str) -> list[Definition]:
        seen: dict[int, Definition] = {}
        for t in self.tables:
            for d in t.overloads(name):
                seen.setdefault(d.arity, d)
        return [seen[a] for a in sorted(seen)]

    def known_names(self) -> list[str]:
        names = set(BUILTINS) | set(VARIABLES) | set(CONSTANTS)
        for t in self.tables:
            names.update(t.names())
        return sorted(names)


def _validate_definition(d: Definition, scope: _Scope) -> None:
    """Expand the body once with opaque parameters: catches unknown calls, arity, recursion."""
    env = {p: Tensor(p, span=None) for p in d.params}
    _Expander(scope, d.text).expand(d.body, env, None, ((d.name, d.arity),))


def expand(source, *, text: str | None = None) -> Node:
    """Resolve names and expand definitions in ``source.expr``: the IR the compiler takes.

    ``source`` is a parsed ``Source``. Its own definitions shadow globals and the prelude;
    shadowing a prelude name of the same arity in a source is an error.
    """
    text = source.text if text is None else text
    local = DefinitionTable()
    for d in source.definitions:
        _check_shadowing(d, None, False)
        if local.get(d.name, d.arity) is not None:
            raise ScoreModDefinitionError(f"'{d.signature}' is defined twice", source=text,
                                          span=d.name_span or d.span)
        local.add(d)
    scope = _Scope((local, global_definitions(), prelude()))
    for d in source.definitions:
        _validate_definition(d, scope)
    expander = _Expander(scope, text)
    result = expander.expand(source.expr, {}, None, ())
    for n in walk(result):
        if isinstance(n, Tensor) and n.name in RESERVED_TENSOR_NAMES:
            raise ScoreModNameError(
                f"tensor parameter '{n.name}' collides with a keyword of attention()",
                source=text, span=n.span, hint=f"rename it, e.g. {n.name}_")
    return result


class _Expander:
    def __init__(self, scope: _Scope, text: str):
        self.scope = scope
        self.text = text
        self.size = 0

    def error(self, cls, message, span, hint=None):
        raise cls(message, source=self.text, span=span, hint=hint)

    def _count(self, node: Node, span) -> None:
        self.size += 1
        if self.size > MAX_EXPANDED_NODES:
            self.error(ScoreModDefinitionError,
                       f"the expression expands to more than {MAX_EXPANDED_NODES:_} nodes", span,
                       "definitions that use a parameter many times multiply; simplify them")

    def expand(self, node: Node, env: dict, call_span, stack) -> Node:
        """Expand ``node``; ``call_span`` (if set) replaces the spans of body nodes."""
        span = call_span or node.span
        self._count(node, span)
        if isinstance(node, (BoolLit, IntLit, RealLit, Var)):
            return type(node)(*_fields(node), span=span)
        if isinstance(node, Tensor):  # an opaque parameter during validation
            return node
        if isinstance(node, Name):
            if node.name in env:
                return env[node.name]
            return self._call(node.name, (), node, env, call_span, stack, span)
        if isinstance(node, Call):
            args = tuple(self.expand(a, env, call_span, stack) for a in node.args)
            if node.fn in env:
                self.error(ScoreModNameError, f"parameter '{node.fn}' is not a function", span)
            return self._call(node.fn, args, node, env, call_span, stack, span)
        if isinstance(node, Index):
            return self._index(node, env, call_span, stack, span)
        if isinstance(node, Unary):
            return Unary(node.op, self.expand(node.operand, env, call_span, stack), span=span)
        if isinstance(node, Binary):
            return Binary(node.op, self.expand(node.lhs, env, call_span, stack),
                          self.expand(node.rhs, env, call_span, stack), span=span)
        raise TypeError(f"unexpected node {type(node).__name__}")

    def _index(self, node: Index, env, call_span, stack, span) -> Node:
        base = self.expand(node.base, env, call_span, stack)
        indices = tuple(self.expand(i, env, call_span, stack) for i in node.indices)
        if isinstance(base, Tensor):
            if base.indices:
                self.error(ScoreModTypeError, f"tensor '{base.name}' is indexed twice", span,
                           f"index once: {base.name}[i, j]")
            return Tensor(base.name, indices, span=span)
        positional = [n for n in walk(base) if isinstance(n, (Var, Tensor))]
        if positional:
            what = base if not isinstance(base, Var) else base
            self.error(ScoreModTypeError, f"only tensors and scalars can be indexed, not {what}", span,
                       "index a tensor parameter, like ids[b, q]")
        # A scalar indexed with any number of indices is itself (indices align right).
        return base

    def _call(self, name, args, node, env, call_span, stack, span) -> Node:
        d = self.scope.lookup(name, len(args))
        if d is not None:
            key = (d.name, d.arity)
            if key in stack:
                chain = " -> ".join(n for n, _ in stack[stack.index(key):]) + f" -> {name}"
                self.error(ScoreModDefinitionError, f"definition '{d.signature}' is recursive ({chain})", span)
            body_env = dict(zip(d.params, args))
            return self.expand(d.body, body_env, span, stack + (key,))
        if name in BUILTINS and not self.scope.overloads(name):
            if len(args) not in BUILTINS[name]:
                n = len(args)
                self.error(ScoreModNameError,
                           f"{name} takes {BUILTINS[name][0]} argument{'s' if BUILTINS[name][0] != 1 else ''}, got {n}",
                           span, f"use {BUILTIN_SIGNATURES[name]}")
            if not args:
                self.error(ScoreModNameError, f"'{name}' is a function", span, f"call it: {BUILTIN_SIGNATURES[name]}")
            return Call(name, args, span=span)
        overloads = self.scope.overloads(name)
        if overloads:
            sigs = ", ".join(o.signature for o in overloads)
            n = len(args)
            if n == 0 and isinstance(node, Name):
                self.error(ScoreModNameError, f"'{name}' needs arguments", span, f"use {sigs}")
            self.error(ScoreModNameError,
                       f"'{name}' takes {_arities(overloads)}, got {n} argument{'s' if n != 1 else ''}",
                       span, f"use {sigs}")
        if isinstance(node, Name):
            # An identifier that is nothing else is a tensor parameter (LANGUAGE.md §5).
            return Tensor(name, span=span)
        if name in VARIABLES:
            self.error(ScoreModNameError, f"'{name}' is a variable, not a function", span)
        name_span = (span[0], span[0] + len(name)) if span else None
        suggestion = closest_name(name, self.scope.known_names())
        hint = f"did you mean '{suggestion}'?" if suggestion else "see `dslc list` for the names there are"
        self.error(ScoreModNameError, f"unknown name '{name}'" + (f" — did you mean '{suggestion}'?" if suggestion else ""),
                   name_span, None if suggestion else hint)


def _arities(overloads) -> str:
    ns = [str(o.arity) for o in overloads]
    words = ns[0] if len(ns) == 1 else ", ".join(ns[:-1]) + " or " + ns[-1]
    return f"{words} argument{'s' if ns != ['1'] else ''}"


def _fields(node):
    return (node.value,) if not isinstance(node, Var) else (node.name,)


def closest_name(name: str, candidates) -> str | None:
    """The candidate most like ``name``, if one is close enough to be a likely typo."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None
