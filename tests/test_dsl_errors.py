"""Error messages (docs/language.md §9 Errors): exact snapshots of representative mistakes, and bad
input (empty, huge, deeply nested, non-ASCII, overflowing literals, random text) that must
end in a clear ``ScoreModError`` or a correct result: never a Lark or Python traceback,
never a hang."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, strategies as st

import scoremod
from scoremod.errors import (
    ScoreModDefinitionError, ScoreModError, ScoreModNameError, ScoreModSyntaxError, ScoreModTypeError,
)
from strategies import sources

# Exact text of what `dslc check` prints (and str(error) is). Update deliberately.
SNAPSHOTS = [
    ("causal & windw(128)", ScoreModNameError, """\
error: unknown name 'windw' — did you mean 'window'?
  causal & windw(128)
           ^^^^^"""),
    ("alibi(8) & alibi(4)", ScoreModTypeError, """\
error: '&' needs a mask on at least one side; alibi(8) and alibi(4) are biases
  alibi(8) & alibi(4)
  ^^^^^^^^^^^^^^^^^^^
hint: add biases with '+'"""),
    ("(q - kv) * causal + 1", ScoreModTypeError, """\
error: '*' needs numbers, but causal is a mask
  (q - kv) * causal + 1
             ^^^^^^
hint: to choose values by a mask use where(mask, a, b)"""),
    ("window(1, 2, 3)", ScoreModNameError, """\
error: 'window' takes 1 or 2 arguments, got 3
  window(1, 2, 3)
  ^^^^^^^^^^^^^^^
hint: use window(w) or window(l, r)"""),
    ("q < kv < 3", ScoreModSyntaxError, """\
error: comparisons do not chain
  q < kv < 3
  ^^^^^^^^^^
hint: write q < kv & kv < 3"""),
    ("(causal & window(3)", ScoreModSyntaxError, """\
error: '(' is never closed
  (causal & window(3)
  ^
hint: add ')'"""),
    ("", ScoreModSyntaxError, """\
error: empty source: expected an expression
hint: for example: causal & window(1024)"""),
    ("1e400 * score", ScoreModSyntaxError, """\
error: real literal 1e400 is too large: reals are float32 (at most 3.402823e+38)
  1e400 * score
  ^^^^^
hint: write inf for infinity"""),
    ("1e39 * score", ScoreModSyntaxError, """\
error: real literal 1e39 is too large: reals are float32 (at most 3.402823e+38)
  1e39 * score
  ^^^^
hint: write inf for infinity"""),
    ("q ≤ kv", ScoreModSyntaxError, """\
error: unexpected character '≤' (U+2264)
  q ≤ kv
    ^
hint: write '<=' instead"""),
    ("q - kv < 3000000000", ScoreModSyntaxError, """\
error: integer literal 3000000000 does not fit in int32 (at most 2_147_483_647)
  q - kv < 3000000000
           ^^^^^^^^^^
hint: positions and sizes are int32; write a real like 1e12 if you meant a number"""),
    ("f(x) = g(x) & causal\ng(y) = f(y)\nf(1)", ScoreModDefinitionError, """\
error: definition 'f(x)' is recursive (f -> g -> f)
  (line 1)
  f(x) = g(x) & causal
         ^^^^
hint: definitions are macros, expanded before anything runs; they cannot call themselves"""),
    ("query[b, q] == 0", ScoreModNameError, """\
error: tensor parameter 'query' collides with a keyword of attention()
  query[b, q] == 0
  ^^^^^
hint: rename it, e.g. query_"""),
    ("2 * (causal & alibi(8))", ScoreModTypeError, """\
error: causal is a mask; a mask acts as a -inf bias only at the top level, not inside another expression
  2 * (causal & alibi(8))
      ^^^^^^^^^^^^^^^^^^^
hint: move it to the top level (mask & (...)), or use where(mask, a, b)"""),
    ("causal = q < kv\ncausal", ScoreModDefinitionError, """\
error: definition 'causal' shadows the prelude's causal = q >= kv
  (line 1)
  causal = q < kv
  ^^^^^^
hint: choose another name (only scoremod.define(..., override=True) may replace it)"""),
    ("x = q < kv", ScoreModSyntaxError, """\
error: a source needs an expression after its definitions
  x = q < kv
  ^^^^^^^^^^
hint: add the expression on a new line, e.g. x"""),
    ("causal &\n  window(3)", ScoreModSyntaxError, """\
error: unexpected newline
  (line 1)
  causal &
          ^
hint: a newline ends the expression here; to go on, wrap it in ( ) or end the line with \\"""),
    ("q kv", ScoreModSyntaxError, """\
error: unexpected 'kv'
  q kv
    ^^
hint: is an operator missing before 'kv'?"""),
]


@pytest.mark.parametrize("source,cls,message", SNAPSHOTS, ids=[s[0][:30] for s in SNAPSHOTS])
def test_error_snapshot(source, cls, message):
    with pytest.raises(ScoreModError) as info:
        scoremod.compile(source)
    assert type(info.value) is cls
    assert str(info.value) == message


def test_define_shadowing_the_prelude_snapshot():
    with pytest.raises(ScoreModDefinitionError) as info:
        scoremod.define("window(w) = q < w")
    assert str(info.value) == """\
error: definition 'window(w)' shadows the prelude's window(w) = abs(q - kv) < w
  window(w) = q < w
  ^^^^^^
hint: choose another name, or pass override=True"""


def test_errors_are_value_errors_with_parts():
    with pytest.raises(ValueError) as info:
        scoremod.compile("causal & windw(128)")
    err = info.value
    assert isinstance(err, ScoreModError)
    assert err.message == "unknown name 'windw' — did you mean 'window'?"
    assert err.source == "causal & windw(128)" and err.span == (9, 14)


@pytest.mark.parametrize("source,cls,fragment", [
    ("causal)", ScoreModSyntaxError, "unmatched ')'"),
    ("f(q]", ScoreModSyntaxError, "']' does not match the '(' at column 2"),
    ("(q+)", ScoreModSyntaxError, "unexpected ')'"),
    ("q +", ScoreModSyntaxError, "unexpected end of source"),
    ("q ! kv", ScoreModSyntaxError, "unexpected character '!'"),
    ("q ^ 2", ScoreModSyntaxError, "unexpected character '^'"),
    ("'causal'", ScoreModSyntaxError, "unexpected character"),
    ("q < kv\nkv < 3", ScoreModSyntaxError, "a second expression"),
    ("q = 1\nq", ScoreModSyntaxError, "'q' is a built-in variable"),
    ("f(1) = 2\nf(1)", ScoreModSyntaxError, "the left side of '='"),
    ("f(q) = q\nf(1) < kv", ScoreModSyntaxError, "parameter 'q' is a built-in variable"),
    ("f(x, x) = x\nf(1, 2) < q", ScoreModSyntaxError, "parameter 'x' appears twice"),
    ("f = q < kv\nf = q > kv\nf", ScoreModDefinitionError, "'f' is defined twice"),
    ("f(x) = x(1)\nf(2) < q", ScoreModNameError, "parameter 'x' is not a function"),
    ("window", ScoreModNameError, "'window' needs arguments"),
    ("abs", ScoreModNameError, "'abs' is a function"),
    ("min(q)", ScoreModNameError, "'min' takes 2 arguments, got 1"),
    ("q(1) < kv", ScoreModNameError, "'q' is a variable, not a function"),
    ("inf(2) < q", ScoreModNameError, "'inf' is a constant"),
    ("zzzzqqq(1)", ScoreModNameError, "unknown name 'zzzzqqq'"),
    ("scale[b] + causal", ScoreModNameError, "collides with a keyword of attention()"),
    ("query", ScoreModNameError, "collides"),
    ("\t\n  # nothing here\n", ScoreModSyntaxError, "empty source"),
    (";;", ScoreModSyntaxError, "empty source"),
    ("q\x00 < kv", ScoreModSyntaxError, "unexpected character '\\x00'"),
])
def test_more_errors(source, cls, fragment):
    with pytest.raises(ScoreModError) as info:
        scoremod.compile(source)
    assert type(info.value) is cls, str(info.value)
    assert fragment in info.value.message, info.value.message


def test_non_string_source():
    with pytest.raises(ScoreModError):
        scoremod.compile(42)


# ---- robustness ----------------------------------------------------------------------------

def _outcome(source, budget=10.0):
    """compile(source) -> the Mod or the ScoreModError; anything else fails the test."""
    start = time.perf_counter()
    try:
        result = scoremod.compile(source)
    except ScoreModError as exc:
        result = exc
        text = str(exc)
        assert text.startswith("error: ")
        assert "Traceback" not in text and "lark" not in text.lower()
        assert len(text) < 2000, "messages stay short, even for huge sources"
    elapsed = time.perf_counter() - start
    assert elapsed < budget, f"took {elapsed:.1f}s"
    return result


def test_nesting_500_levels_works():
    assert _outcome("(" * 500 + "q >= kv" + ")" * 500) == scoremod.compile("causal")
    assert _outcome("~" * 500 + "causal") == scoremod.compile("causal")  # an even number of nots
    assert _outcome("-" * 500 + "q < kv").kind == "mask"
    assert _outcome("abs(" * 500 + "q - kv" + ")" * 500 + " < 3") == scoremod.compile("abs(q - kv) < 3")
    assert _outcome("2 ** " * 500 + "1 > q").kind == "mask"
    assert _outcome("t[" * 300 + "q" + "]" * 300 + " > 0").kind == "mask"


def test_nesting_beyond_the_limit_is_a_clear_error():
    # (parentheses alone add no nesting: "(" * 5000 + "causal" + ")" * 5000 is just causal)
    assert _outcome("(" * 5000 + "causal" + ")" * 5000) == scoremod.compile("causal")
    for source in ["-" * 1500 + "q < kv", "abs(" * 1200 + "q" + ")" * 1200,
                   " + ".join(["alibi(8)"] * 3000) + " & causal", " & ".join(["causal"] * 5000)]:
        result = _outcome(source)
        assert isinstance(result, ScoreModSyntaxError) and "nested" in result.message


def test_definitions_nesting_beyond_the_limit_is_a_clear_error():
    chain = "\n".join(["f0 = causal"] + [f"f{i} = f{i - 1} & causal" for i in range(1, 1200)]) + "\nf1199"
    result = _outcome(chain)
    assert isinstance(result, ScoreModDefinitionError) and "nested" in result.message


def test_definitions_that_blow_up_are_stopped():
    doubling = "f0(x) = x + x\n" + "\n".join(f"f{i}(x) = f{i - 1}(x + x)" for i in range(1, 60)) + "\nf59(1) < q"
    result = _outcome(doubling)
    assert isinstance(result, ScoreModDefinitionError) and "expands to more than" in result.message
    doubling_calls = "f0(x) = x\n" + "\n".join(f"f{i}(x) = f{i - 1}(x) + f{i - 1}(x)" for i in range(1, 60))
    result = _outcome(doubling_calls + "\nf59(1) < q")
    assert isinstance(result, ScoreModDefinitionError)


def test_many_definitions_are_linear_to_check():
    many = "\n".join(["g0 = causal"] + [f"g{i} = g{i - 1}" for i in range(1, 900)]) + "\ng899 & window(3)"
    assert _outcome(many, budget=5.0) == scoremod.compile("causal & window(3)")


def test_100_kb_inputs():
    assert _outcome("causal  # " + "x" * 100_000).kind == "mask"
    result = _outcome("q < " + " + ".join(["1"] * 33_000))  # 100 kB of expression
    assert isinstance(result, ScoreModSyntaxError)
    assert _outcome("\n" * 100_000 + "causal").kind == "mask"
    assert isinstance(_outcome("causal" + " " * 1_000_001), ScoreModSyntaxError)  # over the size limit
    result = _outcome("x" * 100_000 + "(1)")  # a 100 kB unknown name: the caret line is clipped
    assert isinstance(result, ScoreModNameError)


def test_non_ascii_anywhere_but_comments():
    for source in ["causal & wíndow(3)", "q − kv < 3", "causal\u00a0& sink(1)", "q < kv ∧ true", "🙂"]:
        assert isinstance(_outcome(source), ScoreModSyntaxError)
    assert _outcome("causal  # ∞ ≤ ≥").kind == "mask"
    assert _outcome("causal  # " + "é" * 100_000, budget=2.0).kind == "mask"
    assert isinstance(_outcome("causal & " + "é" * 100_000, budget=2.0), ScoreModSyntaxError)


def test_literal_extremes():
    assert isinstance(_outcome("1e400 + score"), ScoreModSyntaxError)
    assert isinstance(_outcome("q < " + "9" * 31), ScoreModSyntaxError)
    assert _outcome("q < 2147483647").kind == "mask"
    assert _outcome("1e-400 + score").kind == "transform"  # underflows to 0.0: fine
    assert _outcome("inf > q").kind == "mask"


_CHARS = "qkvbhscore()[],;=+-*/%&|~<>!.#_ \n\t0123456789eE" + "windowcausalalibi"


@given(st.text(alphabet=_CHARS, max_size=60))
def test_random_text_never_escapes_as_a_python_error(text):
    _outcome(text, budget=5.0)


@given(st.text(max_size=40))
def test_random_unicode_never_escapes_as_a_python_error(text):
    _outcome(text, budget=5.0)


@given(st.text(alphabet=_CHARS, max_size=60))
def test_random_definitions_never_escape_as_a_python_error(text):
    try:
        scoremod.define("zz_fuzz(x) = " + text)
    except ScoreModError:
        pass
    finally:
        scoremod.undefine("zz_fuzz")


@given(sources(), st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(list(_CHARS) + [""])),
                           min_size=1, max_size=3))
def test_mutated_sources_never_escape_as_a_python_error(src, edits):
    """Near-misses of valid sources reach every stage (expansion, typing, canonical form)."""
    text = src.text
    for pos, ch in edits:
        pos %= len(text) + 1
        text = text[:pos] + ch + text[pos + 1:]
    _outcome(text, budget=5.0)
