"""Meaning is preserved: the canonical form (``str(mod)``) and the expanded IR mean what the
source means, as the independent evaluator computes it, on generated sources, shapes,
offsets and tensors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import scoremod
from scoremod.dsl.definitions import expand
from scoremod.dsl.parser import parse_source
from evaluator import evaluate_expr, evaluate_logits, mentions_score
from strategies import prelude_masks, shapes, sources, tensors_for

SMALL = shapes(max_seq=9)


def assert_same_logits(a, b, what):
    assert a.shape == b.shape
    assert not np.isnan(a).any() and not np.isnan(b).any(), what
    np.testing.assert_array_equal(a == -np.inf, b == -np.inf, err_msg=what)
    finite = np.isfinite(a)
    np.testing.assert_allclose(a[finite], b[finite], rtol=1e-9, atol=1e-9, err_msg=what)


def logits(source, shape, tensors, scores):
    return evaluate_logits(source, scores=scores, q_offset=shape.q_offset, kv_offset=shape.kv_offset,
                           tensors=tensors)


def canonical_logits(mod, scores, q_offset=0, kv_offset=0, tensors=None):
    """``where(M, T(score) + B, -inf)`` from the parts of ``mod.canonical``, each evaluated
    as an inner expression: what kernels compute from the canonical form."""
    c = mod.canonical
    kw = dict(q_offset=q_offset, kv_offset=kv_offset, tensors=tensors, scores=scores)
    grid = scores.shape
    mask = evaluate_expr(c.mask, *grid, **kw)
    assert mask.dtype == bool, f"the canonical mask of {mod} is not a mask"
    transformed = scores if c.transform is None else evaluate_expr(c.transform, *grid, **kw).astype(float)
    bias = 0.0 if c.bias is None else evaluate_expr(c.bias, *grid, **kw).astype(float)
    return np.where(mask, transformed + bias, -np.inf)


@given(sources(), SMALL, st.integers(0, 2**32 - 1))
def test_canonical_form_means_what_the_source_means(src, shape, seed):
    rng = np.random.default_rng(seed)
    tensors = src.make_tensors(shape, rng)
    scores = rng.standard_normal(shape.grid) * 4
    mod = scoremod.compile(src.text)
    want = logits(src.text, shape, tensors, scores)
    got = logits(str(mod), shape, tensors, scores)
    assert_same_logits(got, want, f"{src.text!r} -> {mod}")
    parts = canonical_logits(mod, scores, shape.q_offset, shape.kv_offset, tensors)
    assert_same_logits(parts, want, f"{src.text!r} -> M, T, B of {mod}")


@given(sources(), SMALL, st.integers(0, 2**32 - 1))
def test_expansion_means_what_the_source_means(src, shape, seed):
    """The dsl's macro expansion (an IR of Var/Tensor/built-in calls) against the
    evaluator's own call-by-name evaluation of the source."""
    rng = np.random.default_rng(seed)
    tensors = src.make_tensors(shape, rng)
    scores = rng.standard_normal(shape.grid)
    ir = expand(parse_source(src.text))
    assert_same_logits(logits(ir, shape, tensors, scores), logits(src.text, shape, tensors, scores), src.text)


@given(prelude_masks(), SMALL, st.integers(0, 2**32 - 1))
def test_prelude_masks_keep_their_meaning(src, shape, seed):
    rng = np.random.default_rng(seed)
    tensors = src.make_tensors(shape, rng)
    scores = rng.standard_normal(shape.grid)
    mod = scoremod.compile(src.text)
    assert mod.kind == "mask"
    assert_same_logits(logits(str(mod), shape, tensors, scores), logits(src.text, shape, tensors, scores), src.text)


@given(sources(kind="transform"))
def test_transforms_mention_score(src):
    assert mentions_score(src.text)


@pytest.mark.parametrize("text", [
    "causal & window(4096) + alibi(8)", "alibi(8) + causal & window(4)", "where(causal, alibi(8), -inf)",
    "where(causal, 0, -inf) + where(window(3), 1, -inf)", "causal & -inf", "softcap(30) & causal + alibi(2)",
    "-inf", "false & alibi(8)", "q - kv - (q - kv)", "(q - kv) % 3 == 0 | sink(1)", "score * 0 + 1",
    "where(~causal, -inf, relpos(t, 2))", "softcap(30) & causal + alibi(2)", "alibi(2) & causal + softcap(5)",
])
def test_tricky_forms_keep_their_meaning(text):
    rng = np.random.default_rng(0)
    B, N, T, S = 2, 2, 6, 7
    tensors = tensors_for(text, B, N, T, S, rng)
    scores = rng.standard_normal((B, N, T, S))
    mod = scoremod.compile(text)
    want = evaluate_logits(text, scores=scores, tensors=tensors)
    got = evaluate_logits(str(mod), scores=scores, tensors=tensors)
    assert_same_logits(got, want, f"{text!r} -> {mod}")
    assert_same_logits(canonical_logits(mod, scores, tensors=tensors), want, f"{text!r} -> M, T, B of {mod}")


def test_a_mask_mentioning_score_makes_a_transform():
    text = "(score > 0) & alibi(8)"
    scores = np.array([[[[1.0, -1.0], [2.0, 3.0]]]])
    want = evaluate_logits(text, scores=scores)  # alibi where score > 0, -inf elsewhere; score not added
    mod = scoremod.compile(text)
    assert mod.kind == "transform"
    assert_same_logits(canonical_logits(mod, scores), want, text)
    assert scoremod.compile(str(mod)) == mod
