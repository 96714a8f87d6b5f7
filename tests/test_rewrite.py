"""Rewrite rules (compiler/rewrite.py): a table of rules that never change meaning.

Meaning is checked against the independent evaluator (tests/evaluator.py) on generated
sources, for every rule set on its own and for all of them together, plus a targeted
generator of bound chains (what the "bounds" rule set merges).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import scoremod
from scoremod.compiler.rewrite import RULE_SETS, simplify
from scoremod.dsl.parser import parse_source

from evaluator import evaluate_expr, evaluate_logits
from strategies import shapes, sources


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == bool or b.dtype == bool:
        return a.dtype == b.dtype and np.array_equal(a, b)
    return np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-9, atol=1e-9, equal_nan=True)


def _values(node, shape, tensors, scores):
    return evaluate_expr(node, *shape.grid, q_offset=shape.q_offset, kv_offset=shape.kv_offset,
                         tensors=tensors, scores=scores, top_level=True)


# ---- the table -------------------------------------------------------------------------------

def test_every_rule_is_one_line_of_a_named_set_with_a_lhs_rhs_comment():
    """Each entry of each rule-set list ends on a line with a ``# lhs -> rhs`` comment."""
    import ast as pyast
    from scoremod.compiler import rewrite
    assert set(RULE_SETS) >= {"fold", "arithmetic", "logic", "bounds"}
    text = inspect.getsource(rewrite)
    lines = text.splitlines()
    lists = {}
    for stmt in pyast.parse(text).body:
        if isinstance(stmt, pyast.Assign) and isinstance(stmt.value, pyast.List):
            lists[stmt.targets[0].id] = stmt.value
    for name, rules in RULE_SETS.items():
        variable = next(v for v in lists if getattr(rewrite, v) is rules)
        entries = lists[variable].elts
        assert len(entries) == len(rules) > 0, name
        for entry in entries:
            line = lines[entry.end_lineno - 1]
            comment = line[line.index("#"):] if "#" in line else ""
            assert "->" in comment, f"rule set {name!r}, line {entry.end_lineno}: no '# lhs -> rhs' comment: {line}"


# ---- meaning is preserved ----------------------------------------------------------------------

@settings(max_examples=80)
@given(sources(), shapes(), st.integers(0, 2**32 - 1), st.sampled_from([None, *RULE_SETS]))
def test_simplify_preserves_meaning(src, shape, seed, rule_set):
    rng = np.random.default_rng(seed)
    tensors = src.make_tensors(shape, rng)
    scores = rng.standard_normal(shape.grid)
    expr = scoremod.compile(src.text).expr
    out = simplify(expr, None if rule_set is None else [rule_set])
    before = _values(expr, shape, tensors, scores)
    after = _values(out, shape, tensors, scores)
    assert _same(before, after), f"{src.text}\n  simplified ({rule_set}): {out}"


@settings(max_examples=60)
@given(sources(), shapes(), st.integers(0, 2**32 - 1))
def test_canonical_form_preserves_meaning(src, shape, seed):
    rng = np.random.default_rng(seed)
    tensors = src.make_tensors(shape, rng)
    scores = rng.standard_normal(shape.grid)
    mod = scoremod.compile(src.text)
    kw = dict(scores=scores, q_offset=shape.q_offset, kv_offset=shape.kv_offset, tensors=tensors)
    before = evaluate_logits(src.text, **kw)
    after = evaluate_logits(str(mod), **kw)
    assert _same(before, after), f"{src.text}\n  canonical: {mod}"


# Chains of bounds on a few linear forms: what the "bounds" rule set merges.
_FORMS = ["q - kv", "kv - q", "kv", "q", "abs(q - kv)", "q // 4", "kv // 4", "2 * q - 2 * kv", "q + 1 - kv"]


@st.composite
def bound_chains(draw):
    def atom():
        kind = draw(st.sampled_from(["bound", "bound", "bound", "chunk", "dilated", "not"]))
        if kind == "chunk":
            return f"chunk({draw(st.sampled_from([1, 2, 4, 8]))})"
        if kind == "dilated":
            return f"dilated({draw(st.sampled_from([1, 2, 3, 4, 6]))})"
        form = draw(st.sampled_from(_FORMS))
        op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        text = f"{form} {op} {draw(st.integers(-6, 6))}"
        return f"~({text})" if kind == "not" else text

    def chain(depth):
        if depth == 0 or draw(st.integers(0, 2)) == 0:
            return atom()
        op = draw(st.sampled_from(["&", "|", "&"]))
        return f"({chain(depth - 1)} {op} {chain(depth - 1)})"
    parts = [chain(2) for _ in range(draw(st.integers(2, 4)))]
    return f" {draw(st.sampled_from(['&', '|']))} ".join(parts)


@settings(max_examples=150)
@given(bound_chains(), shapes(max_seq=20, max_batch=1, max_heads=1))
def test_bound_merging_preserves_meaning(text, shape):
    expr = scoremod.compile(text).expr
    out = simplify(expr)
    assert _same(_values(expr, shape, {}, None), _values(out, shape, {}, None)), f"{text}\n  -> {out}"


# ---- what the rules do -------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ("causal & causal", "q >= kv"),
    ("window(8) & window(4)", "abs(q - kv) < 4"),
    ("window(4) | window(8)", "abs(q - kv) < 8"),
    ("kv < 5 & kv < 3", "kv < 3"),
    ("sink(4) & sink(2) & causal", "kv < 2 & q >= kv"),
    ("window(3, 5) & window(2, 7)", "kv <= q + 5 & kv >= q - 2"),
    ("causal & window(3, 5)", "kv >= q - 3 & q >= kv"),
    ("causal & kv > q", "false"),
    ("kv < 3 | kv >= 3", "true"),
    ("kv < 3 | kv > 3", "kv < 3 | kv > 3"),
    ("chunk(4) & chunk(8)", "q // 4 == kv // 4"),
    ("chunk(4) | chunk(8)", "q // 8 == kv // 8"),
    ("dilated(2) & dilated(4)", "(q - kv) % 4 == 0"),
    ("causal & (causal | sink(4))", "q >= kv"),
    ("causal | causal & sink(4)", "q >= kv"),
    ("causal & ~causal", "false"),
    ("causal | ~causal", "true"),
    ("q + 3 - 5 > kv", "q - 2 > kv"),
    ("(q - 1) + 1 >= kv", "q >= kv"),
    ("where(true, causal, sink(2))", "q >= kv"),
    ("where(causal, true, false)", "q >= kv"),
    ("where(causal, false, true)", "q < kv"),
    ("q * 0 + kv < 3", "kv < 3"),
    ("abs(-(q + kv)) < 3", "abs(q + kv) < 3"),
    ("min(q, q) >= kv", "q >= kv"),
    ("q <= q & causal", "q >= kv"),
])
def test_rules(source, expected):
    assert str(scoremod.compile(source)) == expected


def test_negating_a_comparison_only_for_ints():
    # ~(t < 0.5) is not t >= 0.5 when t is NaN: kept as it is.
    assert str(scoremod.compile("~(t[kv] < 0.5)")) == "~t[kv] < 0.5"
    assert str(scoremod.compile("~(q < kv)")) == "q >= kv"


def test_reassociation_prints_without_negative_literals():
    node = simplify(parse_source("q - 1 - 2 >= kv").expr)
    assert str(node) == "q - 3 >= kv"
    assert parse_source(str(node)).expr == node


def test_simplify_runs_named_sets_only():
    node = parse_source("kv < 5 & kv < 3").expr
    assert simplify(node, ["fold"]) == node
    assert str(simplify(node, ["bounds"])) == "kv < 3"


def test_rules_never_fire_on_mask_as_bias_chains():
    mod = scoremod.compile("causal & alibi(4) + sink(2)")
    assert mod.kind == "bias"
    assert str(mod.canonical.mask) == "kv < 2 & q >= kv"


def test_simplify_is_fast_enough_for_the_compile_path():
    import time
    node = scoremod.compile("causal & window(4096) & sink(4) | prefix(16) & chunk(128) & dilated(2)").expr
    start = time.perf_counter()
    for _ in range(20):
        simplify(node)
    assert (time.perf_counter() - start) / 20 < 0.05


# ---- the matcher and the rewriter ---------------------------------------------------------------

def test_patterns_match_shape_bind_names_and_check_predicates():
    from scoremod.compiler.rewrite import ANY, FALSE, ONE, Bin, Fn, Pat, V, X, Y
    from scoremod.dsl.ast import IntLit
    from scoremod.dsl.definitions import expand
    expr = expand(parse_source("(q + 1) - (q + 1) < where(kv > 0, kv, 1)"))
    diff, call = expr.lhs, expr.rhs
    assert Bin("<", name="n").match(expr) == {"n": expr}
    assert Bin(("<=", "<"), ANY, Fn("where")).match(expr) == {}
    assert Bin("<", ANY, Fn("min")).match(expr) is None
    assert Bin("-", X, X).match(diff) == {"x": diff.lhs}  # a name bound twice: equal nodes
    assert Bin("-", X, X).match(diff.lhs) is None
    assert Bin("+", X, ONE).match(diff.lhs) == {"x": diff.lhs.lhs}
    assert Bin("+", X, Pat(IntLit, value=2)).match(diff.lhs) is None
    assert Bin("+", V("x", lambda n: n.name == "kv"), ANY).match(diff.lhs) is None  # predicates
    assert Fn("where", ANY, X, Y).match(call) == {"x": call.args[1], "y": call.args[2]}
    assert Fn("where", ANY, X).match(call) is None  # arity
    node = expand(parse_source("false & causal"))
    assert [p.match(node) for p in Bin("&", ANY, FALSE, commute=True).variants()] == [None, {}]


def _subtrees(node):
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children())
    return out


@settings(max_examples=60)
@given(st.one_of(sources().map(lambda s: s.text), bound_chains()))
def test_every_rule_shrinks_the_tree(text):
    """What makes simplify terminate (see there): a rule returns fewer nodes than it matched."""
    from scoremod.compiler.rewrite import _tree_size
    expr = scoremod.compile(text).expr
    nodes = _subtrees(expr) + [n for name in RULE_SETS for n in _subtrees(simplify(expr, [name]))]
    for name, rules in RULE_SETS.items():
        for i, (pattern, rhs) in enumerate(rules):
            for variant in pattern.variants():
                for node in nodes:
                    env = variant.match(node)
                    out = None if env is None else rhs(**env)
                    if out is not None and out != node:
                        assert _tree_size(out) < _tree_size(node), f"{name}[{i}]: {node} -> {out}"


def test_rules_that_never_settle_are_an_internal_error(monkeypatch):
    from scoremod.compiler import rewrite
    from scoremod.compiler.rewrite import Bin, X, Y
    from scoremod.dsl.ast import Binary
    monkeypatch.setitem(RULE_SETS, "swap", [
        (Bin("+", X, Y, name="n"), lambda n, x, y: Binary("+", y, x, span=n.span)),  # x + y -> y + x
    ])
    try:
        message = r"internal error: rule sets \['swap'\].*RULE_SETS\['swap'\]\[0\]"
        with pytest.raises(RuntimeError, match=message):
            simplify(parse_source("q + kv > 0").expr, ["swap"])
    finally:
        rewrite._rules_by_key.cache_clear()


def test_deep_expressions_need_no_recursion_limit():
    """The rewriter keeps its own stack: ~1000 levels simplify under a small recursion limit."""
    import sys
    from scoremod.dsl.definitions import expand
    cases = {
        "(" * 990 + "q" + " + 1)" * 990 + " >= kv": "q + 990 >= kv",
        "-" * 990 + "q < kv": "q < kv",
        "~" * 991 + "(q < kv)": "q >= kv",
        " & ".join(["causal"] * 990): "q >= kv",
    }
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20_000))  # expansion (dsl/definitions.py) recurses
    try:
        exprs = [expand(parse_source(text)) for text in cases]
        sys.setrecursionlimit(len(inspect.stack()) + 100)
        out = [simplify(expr) for expr in exprs]
    finally:
        sys.setrecursionlimit(old)
    assert [str(o) for o in out] == list(cases.values())


@pytest.mark.parametrize("source", ["(-1) ** 0.5 + score", "q - 2147483647 - 1 < kv", "1e38 * 10 + score",
                                    "2.0 ** 200 + score", "kv + 2147483647 + 1 > q"])
def test_folding_never_makes_a_literal_the_language_cannot_write(source):
    # A complex number, an int past int32 or a real past float32 stays unfolded, so the
    # canonical form still reads back (they were a TypeError, or a form that did not parse).
    mod = scoremod.compile(source)
    assert scoremod.compile(str(mod)) == mod
