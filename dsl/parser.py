"""Text -> AST. A cached LALR Lark parser whose Transformer builds nodes with spans."""

from __future__ import annotations

import math
import threading
from functools import lru_cache

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from scoremod.errors import ScoreModError, ScoreModSyntaxError
from scoremod.grammar import grammar_text
from scoremod.dsl.ast import (
    Binary, BoolLit, Call, Definition, Index, IntLit, Name, Node, RealLit, Source, Unary, Var,
    VARIABLES, depth,
)

__all__ = ["parse_source", "parse_definitions", "MAX_DEPTH", "MAX_SOURCE_CHARS"]

MAX_DEPTH = 1000
MAX_SOURCE_CHARS = 1_000_000
INT32_MAX = 2**31 - 1

_TOKEN_WORDS = {
    "CMP_OP": "a comparison", "NAME": "a name", "INT": "an integer", "REAL": "a number",
    "_NL": "a newline", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "COMMA": "','", "SEMICOLON": "';'", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'",
    "SLASH": "'/'", "PERCENT": "'%'", "AMPERSAND": "'&'", "VBAR": "'|'", "TILDE": "'~'",
    "EQUAL": "'='", "DOUBLESTAR": "'**'", "DOUBLESLASH": "'//'", "$END": "the end",
}


def _span(meta) -> tuple[int, int]:
    return (meta.start_pos, meta.end_pos)


class _DropNewlinesInBrackets:
    """Postlexer: a newline inside (...) or [...] is whitespace, outside it ends a definition."""
    always_accept = ("_NL",)

    def process(self, stream):
        level = 0
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                level += 1
            elif tok.type in ("RPAR", "RSQB"):
                level = max(0, level - 1)
            elif tok.type == "_NL" and level > 0:
                continue
            yield tok


def _extent(*items) -> tuple[int, int]:
    """The span covering nodes (by their span) and tokens (by their position)."""
    starts, ends = [], []
    for it in items:
        if isinstance(it, Token):
            starts.append(it.start_pos)
            ends.append(it.end_pos)
        elif isinstance(it, (Node, Definition)) and it.span is not None:
            starts.append(it.span[0])
            ends.append(it.span[1])
    return (min(starts), max(ends))


class _Build(Transformer):
    """One method per grammar alias; each returns an AST node with its span."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def _error(self, message, span, hint=None):
        raise ScoreModSyntaxError(message, source=self.text, span=span, hint=hint)

    # literals and names
    @v_args(inline=True)
    def int_lit(self, tok):
        value = int(str(tok).replace("_", ""))
        if value > INT32_MAX:
            self._error(f"integer literal {tok} does not fit in int32 (at most {INT32_MAX:_})", _extent(tok),
                        "positions and sizes are int32; write a real like 1e12 if you meant a number")
        return IntLit(value, span=_extent(tok))

    @v_args(inline=True)
    def real_lit(self, tok):
        value = float(str(tok).replace("_", ""))
        if math.isinf(value):
            self._error(f"real literal {tok} is too large (it overflows to infinity)", _extent(tok),
                        "write inf for infinity")
        return RealLit(value, span=_extent(tok))

    @v_args(inline=True)
    def name(self, tok):
        text = str(tok)
        span = _extent(tok)
        if text in ("true", "false"):
            return BoolLit(text == "true", span=span)
        if text == "inf":
            return RealLit(math.inf, span=span)
        if text in VARIABLES:
            return Var(text, span=span)
        return Name(text, span=span)

    # operators
    def _binary(op):
        @v_args(inline=True)
        def build(self, lhs, rhs):
            return Binary(op, lhs, rhs, span=_extent(lhs, rhs))
        return build

    or_ = _binary("|")
    and_ = _binary("&")
    add = _binary("+")
    sub = _binary("-")
    mul = _binary("*")
    truediv = _binary("/")
    floordiv = _binary("//")
    mod = _binary("%")
    pow = _binary("**")
    del _binary

    @v_args(inline=True)
    def not_(self, tok, x):
        return Unary("~", x, span=_extent(tok, x))

    @v_args(inline=True)
    def neg(self, tok, x):
        return Unary("-", x, span=_extent(tok, x))

    def compare(self, children):
        if len(children) > 3:
            a, op1, b, op2, c = children[:5]
            first, second = self._snippet(a, b, op1), self._snippet(b, c, op2)
            self._error("comparisons do not chain", _extent(*children),
                        f"write {first} & {second}")
        lhs, op, rhs = children
        return Binary(str(op), lhs, rhs, span=_extent(lhs, rhs))

    def _snippet(self, lhs, rhs, op):
        return f"{self.text[lhs.span[0]:lhs.span[1]]} {op} {self.text[rhs.span[0]:rhs.span[1]]}"

    def call(self, children):
        fn, *args, rpar = children
        args = [a for a in args if a is not None]
        return Call(str(fn), tuple(args), span=_extent(fn, rpar))

    def index(self, children):
        base, *indices, rsqb = children
        return Index(base, tuple(indices), span=_extent(base, rsqb))

    # statements
    @v_args(inline=True)
    def definition(self, lhs, body):
        if isinstance(lhs, Name):
            name, params = lhs.name, ()
        elif isinstance(lhs, Call) and all(isinstance(a, (Name, Var)) for a in lhs.args):
            name = lhs.fn
            for a in lhs.args:
                if isinstance(a, Var):
                    self._error(f"parameter '{a.name}' is a built-in variable", a.span,
                                "choose another parameter name (b, h, q, kv and score are positions and the logit)")
            params = tuple(a.name for a in lhs.args)
            seen = set()
            for a in lhs.args:
                if a.name in seen:
                    self._error(f"parameter '{a.name}' appears twice", a.span)
                seen.add(a.name)
        else:
            self._error("the left side of '=' must be a name or name(parameters)", lhs.span,
                        "write a definition like swa(w) = causal & window(w); compare with '=='")
        span = _extent(lhs, body)
        return Definition(name, params, body, doc=self._doc_above(span[0]), text=self.text,
                          span=span, name_span=lhs.span if isinstance(lhs, Name) else _name_span(lhs))

    def _doc_above(self, pos: int) -> str:
        """The '#' comment lines directly above the line at ``pos``."""
        line_start = self.text.rfind("\n", 0, pos) + 1
        lines = self.text[:line_start].split("\n")[:-1]
        doc = []
        for line in reversed(lines):
            stripped = line.strip()
            if not stripped.startswith("#"):
                break
            doc.append(stripped.lstrip("#").strip())
        return " ".join(reversed(doc))

    def source(self, children):
        *defs, expr = children
        if isinstance(expr, Definition):
            self._error("a source needs an expression after its definitions", expr.span,
                        f"add an expression that uses it, e.g. {expr.signature}")
        return Source(tuple(defs), expr, text=self.text)

    def definitions(self, children):
        return tuple(c for c in children if c is not None)


def _name_span(call: Call) -> tuple[int, int]:
    return (call.span[0], call.span[0] + len(call.fn))


_BUILDER = _Build("")
_LOCK = threading.Lock()


@lru_cache(maxsize=None)
def _parser() -> Lark:
    # The transformer runs inside the LALR parser, so no parse tree is built and
    # deep inputs need no recursion.
    return Lark(grammar_text(), parser="lalr", start=["source", "definitions"],
                propagate_positions=True, postlex=_DropNewlinesInBrackets(),
                maybe_placeholders=True, transformer=_BUILDER)


def _parse(text: str, start: str):
    if not isinstance(text, str):
        raise ScoreModSyntaxError(f"a source must be a string, got {type(text).__name__}")
    if len(text) > MAX_SOURCE_CHARS:
        raise ScoreModSyntaxError(f"source is {len(text):_} characters; the limit is {MAX_SOURCE_CHARS:_}")
    if all(not line.strip() or line.strip().startswith("#") for line in text.splitlines()):
        what = "an expression" if start == "source" else "a definition"
        raise ScoreModSyntaxError(f"empty source: expected {what}",
                                  hint="for example: causal & window(1024)")
    bad = next((i for i, ch in enumerate(text) if ord(ch) > 127 and not _in_comment(text, i)), None)
    if bad is not None:
        raise ScoreModSyntaxError(f"unexpected character {text[bad]!r} (U+{ord(text[bad]):04X})",
                                  source=text, span=(bad, bad + 1), hint=_unicode_hint(text[bad]))
    parser = _parser()
    with _LOCK:
        _BUILDER.text = text
        try:
            return parser.parse(text, start=start)
        except UnexpectedInput as exc:
            raise _syntax_error(text, exc) from None
        except VisitError as exc:
            if isinstance(exc.orig_exc, ScoreModError):
                raise exc.orig_exc from None
            raise


def _in_comment(text: str, i: int) -> bool:
    line_start = text.rfind("\n", 0, i) + 1
    return "#" in text[line_start:i]


def _unicode_hint(ch: str) -> str:
    table = {"≤": "<=", "≥": ">=", "≠": "!=", "−": "-", "×": "*", "÷": "/", "∧": "&", "∨": "|",
             "¬": "~", "∞": "inf", "“": '"', "”": '"'}
    if ch in table:
        return f"write {table[ch]!r} instead"
    return "sources are ASCII outside comments"


def _syntax_error(text: str, exc: UnexpectedInput) -> ScoreModSyntaxError:
    pos = getattr(exc, "pos_in_stream", None)
    if pos is None and getattr(exc, "token", None) is not None:
        pos = getattr(exc.token, "start_pos", None)
    if isinstance(exc, UnexpectedEOF) or pos is None:
        pos = len(text.rstrip())
        return ScoreModSyntaxError("unexpected end of source", source=text, span=(max(0, pos - 1), pos),
                                   hint=_expect_hint(exc))
    if isinstance(exc, UnexpectedCharacters):
        ch = text[pos]
        return ScoreModSyntaxError(f"unexpected character {ch!r}", source=text, span=(pos, pos + 1),
                                   hint=_char_hint(text, pos))
    tok = exc.token
    if tok.type == "$END":
        pos = len(text.rstrip())
        return ScoreModSyntaxError("unexpected end of source", source=text,
                                   span=(max(0, pos - 1), pos), hint=_expect_hint(exc))
    width = max(1, len(str(tok)))
    what = "newline" if tok.type == "_NL" else repr(str(tok))
    return ScoreModSyntaxError(f"unexpected {what}", source=text, span=(pos, pos + width),
                               hint=_expect_hint(exc, tok))


def _char_hint(text: str, pos: int) -> str | None:
    ch = text[pos]
    if ch == "!":
        return "use ~ for 'not' and != for 'not equal'"
    if ch == "^":
        return "use ** for powers"
    if ch == "=" and text[pos:pos + 2] != "==":
        return "use == to compare"
    if ch in "\"'":
        return "strings are not part of the language"
    return None


def _expect_hint(exc: UnexpectedInput, tok: Token | None = None) -> str | None:
    expected = getattr(exc, "expected", None) or getattr(exc, "accepts", None) or set()
    if tok is not None and str(tok) == "=":
        return "use == to compare; a definition is name(params) = expr on its own line"
    words = sorted({_TOKEN_WORDS.get(e, e) for e in expected if not e.startswith("__")})
    if not words:
        return None
    if len(words) > 6:
        return "expected an operand or an operator here"
    return "expected " + ", ".join(words)


def _check_depth(node: Node, text: str) -> None:
    d = depth(node)
    if d > MAX_DEPTH:
        raise ScoreModSyntaxError(f"expression is nested {d} levels deep; the limit is {MAX_DEPTH}",
                                  source=text, span=node.span,
                                  hint="split it into definitions, or sum fewer terms")


def parse_source(text: str) -> Source:
    """Parse a source (definitions, then one expression) into an AST with spans."""
    src = _parse(text, "source")
    for d in src.definitions:
        _check_depth(d.body, text)
    _check_depth(src.expr, text)
    return src


def parse_definitions(text: str) -> tuple[Definition, ...]:
    """Parse a text holding only definitions (the prelude, ``scoremod.define``)."""
    defs = _parse(text, "definitions")
    for d in defs:
        _check_depth(d.body, text)
    return defs
