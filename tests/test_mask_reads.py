"""A tensor read where a mask is expected is a mask by itself (docs/language.md, "3. Types"):
``causal & m[b, q, kv]`` means ``causal & m[b, q, kv] != 0``.

What is checked: the typing of reads in mask positions and the errors around them; the
canonical form (it writes the ``!= 0`` out and reads back); the evaluator's own reading
of the rule against masks built by hand in NumPy; ``attention`` (reference and xla) with
bool and int 0/1 tensors against the same mod written with ``!= 0`` and against a float64
softmax built by hand; block plans from bool tables against brute force; the refusal of
float tensors read as masks.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoremod
from scoremod.compiler.intervals import EMPTY, FULL, PARTIAL, BlockGrid, PositionBlocks, classify_blocks
from scoremod.dsl.definitions import expand
from scoremod.dsl.parser import parse_source
from scoremod.dsl.typecheck import BOOL, INT, NUM, REAL, check
from scoremod.errors import ScoreModTensorError, ScoreModTypeError
from scoremod.runtime.xla import XlaBlockSizes

from evaluator import evaluate_logits, evaluate_mask


def top_type(text):
    return check(expand(parse_source(text)), text)


# ---- typing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("causal & m[b, q, kv]", BOOL), ("m[b, q, kv] & causal", BOOL), ("m[q] & n[kv]", BOOL),
    ("~m[b, kv]", BOOL), ("m[q] | causal", BOOL), ("causal & flag", BOOL),
    ("where(m[q], 1, 2)", INT), ("where(m[q], window(2), causal)", BOOL),
    ("f(x) = causal & x\nf(m[b, q, kv])", BOOL),      # the position after expansion decides
    ("causal & bias(t)", BOOL),                         # bias(t) is the read t[b, h, q, kv]
    ("alibi(8) & m[q, kv]", REAL),                      # ALiBi under the mask m
    # elsewhere a read is a number
    ("m[b, q, kv]", NUM), ("causal + m[b, q, kv]", REAL), ("causal & m[b, q, kv] + alibi(8)", REAL),
    ("causal & (m[q] + 0)", REAL), ("m[q] != 0", BOOL), ("m[q] * 2", NUM),
])
def test_types(text, want):
    assert top_type(text) == want


@pytest.mark.parametrize("text, fragment", [
    ("q & 3", "'&' needs a mask on at least one side; q and 3 are biases"),
    ("where(q & 3, 1, 2)", "'&' needs a mask on at least one side; q and 3 are numbers"),
    ("~q", "'~' needs masks, but q is a number"),
    ("m[q] == causal", "'==' compares a mask with a number"),
    ("m[q] == true", "'==' compares a mask with a number"),
    ("where(m[q] & 3, 1, 2)", "m[q] is a mask (a tensor read under '&' means m[q] != 0)"),
    ("exp(m[q] & causal)", "exp() needs numbers, but m[q] & causal is a mask"),
    ("m[q, 1.5] & causal", "index 1.5 of 'm' is a real"),
    ("m[causal] & causal", "index causal of 'm' is a mask"),
    ("where(causal, m[q], causal)", "where's branches must both be masks or both be numbers"),
])
def test_type_errors(text, fragment):
    with pytest.raises(ScoreModTypeError) as info:
        scoremod.compile(text)
    assert fragment in info.value.message
    assert info.value.span is not None


def test_number_hint_still_suggests_a_comparison():
    with pytest.raises(ScoreModTypeError) as info:
        scoremod.compile("q | causal")
    assert info.value.hint == "compare it to make a mask, e.g. q != 0"


# ---- canonical form --------------------------------------------------------------------------

@pytest.mark.parametrize("text, canonical, kind, mask_reads", [
    ("causal & m[b, q, kv]", "m[b, q, kv] != 0 & q >= kv", "mask", ("m",)),
    ("~pad[b, kv] & doc(ids)", "ids[b, q] == ids[b, kv] & ~pad[b, kv] != 0", "mask", ("pad",)),
    ("where(keep[h], alibi(8), 0)", "where(keep[h] != 0, -exp2(-(h + 1)) * abs(q - kv), 0)", "bias",
     ("keep",)),
    ("causal + m[b, q, kv]", "(q >= kv) + m[b, q, kv]", "bias", ()),
    ("causal & bias(t)", "q >= kv & t[b, h, q, kv] != 0", "mask", ("t",)),
    ("causal + bias(t)", "(q >= kv) + t[b, h, q, kv]", "bias", ()),
])
def test_canonical_form_writes_the_comparison_and_reads_back(text, canonical, kind, mask_reads):
    mod = scoremod.compile(text)
    assert str(mod) == canonical
    assert mod.kind == kind and mod.mask_reads == mask_reads
    again = scoremod.compile(str(mod))
    assert again == mod and again.kind == kind


def test_a_read_and_its_comparison_compile_to_one_mod():
    assert scoremod.compile("causal & m[b, q, kv]") == scoremod.compile("m[b, q, kv] != 0 & causal")
    assert scoremod.compile("causal & m[b, q, kv]") != scoremod.compile("causal + m[b, q, kv]")


def test_a_read_as_the_only_value_under_a_mask_prints_with_plus():
    # The value of where(M, T(score) + B, -inf) alone a read: '&' would make it a mask.
    for text in ("causal + t[b, q, kv]", "causal + t[b, floor(score)]", "sink(2) + w"):
        mod = scoremod.compile(text)
        assert " & " not in str(mod)
        assert scoremod.compile(str(mod)) == mod and mod.kind != "mask"


# ---- the evaluator's reading, against masks built by hand ---------------------------------

def test_evaluator_reads_tensors_in_mask_positions_as_masks():
    rng = np.random.default_rng(0)
    B, N, T, S = 2, 3, 5, 6
    m = rng.random((B, T, S)) < 0.6
    pad = rng.random((B, S)) < 0.3
    keep = np.array([1, 0, 2], np.int32)
    q = np.arange(T)[:, None]
    kv = np.arange(S)[None, :]
    causal = (q >= kv)[None, None]
    scores = rng.standard_normal((B, N, T, S))

    got = evaluate_mask("causal & m[b, q, kv]", B, N, T, S, tensors={"m": m})
    np.testing.assert_array_equal(got, np.broadcast_to(causal & m[:, None], got.shape))
    got = evaluate_mask("~pad[b, kv] | causal", B, N, T, S, tensors={"pad": pad.astype(np.int32)})
    np.testing.assert_array_equal(got, np.broadcast_to(~pad[:, None, None, :] | causal, got.shape))
    got = evaluate_logits("where(keep[h], 1.5, -1.5)", scores=scores, tensors={"keep": keep})
    want = scores + np.where(keep != 0, 1.5, -1.5)[None, :, None, None]
    np.testing.assert_allclose(got, want)
    # nested: an inner '&' of a read and a mask
    got = evaluate_logits("where(m[b, q, kv] & causal, 1.5, -1.5)", scores=scores, tensors={"m": m.astype(np.int32)})
    np.testing.assert_allclose(got, scores + np.where(causal & m[:, None], 1.5, -1.5))
    # through a definition's parameter
    got = evaluate_mask("f(x) = causal & x\nf(m[b, q, kv])", B, N, T, S, tensors={"m": m})
    np.testing.assert_array_equal(got, np.broadcast_to(causal & m[:, None], got.shape))
    # elsewhere a number: a read of 0/1 added as a bias
    got = evaluate_logits("causal + m[b, q, kv]", scores=scores, tensors={"m": m})
    want = np.where(causal, scores + m[:, None], -np.inf)
    np.testing.assert_allclose(got, want)


# ---- attention: reference and xla -----------------------------------------------------------

def _softmax_attention(q, k, v, allowed, scale, bias=0.0):
    """float64 attention with a bool mask [B, N, T, S] built by hand (K == N)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = scale * np.einsum("btnh,bsnh->bnts", q, k) + bias
    s = np.where(allowed, s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True)
    empty = np.isneginf(row_max)
    p = np.where(allowed, np.exp(s - np.where(empty, 0, row_max)), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p / np.where(empty, 1.0, denom), v)


def _attention(impl, q, k, v, mod, **tensors):
    if impl == "xla-small":
        with mock.patch.object(XlaBlockSizes, "get_default",
                               classmethod(lambda cls: XlaBlockSizes(block_q=8, block_kv=16))):
            return jax.jit(lambda q, k, v, t: scoremod.attention(q, k, v, mod=mod, implementation="xla", **t))(
                q, k, v, tensors)
    return jax.jit(lambda q, k, v, t: scoremod.attention(q, k, v, mod=mod, implementation=impl, **t))(
        q, k, v, tensors)


def _block_table(B, T, S, rng, bq=8, bk=16):
    """A bool [B, T, S] table made of all-true, all-false and mixed 8 x 16 blocks."""
    kind = rng.integers(0, 3, size=(B, -(-T // bq), -(-S // bk)))
    dense = np.repeat(np.repeat(kind, bq, axis=1), bk, axis=2)[:, :T, :S]
    mixed = rng.random((B, T, S)) < 0.5
    return np.where(dense == 2, mixed, dense == 1)


@pytest.mark.parametrize("impl", ["reference", "xla", "xla-small"])
@pytest.mark.parametrize("dtype", [np.bool_, np.int32])
def test_attention_with_a_bool_tensor_mask(impl, dtype):
    rng = np.random.default_rng(1)
    B, T, S, N, H = 2, 29, 37, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
               ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
    m = _block_table(B, T, S, rng)
    m[:, 0] = False   # a row with no key: output 0
    m_arg = m.astype(dtype)
    out = np.asarray(_attention(impl, q, k, v, "causal & m[b, q, kv]", m=m_arg))
    same = np.asarray(_attention(impl, q, k, v, "causal & m[b, q, kv] != 0", m=m_arg))
    np.testing.assert_allclose(out, same, atol=1e-6)
    allowed = (np.arange(T)[:, None] >= np.arange(S)[None, :])[None, None] & m[:, None]
    want = _softmax_attention(q, k, v, allowed, 1 / np.sqrt(H))
    np.testing.assert_allclose(out, want, atol=2e-5)
    assert np.all(out[:, 0] == 0)


@pytest.mark.parametrize("impl", ["reference", "xla-small"])
def test_attention_with_padding_flags_and_head_gates(impl):
    rng = np.random.default_rng(2)
    B, T, S, N, H = 2, 11, 23, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
               ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
    pad = rng.random((B, S)) < 0.3
    keep = np.array([True, False])
    mod = "~pad[b, kv] & where(keep[h], alibi(2), 0.5)"
    out = np.asarray(_attention(impl, q, k, v, mod, pad=pad, keep=keep))
    allowed = np.broadcast_to(~pad[:, None, None, :], (B, N, T, S))
    slopes = 2.0 ** (-8 * (np.arange(N) + 1) / 2)
    alibi = -slopes[:, None, None] * np.abs(np.arange(T)[:, None] - np.arange(S)[None, :])
    bias = np.where(keep[:, None, None], alibi, 0.5)[None]
    np.testing.assert_allclose(out, _softmax_attention(q, k, v, allowed, 1 / np.sqrt(H), bias), atol=2e-5)
    # a bare scalar flag: on, every key is a candidate; off, no key is
    on = np.asarray(_attention(impl, q, k, v, "causal & flag", flag=np.bool_(True)))
    np.testing.assert_allclose(on, np.asarray(_attention(impl, q, k, v, "causal")), atol=1e-6)
    off = np.asarray(_attention(impl, q, k, v, "causal & flag", flag=np.int32(0)))
    assert np.all(off == 0)


@pytest.mark.parametrize("impl", ["reference", "xla-small"])
def test_gradients_through_a_bool_tensor_mask(impl):
    rng = np.random.default_rng(3)
    B, T, S, N, H = 1, 17, 21, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
               ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
    m = _block_table(B, T, S, rng)
    m[:, :, 0] = True   # every row has a key

    def loss(mod, impl_name):
        def f(q, k, v):
            return jnp.sum(scoremod.attention(q, k, v, mod=mod, implementation=impl_name, m=m) ** 2)
        return f

    name = "xla" if impl == "xla-small" else impl
    with mock.patch.object(XlaBlockSizes, "get_default", classmethod(lambda cls: XlaBlockSizes(block_q=8, block_kv=16))):
        got = jax.grad(loss("m[b, q, kv] & softcap(4)", name), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(loss("m[b, q, kv] != 0 & softcap(4)", "reference"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


# ---- block plans from bool tables ----------------------------------------------------------

@pytest.mark.parametrize("xp", [np, jnp])
@pytest.mark.parametrize("source", ["m[b, q, kv] & true", "causal & m[b, q, kv]", "~m[b, q, kv] | sink(3)"])
def test_block_classes_of_a_bool_table_are_exact(xp, source):
    rng = np.random.default_rng(4)
    B, T, S, bq, bk = 2, 29, 37, 8, 16
    m = _block_table(B, T, S, rng, bq, bk)
    mod = scoremod.compile(source)
    grid = BlockGrid(B, 1, PositionBlocks(T, bq), PositionBlocks(S, bk))
    classes = np.asarray(classify_blocks(mod.canonical.mask, grid, {"m": xp.asarray(m)}, xp))
    dense = evaluate_mask(source, B, 1, T, S, tensors={"m": m})
    nq, nk = -(-T // bq), -(-S // bk)
    for bi in range(B):
        for i in range(nq):
            for j in range(nk):
                block = dense[bi, 0, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                want = FULL if block.all() else EMPTY if not block.any() else PARTIAL
                assert classes[bi, 0, i, j] == want, (source, bi, i, j)
    assert {EMPTY, FULL, PARTIAL} <= set(np.unique(classes).tolist())


# ---- float tensors read as masks are refused -------------------------------------------------

def test_a_float_tensor_read_as_a_mask_is_refused():
    q = jnp.ones((1, 4, 1, 8))
    t = np.random.default_rng(5).standard_normal((4, 4)).astype(np.float32)
    with pytest.raises(ScoreModTensorError) as info:
        scoremod.attention(q, q, q, mod="causal & bias(t)", t=t)
    assert "reads it as a mask" in info.value.message and "must be bool or int" in info.value.message
    assert "causal + bias(t)" in info.value.hint
    with pytest.raises(ScoreModTensorError, match="reads it as a mask"):
        scoremod.compile("f(x) = causal & x\nf(m[q, kv])").score_mod(m=t)
    with pytest.raises(ScoreModTensorError, match="reads it as a mask"):   # under jit too
        jax.jit(lambda q, t: scoremod.attention(q, q, q, mod="m[q, kv] | causal", m=t))(q, t)
    # the caret points at the read (through a definition: at the call)
    with pytest.raises(ScoreModTensorError) as info:
        scoremod.compile("f(x) = causal & x\nf(m[q, kv])").mask_mod(m=t)
    assert info.value.span == (len("f(x) = causal & x\nf("), len("f(x) = causal & x\nf(m[q, kv]"))
    # written out, or added, a float tensor is fine
    scoremod.attention(q, q, q, mod="causal & m[q, kv] != 0", m=t)
    scoremod.attention(q, q, q, mod="causal + bias(t)", t=t)
    scoremod.attention(q, q, q, mod="causal & m[q, kv]", m=t > 0)
