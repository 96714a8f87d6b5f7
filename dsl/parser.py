"""Text -> AST with spans.

Lark compiles the grammar (grammar/scoremod.lark) into LALR(1) tables once, and builds
one callback per grammar alias from the ``_Build`` transformer. Parsing a source then
runs a small driver over those tables, fed by a one-regex lexer made from the grammar's
own terminals: both are a few times faster than Lark's general-purpose loop, and the
grammar file stays the single description of the syntax. No parse tree is built and
nothing recurses, so deep inputs are fine.
"""

from __future__ import annotations

import math
import dataclasses
import re
import threading
from functools import lru_cache

from lark import Lark, Transformer, v_args
from lark.parsers.lalr_analysis import Shift

from scoremod.errors import ScoreModSyntaxError
from scoremod.grammar import grammar_text
from scoremod.dsl.typecheck import INT32_MAX
from scoremod.dsl.ast import (
    Binary, BoolLit, Call, Definition, Index, IntLit, Name, Node, RealLit, Source, Unary, Var,
    VARIABLES, depth, make_error,
)

__all__ = ["parse_source", "parse_definitions", "normalize_newlines", "MAX_DEPTH", "MAX_SOURCE_CHARS"]

MAX_DEPTH = 1000
MAX_SOURCE_CHARS = 1_000_000
# Reals are float32 in every implementation (docs/language.md, Literals).
FLOAT32_MAX = 3.4028234663852886e38

# How terminals are named in messages.
_TOKEN_WORDS = {
    "CMP_OP": "a comparison", "NAME": "a name", "INT": "a number", "REAL": "a number",
    "_NL": "a newline", "$END": "the end",
}
_OPENERS = {"LPAR": "RPAR", "LSQB": "RSQB"}
_CLOSERS = {"RPAR": "LPAR", "RSQB": "LSQB"}
_BRACKET_TEXT = {"LPAR": "(", "RPAR": ")", "LSQB": "[", "RSQB": "]"}
# Tokens that can start an operand, and binary operators (for "what was expected" hints).
_OPERAND_START = {"NAME", "INT", "REAL", "LPAR", "MINUS", "TILDE"}
_BINARY_OPERATORS = {"PLUS", "STAR", "SLASH", "PERCENT", "AMPERSAND", "VBAR", "CMP_OP"}


class _Token(str):
    """A lexed token: its text, with ``type``, ``start_pos`` and ``end_pos``."""

    def __new__(cls, type_: str, text: str, start: int, end: int):
        tok = str.__new__(cls, text)
        tok.type, tok.start_pos, tok.end_pos = type_, start, end
        return tok


def _extent(*items) -> tuple[int, int]:
    """The span covering nodes (by their span) and tokens (by their position)."""
    starts, ends = [], []
    for it in items:
        if isinstance(it, _Token):
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
        raise _syntax_error(message, source=self.text, span=span, hint=hint)

    # literals and names
    @v_args(inline=True)
    def int_lit(self, tok):
        digits = str(tok).replace("_", "").lstrip("0") or "0"
        value = int(digits) if len(digits) <= 10 else INT32_MAX + 1   # (Python refuses > 4300 digits)
        if value > INT32_MAX:
            self._error(f"integer literal {tok} does not fit in int32 (at most {INT32_MAX:_})", _extent(tok),
                        "positions and sizes are int32; write a real like 1e12 if you meant a number")
        return IntLit(value, span=_extent(tok))

    @v_args(inline=True)
    def real_lit(self, tok):
        value = float(str(tok).replace("_", ""))
        if math.isinf(value) or value > FLOAT32_MAX:
            self._error(f"real literal {tok} is too large: reals are float32 (at most {FLOAT32_MAX:.7g})",
                        _extent(tok), "write inf for infinity")
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
        args = [a for a in args if a is not None and not (isinstance(a, _Token) and a.type == "LPAR")]
        return Call(str(fn), tuple(args), span=_extent(fn, rpar))

    @v_args(inline=True)
    def paren(self, lpar, expr, rpar):
        # The brackets belong to the expression's span: error carets start at the '('.
        return dataclasses.replace(expr, span=_extent(lpar, rpar))

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
        elif isinstance(lhs, Var):
            self._error(f"'{lhs.name}' is a built-in variable and cannot be defined", lhs.span,
                        "choose another name; to compare, write ==")
        elif isinstance(lhs, BoolLit) or (isinstance(lhs, RealLit) and _span_text(self.text, lhs) == "inf"):
            self._error(f"'{_span_text(self.text, lhs)}' is a constant and cannot be defined", lhs.span,
                        "choose another name")
        else:
            self._error("the left side of '=' must be a name or name(parameters)", lhs.span,
                        "write a definition like swa(w) = causal & window(w); compare with '=='")
        span = _extent(lhs, body)
        return Definition(name, params, body, doc=self._doc_above(span[0]), text=self.text,
                          span=span, name_span=lhs.span if isinstance(lhs, Name) else _name_span(lhs))

    def _doc_above(self, pos: int) -> str:
        """The '#' comment lines directly above the line at ``pos``."""
        end = self.text.rfind("\n", 0, pos)    # the newline before the definition's line
        doc = []
        while end >= 0:   # walk up one line at a time (splitting the whole prefix was quadratic)
            start = self.text.rfind("\n", 0, end) + 1
            stripped = self.text[start:end].strip()
            if not stripped.startswith("#"):
                break
            doc.append(stripped.lstrip("#").strip())
            end = start - 1
        return " ".join(reversed(doc))

    def source(self, children):
        *defs, expr = children
        if isinstance(expr, Definition):
            self._error("a source needs an expression after its definitions", expr.span,
                        f"add an expression that uses it, e.g. {expr.signature}")
        return Source(tuple(defs), expr, text=self.text)

    def definitions(self, children):
        return tuple(c for c in children if c is not None)


def _syntax_error(message, **kw) -> ScoreModSyntaxError:
    return make_error(ScoreModSyntaxError, message, **kw)


def _span_text(text: str, node: Node) -> str:
    return text[node.span[0]:node.span[1]] if node.span else str(node)


def _name_span(call: Call) -> tuple[int, int]:
    return (call.span[0], call.span[0] + len(call.fn))


_BUILDER = _Build("")
_LOCK = threading.Lock()


class _Tables:
    """What parsing needs, taken from Lark once: the lexer regex and the LALR tables.

    ``actions[state][terminal]`` is ``(True, next_state)`` for a shift, or
    ``(False, size, nonterminal, callback)`` for a reduction (callback None: the rule
    only passes its one child through, as ``?rule: other`` does).
    """

    def __init__(self, lark: Lark):
        terminals = sorted(lark.lexer_conf.terminals,
                           key=lambda t: (-t.priority, -t.pattern.max_width, -len(t.pattern.value), t.name))
        self.regex = re.compile("|".join(f"(?P<{t.name}>{t.pattern.to_regexp()})" for t in terminals))
        self.ignore = frozenset(lark.lexer_conf.ignore)
        self.words = dict(_TOKEN_WORDS)
        for t in terminals:
            if t.pattern.type == "str":
                self.words.setdefault(t.name, repr(t.pattern.value))
        parser = lark.parser.parser.parser
        table = parser.parse_table
        self.start_states = dict(table.start_states)
        self.end_states = dict(table.end_states)
        self.actions: dict[int, dict[str, tuple]] = {}
        for state, row in table.states.items():
            out = {}
            for term, (action, arg) in row.items():
                if action is Shift:
                    out[str(term)] = (True, arg)
                else:
                    passthrough = (arg.options.expand1 and len(arg.expansion) == 1
                                   and not arg.expansion[0].is_term)
                    out[str(term)] = (False, len(arg.expansion), str(arg.origin.name),
                                      None if passthrough else parser.callbacks[arg])
            self.actions[state] = out


@lru_cache(maxsize=None)
def _tables() -> _Tables:
    # Lark builds the LALR tables and the callbacks (the _Build methods wrapped to drop
    # punctuation and inline `?rule`s); it never runs its own parse loop here.
    return _Tables(Lark(grammar_text(), parser="lalr", start=["source", "definitions"],
                        maybe_placeholders=True, transformer=_BUILDER))


def _lex(text: str, tables: _Tables) -> list[_Token]:
    """Tokens of ``text``; a newline inside (...) or [...] is whitespace, outside it ends a
    definition. Brackets must balance: that is checked here, for a clear message."""
    match = tables.regex.match
    ignore = tables.ignore
    tokens: list[_Token] = []
    opened: list[_Token] = []
    pos, n = 0, len(text)
    while pos < n:
        m = match(text, pos)
        if m is None or m.end() == pos:
            raise _syntax_error(f"unexpected character {text[pos]!r}", source=text,
                                span=(pos, pos + 1), hint=_char_hint(text, pos))
        kind, end = m.lastgroup, m.end()
        if kind in ignore or (kind == "_NL" and opened):
            pos = end
            continue
        tok = _Token(kind, m.group(), pos, end)
        if kind in _OPENERS:
            opened.append(tok)
        elif kind in _CLOSERS:
            if not opened:
                raise _syntax_error(f"unmatched {tok!r}", source=text, span=(pos, end),
                                    hint=f"remove it, or add {_BRACKET_TEXT[_CLOSERS[kind]]!r} before it")
            opener = opened.pop()
            if _OPENERS[opener.type] != kind:
                want = _BRACKET_TEXT[_OPENERS[opener.type]]
                raise _syntax_error(
                    f"{tok!r} does not match the {opener!r} at column {_column(text, opener.start_pos)}",
                    source=text, span=(pos, end), hint=f"close {opener!r} with {want!r}")
        tokens.append(tok)
        pos = end
    if opened:
        opener = opened[-1]
        want = _BRACKET_TEXT[_OPENERS[opener.type]]
        raise _syntax_error(f"{opener!r} is never closed", source=text,
                            span=(opener.start_pos, opener.end_pos), hint=f"add {want!r}")
    end = len(text.rstrip())
    tokens.append(_Token("$END", "", end, end))
    return tokens


def _column(text: str, pos: int) -> int:
    return pos - text.rfind("\n", 0, pos)


def _run(text: str, tokens: list[_Token], start: str, tables: _Tables):
    """The LALR(1) loop: shift tokens, reduce rules through their callbacks."""
    actions = tables.actions
    end_state = tables.end_states[start]
    states = [tables.start_states[start]]
    values: list = []
    prev = None
    for tok in tokens:
        kind = tok.type
        while True:
            act = actions[states[-1]].get(kind)
            if act is None:
                raise _unexpected(text, tok, prev, actions[states[-1]], values, start, tables)
            if act[0]:
                states.append(act[1])
                values.append(tok)
                prev = tok
                break
            _, size, origin, callback = act
            if size:
                children = values[-size:]
                del states[-size:]
                del values[-size:]
            else:
                children = []
            value = children[0] if callback is None else callback(children)
            states.append(actions[states[-1]][origin][1])
            values.append(value)
            if kind == "$END" and states[-1] == end_state:
                return values[-1]
    raise AssertionError("the token stream ends with $END")


def _unexpected(text, tok, prev, row, values, start, tables) -> ScoreModSyntaxError:
    """The error for ``tok`` (after ``prev``) where the parser expected one of ``row``'s terminals."""
    expected = {t for t in row if t.isupper() or t == "$END"}
    span = (tok.start_pos, tok.end_pos)
    if tok.type == "$END":
        span = (max(0, tok.start_pos - 1), tok.start_pos)
        defs = [v for v in values if isinstance(v, Definition)]
        in_definition = any(isinstance(v, _Token) and v.type == "EQUAL" for v in values)
        if start == "source" and (defs or in_definition):
            if not in_definition or expected & {"_NL", "SEMICOLON"}:
                return _syntax_error(
                    "a source needs an expression after its definitions", source=text,
                    span=defs[-1].span if defs and not in_definition else span,
                    hint="add the expression on a new line, e.g. " + _example_use(defs))
        if start == "definitions" and not in_definition:
            return _syntax_error("expected '=': this is not a definition", source=text, span=span,
                                 hint="a definition is name(params) = expr, e.g. swa(w) = causal & window(w)")
        return _syntax_error("unexpected end of source", source=text, span=span,
                             hint=_expect_hint(expected, tok, tables))
    if tok.type == "EQUAL":
        return _syntax_error("unexpected '='", source=text, span=span,
                             hint="use == to compare; a definition is name(params) = expr on its own line")
    if tok.type == "_NL":
        hint = _expect_hint(expected, tok, tables)
        if expected & _OPERAND_START:
            hint = "a newline ends the expression here; to go on, wrap it in ( ) or end the line with \\"
        return _syntax_error("unexpected newline", source=text, span=span, hint=hint)
    if prev is not None and prev.type in ("INT", "REAL") and prev.end_pos == tok.start_pos and tok.type == "NAME":
        if str(prev) == "0" and str(tok)[0] in "xXoObB":
            hint = "numbers are written in decimal"
        elif str(tok)[0] in "eE":
            hint = "an exponent needs digits, e.g. 1e3"
        elif str(tok)[0] == "_":
            hint = "'_' goes between digits, as in 4_096"
        else:
            hint = "a name cannot start with a digit"
        return _syntax_error(f"unexpected {str(tok)!r} after the number {str(prev)!r}", source=text,
                             span=(prev.start_pos, tok.end_pos), hint=hint)
    if prev is not None and prev.type in ("_NL", "SEMICOLON") and start == "source" and "$END" in expected:
        return _syntax_error(
            "a second expression: a source is definitions followed by one expression", source=text, span=span,
            hint="combine expressions with & or +, or write name(params) = ... to define a name")
    return _syntax_error(f"unexpected {str(tok)!r}", source=text, span=span,
                         hint=_expect_hint(expected, tok, tables))


def _example_use(defs) -> str:
    d = defs[-1] if defs else None
    if d is not None:
        args = ", ".join("..." for _ in d.params)
        return f"{d.name}({args})" if d.params else d.name
    return "causal & window(1024)"


def _expect_hint(expected: set[str], tok, tables: _Tables) -> str | None:
    expected = set(expected)
    if expected - {"_NL"}:
        expected.discard("_NL")
    if expected & {"NAME", "INT", "REAL"} and not expected & _BINARY_OPERATORS:
        return "expected a value here: a name, a number, or '('"
    if tok.type in _OPERAND_START - {"MINUS"} and expected & _BINARY_OPERATORS:
        return f"is an operator missing before {str(tok)!r}?"
    words = sorted({tables.words.get(e, e) for e in expected})
    if not words:
        return None
    if len(words) > 6:
        return "expected an operator, or the end of the expression"
    return "expected " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1])


def _char_hint(text: str, pos: int) -> str | None:
    ch = text[pos]
    if ch == "!":
        return "use ~ for 'not' and != for 'not equal'"
    if ch == "^":
        return "use ** for powers"
    if ch in "\"'":
        return "strings are not part of the language; a tensor is passed by name, e.g. doc(ids)"
    if ch == "." and pos + 1 < len(text) and text[pos + 1].isalpha():
        return "there are no attributes; index a tensor with t[i, j]"
    if ch == "\\":
        return "a backslash continues a line only at the end of a line"
    return None


def _first_non_ascii_outside_comments(text: str) -> int | None:
    """Offset of the first non-ASCII character that is not in a comment (linear time)."""
    pos = 0
    for line in text.split("\n"):
        code = line.split("#", 1)[0]
        if not code.isascii():
            return pos + next(i for i, ch in enumerate(code) if ord(ch) > 127)
        pos += len(line) + 1
    return None


def _unicode_hint(ch: str) -> str:
    table = {"≤": "<=", "≥": ">=", "≠": "!=", "−": "-", "–": "-", "×": "*", "÷": "/", "∧": "&",
             "∨": "|", "¬": "~", "∞": "inf", "“": '"', "”": '"', "·": "*", "⋅": "*"}
    if ch in table:
        return f"write {table[ch]!r} instead"
    if ch.isspace():
        return "replace it with a plain space"
    return "sources are ASCII outside comments"


def _precheck(text, start: str) -> None:
    if not isinstance(text, str):
        raise _syntax_error(f"a source must be a string, got {type(text).__name__}")
    if len(text) > MAX_SOURCE_CHARS:
        raise _syntax_error(f"source is {len(text):_} characters; the limit is {MAX_SOURCE_CHARS:_}")
    if not text.isascii():
        bad = _first_non_ascii_outside_comments(text)
        if bad is not None:
            code = ord(text[bad])
            if 0xDC80 <= code <= 0xDCFF:   # a byte that was not UTF-8, kept by surrogateescape
                raise _syntax_error(f"byte 0x{code - 0xDC00:02x} is not valid UTF-8 text", source=text,
                                    span=(bad, bad + 1), hint="save the source as UTF-8 (or ASCII)")
            raise _syntax_error(f"unexpected character {text[bad]!r} (U+{code:04X})",
                                source=text, span=(bad, bad + 1), hint=_unicode_hint(text[bad]))


_LONE_CR = re.compile(r"\r(?!\n)")


def normalize_newlines(text):
    """A lone ``\r`` (old Mac line ends) as ``\n``: the same length, so spans stay put, and
    error messages draw the right line."""
    return _LONE_CR.sub("\n", text) if "\r" in text else text


def _parse(text: str, start: str):
    _precheck(text, start)
    text = normalize_newlines(text)
    tables = _tables()
    tokens = _lex(text, tables)
    if all(t.type in ("_NL", "SEMICOLON") for t in tokens[:-1]):
        what = "an expression" if start == "source" else "a definition"
        raise _syntax_error(f"empty source: expected {what}",
                            hint="for example: causal & window(1024)")
    with _LOCK:
        _BUILDER.text = text
        result = _run(text, tokens, start, tables)
    return result, len(tokens)


def _check_depth(node: Node, text: str, num_tokens: int) -> None:
    if num_tokens <= MAX_DEPTH:  # every level of nesting takes at least one token
        return
    d = depth(node)
    if d > MAX_DEPTH:
        raise _syntax_error(f"expression is nested {d} levels deep; the limit is {MAX_DEPTH}",
                            source=text, span=node.span,
                            hint="split it into definitions, or sum fewer terms")


def parse_source(text: str) -> Source:
    """Parse a source (definitions, then one expression) into an AST with spans.

    Raises ``ScoreModSyntaxError`` with a caret under the offending text.
    """
    src, num_tokens = _parse(text, "source")
    for d in src.definitions:
        _check_depth(d.body, text, num_tokens)
    _check_depth(src.expr, text, num_tokens)
    return src


def parse_definitions(text: str) -> tuple[Definition, ...]:
    """Parse a text holding only definitions (the prelude, ``scoremod.define``)."""
    defs, num_tokens = _parse(text, "definitions")
    for d in defs:
        _check_depth(d.body, text, num_tokens)
    return defs
