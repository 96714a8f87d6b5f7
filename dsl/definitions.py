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
    CONSTANTS, VARIABLES, depth, make_error, walk,
)
from scoremod.dsl.parser import MAX_DEPTH, parse_definitions

__all__ = [
    "BUILTINS", "RESERVED_TENSOR_NAMES", "DefinitionTable", "prelude", "global_definitions",
    "define", "undefine", "expand", "MAX_EXPANDED_NODES",
]

# name -> allowed numbers of arguments (docs/language.md, "4. Built-in functions").
BUILTINS: dict[str, tuple[int, ...]] = {
    "abs": (1,), "min": (2,), "max": (2,), "clip": (3,), "where": (3,), "exp": (1,),
    "exp2": (1,), "log": (1,), "log2": (1,), "sqrt": (1,), "tanh": (1,), "sigmoid": (1,),
    "floor": (1,), "ceil": (1,), "sign": (1,), "sin": (1,), "cos": (1,),
}
BUILTIN_SIGNATURES = {
    "abs": "abs(x)", "min": "min(x, y)", "max": "max(x, y)", "clip": "clip(x, lo, hi)",
    "where": "where(mask, a, b)", "exp": "exp(x)", "exp2": "exp2(x)", "log": "log(x)",
    "log2": "log2(x)", "sqrt": "sqrt(x)", "tanh": "tanh(x)", "sigmoid": "sigmoid(x)",
    "floor": "floor(x)", "ceil": "ceil(x)", "sign": "sign(x)", "sin": "sin(x)", "cos": "cos(x)",
}
BUILTIN_DOCS = {
    "abs": "absolute value", "min": "smaller of two numbers", "max": "larger of two numbers",
    "clip": "x limited to [lo, hi]", "where": "a where mask holds, else b",
    "exp": "e ** x", "exp2": "2 ** x", "log": "natural logarithm", "log2": "base-2 logarithm",
    "sqrt": "square root", "tanh": "hyperbolic tangent", "sigmoid": "1 / (1 + exp(-x))",
    "floor": "largest int <= x", "ceil": "smallest int >= x", "sign": "-1, 0 or 1",
    "sin": "sine (x in radians)", "cos": "cosine (x in radians)",
}

# Keywords of attention()/paged_attention(): a tensor parameter may not take these names.
RESERVED_TENSOR_NAMES = frozenset({
    "query", "key", "value", "mod", "scale", "q_offset", "kv_offset", "implementation",
    "return_lse", "block_sizes", "interpret", "k_pages", "v_pages", "block_tables", "lengths",
    "mesh", "context_axis", "context_layout", "context_strategy", "plan", "sinks",
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
            _check_shadowing(d, override=override, in_source=False)
            table.add(Definition(d.name, d.params, d.body, doc=d.doc, text=d.text, span=d.span,
                                 origin="global", name_span=d.name_span))
        _validate_definitions(defs, _Scope((table, prelude()), override_builtins=override))
        for d in defs:
            _GLOBALS.add(table.get(d.name, d.arity))
        _GLOBALS_VERSION[0] += 1
    return defs


def undefine(name: str, arity: int | None = None) -> None:
    """Remove a global definition (all arities unless ``arity`` is given)."""
    with _GLOBALS_LOCK:
        _GLOBALS.remove(name, arity)
        _GLOBALS_VERSION[0] += 1


def _check_shadowing(d: Definition, *, override: bool, in_source: bool) -> None:
    """Built-in variables and constants can never be defined; built-in functions and prelude
    names (same arity) only through ``define(..., override=True)``."""
    span = d.name_span or d.span
    fix = ("choose another name (only scoremod.define(..., override=True) may replace it)" if in_source
           else "choose another name, or pass override=True")
    if d.name in VARIABLES or d.name in CONSTANTS:
        raise make_error(ScoreModDefinitionError, f"'{d.name}' is a built-in name and cannot be defined",
                         source=d.text, span=span, hint="choose another name")
    if override:
        return
    if d.name in BUILTINS:
        raise make_error(
            ScoreModDefinitionError,
            f"definition '{d.signature}' shadows the built-in function {BUILTIN_SIGNATURES[d.name]}",
            source=d.text, span=span, hint=fix)
    existing = prelude().get(d.name, d.arity)
    if existing is not None:
        raise make_error(
            ScoreModDefinitionError,
            f"definition '{d.signature}' shadows the prelude's {existing.signature} = {existing.body}",
            source=d.text, span=span, hint=fix)


class _Scope:
    """Where names are looked up during expansion: tables searched in order, flattened
    into one dict ``name -> {arity: Definition}`` (the first table holding an arity wins)."""

    def __init__(self, tables, override_builtins: bool = False):
        self.tables = tables
        self.override_builtins = override_builtins
        self.by_name: dict[str, dict[int, Definition]] = {}
        for t in reversed(tables):
            for d in t:
                self.by_name.setdefault(d.name, {})[d.arity] = d

    def with_local(self, local: DefinitionTable) -> "_Scope":
        """This scope with ``local`` searched first."""
        scope = _Scope(())
        scope.tables = (local,) + self.tables
        scope.by_name = {name: dict(arities) for name, arities in self.by_name.items()}
        for d in local:
            scope.by_name.setdefault(d.name, {})[d.arity] = d
        return scope

    def overloads(self, name: str) -> list[Definition]:
        found = self.by_name.get(name, {})
        return [found[a] for a in sorted(found)]

    def known_names(self) -> list[str]:
        return sorted(set(BUILTINS) | set(VARIABLES) | set(CONSTANTS) | set(self.by_name))


_BASE_SCOPE: list = [None, None]  # [globals version, scope of globals + prelude]


def _base_scope() -> _Scope:
    """Globals, then the prelude; rebuilt only after ``define``/``undefine``."""
    version = globals_version()
    if _BASE_SCOPE[0] != version:
        _BASE_SCOPE[1] = _Scope((global_definitions(), prelude()))
        _BASE_SCOPE[0] = version
    return _BASE_SCOPE[1]


def expand(source, *, text: str | None = None) -> Node:
    """Resolve names and expand definitions in ``source.expr``: the IR the compiler takes.

    ``source`` is a parsed ``Source``. Its own definitions shadow globals and the prelude;
    shadowing a prelude name of the same arity in a source is an error. Identifiers that
    name nothing become ``Tensor`` parameters; names that collide with attention()'s own
    keywords are errors.
    """
    text = source.text if text is None else text
    scope = _base_scope()
    if source.definitions:
        local = DefinitionTable()
        for d in source.definitions:
            _check_shadowing(d, override=False, in_source=True)
            if local.get(d.name, d.arity) is not None:
                raise make_error(ScoreModDefinitionError, f"'{d.signature}' is defined twice", source=text,
                                 span=d.name_span or d.span, hint="remove one, or give it another name")
            local.add(d)
        scope = scope.with_local(local)
        _validate_definitions(source.definitions, scope)
    expander = _Expander(scope, text)
    result = expander.expand(source.expr, {}, None, ())
    if expander.size > MAX_DEPTH:  # definitions can nest deeper than the text does
        d = depth(result)
        if d > MAX_DEPTH:
            raise make_error(
                ScoreModDefinitionError,
                f"the expression is nested {d} levels deep once definitions are expanded; the limit is {MAX_DEPTH}",
                source=text, span=source.expr.span, hint="nest fewer definitions inside each other")
    return result


class _Expander:
    def __init__(self, scope: _Scope, text: str):
        self.scope = scope
        self.text = text
        self.size = 0  # nodes of the expanded tree so far (as a tree: shared arguments count each time)
        self._sizes: dict[int, tuple[Node, int]] = {}

    def _tree_size(self, node: Node) -> int:
        """Size of ``node`` as a tree; arguments are shared, so the tree can be far larger
        than the number of objects (``f(x) = g(x + x)`` doubles at every level)."""
        sizes = self._sizes
        stack = [node]
        while stack:  # post-order without recursion
            n = stack[-1]
            if id(n) in sizes:
                stack.pop()
                continue
            missing = [c for c in n.children() if id(c) not in sizes]
            if missing:
                stack.extend(missing)
            else:  # the node is kept with its size, so its id cannot be reused meanwhile
                sizes[id(n)] = (n, 1 + sum(sizes[id(c)][1] for c in n.children()))
                stack.pop()
        return sizes[id(node)][1]

    def _grow(self, n: int, span) -> None:
        self.size += n
        if self.size > MAX_EXPANDED_NODES:
            self.error(ScoreModDefinitionError,
                       f"the expression expands to more than {MAX_EXPANDED_NODES:_} nodes", span,
                       "a definition that uses a parameter several times copies its argument each time; "
                       "simplify the definitions")

    def error(self, cls, message, span, hint=None):
        raise make_error(cls, message, source=self.text, span=span, hint=hint)

    def expand(self, node: Node, env: dict, call_span, stack) -> Node:
        """Expand ``node``; ``call_span`` (if set) replaces the spans of body nodes."""
        self.size += 1
        if self.size > MAX_EXPANDED_NODES:
            self._grow(0, call_span or node.span)
        kind = type(node)
        if kind is Binary:
            return Binary(node.op, self.expand(node.lhs, env, call_span, stack),
                          self.expand(node.rhs, env, call_span, stack), span=call_span or node.span)
        if kind is Call:
            args = tuple(self.expand(a, env, call_span, stack) for a in node.args)
            if node.fn in env:
                self.error(ScoreModNameError, f"parameter '{node.fn}' is not a function", call_span or node.span,
                           f"a parameter stands for a value; use it as {node.fn}, not {node.fn}(...)")
            return self._call(node.fn, args, node, call_span or node.span, stack)
        if kind is Name:
            if node.name in env:
                value = env[node.name]
                if value.children():
                    self._grow(self._tree_size(value) - 1, call_span or node.span)
                return value
            return self._call(node.name, (), node, call_span or node.span, stack)
        if kind in (BoolLit, IntLit, RealLit, Var):
            if call_span is None:
                return node
            return kind(node.name if kind is Var else node.value, span=call_span)
        if kind is Unary:
            return Unary(node.op, self.expand(node.operand, env, call_span, stack), span=call_span or node.span)
        if kind is Index:
            return self._index(node, env, call_span, stack, call_span or node.span)
        if kind is Tensor:  # an opaque parameter during validation
            return node
        raise TypeError(f"unexpected node {kind.__name__}")

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
            self.error(ScoreModTypeError, f"only tensors and scalars can be indexed, not {base}", span,
                       "index a tensor parameter, like ids[b, q]")
        # A scalar indexed with any number of indices is itself (indices align right).
        return base

    def _call(self, name, args, node, span, stack) -> Node:
        what = self.resolve(name, len(args), isinstance(node, Name), span)
        if what == "builtin":
            return Call(name, args, span=span)
        if what == "tensor":
            return Tensor(name, span=span)
        d = what
        key = (d.name, d.arity)
        if key in stack:
            chain = " -> ".join(n for n, _ in stack[stack.index(key):]) + f" -> {name}"
            self.error(ScoreModDefinitionError, f"definition '{d.signature}' is recursive ({chain})", span,
                       _RECURSION_HINT)
        return self.expand(d.body, dict(zip(d.params, args)), span, stack + (key,))

    def resolve(self, name: str, nargs: int, bare: bool, span) -> "Definition | str":
        """What ``name`` with ``nargs`` arguments is: a Definition, "builtin" or "tensor"
        (``bare``: written without parentheses). Raises the error for anything else."""
        found = self.scope.by_name.get(name)
        if found:
            d = found.get(nargs)
            if d is not None:
                return d
            if not (name in BUILTINS and nargs in BUILTINS[name]):
                overloads = self.scope.overloads(name)
                sigs = _or_list([o.signature for o in overloads])
                if nargs == 0 and bare:
                    self.error(ScoreModNameError, f"'{name}' needs arguments", span, f"use {sigs}")
                self.error(ScoreModNameError, f"'{name}' takes {_arities(overloads)}, got {nargs}", span,
                           f"use {sigs}")
        if name in BUILTINS:
            if bare:
                self.error(ScoreModNameError, f"'{name}' is a function", span, f"call it: {BUILTIN_SIGNATURES[name]}")
            if nargs not in BUILTINS[name]:
                want = BUILTINS[name][0]
                self.error(ScoreModNameError,
                           f"'{name}' takes {want} argument{'s' if want != 1 else ''}, got {nargs}",
                           span, f"use {BUILTIN_SIGNATURES[name]}")
            return "builtin"
        if bare:
            # An identifier that is nothing else is a tensor parameter (docs/language.md, "7. Tensors").
            if name in RESERVED_TENSOR_NAMES:
                self.error(ScoreModNameError, f"tensor parameter '{name}' collides with a keyword of attention()",
                           span, f"rename it, e.g. {name}_")
            return "tensor"
        if name in VARIABLES:
            self.error(ScoreModNameError, f"'{name}' is a variable, not a function", span,
                       f"use it as {name}, e.g. q - kv" if name != "score" else "use it as score, e.g. tanh(score)")
        if name in CONSTANTS:
            self.error(ScoreModNameError, f"'{name}' is a constant, not a function", span)
        name_span = (span[0], span[0] + len(name)) if span else None
        suggestion = closest_name(name, self.scope.known_names())
        if suggestion:
            self.error(ScoreModNameError, f"unknown name '{name}' — did you mean '{suggestion}'?", name_span)
        self.error(ScoreModNameError, f"unknown name '{name}'", name_span,
                   "`dslc list` shows every name; a tensor parameter is used without ( ), e.g. ids[b, q]")


_RECURSION_HINT = "definitions are macros, expanded before anything runs; they cannot call themselves"


def _body_calls(d: Definition, scope: _Scope) -> list[tuple[Definition, tuple[int, int] | None]]:
    """The definitions ``d``'s body calls, with the span of each call, checking every name in
    it on the way (without expanding anything: linear in the size of the body)."""
    ex = _Expander(scope, d.text)
    params = set(d.params)
    calls = []
    for n in walk(d.body):
        if isinstance(n, Name) and n.name not in params:
            what = ex.resolve(n.name, 0, True, n.span)
        elif isinstance(n, Call):
            if n.fn in params:
                ex.error(ScoreModNameError, f"parameter '{n.fn}' is not a function", n.span,
                         f"a parameter stands for a value; use it as {n.fn}, not {n.fn}(...)")
            what = ex.resolve(n.fn, len(n.args), False, n.span)
        elif isinstance(n, Index) and any(isinstance(x, Var) for x in walk(n.base)):
            ex.error(ScoreModTypeError, f"only tensors and scalars can be indexed, not {n.base}", n.span,
                     "index a tensor parameter, like ids[b, q]")
        else:
            continue
        if isinstance(what, Definition):
            calls.append((what, n.span))
    return calls


def _validate_definitions(defs, scope: _Scope) -> None:
    """Check definitions once, without expanding them: every name in a body resolves with
    the right number of arguments, and no definition reaches itself through its calls."""
    edges: dict[tuple[str, int], list] = {}

    def calls_of(d: Definition):
        key = (d.name, d.arity)
        if key not in edges:
            edges[key] = _body_calls(d, scope)
        return edges[key]

    done: set[tuple[str, int]] = set()
    for root in defs:
        # Depth-first over the call graph; path holds (definition, span of the call taken from it).
        path: list[list] = []
        on_path: dict[tuple[str, int], int] = {}

        def enter(d):
            on_path[(d.name, d.arity)] = len(path)
            path.append([d, iter(calls_of(d)), None])

        if (root.name, root.arity) in done:
            continue
        enter(root)
        while path:
            frame = path[-1]
            nxt = next(frame[1], None)
            if nxt is None:
                path.pop()
                key = (frame[0].name, frame[0].arity)
                del on_path[key]
                done.add(key)
                continue
            callee, span = nxt
            frame[2] = span
            key = (callee.name, callee.arity)
            if key in on_path:
                start = on_path[key]
                cycle = [f[0] for f in path[start:]]
                chain = " -> ".join(c.name for c in cycle) + f" -> {callee.name}"
                where = path[start]
                raise make_error(ScoreModDefinitionError, f"definition '{callee.signature}' is recursive ({chain})",
                                 source=where[0].text, span=where[2], hint=_RECURSION_HINT)
            if key not in done:
                enter(callee)


def _or_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _arities(overloads) -> str:
    ns = [str(o.arity) for o in overloads]
    return f"{_or_list(ns)} argument{'s' if ns != ['1'] else ''}"


def closest_name(name: str, candidates) -> str | None:
    """The candidate most like ``name``, if one is close enough to be a likely typo."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None
