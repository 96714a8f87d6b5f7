"""Fuzzing the front end with a CI-sized budget: whatever text a user types, ``scoremod.compile``
either gives a Mod whose canonical form reads back to it, or a ``ScoreModError`` (never a raw
traceback, never a hang). Three kinds of input: random text (printable ASCII, any Unicode,
undecodable bytes), generated well-typed sources with random edits (grammar-aware
mutations), and long or deep sources near the documented limits.
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import scoremod
from strategies import sources

# CI budget; HYPOTHESIS_PROFILE=dev runs twenty times as many.
FUZZ = settings(max_examples=3000 if os.environ.get("HYPOTHESIS_PROFILE") == "dev" else 150, deadline=None,
                suppress_health_check=list(HealthCheck))
ALPHABET = "qkvbhscore0123456789 .+-*/%()[]&|~<>=!,;#\\\n\r\tabcdefghijklmnopwxyz_"


def compiles_or_errs(text: str) -> None:
    try:
        mod = scoremod.compile(text)
    except scoremod.ScoreModError:
        return
    assert scoremod.compile(str(mod)) == mod, (text, str(mod))


@FUZZ
@given(st.text(alphabet=ALPHABET, max_size=60))
def test_random_text_from_the_language_alphabet(text):
    compiles_or_errs(text)


@FUZZ
@given(st.text(max_size=40))
def test_random_unicode(text):
    compiles_or_errs(text)


@FUZZ
@given(st.binary(max_size=40))
def test_random_bytes_read_leniently(data):
    compiles_or_errs(data.decode("utf-8", "surrogateescape"))


@st.composite
def mutated_sources(draw):
    text = draw(sources()).text
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        how = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        char = draw(st.sampled_from(ALPHABET))
        if how == "delete":
            text = text[:i] + text[i + 1:]
        elif how == "insert":
            text = text[:i] + char + text[i:]
        elif how == "replace":
            text = text[:i] + char + text[i + 1:]
        else:
            j = draw(st.integers(i, min(len(text), i + 12)))
            text = text[:j] + text[i:j] + text[j:]
    return text


@FUZZ
@given(mutated_sources())
def test_generated_sources_with_random_edits(text):
    compiles_or_errs(text)


@pytest.mark.parametrize("text", [
    " + ".join(["alibi(2)"] * 495),                                       # was a RecursionError
    "(" * 400 + "q" + ")" * 400 + " < kv",
    "-" * 900 + "q < kv",
    " & ".join(f"q - kv != {i}" for i in range(1, 301)),
    "q < " + "9" * 5000,                                                  # was a ValueError inside Lark
    "(-1) ** 0.5 + score",                                                # was a TypeError
    "q - 2147483647 - 1 < kv",
    "1e39 + score",
    "q // 0 == 1",
])
def test_extreme_sources(text):
    start = time.perf_counter()
    compiles_or_errs(text)
    assert time.perf_counter() - start < 60   # a bound against hangs, not a timing
