"""Typing (docs/language.md §3 Types): what is accepted with which type, what is rejected with which
error class; generated well-typed sources all pass, generated ill-typed ones all fail."""

from __future__ import annotations

import pytest
from hypothesis import given

import scoremod
from scoremod.dsl.definitions import expand
from scoremod.dsl.parser import parse_source
from scoremod.dsl.typecheck import BOOL, INT, NUM, REAL, check, type_of
from scoremod.errors import ScoreModError, ScoreModTypeError
from strategies import ill_typed_sources, sources


def top_type(text):
    return check(expand(parse_source(text)), text)


def inner_type(text):
    return type_of(expand(parse_source(text)))


@pytest.mark.parametrize("text,want", [
    ("causal", BOOL), ("causal & window(4)", BOOL), ("causal + window(4)", BOOL), ("causal | sink(4)", BOOL),
    ("~causal", BOOL), ("true", BOOL), ("where(causal, window(2), sink(1))", BOOL), ("causal == sink(2)", BOOL),
    ("causal & alibi(8)", REAL), ("alibi(8) & causal", REAL), ("causal + alibi(8)", REAL),
    ("causal & window(4) + alibi(8)", REAL), ("(causal & window(4)) + alibi(8)", REAL),
    ("alibi(8) + relpos(t, 4)", REAL), ("softcap(30)", REAL), ("30 * tanh((score + alibi(8)) / 30)", REAL),
    ("q - kv", INT), ("(q - kv) // 2", INT), ("q / 2", REAL), ("2 ** 2", REAL), ("q * 0.5", REAL),
    ("t[b, q]", NUM), ("t[b, q] + 1", NUM), ("t[b, q] + 1.0", REAL), ("floor(q / 2)", INT),
    ("score & causal", REAL), ("where(causal, 1, 2)", INT), ("where(causal, 1, 2.0)", REAL),
])
def test_top_level_types(text, want):
    assert top_type(text) == want


@pytest.mark.parametrize("text,want", [
    ("q - kv < 128 & kv >= 16", BOOL), ("abs(q - kv)", INT), ("min(q, 2.5)", REAL), ("sign(q - kv)", INT),
    ("exp(q)", REAL), ("ceil(t[q])", NUM), ("clip(q, 0, 3)", INT), ("-q", INT), ("n", NUM),
])
def test_inner_types(text, want):
    assert inner_type(text) == want


@pytest.mark.parametrize("text,fragment", [
    ("alibi(8) & alibi(4)", "'&' needs a mask on at least one side"),
    ("score & softcap(30)", "are transforms"),
    ("q | kv", "'|' needs masks"),
    ("~alibi(8)", "'~' needs masks"),
    ("causal * 2", "'*' needs numbers, but causal is a mask"),
    ("-causal", "unary '-' needs numbers"),
    ("exp(window(3))", "exp() needs numbers"),
    ("2 * (causal & alibi(8))", "a mask acts as a -inf bias only at the top level"),
    ("tanh(causal + alibi(8))", "a mask acts as a -inf bias only at the top level"),
    ("where(causal, 1, 2) < (causal & 2)", "only at the top level"),
    ("(q < kv) + 1 > 0", "only at the top level"),
    ("causal < 3", "compares a mask with a number"),
    ("causal < sink(2)", "masks can only be compared with == and !="),
    ("where(q, 1, 2)", "where's first argument needs masks"),
    ("where(causal, causal, 1)", "where's branches must both be masks or both be numbers"),
    ("ids[b, q / 2] == 0", "is a real"),
    ("ids[causal] == 0", "is a mask"),
    ("q[0] < kv", "only tensors and scalars can be indexed"),
    ("ids[b][q] == 0", "indexed twice"),
    ("5 & 3", "'&' needs a mask on at least one side"),
])
def test_type_errors(text, fragment):
    with pytest.raises(ScoreModTypeError) as info:
        scoremod.compile(text)
    assert fragment in info.value.message
    assert info.value.span is not None and info.value.source == text


def test_arithmetic_on_a_mask_suggests_where():
    with pytest.raises(ScoreModTypeError) as info:
        scoremod.compile("(q - kv) * causal")
    assert "where(mask, a, b)" in info.value.hint


def test_mask_through_a_definition_is_named_by_its_printed_form():
    # nodes expanded from a body carry the call's span; the message must not call the
    # whole call a mask when only a part of its body is
    with pytest.raises(ScoreModTypeError) as info:
        scoremod.compile("f(x) = x * causal\nf(2) > q")
    assert "q >= kv is a mask" in info.value.message
    assert info.value.span == (len("f(x) = x * causal\n"), len("f(x) = x * causal\nf(2)"))


def test_score_is_allowed_anywhere_numeric():
    for text in ["score", "score * 2", "causal & score", "where(score > 0, score, 0)", "relpos(t, 2) + score",
                 "t[b, floor(score)]", "softcap(30) + alibi(8) & causal"]:
        scoremod.compile(text)


def test_ints_promote_and_division_gives_a_real():
    assert top_type("q + 0.5") == REAL
    assert top_type("q / kv") == REAL
    assert top_type("q // kv") == INT


@given(sources())
def test_generated_well_typed_sources_are_accepted(src):
    mod = scoremod.compile(src.text)
    t = top_type(src.text)
    assert (t == BOOL) == (src.kind == "mask")
    if src.kind == "transform":
        assert mod.kind == "transform"


@given(ill_typed_sources())
def test_generated_ill_typed_sources_are_rejected_with_the_right_class(bad):
    with pytest.raises(ScoreModError) as info:
        scoremod.compile(bad.text)
    assert type(info.value) is bad.error, f"{bad.text!r}: {info.value}"
    assert str(info.value).startswith("error: ")


@pytest.mark.parametrize("source", ["q // 0 == 1", "q % 0 == 0", "score / 0.0", "score * (kv / 0)", "chunk(0)"])
def test_a_literal_zero_divisor_is_an_error(source):
    with pytest.raises(ScoreModError, match="divides by zero"):
        scoremod.compile(source)


def test_integer_literals_of_any_length_give_the_int32_error():
    # Python itself refuses to convert integers of more than 4300 digits.
    with pytest.raises(ScoreModError, match="does not fit in int32"):
        scoremod.compile("q < " + "9" * 5000)
