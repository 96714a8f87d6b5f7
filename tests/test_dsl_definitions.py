"""Definitions (docs/language.md §6 Definitions): macros overloaded by arity, in a source and globally with
``scoremod.define``/``undefine``, shadowing rules and ``override=True``."""

from __future__ import annotations

import pytest

import scoremod
from scoremod.dsl.definitions import global_definitions, prelude
from scoremod.errors import ScoreModDefinitionError, ScoreModNameError, ScoreModSyntaxError


@pytest.fixture(autouse=True)
def restore_globals():
    """Every test leaves the global definitions as it found them."""
    before = {(d.name, d.arity): d for d in global_definitions()}
    yield
    after = {(d.name, d.arity) for d in global_definitions()}
    for name, arity in after - set(before):
        scoremod.undefine(name, arity)
    for (name, arity), d in before.items():
        if global_definitions().get(name, arity) != d:
            scoremod.define(str(d), override=True)


def test_define_then_use_then_undefine():
    defs = scoremod.define("# A causal window.\ndefs_swa(w) = causal & window(w)")
    assert [d.signature for d in defs] == ["defs_swa(w)"]
    assert global_definitions().get("defs_swa", 1).doc == "A causal window."
    assert scoremod.compile("defs_swa(4)") == scoremod.compile("causal & window(4)")
    scoremod.undefine("defs_swa")
    with pytest.raises(ScoreModNameError, match="unknown name 'defs_swa'"):
        scoremod.compile("defs_swa(4)")  # the compile cache does not keep the old meaning


def test_define_several_at_once_and_use_each_other():
    scoremod.define("defs_a = causal; defs_b(w) = defs_a & window(w)\ndefs_c = defs_b(2) | sink(1)")
    assert scoremod.compile("defs_c") == scoremod.compile("causal & window(2) | sink(1)")


def test_define_is_all_or_nothing():
    with pytest.raises(ScoreModNameError, match="unknown name 'nope'"):
        scoremod.define("defs_ok = causal\ndefs_bad = nope(3)")
    assert global_definitions().get("defs_ok", 0) is None


def test_define_validates_like_a_source():
    with pytest.raises(ScoreModDefinitionError, match="recursive"):
        scoremod.define("defs_r(x) = defs_r(x) + 1")
    with pytest.raises(ScoreModDefinitionError, match="recursive"):
        scoremod.define("defs_p(x) = defs_q(x)\ndefs_q(x) = defs_p(x)")
    with pytest.raises(ScoreModNameError, match="takes 1 or 2 arguments"):
        scoremod.define("defs_w = window(1, 2, 3)")
    with pytest.raises(ScoreModSyntaxError, match="built-in variable"):
        scoremod.define("kv = 3")
    with pytest.raises(ScoreModSyntaxError, match="expected '='"):
        scoremod.define("causal & window(3)")
    with pytest.raises(ScoreModSyntaxError, match="empty source"):
        scoremod.define("   ")


def test_shadowing_prelude_or_builtins_needs_override():
    with pytest.raises(ScoreModDefinitionError, match="shadows the prelude's causal = q >= kv"):
        scoremod.define("causal = q > kv")
    with pytest.raises(ScoreModDefinitionError, match="shadows the built-in function abs"):
        scoremod.define("abs(x) = x")
    # another arity of a prelude name is an overload, not a shadow
    scoremod.define("window(l, r, s) = window(l, r) & dilated(s)")
    assert scoremod.compile("window(1, 2, 2)") == scoremod.compile("window(1, 2) & dilated(2)")
    assert scoremod.compile("window(3)") == scoremod.compile("abs(q - kv) < 3")


def test_override_replaces_and_undefine_restores():
    scoremod.define("causal = q > kv", override=True)
    assert scoremod.compile("causal") == scoremod.compile("q > kv")
    assert scoremod.compile("window(2) & causal") == scoremod.compile("abs(q - kv) < 2 & q > kv")
    scoremod.undefine("causal")
    assert scoremod.compile("causal") == scoremod.compile("q >= kv")
    assert prelude().get("causal", 0) is not None


def test_override_a_builtin_function_for_one_arity():
    scoremod.define("min(x, y, z) = min(min(x, y), z)", override=True)
    assert scoremod.compile("min(q, kv, 3) > 0") == scoremod.compile("min(min(q, kv), 3) > 0")
    assert scoremod.compile("min(q, kv) > 0").kind == "mask"  # the built-in arity still works


def test_undefine_one_arity():
    scoremod.define("defs_o(x) = q < x\ndefs_o(x, y) = q < x + y")
    scoremod.undefine("defs_o", 2)
    assert scoremod.compile("defs_o(3)").kind == "mask"
    with pytest.raises(ScoreModNameError, match="takes 1 argument, got 2"):
        scoremod.compile("defs_o(3, 4)")
    scoremod.undefine("defs_o")
    scoremod.undefine("defs_never_defined")  # no error


def test_source_definitions_overload_and_shadow_globals():
    scoremod.define("defs_g = q < 3")
    src = "defs_g = q < 5\nf(x) = q < x\nf(x, y) = q < x & kv < y\ndefs_g & f(2) & f(3, 4)"
    assert scoremod.compile(src) == scoremod.compile("q < 5 & q < 2 & q < 3 & kv < 4")


def test_source_may_not_shadow_the_prelude():
    with pytest.raises(ScoreModDefinitionError, match="shadows the prelude"):
        scoremod.compile("window(w) = q < w\nwindow(3)")


def test_arguments_are_substituted_as_trees_not_text():
    # f(x) = x * 2 with x = q - kv must mean (q - kv) * 2, not q - kv * 2
    assert scoremod.compile("f(x) = x * 2\nf(q - kv) < 3") == scoremod.compile("(q - kv) * 2 < 3")
    assert scoremod.compile("f(x) = -x ** 2\nf(q - kv) < 3") == scoremod.compile("-(q - kv) ** 2 < 3")


def test_parameters_may_be_tensors_and_definitions_may_be_constants():
    assert scoremod.compile("same(t) = t[b, q] == t[b, kv]\nsame(ids)") == scoremod.compile("doc(ids)")
    assert scoremod.compile("w = 4\nwindow(w)") == scoremod.compile("window(4)")
    assert scoremod.compile("n = lens\nprefix(n)").tensors == ("lens",)


def test_zero_argument_definitions_can_be_called_with_parentheses():
    assert scoremod.compile("causal()") == scoremod.compile("causal")


def test_prelude_names_and_arities():
    assert {(d.name, d.arity) for d in prelude()} == {
        ("causal", 0), ("window", 1), ("window", 2), ("chunk", 1), ("doc", 1), ("doc", 2), ("prefix", 1),
        ("sink", 1), ("dilated", 1), ("length", 1), ("alibi", 1), ("relpos", 2), ("bias", 1), ("softcap", 1)}
    for d in prelude():
        assert d.origin == "prelude" and d.doc


def test_docs_list_every_prelude_definition():
    from pathlib import Path
    docs = Path(__file__).resolve().parent.parent / "docs" / "language.md"
    text = docs.read_text(encoding="utf-8").replace("\\|", "|")
    for d in prelude():
        assert f"`{d}`" in text, f"docs/language.md does not show {d}"
