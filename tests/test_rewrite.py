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


@pytest.mark.parametrize("source, expected", [
    ("alibi(8)", "-exp2(-(h + 1)) * abs(q - kv)"),
    ("alibi(4)", "-exp2(-2 * (h + 1)) * abs(q - kv)"),
    ("alibi(16)", "-exp2(-(h + 1) / 2) * abs(q - kv)"),
    ("alibi(12)", "-exp2(-8 * (h + 1) / 12) * abs(q - kv)"),   # neither divides the other
    ("exp(3 * h / 3)", "exp(h)"),
    ("3 * h / 6 + score", "score + h / 2"),
    ("3 * h / 3 + score", "score + 3 * h / 3"),     # h alone is an int, not the real h / 1
    ("exp(8 * q / 8)", "exp(8 * q / 8)"),           # 8 * q may wrap int32
    ("exp(40000 * h / 40000)", "exp(40000 * h / 40000)"),     # so may 40000 * h (h < 65,536)
    ("exp(3 * (q // 64) / 3)", "exp(3 * (q // 64) / 3)"),     # past 2**24: float32 rounds 3 * x
    ("exp(4 * (q // 64) / 4)", "exp(q // 64)"),               # ... but scales exactly by 4
    ("exp(3 * t[h] / 3)", "exp(3 * t[h] / 3)"),               # a tensor: no bounds
    ("0 * floor(score) / 4 + score", "0 * floor(score) / 4 + score"),   # (was a ZeroDivisionError)
])
def test_int_quotients_simplify_only_where_a_kernel_computes_the_same(source, expected):
    # int32 wrap-around and float32 rounding included: guarded by intervals.int_range.
    mod = scoremod.compile(source)
    assert str(mod) == expected
    assert scoremod.compile(str(mod)) == mod


def test_a_zero_transform_prints_as_nothing_and_reads_back():
    # score only in the mask: T(score) = 0, so the canonical form is M & B, not M & 0 + B.
    mod = scoremod.compile("(score > 0) & alibi(8)")
    assert mod.kind == "transform" and mod.canonical.transform == scoremod.compile("score > 0 & 0").canonical.transform
    assert str(mod) == "score > 0 & -exp2(-(h + 1)) * abs(q - kv)"
    assert scoremod.compile(str(mod)) == mod


def test_int_range_knows_positions_before_shapes():
    from scoremod.compiler.intervals import MAX_HEADS, int_range
    from scoremod.dsl.definitions import expand

    def bounds(text):
        return int_range(expand(parse_source(text)))
    assert bounds("-8 * (h + 1)") == (-8 * MAX_HEADS, -8)
    assert bounds("q // 64") == (-(2**31) // 64, (2**31 - 1) // 64)
    assert bounds("h * 40000") is None      # may leave int32
    assert bounds("q - kv") is None
    assert bounds("ids[b, q]") is None      # a tensor
    assert bounds("floor(score)") is None


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


# ---- long chains ------------------------------------------------------------------------------
# Merging compares only the parts of a chain that can interact and remembers merged chains, so
# long chains compile in time linear in their length (measured, not asserted, in
# benchmarks/compile_speed.py). What they merge to is pinned here: the forms the rules made
# when every pair was compared.

def _balanced(parts, op):
    if len(parts) == 1:
        return parts[0]
    middle = len(parts) // 2
    return f"({_balanced(parts[:middle], op)} {op} {_balanced(parts[middle:], op)})"


_PRIMES_TO_60 = [p for p in range(2, 61) if all(p % d for d in range(2, p))]


@pytest.mark.parametrize("source, expected", [
    (" & ".join(f"q - kv != {i}" for i in range(1, 601)),
     " & ".join(sorted(f"q - kv != {i}" for i in range(1, 601)))),
    (" | ".join(f"q - kv == {i}" for i in range(1, 401)),
     " | ".join(f"q - kv == {i}" for i in range(1, 401))),
    (" & ".join(f"dilated({d})" for d in range(1, 101)),    # the multiples 51..100 imply the rest
     " & ".join(sorted(f"(q - kv) % {d} == 0" for d in range(51, 101)))),
    ("~(" + " & ".join(f"dilated({d})" for d in range(1, 101)) + ")",   # not a top-level chain: as written
     "~(" + " & ".join(f"(q - kv) % {d} == 0" for d in range(51, 101)) + ")"),
    (" & ".join(f"chunk({c})" for c in range(1, 61)),      # chunk(1) is q == kv
     " & ".join(sorted([f"q // {p} == kv // {p}" for p in _PRIMES_TO_60] + ["q == kv"]))),
    (" & ".join(f"q - kv >= {i}" for i in range(1, 300)) + " & " +
     " & ".join(f"q - kv <= {i}" for i in range(1000, 500, -1)), "q - kv <= 501 & q - kv >= 299"),
    (_balanced([f"q - kv >= {i}" for i in range(1, 200)], "&"), "q - kv >= 199"),
    (_balanced(["kv - q >= 0"] + [f"kv - q == {i}" for i in range(200)], "|"), "kv - q >= 0"),
    (_balanced([f"q - kv == {i}" for i in range(100)] + ["doc(ids)", "~doc(ids)"], "|"), "true"),
    (_balanced([f"dilated({d})" for d in range(1, 301)] + ["q - kv >= 5", "q - kv <= 3"], "&"), "false"),
], ids=["600 != &", "400 == |", "dilated 1..100", "~(dilated 1..100)", "chunk 1..60", "bounds &",
        "balanced bounds &", "balanced points | range", "balanced a | ~a", "balanced disjoint"])
def test_long_chains_merge_as_when_every_pair_was_compared(source, expected):
    assert str(scoremod.compile(source)) == expected


@pytest.mark.parametrize("source, expected", [
    ("~(" + " & ".join(f"dilated({d})" for d in range(1, 13)) + ")",
     "~(" + " & ".join(f"(q - kv) % {d} == 0" for d in range(7, 13)) + ")"),
    ("causal | (" + " & ".join(f"dilated({d})" for d in range(1, 13)) + ")",
     "q >= kv | " + " & ".join(f"(q - kv) % {d} == 0" for d in range(7, 13))),
    ("window(3) & ~(q - kv == 2 | q - kv >= 5 | q - kv == 7 | chunk(2) | q - kv == 2 | chunk(4) | doc(ids))",
     "abs(q - kv) < 3 & ~(q - kv == 2 | q - kv >= 5 | q // 4 == kv // 4 | ids[b, q] == ids[b, kv])"),
    ("~(doc(ids) & q - kv >= 1 & q - kv >= 3 & (q - kv >= 3 | causal) & q - kv <= 9 & chunk(8) & chunk(4))",
     "~(ids[b, q] == ids[b, kv] & q - kv >= 3 & q - kv <= 9 & q // 4 == kv // 4)"),
], ids=["~(dilated 1..12)", "causal | (dilated 1..12)", "~(points | range | chunks)", "~(bounds & chunks)"])
def test_nested_chains_merge_in_one_pass_as_the_rules_merged_them(source, expected):
    """A chain nested under ``~`` or ``|`` is merged in one pass (``_Run._merged``), no longer
    part by part; its form is the one the rules made (true parts dropped, implied parts,
    duplicates and absorbed disjunctions gone, the kept ones in the written order)."""
    assert str(scoremod.compile(source)) == expected


def test_a_balanced_chain_with_nothing_to_merge_stays_as_written():
    from scoremod.dsl.definitions import expand
    for op in ("&", "|"):
        expr = expand(parse_source(_balanced([f"q - kv != {i}" for i in range(1, 1001)], op)))
        assert simplify(expr) == expr


@st.composite
def _mask_parts(draw):
    """Parts of a conjunction: bounds on a few forms, chunks, dilations, negations, nested
    disjunctions, tensor reads, ``false``: what merging compares."""
    def part():
        kind = draw(st.sampled_from(["bound"] * 4 + ["chunk", "dilated", "not", "or", "read", "false"]))
        if kind == "chunk":
            return f"chunk({draw(st.sampled_from([1, 2, 3, 4, 6, 8]))})"
        if kind == "dilated":
            return f"dilated({draw(st.sampled_from([1, 2, 3, 4, 6, 12]))})"
        if kind == "read":
            return draw(st.sampled_from(["m[q]", "doc(ids)"]))
        if kind == "false":
            return "false"
        if kind == "or":
            return f"({part()} | {part()})"
        form = draw(st.sampled_from(["q - kv", "kv - q", "kv", "abs(q - kv)", "2 * q - 2 * kv"]))
        text = f"{form} {draw(st.sampled_from(['<', '<=', '>', '>=', '==', '!=']))} {draw(st.integers(-3, 3))}"
        return f"~({text})" if kind == "not" else text
    return [part() for _ in range(draw(st.integers(0, 12)))]


@settings(max_examples=150)
@given(_mask_parts())
def test_conjunction_merges_in_one_pass_as_the_rules_merge_the_chain(texts):
    from scoremod.compiler.rewrite import conjunction
    from scoremod.dsl.ast import Binary, BoolLit
    from scoremod.dsl.definitions import expand
    parts = [simplify(expand(parse_source(t))) for t in texts]
    parts = [p for p in parts if p != BoolLit(True)]   # as canonicalize passes them
    chain = parts[0] if parts else BoolLit(True)
    for p in parts[1:]:
        chain = Binary("&", chain, p)
    merged = conjunction(parts)
    assert merged == simplify(chain), texts
    assert simplify(merged) == merged


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
