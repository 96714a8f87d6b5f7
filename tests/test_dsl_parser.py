"""Parsing (docs/language.md §2 Syntax): precedence, literals, separators, comments, spans, definitions;
and print -> parse round trips on generated sources and random trees."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, strategies as st

import scoremod
from scoremod.dsl.ast import Binary, BoolLit, Call, Index, IntLit, Name, RealLit, Unary, Var
from scoremod.dsl.definitions import expand
from scoremod.dsl.parser import parse_definitions, parse_source
from scoremod.dsl.printer import to_source
from strategies import sources

q, kv, b, h = Var("q"), Var("kv"), Var("b"), Var("h")


def expr(text):
    return parse_source(text).expr


# ---- precedence (lowest first: | & ~ comparisons +- */ //% unary- ** postfix) -------------------

@pytest.mark.parametrize("text,tree", [
    ("q | kv & b", Binary("|", q, Binary("&", kv, b))),
    ("q & kv | b", Binary("|", Binary("&", q, kv), b)),
    ("~q & kv", Binary("&", Unary("~", q), kv)),
    ("~q < kv", Unary("~", Binary("<", q, kv))),
    ("q - kv < 128 & kv >= 16",
     Binary("&", Binary("<", Binary("-", q, kv), IntLit(128)), Binary(">=", kv, IntLit(16)))),
    ("q + kv * b", Binary("+", q, Binary("*", kv, b))),
    ("q - kv - b", Binary("-", Binary("-", q, kv), b)),
    ("q // 2 % 3", Binary("%", Binary("//", q, IntLit(2)), IntLit(3))),
    ("-q * kv", Binary("*", Unary("-", q), kv)),
    ("-q ** 2", Unary("-", Binary("**", q, IntLit(2)))),
    ("q ** kv ** 2", Binary("**", q, Binary("**", kv, IntLit(2)))),
    ("q ** -kv", Binary("**", q, Unary("-", kv))),
    ("q / kv / 2", Binary("/", Binary("/", q, kv), IntLit(2))),
    ("t[b, q] ** 2", Binary("**", Index(Name("t"), (b, q)), IntLit(2))),
    ("f(q)[kv]", Index(Call("f", (q,)), (kv,))),
    ("(q | kv) & b", Binary("&", Binary("|", q, kv), b)),
    ("~~q", Unary("~", Unary("~", q))),
    ("--q", Unary("-", Unary("-", q))),
    ("(q == kv) != b", Binary("!=", Binary("==", q, kv), b)),
])
def test_precedence(text, tree):
    assert expr(text) == tree


def test_comparisons_bind_tighter_than_and_or():
    assert expr("q - kv < 128 & kv >= 16") == expr("(q - kv < 128) & (kv >= 16)")
    assert expr("q < kv | kv < 3") == expr("(q < kv) | (kv < 3)")


# ---- literals and names ---------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("4096", IntLit(4096)), ("4_096", IntLit(4096)), ("0", IntLit(0)), ("2147483647", IntLit(2**31 - 1)),
    ("0.5", RealLit(0.5)), ("1e-3", RealLit(1e-3)), ("1E3", RealLit(1000.0)), (".5", RealLit(0.5)),
    ("5.", RealLit(5.0)), ("1_000.5", RealLit(1000.5)), ("2e+2", RealLit(200.0)),
    ("true", BoolLit(True)), ("false", BoolLit(False)), ("inf", RealLit(math.inf)),
    ("score", Var("score")), ("kv", Var("kv")), ("ids", Name("ids")), ("_x1", Name("_x1")),
])
def test_literals_and_names(text, value):
    assert expr(text) == value
    assert type(expr(text)) is type(value)


def test_literal_types_are_distinct():
    assert expr("1") != expr("1.0")  # IntLit vs RealLit compare unequal by class


# ---- separators, comments, newlines -------------------------------------------------------

def test_definitions_then_expression():
    for text in ["swa(w) = causal & window(w)\nswa(4096) + alibi(8)",
                 "swa(w) = causal & window(w); swa(4096) + alibi(8)",
                 "\n\n# doc\nswa(w) = causal & window(w)   # trailing\n\nswa(4096) + alibi(8)\n\n",
                 "swa(w) = causal & window(w);;\n;swa(4096) + alibi(8);"]:
        src = parse_source(text)
        assert [d.signature for d in src.definitions] == ["swa(w)"]
        assert src.expr == expr("swa(4096) + alibi(8)")


def test_newlines_inside_brackets_are_whitespace():
    assert expr("(causal &\n window(3))") == expr("causal & window(3)")
    assert expr("t[b,\n q] == f(1,\n 2,\n)") == expr("t[b, q] == f(1, 2)")  # trailing comma too


def test_line_continuation():
    assert expr("causal & \\\n window(3)") == expr("causal & window(3)")


def test_comments_are_ignored_and_document_definitions():
    src = parse_source("# Sliding window.\n# Causal.\nswa(w) = causal & window(w)  # not doc\nswa(2)  # end")
    assert src.definitions[0].doc == "Sliding window. Causal."
    assert src.expr == expr("swa(2)")


def test_non_ascii_allowed_in_comments():
    assert expr("causal  # ≤ fenêtre") == Name("causal")


# ---- spans --------------------------------------------------------------------------------

def test_spans_point_into_the_text():
    text = "causal & window(128) + alibi(8)"
    e = expr(text)
    assert e.span == (0, len(text))
    rhs = e.rhs
    assert text[rhs.span[0]:rhs.span[1]] == "window(128) + alibi(8)"
    assert text[rhs.lhs.span[0]:rhs.lhs.span[1]] == "window(128)"
    assert text[rhs.lhs.args[0].span[0]:rhs.lhs.args[0].span[1]] == "128"
    t = "ids[b, q] == -x"
    e = expr(t)
    assert t[e.lhs.span[0]:e.lhs.span[1]] == "ids[b, q]"
    assert t[e.rhs.span[0]:e.rhs.span[1]] == "-x"


def test_definition_spans_and_names():
    text = "a = 1\nswa(w) = causal & window(w)\nswa(1)"
    d = parse_source(text).definitions[1]
    assert text[d.span[0]:d.span[1]] == "swa(w) = causal & window(w)"
    assert text[d.name_span[0]:d.name_span[1]] == "swa"
    assert d.params == ("w",) and str(d) == "swa(w) = causal & window(w)"


def test_parse_definitions_only():
    defs = parse_definitions("f(x) = x + 1\ng = f(2) < q")
    assert [d.signature for d in defs] == ["f(x)", "g"]


def test_the_prelude_parses_and_prints_back():
    from scoremod.grammar import prelude_text
    defs = parse_definitions(prelude_text())
    assert len(defs) >= 14
    for d in defs:
        assert parse_definitions(str(d)) == (d,)
        assert d.doc, f"prelude definition {d.signature} has no documentation comment"


# ---- round trips ----------------------------------------------------------------------------

@given(sources())
def test_print_parse_round_trip_on_generated_sources(src):
    parsed = parse_source(src.text)
    assert parse_source(to_source(parsed.expr)).expr == parsed.expr
    for d in parsed.definitions:
        assert parse_definitions(str(d)) == (d,)
    # the expanded IR prints to source that expands back to the same IR
    ir = expand(parsed)
    assert expand(parse_source(to_source(ir))) == ir


@given(sources())
def test_canonical_source_compiles_to_an_equal_mod(src):
    mod = scoremod.compile(src.text)
    again = scoremod.compile(str(mod))
    assert again == mod
    assert hash(again) == hash(mod)
    assert str(again) == str(mod)


_LEAVES = [q, kv, b, h, Var("score"), Name("ids"), IntLit(0), IntLit(3), IntLit(4096), RealLit(0.5),
           RealLit(1e-05), RealLit(2.5e16), RealLit(math.inf), BoolLit(True)]
_OPS = ["|", "&", "<", "<=", ">", ">=", "==", "!=", "+", "-", "*", "/", "//", "%", "**"]


@st.composite
def _trees(draw, depth=4):
    """Any tree of parser nodes, typed or not (printing does not care about types)."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(_LEAVES))
    sub = lambda: draw(_trees(depth - 1))  # noqa: E731
    form = draw(st.sampled_from(["binary", "binary", "binary", "unary", "call", "index"]))
    if form == "binary":
        return Binary(draw(st.sampled_from(_OPS)), sub(), sub())
    if form == "unary":
        return Unary(draw(st.sampled_from(["-", "~"])), sub())
    args = tuple(sub() for _ in range(draw(st.integers(1, 3))))
    if form == "call":
        return Call(draw(st.sampled_from(["abs", "min", "clip", "f"])), args)
    return Index(Name("t") if draw(st.booleans()) else sub(), args)


@given(_trees())
def test_printer_round_trips_any_tree(tree):
    """Trees the parser would never build (a comparison under a comparison, a '-' under
    '**', ...) still print to text that parses back to the same tree."""
    assert expr(to_source(tree)) == tree


@given(_trees())
def test_printer_uses_no_unneeded_parentheses(tree):
    text = to_source(tree)
    # Every grouping pair of parentheses (not a call's) must be needed: without it the
    # text parses differently, or not at all.
    for m in re.finditer(r"(?<![A-Za-z0-9_])\(", text):
        start = m.start()
        depth, end = 0, None
        for i in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                end = i
                break
        stripped = text[:start] + text[start + 1:end] + text[end + 1:]
        try:
            different = expr(stripped) != tree
        except scoremod.ScoreModError:
            different = True
        assert different, f"parentheses at {start} of {text!r} are not needed"


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_line_ending_ends_a_line(newline):
    text = f"# a comment{newline}f(x) = x > 0{newline}causal & f(kv)"
    assert str(scoremod.compile(text)) == "kv > 0 & q >= kv"
    with pytest.raises(scoremod.ScoreModError) as info:
        scoremod.compile(f"f(x) = x > 0{newline}causal & windw(3)")
    assert "(line 2)" in str(info.value) and "\n  causal & windw(3)\n" in str(info.value)


def test_a_byte_that_is_not_utf8_is_named():
    text = b"causal & \xff".decode("utf-8", "surrogateescape")   # what reading bytes leniently gives
    with pytest.raises(scoremod.ScoreModError, match="byte 0xff is not valid UTF-8"):
        scoremod.compile(text)
