"""The independent evaluator against hand-computed answers: every prelude name, the top-level
reading of docs/language.md §1 Meaning, floor semantics, tensors (right alignment, clipping), offsets,
and the float64 attention reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

import scoremod
from scoremod.dsl.definitions import prelude
from evaluator import attention_reference, evaluate_expr, evaluate_logits, evaluate_mask, mentions_score

NEG = -np.inf


def mask2d(source, T, S, **kw):
    return evaluate_mask(source, 1, 1, T, S, **kw)[0, 0].astype(int)


def grid(rows):
    return np.array(rows, dtype=int)


# ---- every prelude name, by hand ---------------------------------------------------------

def case_causal():
    assert (mask2d("causal", 4, 4) == grid([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])).all()


def case_window_1():
    assert (mask2d("window(2)", 5, 5) == grid([
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1]])).all()


def case_window_2():
    # kv from q - 1 to q + 2
    assert (mask2d("window(1, 2)", 5, 5) == grid([
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1]])).all()


def case_chunk():
    assert (mask2d("chunk(2)", 5, 5) == grid([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1]])).all()


def case_doc_1():
    expected = grid([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1]])
    assert (mask2d("doc(ids)", 5, 5, tensors={"ids": [7, 7, 3, 3, 9]}) == expected).all()
    # ids[B, S]: each batch its own documents; unsorted ids work the same
    both = evaluate_mask("doc(ids)", 2, 1, 3, 3, tensors={"ids": [[0, 0, 1], [2, 1, 2]]}).astype(int)
    assert (both[0, 0] == grid([[1, 1, 0], [1, 1, 0], [0, 0, 1]])).all()
    assert (both[1, 0] == grid([[1, 0, 1], [0, 1, 0], [1, 0, 1]])).all()


def case_doc_2():
    # queries are in documents [0, 1, 1]; keys in [0, 0, 1, 1, 1]
    assert (mask2d("doc(qids, kvids)", 3, 5, tensors={"qids": [0, 1, 1], "kvids": [0, 0, 1, 1, 1]}) == grid([
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1]])).all()


def case_prefix():
    m = evaluate_mask("causal | prefix(n)", 2, 1, 4, 4, tensors={"n": [1, 3]}).astype(int)
    assert (m[0, 0] == grid([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])).all()
    assert (m[1, 0] == grid([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])).all()
    assert (mask2d("prefix(2)", 2, 4) == grid([[1, 1, 0, 0], [1, 1, 0, 0]])).all()


def case_sink():
    assert (mask2d("sink(2)", 3, 4) == grid([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])).all()
    assert (mask2d("causal & window(2) | sink(1)", 4, 4) == grid([
        [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]])).all()


def case_dilated():
    assert (mask2d("dilated(2)", 4, 4) == grid([
        [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])).all()
    assert (mask2d("causal & dilated(3)", 5, 5) == grid([
        [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [1, 0, 0, 1, 0], [0, 1, 0, 0, 1]])).all()


def case_length():
    m = evaluate_mask("length(n)", 2, 1, 2, 4, tensors={"n": np.array([3, 1])}).astype(int)
    assert (m[0, 0] == grid([[1, 1, 1, 0], [1, 1, 1, 0]])).all()
    assert (m[1, 0] == grid([[1, 0, 0, 0], [1, 0, 0, 0]])).all()
    assert (mask2d("length(2)", 1, 3) == grid([[1, 1, 0]])).all()


def case_alibi():
    # n = 2 heads: slopes 2**-4 and 2**-8; bias = -slope * |q - kv|
    got = evaluate_logits("alibi(2)", scores=np.zeros((1, 2, 3, 3)))
    d = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=float)
    np.testing.assert_array_equal(got[0, 0], -d / 16)
    np.testing.assert_array_equal(got[0, 1], -d / 256)
    # under causal it is standard ALiBi: -slope * (q - kv) on allowed keys
    got = evaluate_logits("causal & alibi(8)", scores=np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(got[0, 0], [[1.0, NEG], [0.5, 1.0]])


def case_relpos():
    table = np.array([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])  # [N, 2m + 1] with m = 1
    got = evaluate_logits("relpos(t, 1)", scores=np.zeros((1, 2, 3, 4)), tensors={"t": table})
    # q - kv clipped to [-1, 1], + 1: column 0 for kv > q, 1 on the diagonal, 2 for kv < q
    np.testing.assert_array_equal(got[0, 0], [[20, 10, 10, 10], [30, 20, 10, 10], [30, 30, 20, 10]])
    np.testing.assert_array_equal(got[0, 1], [[2, 1, 1, 1], [3, 2, 1, 1], [3, 3, 2, 1]])


def case_bias():
    t = np.arange(2 * 2 * 2 * 3, dtype=float).reshape(2, 2, 2, 3)
    scores = np.full((2, 2, 2, 3), 0.5)
    np.testing.assert_array_equal(evaluate_logits("bias(t)", scores=scores, tensors={"t": t}), t + 0.5)
    # a [T, S] bias broadcasts over batch and heads (indices align right)
    t2 = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    got = evaluate_logits("bias(t)", scores=np.zeros((2, 2, 2, 3)), tensors={"t": t2})
    assert all((got[b, h] == t2).all() for b in range(2) for h in range(2))


def case_softcap():
    scores = np.array([-100.0, -1.0, 0.0, 2.0, 100.0]).reshape(1, 1, 1, 5)
    got = evaluate_logits("softcap(10)", scores=scores)
    np.testing.assert_allclose(got[0, 0, 0], [10 * math.tanh(s / 10) for s in scores.ravel()], rtol=1e-15)
    assert abs(got).max() < 10


HAND_CASES = {
    ("causal", 0): case_causal,
    ("window", 1): case_window_1,
    ("window", 2): case_window_2,
    ("chunk", 1): case_chunk,
    ("doc", 1): case_doc_1,
    ("doc", 2): case_doc_2,
    ("prefix", 1): case_prefix,
    ("sink", 1): case_sink,
    ("dilated", 1): case_dilated,
    ("length", 1): case_length,
    ("alibi", 1): case_alibi,
    ("relpos", 2): case_relpos,
    ("bias", 1): case_bias,
    ("softcap", 1): case_softcap,
}


def test_every_prelude_definition_has_a_hand_computed_case():
    defined = {(d.name, d.arity) for d in prelude()}
    assert defined == set(HAND_CASES), "add a hand-computed case for new prelude names"


@pytest.mark.parametrize("key", sorted(HAND_CASES), ids=lambda k: f"{k[0]}/{k[1]}")
def test_prelude_by_hand(key):
    HAND_CASES[key]()


# ---- the top-level reading (docs/language.md §1 Meaning) -------------------------------------------------

def test_mask_keeps_score_or_minus_inf():
    scores = np.arange(4.0).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(evaluate_logits("q >= kv", scores=scores)[0, 0], [[0.0, NEG], [2.0, 3.0]])


def test_bias_adds_to_score_and_transform_replaces_it():
    scores = np.full((1, 1, 2, 2), 3.0)
    np.testing.assert_array_equal(evaluate_logits("q - kv", scores=scores)[0, 0], [[3.0, 2.0], [4.0, 3.0]])
    np.testing.assert_array_equal(evaluate_logits("score * 0 + 1", scores=scores)[0, 0], np.ones((2, 2)))
    np.testing.assert_array_equal(evaluate_logits("2 * score", scores=scores)[0, 0], np.full((2, 2), 6.0))


def test_masks_in_the_top_level_chain_read_as_minus_inf_biases_however_bracketed():
    scores = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    forms = ["causal & window(3) + alibi(8)", "(causal & window(3)) + alibi(8)", "causal & (window(3) + alibi(8))",
             "alibi(8) + causal + window(3)", "window(3) & alibi(8) & causal", "alibi(8) & (causal + window(3))"]
    results = [evaluate_logits(f, scores=scores) for f in forms]
    for f, r in zip(forms, results):
        np.testing.assert_array_equal(r, results[0], err_msg=f)
    d = np.abs(np.subtract.outer(np.arange(5), np.arange(5)))
    allowed = (np.subtract.outer(np.arange(5), np.arange(5)) >= 0) & (d < 3)
    expected = np.where(allowed, scores[0, 0] - 0.5 * d, NEG)
    np.testing.assert_allclose(results[0][0, 0], expected, rtol=1e-15)


def test_two_masks_combine_by_conjunction():
    assert (mask2d("causal + dilated(2)", 3, 3) == mask2d("causal & dilated(2)", 3, 3)).all()


def test_mask_next_to_a_transform():
    scores = np.full((1, 1, 2, 2), 40.0)
    got = evaluate_logits("causal & softcap(20)", scores=scores)[0, 0]
    cap = 20 * math.tanh(2.0)
    np.testing.assert_allclose(got, [[cap, NEG], [cap, cap]], rtol=1e-15)


def test_mentioning_score_is_syntactic_after_expansion():
    assert mentions_score("score * 0 + alibi(8)")
    assert mentions_score("softcap(30)")
    assert not mentions_score("f(x) = alibi(8)\nf(score)")  # the argument is never used
    assert scoremod.compile("f(x) = alibi(8)\nf(score)").kind == "bias"
    scores = np.full((1, 1, 1, 1), 5.0)
    assert evaluate_logits("f(x) = alibi(8)\nf(score)", scores=scores)[0, 0, 0, 0] == 5.0


def test_false_and_minus_inf_mask_everything():
    for source in ["false", "-inf", "causal & false", "where(causal, 0, -inf) & q < kv"]:
        assert not evaluate_mask(source, 1, 1, 3, 3).any(), source


# ---- arithmetic ---------------------------------------------------------------------------

def test_floor_division_and_modulo_follow_python_on_ints():
    q_minus_kv = np.subtract.outer(np.arange(4), np.arange(6))
    for d in (1, 2, 3, 5):
        got_div = evaluate_expr(f"(q - kv) // {d}", 1, 1, 4, 6)[0, 0]
        got_mod = evaluate_expr(f"(q - kv) % {d}", 1, 1, 4, 6)[0, 0]
        assert got_div.tolist() == [[a // d for a in row] for row in q_minus_kv.tolist()]
        assert got_mod.tolist() == [[a % d for a in row] for row in q_minus_kv.tolist()]
    assert evaluate_expr("-7 // 2", 1, 1, 1, 1).item() == -4
    assert evaluate_expr("-7 % 2", 1, 1, 1, 1).item() == 1
    assert evaluate_expr("7 % -2", 1, 1, 1, 1).item() == -1


def test_floor_division_on_reals_is_floor_of_quotient():
    assert evaluate_expr("-7.5 // 2", 1, 1, 1, 1).item() == -4.0
    assert evaluate_expr("7.5 % 2", 1, 1, 1, 1).item() == 1.5


def test_integer_division_by_zero_is_refused():
    with pytest.raises(ZeroDivisionError):
        evaluate_expr("q // (kv - kv)", 1, 1, 2, 2)


def test_types_of_values():
    assert evaluate_expr("q - kv", 1, 1, 2, 2).dtype == np.int64
    assert evaluate_expr("q / 2", 1, 1, 2, 2).dtype == np.float64
    assert evaluate_expr("2 ** 2", 1, 1, 1, 1).dtype == np.float64
    assert evaluate_expr("floor(q / 2)", 1, 1, 3, 1).dtype == np.int64
    assert evaluate_expr("causal", 1, 1, 2, 2).dtype == bool


def test_builtin_functions():
    x = 2.5
    values = {
        "abs(-2.5)": 2.5, "min(2.5, 1)": 1, "max(2.5, 1)": 2.5, "clip(2.5, 0, 2)": 2, "clip(2.5, 3, 4)": 3,
        "exp(2.5)": math.exp(x), "exp2(2.5)": 2 ** x, "log(2.5)": math.log(x), "log2(2.5)": math.log2(x),
        "sqrt(2.5)": math.sqrt(x), "tanh(2.5)": math.tanh(x), "sigmoid(2.5)": 1 / (1 + math.exp(-x)),
        "floor(-2.5)": -3, "ceil(-2.5)": -2, "sign(-2.5)": -1, "sign(0)": 0, "where(1 < 2, 3, 4)": 3,
    }
    for source, want in values.items():
        assert evaluate_expr(source, 1, 1, 1, 1).item() == pytest.approx(want, rel=1e-15), source


def test_precedence_as_evaluated():
    assert evaluate_expr("-2 ** 2", 1, 1, 1, 1).item() == -4.0
    assert evaluate_expr("2 ** 3 ** 2", 1, 1, 1, 1).item() == 512.0
    assert evaluate_expr("10 - 4 - 3", 1, 1, 1, 1).item() == 3
    assert evaluate_expr("2 + 3 * 4 % 5", 1, 1, 1, 1).item() == 4
    assert not evaluate_expr("~false & false", 1, 1, 1, 1).item()  # (~false) & false
    assert evaluate_expr("true | false & false", 1, 1, 1, 1).item()  # true | (false & false)
    assert not evaluate_expr("~2 < 3", 1, 1, 1, 1).item()  # ~(2 < 3)


# ---- tensors and positions -----------------------------------------------------------------

def test_tensor_indices_align_right():
    ids_1d = np.array([0, 0, 1, 1])
    ids_2d = np.stack([ids_1d, ids_1d])
    a = evaluate_mask("doc(ids)", 2, 1, 4, 4, tensors={"ids": ids_1d})
    b = evaluate_mask("doc(ids)", 2, 1, 4, 4, tensors={"ids": ids_2d})
    np.testing.assert_array_equal(a, b)
    # n[b] for a scalar n, a Python number, and a literal
    for n in (np.int32(2), 2):
        np.testing.assert_array_equal(evaluate_mask("prefix(n)", 2, 1, 2, 3, tensors={"n": n}),
                                      evaluate_mask("prefix(2)", 2, 1, 2, 3))
    np.testing.assert_array_equal(evaluate_mask("kv < 2[b]", 1, 1, 2, 3), evaluate_mask("kv < 2", 1, 1, 2, 3))


def test_out_of_range_indices_are_clipped():
    t = np.array([1.0, 2.0, 3.0])
    got = evaluate_expr("t[q - 1]", 1, 1, 6, 1, tensors={"t": t})[0, 0, :, 0]
    np.testing.assert_array_equal(got, [1.0, 1.0, 2.0, 3.0, 3.0, 3.0])


def test_tensor_errors():
    with pytest.raises(KeyError, match="ids"):
        evaluate_mask("doc(ids)", 1, 1, 2, 2)
    with pytest.raises(ValueError, match="rank 3"):
        evaluate_expr("t[q]", 1, 1, 2, 2, tensors={"t": np.zeros((2, 2, 2))})
    with pytest.raises(ValueError, match="scalar"):
        evaluate_mask("window(w)", 1, 1, 2, 2, tensors={"w": np.array([1, 2])})


def test_parameter_bound_to_a_tensor_is_indexable_through_definitions():
    src = "same(a, c) = a[b, q] == c[b, kv]\nmine(x) = same(x, x)\nmine(ids)"
    ids = np.array([0, 1, 1])
    np.testing.assert_array_equal(evaluate_mask(src, 1, 1, 3, 3, tensors={"ids": ids}),
                                  evaluate_mask("doc(ids)", 1, 1, 3, 3, tensors={"ids": ids}))


def test_offsets_scalar_and_per_batch():
    # decode: one query at the last of 4 keys
    assert (mask2d("causal", 1, 4, q_offset=3) == grid([[1, 1, 1, 1]])).all()
    m = evaluate_mask("causal", 2, 1, 2, 4, q_offset=np.array([0, 2])).astype(int)
    assert (m[0, 0] == grid([[1, 0, 0, 0], [1, 1, 0, 0]])).all()
    assert (m[1, 0] == grid([[1, 1, 1, 0], [1, 1, 1, 1]])).all()
    m = evaluate_mask("causal", 1, 1, 2, 2, kv_offset=1).astype(int)
    assert (m[0, 0] == grid([[0, 0], [1, 0]])).all()


def test_heads_and_batches_are_indexed():
    got = evaluate_expr("b * 10 + h", 2, 3, 1, 1)[..., 0, 0]
    np.testing.assert_array_equal(got, [[0, 1, 2], [10, 11, 12]])


def test_global_and_local_definitions():
    scoremod.define("evtest_band(lo, hi) = q - kv >= lo & q - kv <= hi")
    try:
        assert (mask2d("evtest_band(0, 1)", 3, 3) == grid([[1, 0, 0], [1, 1, 0], [0, 1, 1]])).all()
        # a source's own definitions come first
        assert (mask2d("evtest_band(lo, hi) = q == kv\nevtest_band(0, 1)", 2, 2) == grid([[1, 0], [0, 1]])).all()
    finally:
        scoremod.undefine("evtest_band")


# ---- the attention reference ------------------------------------------------------------------

def _naive_attention(q, k, v, allowed, scale):
    """One (b, t, n) at a time, with Python loops: softmax over the allowed keys."""
    B, T, N, H = q.shape
    K = k.shape[2]
    out = np.zeros_like(q)
    lse = np.full((B, N, T), NEG)
    for b in range(B):
        for n in range(N):
            kvh = n // (N // K)
            for t in range(T):
                keys = [s for s in range(k.shape[1]) if allowed[b, n, t, s]]
                if not keys:
                    continue
                logits = [scale * float(q[b, t, n] @ k[b, s, kvh]) for s in keys]
                m = max(logits)
                weights = [math.exp(x - m) for x in logits]
                total = sum(weights)
                out[b, t, n] = sum(w * v[b, s, kvh] for w, s in zip(weights, keys)) / total
                lse[b, n, t] = m + math.log(total)
    return out, lse


@pytest.mark.parametrize("N,K", [(1, 1), (4, 2), (4, 1)])
def test_attention_reference_matches_a_naive_loop(N, K):
    rng = np.random.default_rng(N * 10 + K)
    B, T, S, H = 2, 5, 7, 3
    q, k, v = rng.standard_normal((B, T, N, H)), rng.standard_normal((B, S, K, H)), rng.standard_normal((B, S, K, H))
    out, lse = attention_reference(q, k, v, "causal & window(3)", q_offset=2)
    allowed = evaluate_mask("causal & window(3)", B, N, T, S, q_offset=2)
    want_out, want_lse = _naive_attention(q, k, v, allowed, 1 / math.sqrt(H))
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_attention_reference_rows_without_keys_give_zero_and_minus_inf():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 3, 2, 4)), rng.standard_normal((1, 3, 2, 4)), rng.standard_normal((1, 3, 2, 4))
    out, lse = attention_reference(q, k, v, "kv > q + 1")  # rows 1 and 2 see nothing
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(out[0, 1:], 0.0)
    np.testing.assert_array_equal(lse[0, :, 1:], NEG)
    assert np.isfinite(lse[0, :, 0]).all()
    out, lse = attention_reference(q, k, v, "false")
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(lse, NEG)


def test_attention_reference_scale_and_no_mod():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((1, 2, 1, 4)), rng.standard_normal((1, 3, 1, 4)), rng.standard_normal((1, 3, 1, 4))
    out, lse = attention_reference(q, k, v, scale=0.5)
    logits = 0.5 * np.einsum("th,sh->ts", q[0, :, 0], k[0, :, 0])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(out[0, :, 0], (p / p.sum(-1, keepdims=True)) @ v[0, :, 0], rtol=1e-12)
    np.testing.assert_allclose(lse[0, 0], np.log(np.exp(logits).sum(-1)), rtol=1e-12)
    with pytest.raises(ValueError, match="multiple"):
        attention_reference(rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 3, 2, 4)),
                            rng.standard_normal((1, 3, 2, 4)))


# ---- the test helpers' tensors (tests/strategies.py) ------------------------------------------

def test_tensors_for_sizes_tensors_by_how_they_are_read():
    from strategies import tensors_for
    src = "relpos(t, 3) + bias(bt) + causal & doc(ids) & prefix(n) & window(w) & chunk(c) & doc(qi, ki)"
    got = tensors_for(src, 2, 3, 5, 7, np.random.default_rng(0), q_offset=np.array([0, 4]))
    assert got["t"].shape == (3, 7) and got["t"].dtype == np.float32  # [N, 2m + 1]
    assert got["bt"].shape == (2, 3, 9, 7)  # [B, N, max q + 1, max kv + 1]
    assert got["ids"].shape == (2, 9) and got["ids"].dtype == np.int32
    assert got["qi"].shape == (2, 9) and got["ki"].shape == (2, 7)
    assert got["n"].shape == (2,) and got["w"].shape == () and got["c"].shape == ()
    assert got["c"] >= 1  # a divisor
    assert 0 <= got["w"] <= 11 and (0 <= got["n"]).all()
    sorted_ids = tensors_for("doc(ids)", 2, 1, 6, 6, np.random.default_rng(1), sorted_ids=True)["ids"]
    assert (np.diff(sorted_ids, axis=-1) >= 0).all()


def test_generated_static_sources_read_no_tensors():
    from hypothesis import given, settings
    from strategies import sources

    @settings(max_examples=30)
    @given(sources(with_tensors=False))
    def check(src):
        assert scoremod.compile(src.text).tensors == ()
        assert not src.uses_tensors

    check()
