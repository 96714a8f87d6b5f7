"""Hypothesis strategies for scoremod sources, shapes and the tensors a source reads.

For other test authors; the main entry points:

* ``sources(kind=None, with_tensors=True, with_definitions=True, max_depth=3)``: random
  well-typed sources (``GeneratedSource``: ``.text``, ``.kind``, ``.make_tensors(...)``).
  ``kind`` is "mask", "bias", "transform" or None (any). They use every prelude name
  with sensible literal arguments, comparisons of index arithmetic over q/kv/b/h, ``|``,
  ``~``, ``where``, ALiBi/relpos/dense biases, transforms of ``score`` (softcap,
  ``30 * tanh(score / 30)``, ``sin``/``cos``, ...), segment ids, tensor reads that are
  masks by themselves (``causal & mk[b, q, kv]``, bool or int 0/1 tensors), and
  definitions made in the source.
  Values stay finite: no NaN, no +inf, no division by zero, small ints.
* ``masks(...)`` = ``sources(kind="mask", ...)``; ``prelude_masks(...)``: one prelude mask
  name with arguments (what plans must be *exact* for).
* ``gather_sources(kind=None)``: sources that read tables at computed indices (``relpos``,
  ``g0[q - kv + 3]``, ``g1[h, abs(q - kv)]``, ``m0[(kv - q) % 3]`` as a mask, ...), the reads
  a kernel gathers per tile.
* ``ill_typed_sources()``: ``BadSource(text, error)``, sources that must be rejected with
  that ``ScoreModError`` subclass.
* ``shapes(...)``: ``Shape(B, N, K, T, S, q_offset, kv_offset)`` with GQA, ragged sizes
  and scalar or per-batch offsets.
* ``tensors_for(source_or_mod, B, N, T, S, rng, q_offset=0, kv_offset=0, sorted_ids=None)``:
  tensors for any source, by looking at how each tensor parameter is read (see its
  docstring). Works for hand-written sources too: ``tensors_for("causal & doc(ids)", ...)``.

Example::

    from hypothesis import given
    from strategies import sources, shapes

    @given(sources(kind="mask"), shapes(), st.integers(0, 2**32 - 1))
    def test_plan_is_sound(src, shape, seed):
        tensors = src.make_tensors(shape, np.random.default_rng(seed))
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from scoremod.errors import (
    ScoreModDefinitionError, ScoreModNameError, ScoreModSyntaxError, ScoreModTypeError,
)

__all__ = [
    "GeneratedSource", "BadSource", "Shape", "sources", "masks", "prelude_masks", "gather_sources",
    "ill_typed_sources",
    "shapes", "tensors_for", "PRELUDE_EXAMPLES",
]

# ---- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Sizes for an attention call: q [B, T, N, H], k/v [B, S, K, H]; offsets int or int[B]."""
    B: int
    N: int
    K: int
    T: int
    S: int
    q_offset: Any = 0
    kv_offset: Any = 0

    @property
    def grid(self) -> tuple[int, int, int, int]:
        """(B, N, T, S), the evaluator's grid."""
        return (self.B, self.N, self.T, self.S)


@dataclass(frozen=True)
class GeneratedSource:
    """A generated well-typed source.

    Attributes:
      text: the source (definitions, then one expression).
      kind: "mask" (bool), "bias" (real, no score) or "transform" (real, mentions score),
        as the language defines it; the canonical form may simplify further (a bias
        that folds to 0 becomes a mask).
      uses_tensors: whether it reads tensor parameters.
    """
    text: str
    kind: str
    uses_tensors: bool

    def make_tensors(self, shape: Shape, rng: np.random.Generator, sorted_ids: bool | None = None) -> dict:
        """The tensors this source reads, for ``shape`` (see ``tensors_for``)."""
        return tensors_for(self.text, shape.B, shape.N, shape.T, shape.S, rng,
                           q_offset=shape.q_offset, kv_offset=shape.kv_offset, sorted_ids=sorted_ids)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class BadSource:
    """A source that must be rejected with ``error`` (a ``ScoreModError`` subclass)."""
    text: str
    error: type


# ---- fragments -------------------------------------------------------------------------

# Precedence levels (docs/language.md §2 Syntax), lowest first; 9 = calls, indexing and atoms.
_LEVEL = {"|": 1, "&": 2, "<": 4, "<=": 4, ">": 4, ">=": 4, "==": 4, "!=": 4,
          "+": 5, "-": 5, "*": 6, "/": 6, "//": 6, "%": 6, "**": 8}
_CMP = ("<", "<=", ">", ">=", "==", "!=")
_ATOM = 9


@dataclass(frozen=True)
class _Frag:
    """A piece of source: its text, precedence level, type and whether it mentions score."""
    text: str
    prec: int
    type: str  # "bool", "int" or "real"
    score: bool = False
    tensors: bool = False
    read: bool = False          # a bare tensor read once expanded (under '&' it would be a mask)
    param: str | None = None    # a bare parameter of the definition being drawn


def _wrap(f: _Frag, min_prec: int) -> str:
    return f.text if f.prec >= min_prec else f"({f.text})"


def _atom(text: str, type_: str, score: bool = False, tensors: bool = False, read: bool = False) -> _Frag:
    return _Frag(text, _ATOM, type_, score, tensors, read)


def _bin(op: str, a: _Frag, b: _Frag, type_: str) -> _Frag:
    level = _LEVEL[op]
    if op == "**":  # right-associative: postfix ** unary
        lt, rt = _wrap(a, _ATOM), _wrap(b, 7)
    elif op in _CMP:  # not chainable
        lt, rt = _wrap(a, 5), _wrap(b, 5)
    else:
        lt, rt = _wrap(a, level), _wrap(b, level + 1)
    return _Frag(f"{lt} {op} {rt}", level, type_, a.score or b.score, a.tensors or b.tensors)


def _call(fn: str, args, type_: str) -> _Frag:
    return _Frag(f"{fn}({', '.join(a.text for a in args)})", _ATOM, type_,
                 any(a.score for a in args), any(a.tensors for a in args))


def _neg(a: _Frag) -> _Frag:
    return _Frag("-" + _wrap(a, 7), 7, a.type, a.score, a.tensors)


def _not(a: _Frag) -> _Frag:
    return _Frag("~" + _wrap(a, 3), 3, "bool", a.score, a.tensors)


def _paren(a: _Frag) -> _Frag:
    return _Frag(f"({a.text})", _ATOM, a.type, a.score, a.tensors, a.read, a.param)


def _not_read(a: _Frag) -> _Frag:
    """``a``, or ``-a`` when ``a`` is a bare tensor read (which '&', '|', '~' read as a mask)."""
    return _neg(a) if a.read else a


@dataclass(frozen=True)
class _Def:
    name: str
    params: tuple[str, ...]
    type: str
    score: bool
    tensors: bool
    read: bool = False             # the body is a bare tensor read
    passes: int | None = None      # the body is this parameter, bare


class _Gen:
    """Draws typed fragments. Ints stay small, reals finite, divisors positive literals."""

    def __init__(self, draw, with_tensors: bool, max_depth: int):
        self.draw = draw
        self.with_tensors = with_tensors
        self.max_depth = max_depth
        self.defs: list[_Def] = []
        self.params: tuple[str, ...] = ()  # parameters in scope while drawing a definition body

    def choice(self, options):
        return self.draw(st.sampled_from(options))

    def lit_int(self, lo=0, hi=9) -> _Frag:
        return _atom(str(self.draw(st.integers(lo, hi))), "int")

    def maybe_paren(self, f: _Frag) -> _Frag:
        return _paren(f) if self.draw(st.integers(0, 9)) == 0 else f

    def def_calls(self, type_: str, score: bool):
        """Calls of source definitions of ``type_`` (arguments are int fragments)."""
        out = []
        for d in self.defs:
            if d.type == type_ and (score or not d.score) and (self.with_tensors or not d.tensors):
                out.append(d)
        return out

    def call_def(self, d: _Def, depth: int) -> _Frag:
        if not d.params:
            return _atom(d.name, d.type, d.score, d.tensors, read=d.read)
        args = [self.int_(min(depth, 1)) for _ in d.params]
        f = _call(d.name, args, d.type)
        read = d.read or (d.passes is not None and args[d.passes].read)
        return _Frag(f.text, f.prec, d.type, d.score or f.score, d.tensors or f.tensors, read)

    # ints: index arithmetic over positions

    def int_(self, depth: int) -> _Frag:
        leaves = ["q", "kv", "b", "h", "lit", "lit"] + ["param"] * (2 if self.params else 0)
        if self.with_tensors:
            leaves.append("scalar")
        if depth <= 0 or self.draw(st.integers(0, 2)) == 0:
            leaf = self.choice(leaves)
            if leaf == "lit":
                return self.lit_int()
            if leaf == "param":
                name = self.choice(self.params)
                return _Frag(name, _ATOM, "int", param=name)
            if leaf == "scalar":
                return _atom("w", "int", tensors=True, read=True)
            return _atom(leaf, "int")
        d = depth - 1
        form = self.choice(["+", "-", "*", "//", "%", "neg", "abs", "min", "max", "clip", "def", "floor"])
        if form in ("+", "-"):
            f = _bin(form, self.int_(d), self.int_(d), "int")
        elif form == "*":
            f = _bin("*", self.int_(d), self.lit_int(0, 3), "int")
        elif form in ("//", "%"):
            f = _bin(form, self.int_(d), self.lit_int(1, 7), "int")
        elif form == "neg":
            f = _neg(self.int_(d))
        elif form == "abs":
            f = _call("abs", [self.int_(d)], "int")
        elif form in ("min", "max"):
            f = _call(form, [self.int_(d), self.int_(d)], "int")
        elif form == "clip":
            lo = self.draw(st.integers(-4, 4))
            f = _call("clip", [self.int_(d), _atom(str(lo), "int") if lo >= 0 else _neg(_atom(str(-lo), "int")),
                               self.lit_int(max(lo, 0), 9)], "int")
        elif form == "floor":
            f = _call(self.choice(["floor", "ceil"]), [_bin("/", self.int_(d), self.lit_int(1, 5), "real")], "int")
        else:
            calls = self.def_calls("int", False)
            f = self.call_def(self.choice(calls), d) if calls else self.int_(0)
        return self.maybe_paren(f)

    # masks

    def prelude_mask(self) -> _Frag:
        names = ["causal", "window1", "window2", "chunk", "sink", "dilated"]
        if self.with_tensors:
            names += ["doc1", "doc2", "prefix", "length", "window_t", "prefix_lit"]
        else:
            names += ["prefix_lit", "length_lit"]
        name = self.choice(names)
        lit = lambda lo, hi: str(self.draw(st.integers(lo, hi)))  # noqa: E731
        text = {
            "causal": lambda: "causal",
            "window1": lambda: f"window({lit(1, 8)})",
            "window2": lambda: f"window({lit(0, 6)}, {lit(0, 6)})",
            "chunk": lambda: f"chunk({lit(1, 8)})",
            "sink": lambda: f"sink({lit(0, 4)})",
            "dilated": lambda: f"dilated({lit(1, 4)})",
            "doc1": lambda: "doc(ids)",
            "doc2": lambda: "doc(qids, kvids)",
            "prefix": lambda: "prefix(n)",
            "length": lambda: "length(n)",
            "window_t": lambda: "window(w)",
            "prefix_lit": lambda: f"prefix({lit(0, 8)})",
            "length_lit": lambda: f"length({lit(1, 12)})",
        }[name]()
        return _atom(text, "bool", tensors=name in ("doc1", "doc2", "prefix", "length", "window_t"))

    def mask_read(self) -> _Frag:
        """A tensor read that is a mask by itself (bool or int 0/1 values; see ``_values``)."""
        text = self.choice(["mk[b, q, kv]", "hm[h, q, kv]", "km[b, kv]", "fl"])
        return _atom(text, "bool", tensors=True, read=True)

    def bool_(self, depth: int, mask_pos: bool = False) -> _Frag:
        """A mask. ``mask_pos``: it is an operand of '&', '|', '~' or where's condition, where a
        bare tensor read is a mask too (elsewhere, under '+' say, the read would be a number)."""
        if depth <= 0 or self.draw(st.integers(0, 3)) == 0:
            leaf = self.choice(["prelude", "prelude", "cmp", "cmp", "ids", "const"]
                               + (["read"] if mask_pos and self.with_tensors else []))
            if leaf == "read":
                return self.mask_read()
            if leaf == "prelude":
                return self.prelude_mask()
            if leaf == "cmp" or (leaf == "ids" and not self.with_tensors):
                return _bin(self.choice(_CMP), self.int_(1), self.int_(1), "bool")
            if leaf == "ids":
                return _bin(self.choice(["==", "!="]), _atom("ids[b, q]", "int", tensors=True),
                            _atom("ids[b, kv]", "int", tensors=True), "bool")
            return _atom(self.choice(["true", "false"]), "bool")
        d = depth - 1
        form = self.choice(["&", "|", "~", "+", "where", "cmp", "realcmp", "maskeq", "def"])
        if form in ("&", "|", "+"):
            f = _bin(form, self.bool_(d, form != "+"), self.bool_(d, form != "+"), "bool")
        elif form == "~":
            f = _not(self.bool_(d, True))
        elif form == "where":
            f = _call("where", [self.bool_(d, True), self.bool_(d), self.bool_(d)], "bool")
        elif form == "cmp":
            f = _bin(self.choice(_CMP), self.int_(d), self.int_(d), "bool")
        elif form == "realcmp":
            f = _bin(self.choice(["<", "<=", ">", ">="]), self.real(d, score=False), self.real(d, score=False), "bool")
        elif form == "maskeq":
            f = _bin(self.choice(["==", "!="]), self.bool_(d), self.bool_(d), "bool")
        else:
            calls = self.def_calls("bool", False)
            f = self.call_def(self.choice(calls), d) if calls else self.prelude_mask()
        return self.maybe_paren(f)

    # reals: biases and, with score=True, transforms

    def prelude_bias(self) -> _Frag:
        names = ["alibi"] + (["relpos", "bias"] if self.with_tensors else [])
        name = self.choice(names)
        if name == "alibi":
            return _atom(f"alibi({self.draw(st.integers(1, 16))})", "real")
        if name == "relpos":
            m = self.draw(st.integers(0, 4))
            return _atom(f"relpos(rp{m}, {m})", "real", tensors=True, read=True)
        return _atom("bias(bt)", "real", tensors=True, read=True)

    def lit_real(self) -> _Frag:
        value = self.draw(st.sampled_from([0.5, 0.25, 1.5, 2.0, 0.125, 3.0, 1e-3, 10.0]))
        f = _atom(repr(value), "real")
        return _neg(f) if self.draw(st.booleans()) else f

    def real(self, depth: int, score: bool) -> _Frag:
        """A real; when ``score`` is set it may (not must) mention score."""
        if depth <= 0 or self.draw(st.integers(0, 3)) == 0:
            leaf = self.choice(["prelude", "prelude", "lit", "int"] + (["score", "score"] if score else []))
            if leaf == "prelude":
                return self.prelude_bias()
            if leaf == "lit":
                return self.lit_real()
            if leaf == "score":
                return _atom("score", "real", score=True)
            return self.int_(1)
        d = depth - 1
        forms = ["+", "-", "*", "/", "neg", "tanh", "sigmoid", "exp", "exp2", "log", "sqrt", "pow",
                 "minmax", "clip", "where", "def", "int", "sin", "cos"]
        if score:
            forms += ["softcap", "tanhcap"]
        form = self.choice(forms)
        r = lambda: self.real(d, score)  # noqa: E731
        if form in ("+", "-", "*"):
            f = _bin(form, r(), r(), "real")
        elif form == "/":
            den = self.choice(["lit", "abs"])
            if den == "lit":
                f = _bin("/", r(), self.lit_real_positive(), "real")
            else:
                f = _bin("/", r(), _bin("+", _call("abs", [r()], "real"), _atom("1", "int"), "real"), "real")
        elif form == "neg":
            f = _neg(r())
        elif form in ("tanh", "sigmoid", "sin", "cos"):
            f = _call(form, [r()], "real")
        elif form in ("exp", "exp2"):
            f = _call(form, [_call("tanh", [r()], "real")], "real")
        elif form == "log":
            f = _call("log", [_bin("+", _call("abs", [r()], "real"), _atom("1", "int"), "real")], "real")
        elif form == "sqrt":
            f = _call("sqrt", [_call("abs", [r()], "real")], "real")
        elif form == "pow":
            base = _paren(_bin("+", _call("abs", [_call("tanh", [r()], "real")], "real"), _atom("1", "int"), "real"))
            f = _bin("**", base, self.choice([_atom("2", "int"), _atom("0.5", "real"), _neg(_atom("1", "int"))]),
                     "real")
        elif form == "minmax":
            f = _call(self.choice(["min", "max"]), [r(), r()], "real")
        elif form == "clip":
            f = _call("clip", [r(), _neg(_atom("2.5", "real")), _atom("2.5", "real")], "real")
        elif form == "where":
            f = _call("where", [self.bool_(d, True), r(), r()], "real")
        elif form == "softcap":
            f = _atom(f"softcap({self.draw(st.sampled_from([5, 20, 30, 50]))})", "real", score=True)
        elif form == "tanhcap":
            c = self.draw(st.sampled_from(["30", "20.0", "5"]))
            f = _bin("*", _atom(c, "int"), _call("tanh", [_bin("/", r(), _atom(c, "int"), "real")], "real"), "real")
        elif form == "def":
            calls = self.def_calls("real", score)
            f = self.call_def(self.choice(calls), d) if calls else self.prelude_bias()
        else:
            f = self.int_(d)
        return self.maybe_paren(f)

    def lit_real_positive(self) -> _Frag:
        return _atom(repr(self.draw(st.sampled_from([0.5, 2.0, 3.0, 8.0]))), "real")

    # definitions and the top level

    def definition(self, index: int) -> str:
        name = f"u{index}"
        params = tuple(f"p{i}" for i in range(self.draw(st.integers(0, 2))))
        type_ = self.choice(["bool", "bool", "int", "real", "real"])
        self.params = params
        try:
            if type_ == "bool":
                body = self.bool_(2)
            elif type_ == "int":
                body = self.int_(2)
            else:
                body = self.real(2, score=self.draw(st.booleans()))
        finally:
            self.params = ()
        passes = params.index(body.param) if body.param in params else None
        self.defs.append(_Def(name, params, type_, body.score, body.tensors, body.read, passes))
        head = f"{name}({', '.join(params)})" if params else name
        return f"{head} = {body.text}"

    def top_part(self, want: str, score: bool) -> _Frag:
        """One operand of the top-level chain: a mask, or a real (with score if asked)."""
        if want == "bool":
            if self.with_tensors and self.draw(st.integers(0, 5)) == 0:   # causal & mk[b, q, kv]
                return _bin("&", self.prelude_mask(), self.mask_read(), "bool")
            return self.bool_(self.max_depth)
        if score:
            f = self.real(self.max_depth, score=True)
            if not f.score:
                f = _bin("+", f, _atom("score", "real", score=True), "real")
            return f
        if self.draw(st.integers(0, 5)) == 0:  # an explicit -inf bias: where(m, x, -inf)
            return _call("where", [self.bool_(1, True), self.real(1, False), _neg(_atom("inf", "real"))], "real")
        return self.real(self.max_depth, score=False)

    def top(self, kind: str) -> _Frag:
        """A top-level chain of + and & whose meaning is of ``kind``."""
        if kind == "mask":
            parts = [self.top_part("bool", False) for _ in range(self.draw(st.integers(1, 3)))]
        else:
            n_real = self.draw(st.integers(1, 3))
            n_score = self.draw(st.integers(1, n_real)) if kind == "transform" else 0
            n_mask = self.draw(st.integers(0, 2))
            parts = [self.top_part("real", i < n_score) for i in range(n_real)]
            parts += [self.top_part("bool", False) for _ in range(n_mask)]
            parts = self.draw(st.permutations(parts))
        # Combine into a random binary tree; '&' needs a mask on at least one side.
        parts = list(parts)
        while len(parts) > 1:
            i = self.draw(st.integers(0, len(parts) - 2))
            a, b = parts[i], parts[i + 1]
            # '&' needs a mask on one side, and would read a bare tensor read (bias(bt), w) as a mask.
            ops = ["+", "&"] if "bool" in (a.type, b.type) and not (a.read or b.read) else ["+"]
            op = self.choice(ops)
            type_ = "bool" if a.type == b.type == "bool" else "real"
            parts[i:i + 2] = [_bin(op, a, b, type_)]
        return parts[0]


@st.composite
def sources(draw, kind: str | None = None, with_tensors: bool = True, with_definitions: bool = True,
            max_depth: int = 3) -> GeneratedSource:
    """A random well-typed source of ``kind`` ("mask", "bias", "transform"; None: any).

    ``with_tensors=False`` keeps to static sources (no tensor parameters);
    ``with_definitions=False`` leaves out definitions in the source.
    """
    if kind is None:
        kind = draw(st.sampled_from(["mask", "bias", "transform"]))
    if kind not in ("mask", "bias", "transform"):
        raise ValueError(f"kind must be 'mask', 'bias', 'transform' or None, got {kind!r}")
    gen = _Gen(draw, with_tensors, max_depth)
    lines = []
    if with_definitions:
        for i in range(draw(st.integers(0, 2))):
            lines.append(gen.definition(i))
    expr = gen.top(kind)
    if kind != "mask" and expr.type == "bool":  # cannot happen: the chain has a real part
        raise AssertionError(expr)
    sep = draw(st.sampled_from(["\n", "; ", "\n# a comment\n"]))
    text = sep.join(lines + [expr.text])
    if draw(st.integers(0, 7)) == 0:
        text = "# generated\n" + text + "  # end"
    return GeneratedSource(text, kind, expr.tensors)


def masks(with_tensors: bool = True, with_definitions: bool = True, max_depth: int = 3):
    """Random well-typed mask sources (``sources(kind="mask", ...)``)."""
    return sources(kind="mask", with_tensors=with_tensors, with_definitions=with_definitions, max_depth=max_depth)


@st.composite
def gather_sources(draw, kind: str | None = None) -> GeneratedSource:
    """A source of ``kind`` ("mask", "bias", "transform"; None: any) that reads tables at
    computed indices ("gather" reads): ``relpos(rp2, 2)``, ``g0[q - kv + 3]``,
    ``g1[h, abs(q - kv)]``, ``g2[b, h, clip(q - kv, -2, 2) + 2]``, ``g3[1, b, h, q]`` (a
    literal index), ``g4[(q - kv) // 3, h]``, random index arithmetic (``//``, ``%``,
    ``min``, ``floor``, ...), tables read as masks (``causal & m0[(kv - q) % 3]``: bool or
    int 0/1) and inside a transform (``score * sigmoid(g5[h, ...])``). No index depends on
    ``score``. Each read has its own table (``g*``, ``m*``, ``rp*``); ``tensors_for`` sizes
    each to its indices' range on the grid, so negative indices are clipped to 0; shrink
    the tables to send indices past the other end too.
    """
    if kind is None:
        kind = draw(st.sampled_from(["mask", "bias", "transform"]))
    gen = _Gen(draw, with_tensors=False, max_depth=2)
    lit = lambda lo, hi: draw(st.integers(lo, hi))  # noqa: E731
    names = iter(range(100))

    def plus(c: int) -> str:
        return f" + {c}" if c >= 0 else f" - {-c}"

    def index() -> str:
        form = draw(st.sampled_from(["diff", "abs", "clip", "div", "mod", "random"]))
        if form == "diff":
            return f"q - kv{plus(lit(-3, 6))}"
        if form == "abs":
            return draw(st.sampled_from(["abs(q - kv)", f"abs(kv - q{plus(lit(-3, 3))})"]))
        if form == "clip":
            m = lit(0, 4)
            return f"clip(q - kv, -{m}, {m}) + {m}"
        if form == "div":
            return f"(q - kv) // {lit(1, 4)}{plus(lit(-2, 4))}"
        if form == "mod":
            return f"(kv - q) % {lit(1, 5)}"
        return gen.int_(2).text

    def table_read(prefix: str) -> str:
        name = f"{prefix}{next(names)}"
        form = draw(st.sampled_from(["1d", "h", "bh", "literal", "first", "2d", "relpos"]))
        if form == "relpos" and prefix == "g":
            m = lit(0, 4)
            return f"relpos(rp{name[1:]}, {m})"
        return {
            "1d": lambda: f"{name}[{index()}]",
            "h": lambda: f"{name}[h, {index()}]",
            "bh": lambda: f"{name}[b, h, {index()}]",
            "literal": lambda: f"{name}[{lit(0, 2)}, b, h, q]",
            "first": lambda: f"{name}[{index()}, h]",
            "2d": lambda: f"{name}[{index()}, {index()}]",
            "relpos": lambda: f"{name}[h, {index()}]",
        }[form]()

    def mask() -> str:
        parts = [draw(st.sampled_from(["causal", f"window({lit(1, 8)})", f"chunk({lit(2, 8)})",
                                       f"kv > q - {lit(0, 8)}", gen.bool_(1).text]))]
        if kind == "mask" or draw(st.booleans()):
            parts.append(table_read("m"))
        return " & ".join(parts)

    def bias() -> str:
        read = table_read("g")
        form = draw(st.sampled_from(["plain", "plain", "scaled", "neg"]))
        return {"plain": read, "scaled": f"0.5 * {read}", "neg": f"-abs({read})"}[form]

    if kind == "mask":
        text = mask()
    else:
        terms = [bias() for _ in range(lit(1, 2))] if kind == "bias" else []
        if kind == "transform":
            terms.insert(0, draw(st.sampled_from([f"score * sigmoid({table_read('g')})",
                                                  f"score + tanh(score) * {table_read('g')}"])))
        if draw(st.integers(0, 3)):
            terms.append(f"({mask()})")
        text = " + ".join(draw(st.permutations(terms)))
    return GeneratedSource(text, kind, True)


@st.composite
def diagonal_masks(draw, depth: int = 3) -> str:
    """Masks built from the pieces the band understands, and some it does not."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        c = draw(st.integers(-6, 6))
        w = draw(st.integers(0, 8))
        return draw(st.sampled_from([
            "causal", f"window({w})", f"window({abs(c)}, {w})", f"chunk({w + 1})", f"sink({w})",
            f"q - kv <= {c}", f"kv - q < {c}", f"q >= kv + {c}", f"q == kv + {c}", f"abs(q - kv + {c}) <= {w}",
            f"abs(kv - q) > {w}", f"q // {w + 1} - kv // {w + 1} <= {c}", "doc(ids)", "true", "false",
            f"2 * q - 2 * kv < {c}", f"q - 2 * kv < {c}",
        ]))
    op = draw(st.sampled_from(["&", "|", "~"]))
    if op == "~":
        return f"~({draw(diagonal_masks(depth - 1))})"
    return f"({draw(diagonal_masks(depth - 1))}) {op} ({draw(diagonal_masks(depth - 1))})"



# One call per prelude name, with arguments (tensor names as tensors_for expects them).
PRELUDE_EXAMPLES = {
    "causal": ["causal"],
    "window": ["window({w})", "window({l}, {r})"],
    "chunk": ["chunk({c})"],
    "doc": ["doc(ids)", "doc(qids, kvids)"],
    "prefix": ["prefix({n})", "prefix(n)"],
    "sink": ["sink({n})"],
    "dilated": ["dilated({d})"],
    "length": ["length({n})", "length(n)"],
}


@st.composite
def prelude_masks(draw, with_tensors: bool = True) -> GeneratedSource:
    """One prelude mask with random literal arguments, e.g. ``window(5)`` or ``doc(ids)``."""
    options = [t for ts in PRELUDE_EXAMPLES.values() for t in ts]
    if not with_tensors:
        options = [t for t in options if "{" in t or "(" not in t]
    template = draw(st.sampled_from(options))
    text = template.format(w=draw(st.integers(1, 9)), l=draw(st.integers(0, 6)), r=draw(st.integers(0, 6)),
                           c=draw(st.integers(1, 9)), n=draw(st.integers(0, 9)), d=draw(st.integers(1, 5)))
    return GeneratedSource(text, "mask", template in ("doc(ids)", "doc(qids, kvids)", "prefix(n)", "length(n)"))


# ---- ill-typed sources -------------------------------------------------------------------

_FIXED_BAD = [
    ("alibi(8) & alibi(4)", ScoreModTypeError),
    ("causal * 2", ScoreModTypeError),
    ("-window(3)", ScoreModTypeError),
    ("exp(causal)", ScoreModTypeError),
    ("q | kv", ScoreModTypeError),
    ("~alibi(2)", ScoreModTypeError),
    ("2 * (causal & alibi(8))", ScoreModTypeError),
    ("causal < 3", ScoreModTypeError),
    ("ids[b, q / 2] == 0", ScoreModTypeError),
    ("q[0] < kv", ScoreModTypeError),
    ("ids[b][q] == 1", ScoreModTypeError),
    ("score & alibi(4)", ScoreModTypeError),
    ("where(q, 1, 2)", ScoreModTypeError),
    ("where(causal, causal, 1)", ScoreModTypeError),
    ("sin(causal)", ScoreModTypeError),
    ("cos(score) & sin(q)", ScoreModTypeError),
    ("mk[q] == causal", ScoreModTypeError),
    ("where(mk[q] & 2, 1, 0)", ScoreModTypeError),
    ("sin(q, kv)", ScoreModNameError),
    ("sin", ScoreModNameError),
    ("windw(3)", ScoreModNameError),
    ("window(1, 2, 3)", ScoreModNameError),
    ("causal(1)", ScoreModNameError),
    ("window", ScoreModNameError),
    ("min(q)", ScoreModNameError),
    ("query[b, q] == 0", ScoreModNameError),
    ("q(1) < kv", ScoreModNameError),
    ("q < kv < 3", ScoreModSyntaxError),
    ("(causal", ScoreModSyntaxError),
    ("causal)", ScoreModSyntaxError),
    ("q +", ScoreModSyntaxError),
    ("", ScoreModSyntaxError),
    ("1e400 + score", ScoreModSyntaxError),
    ("q < 99999999999", ScoreModSyntaxError),
    ("q ≤ kv", ScoreModSyntaxError),
    ("q kv", ScoreModSyntaxError),
    ("f(x) = x < q", ScoreModSyntaxError),
    ("f(x) = f(x) + 1\nf(2) > q", ScoreModDefinitionError),
    ("f(x) = g(x)\ng(x) = f(x)\nf(1) < q", ScoreModDefinitionError),
    ("causal = q < kv\ncausal", ScoreModDefinitionError),
    ("f = q < kv\nf = q > kv\nf", ScoreModDefinitionError),
    ("f(q) = q\nf(1) < kv", ScoreModSyntaxError),
    ("f(x, x) = x\nf(1, 2) < q", ScoreModSyntaxError),
]


@st.composite
def ill_typed_sources(draw, with_tensors: bool = True) -> BadSource:
    """A source that must fail, with the ``ScoreModError`` subclass it must raise.

    Half are fixed representative mistakes; the rest put generated well-typed pieces
    together wrongly (two reals under '&', masks in arithmetic, numbers under '|'/'~',
    a mask compared with a number, chained comparisons, misspelt names, wrong arity).
    """
    if draw(st.booleans()):
        text, error = draw(st.sampled_from(_FIXED_BAD))
        return BadSource(text, error)
    gen = _Gen(draw, with_tensors, 2)
    how = draw(st.sampled_from(["real&real", "mask*", "fn(mask)", "~num", "num|", "mask<num", "chain",
                                "typo", "arity", "nested-bias"]))
    if how == "real&real":   # (a bare tensor read under '&' is a mask: negated, it is a number)
        text = _bin("&", _not_read(gen.real(2, False)), _not_read(gen.real(2, draw(st.booleans()))), "real").text
        return BadSource(text, ScoreModTypeError)
    if how == "mask*":
        op = draw(st.sampled_from(["*", "-", "/", "//", "%", "**"]))
        m, x = gen.bool_(2), gen.int_(1)
        pair = (m, x) if draw(st.booleans()) else (x, m)
        return BadSource(_bin(op, pair[0], pair[1], "real").text, ScoreModTypeError)
    if how == "fn(mask)":
        fn = draw(st.sampled_from(["exp", "abs", "tanh", "sqrt", "floor", "sin", "cos"]))
        return BadSource(_call(fn, [gen.bool_(2)], "real").text, ScoreModTypeError)
    if how == "~num":
        return BadSource(_not(_not_read(gen.real(2, False))).text, ScoreModTypeError)
    if how == "num|":
        return BadSource(_bin("|", _not_read(gen.int_(2)), gen.bool_(1), "bool").text, ScoreModTypeError)
    if how == "mask<num":
        return BadSource(_bin(draw(st.sampled_from(_CMP)), gen.bool_(1), gen.int_(1), "bool").text,
                         ScoreModTypeError)
    if how == "chain":
        a, b, c = gen.int_(1), gen.int_(1), gen.int_(1)
        op1, op2 = draw(st.sampled_from(_CMP)), draw(st.sampled_from(_CMP))
        return BadSource(f"{_wrap(a, 5)} {op1} {_wrap(b, 5)} {op2} {_wrap(c, 5)}", ScoreModSyntaxError)
    if how == "typo":
        name = draw(st.sampled_from(["causl", "windo", "chunks", "alibii", "softcapp", "dilate", "prefx"]))
        return BadSource(f"{name}(3) & causal", ScoreModNameError)
    if how == "arity":
        text = draw(st.sampled_from(["window(1, 2, 3)", "chunk()", "alibi(1, 2)", "doc(ids, ids, ids)",
                                     "softcap()", "relpos(t)", "tanh(1, 2)", "clip(q, 1)"]))
        return BadSource(f"causal & {text}", ScoreModNameError)
    inner = _bin("&", gen.bool_(1), gen.real(1, False), "real")  # a mask-as-bias nested in a product
    return BadSource(_bin("*", _paren(inner), gen.lit_real_positive(), "real").text, ScoreModTypeError)


# ---- shapes ------------------------------------------------------------------------------


@st.composite
def shapes(draw, max_batch: int = 2, max_heads: int = 4, max_seq: int = 24, min_seq: int = 1,
           offsets: bool = True) -> Shape:
    """Small attention shapes: ragged T and S, GQA (N a multiple of K), scalar or per-batch
    offsets (decode-style bottom-right alignment among them)."""
    B = draw(st.integers(1, max_batch))
    K = draw(st.sampled_from([k for k in (1, 2) if k <= max_heads]))
    N = K * draw(st.integers(1, max(1, max_heads // K)))
    T = draw(st.integers(min_seq, max_seq))
    S = draw(st.integers(min_seq, max_seq))
    q_offset, kv_offset = 0, 0
    if offsets:
        how = draw(st.sampled_from(["none", "none", "bottom-right", "scalar", "per-batch"]))
        if how == "bottom-right":
            q_offset = max(0, S - T)
        elif how == "scalar":
            q_offset, kv_offset = draw(st.integers(0, 6)), draw(st.integers(0, 6))
        elif how == "per-batch":
            q_offset = np.array(draw(st.lists(st.integers(0, 6), min_size=B, max_size=B)), dtype=np.int32)
            kv_offset = np.array(draw(st.lists(st.integers(0, 3), min_size=B, max_size=B)), dtype=np.int32)
    return Shape(B, N, K, T, S, q_offset, kv_offset)


# ---- tensors for a source -------------------------------------------------------------------


def _expanded(source):
    """The expanded IR of a source string or ``Mod`` (through the dsl, not the compiler)."""
    from scoremod.dsl.definitions import expand
    from scoremod.dsl.parser import parse_source
    if hasattr(source, "canonical") and hasattr(source, "source"):
        source = source.source or str(source)
    return expand(parse_source(str(source)))


def _tensor_uses(expr):
    """For each tensor name: its index expressions (one tuple per read) and its role.

    Roles, strongest first: "divisor" (right of / // %: positive ints), "index" (inside
    another tensor's index: small non-negative ints), "ids" (compared with another tensor
    read: segment ids), "position" (compared with anything else: ints in the range of
    positions), "mask" (a read that is an operand of '&', '|', '~' or where's condition,
    a mask by itself: bool or int 0/1), "real" (everything else: a bias, N(0, 1) values).
    """
    from scoremod.dsl.ast import Binary, Call, Tensor, Unary, walk
    rank = {"divisor": 0, "index": 1, "ids": 2, "position": 3, "mask": 4, "real": 5}
    reads: dict[str, list] = {}
    roles: dict[str, str] = {}
    arithmetic = {"+", "-", "*"}

    def visit(node, context):
        stack = [(node, context)]
        while stack:
            n, ctx = stack.pop()
            if isinstance(n, Tensor):
                reads.setdefault(n.name, []).append(n.indices)
                if rank[ctx] < rank[roles.get(n.name, "real")]:
                    roles[n.name] = ctx
                for i in n.indices:
                    stack.append((i, "index"))
                continue
            if ctx == "mask":   # only a read itself is a mask there; what is below it is not
                ctx = "real"
            if isinstance(n, Binary):
                if n.op in ("<", "<=", ">", ">=", "==", "!="):
                    lhs_t = any(isinstance(x, Tensor) for x in walk(n.lhs))
                    rhs_t = any(isinstance(x, Tensor) for x in walk(n.rhs))
                    side = "ids" if lhs_t and rhs_t else "position"
                    stack.append((n.lhs, side if ctx != "index" else ctx))
                    stack.append((n.rhs, side if ctx != "index" else ctx))
                elif n.op in ("/", "//", "%"):
                    stack.append((n.lhs, ctx))
                    stack.append((n.rhs, "divisor"))
                elif n.op in arithmetic:
                    stack.append((n.lhs, ctx))
                    stack.append((n.rhs, ctx))
                elif n.op in ("&", "|"):
                    stack.append((n.lhs, "mask"))
                    stack.append((n.rhs, "mask"))
                else:
                    stack.append((n.lhs, "real"))
                    stack.append((n.rhs, "real"))
            elif isinstance(n, Unary):
                stack.append((n.operand, ctx if n.op == "-" else "mask"))
            elif isinstance(n, Call):
                keeps = n.fn in ("abs", "min", "max", "clip", "floor", "ceil", "sign")
                for k, a in enumerate(n.args):
                    if n.fn == "where":
                        stack.append((a, "mask" if k == 0 else ctx))
                    else:
                        stack.append((a, ctx if keeps else "real"))
    visit(expr, "real")
    return reads, {name: roles.get(name, "real") for name in reads}


def tensors_for(source, B: int, N: int, T: int, S: int, rng: np.random.Generator, *, q_offset=0, kv_offset=0,
                sorted_ids: bool | None = None) -> dict[str, np.ndarray]:
    """Tensors for every tensor parameter ``source`` reads, sized so indices stay meaningful.

    The rank of a tensor is the number of indices it is read with (0 for a bare scalar);
    each dimension is one more than the largest value its index takes on the grid (so
    ``ids[b, q]`` gets ``[B, max q + 1]``, ``rp[h, clip(q - kv, -m, m) + m]`` gets
    ``[N, 2m + 1]``, ``bt[b, h, q, kv]`` gets ``[B, N, max q + 1, max kv + 1]``).
    Values follow how the tensor is used (see ``_tensor_uses``): segment ids are small
    ints, sorted (packed documents) or not (``sorted_ids``: None = random); "position"
    ints lie in ``[0, max position + 1]``; divisors in ``[1, 8]``; reads that are masks by
    themselves are bool or int 0/1 (mostly 1); reals are N(0, 1).
    Returns int32, float32 and (masks read by themselves) bool NumPy arrays, what a user passes.
    """
    from evaluator import evaluate_expr  # the grid evaluation of index expressions
    expr = _expanded(source)
    reads, roles = _tensor_uses(expr)
    max_pos = max(int(np.max(np.asarray(q_offset))) + T, int(np.max(np.asarray(kv_offset))) + S)
    out: dict[str, np.ndarray] = {}
    pending = dict(reads)
    for _ in range(len(pending) + 1):
        for name, index_lists in list(pending.items()):
            needed = {n for idx in index_lists for i in idx for n in _tensor_names(i)}
            if not needed <= set(out):
                continue
            del pending[name]
            rank = min((len(idx) for idx in index_lists), default=0)
            shape = []
            for axis in range(rank):
                size = 1
                for idx in index_lists:
                    node = idx[len(idx) - rank + axis]
                    values = evaluate_expr(node, B, N, T, S, q_offset=q_offset, kv_offset=kv_offset, tensors=out)
                    size = max(size, int(np.max(values)) + 1)
                shape.append(size)
            out[name] = _values(roles[name], tuple(shape), max_pos, rng, sorted_ids)
    for name in pending:  # circular reads (t[u[...]] and u[t[...]]): plain ints
        out[name] = rng.integers(0, 4, size=(max(T, S),)).astype(np.int32)
    return out


def _tensor_names(node):
    from scoremod.dsl.ast import Tensor, walk
    return [n.name for n in walk(node) if isinstance(n, Tensor)]


def _values(role: str, shape: tuple, max_pos: int, rng, sorted_ids) -> np.ndarray:
    if role == "real":
        return rng.standard_normal(shape).astype(np.float32)
    if role == "mask":   # mostly true; bool or int 0/1, as a user passes a mask
        ones = np.asarray(rng.random(shape) < 0.7)
        return ones if rng.integers(0, 2) else ones.astype(np.int32)
    if role == "divisor":
        return rng.integers(1, 9, size=shape).astype(np.int32)
    if role == "index":
        return rng.integers(0, 5, size=shape).astype(np.int32)
    if role == "position":
        return rng.integers(0, max_pos + 2, size=shape).astype(np.int32)
    # ids: small ints; sorted means packed documents (runs), else any order
    if sorted_ids is None:
        sorted_ids = bool(rng.integers(0, 2))
    ids = rng.integers(0, 3, size=shape)
    if sorted_ids and len(shape) >= 1:
        ids = np.sort(ids, axis=-1)
    return ids.astype(np.int32)

