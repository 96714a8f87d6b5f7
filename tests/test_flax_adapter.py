"""as_attention_fn in Flax's own attention layers (flax is a test dependency; these tests
skip without it): nnx.MultiHeadAttention (incl. ``is_causal``, training, decoding with a
cache) and linen.MultiHeadDotProductAttention, against Flax's own attention function
with the same parameters; then the adapter's own behaviour (masks, bias, batch axes,
refusals) called directly.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoremod
from scoremod import ScoreModError

rng = np.random.default_rng(0)
B, T, N, H = 2, 12, 2, 8
Q, K, V = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))
IDS = jnp.asarray(np.repeat([[0, 1, 2]], 4, axis=1).repeat(B, 0), jnp.int32)


def causal_mask_like_flax(length, dtype=jnp.float32):
    """flax's make_causal_mask: float 1/0, [batch..., 1, T, T]."""
    idx = jnp.arange(length)
    return (idx[:, None] >= idx[None, :]).astype(dtype)[None, None].repeat(B, 0)


def attention(mod, **kw):
    return scoremod.attention(Q, K, V, mod=mod, implementation="reference", **kw)


flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402
import flax.linen as nn  # noqa: E402

D = N * H   # model width of the layers below


def _nnx_pair(**kw):
    """Two nnx layers with the same parameters: Flax's attention and ours."""
    ours = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=False,
                                  attention_fn=scoremod.as_attention_fn(implementation="reference"), **kw)
    theirs = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=False, **kw)
    return ours, theirs


X = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)


def test_nnx_layer_matches_flax():
    ours, theirs = _nnx_pair()
    np.testing.assert_allclose(ours(X), theirs(X), atol=1e-5)
    mask = nnx.make_causal_mask(jnp.ones((B, T)))
    np.testing.assert_allclose(ours(X, mask=mask), theirs(X, mask=mask), atol=1e-5)


def test_nnx_is_causal():
    # flax 0.12 passes is_causal to attention_fn unconditionally (was a TypeError here).
    ours, theirs = _nnx_pair()
    want = theirs(X, mask=nnx.make_causal_mask(jnp.ones((B, T))))
    np.testing.assert_allclose(ours(X, is_causal=True), want, atol=1e-5)


def test_nnx_mod_with_tensors_in_a_layer():
    layer = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=False,
                                   attention_fn=scoremod.as_attention_fn("causal & doc(ids)", ids=IDS,
                                                                         implementation="reference"))
    theirs = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=False)
    same_doc = IDS[:, None, :, None] == IDS[:, None, None, :]
    want = theirs(X, mask=nnx.combine_masks(nnx.make_causal_mask(jnp.ones((B, T))), same_doc))
    np.testing.assert_allclose(layer(X), want, atol=1e-5)


def test_nnx_training_step():
    ours, theirs = _nnx_pair()

    def loss(model):
        return jnp.mean(model(X, is_causal=True) ** 2)
    g_ours = nnx.grad(loss)(ours)
    g_theirs = nnx.grad(loss)(theirs)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_theirs)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    step = nnx.jit(lambda model: nnx.grad(loss)(model))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(step(ours)))


def test_nnx_decode_loop_matches_the_full_causal_pass():
    layer = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=True,
                                   attention_fn=scoremod.as_attention_fn(implementation="reference"))
    full = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=False)
    want = full(X, mask=nnx.make_causal_mask(jnp.ones((B, T))))
    layer.init_cache((B, T, D))
    steps = [layer(X[:, t:t + 1]) for t in range(T)]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), want, atol=1e-5)


def test_linen_layer_matches_flax_and_trains():
    ours = nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=scoremod.as_attention_fn(
        implementation="reference"))
    theirs = nn.MultiHeadDotProductAttention(num_heads=N)
    params = theirs.init(jax.random.key(0), X)
    mask = nn.make_causal_mask(jnp.ones((B, T)))
    np.testing.assert_allclose(ours.apply(params, X, mask=mask), theirs.apply(params, X, mask=mask), atol=1e-5)

    def loss(p, model):
        return jnp.mean(model.apply(p, X, mask=mask) ** 2)
    for a, b in zip(jax.tree_util.tree_leaves(jax.grad(loss)(params, ours)),
                    jax.tree_util.tree_leaves(jax.grad(loss)(params, theirs))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_dropout_and_sowing_are_refused_clearly():
    layer = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=False, dropout_rate=0.1,
                                   attention_fn=scoremod.as_attention_fn("causal"))
    with pytest.raises(ScoreModError, match="dropout"):
        layer(X, deterministic=False)
    # Dropout configured but switched off (evaluation) is fine.
    assert layer(X, deterministic=True).shape == X.shape
    linen = nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=scoremod.as_attention_fn("causal"))
    params = linen.init(jax.random.key(0), X)
    with pytest.raises(ScoreModError, match="sow_weights"):
        linen.apply(params, X, sow_weights=True)


def test_signature_names_what_flax_passes():
    params = inspect.signature(scoremod.as_attention_fn("causal")).parameters
    for name in ("query", "key", "value", "bias", "mask", "broadcast_dropout", "dropout_rng", "dropout_rate",
                 "deterministic", "dtype", "precision", "module", "force_fp32_for_softmax", "is_causal"):
        assert name in params
    assert list(params)[:5] == ["query", "key", "value", "bias", "mask"]


def test_a_flax_mask_is_anded_with_the_mod():
    fn = scoremod.as_attention_fn("doc(ids)", ids=IDS, implementation="reference")
    out = fn(Q, K, V, mask=causal_mask_like_flax(T))
    np.testing.assert_allclose(out, attention("causal & doc(ids)", ids=IDS), atol=1e-6)
    out = fn(Q, K, V, mask=causal_mask_like_flax(T, jnp.bool_)[:1])   # broadcast batch
    np.testing.assert_allclose(out, attention("causal & doc(ids)", ids=IDS), atol=1e-6)


def test_a_bias_is_added():
    bt = jnp.asarray(rng.standard_normal((B, N, T, T)), jnp.float32)
    fn = scoremod.as_attention_fn("causal", implementation="reference")
    out = fn(Q, K, V, bias=bt, mask=causal_mask_like_flax(T))
    np.testing.assert_allclose(out, attention("causal + bias(bt)", bt=bt), atol=1e-5)


def test_a_mod_that_is_a_tensor_read_stays_a_bias_under_flax_masks():
    # Under '&' a tensor read is a mask (docs/language.md): the adapter must not put one there.
    bt = jnp.asarray(rng.standard_normal((B, N, T, T)), jnp.float32)
    fn = scoremod.as_attention_fn("bias(bt)", bt=bt, implementation="reference")
    want = attention("causal + bias(bt)", bt=bt)
    np.testing.assert_allclose(fn(Q, K, V, mask=causal_mask_like_flax(T)), want, atol=1e-5)
    np.testing.assert_allclose(fn(Q, K, V, is_causal=True), want, atol=1e-5)


def test_rows_masked_by_flax_give_zero():
    mask = jnp.ones((B, 1, T, T), bool).at[:, :, 3].set(False)
    out = scoremod.as_attention_fn()(Q, K, V, mask=mask)
    assert not np.any(np.asarray(out)[:, 3]) and np.all(np.isfinite(out))


def test_batch_axes_any_number_or_none():
    fn = scoremod.as_attention_fn("causal", implementation="reference")
    q, k, v = (x.reshape(1, B, T, N, H) for x in (Q, K, V))
    np.testing.assert_allclose(fn(q, k, v)[0], attention("causal"), atol=1e-6)
    np.testing.assert_allclose(fn(Q[0], K[0], V[0]), attention("causal")[0], atol=1e-6)


def test_dtype_casts_and_grads_flow():
    fn = scoremod.as_attention_fn("causal")
    assert fn(Q, K, V, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    g = jax.jit(jax.grad(lambda q: jnp.sum(fn(q, K, V, mask=causal_mask_like_flax(T)) ** 2)))(Q)
    assert g.shape == Q.shape and bool(jnp.all(jnp.isfinite(g)))


def test_reserved_tensor_names():
    with pytest.raises(ScoreModError, match="flax_mask"):
        scoremod.as_attention_fn("flax_mask[b, q] > 0")


def test_nnx_decode_with_a_position_dependent_mod_is_refused():
    """Flax's decode cache passes one query, the whole cache and no position: a mod that
    reads q (causal, window) cannot be placed, and at offset 0 it silently gave a wrong
    answer (off by up to 4.0 from the full pass; a third audit). Now a clear error; a
    position-free mod with the cache's mask still decodes (the test above)."""
    fn = scoremod.as_attention_fn("causal & window(3)", implementation="reference")
    layer = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=True, attention_fn=fn)
    layer.init_cache((B, T, D))
    with pytest.raises(ScoreModError, match="depends on query positions") as info:
        layer(X[:, :1])
    assert "q_offset" in str(info.value)
    # The same mod on the full sequence (no cache) runs.
    full = nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(0), decode=False, attention_fn=fn)
    assert full(X).shape == X.shape


def test_masks_and_biases_of_the_wrong_size_are_refused():
    """A Flax mask or bias must broadcast to [batch..., N, T, S]: a wrong batch was a raw
    broadcasting error and a mask one key wider was read in part, silently (a third audit)."""
    fn = scoremod.as_attention_fn()
    x = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
    for bad in ((3, 2, 8, 8), (1, 2, 8, 9), (1, 3, 8, 8), (2, 8, 7)):
        with pytest.raises(scoremod.ScoreModShapeError, match="must broadcast"):
            fn(x, x, x, mask=jnp.ones(bad, bool))
        with pytest.raises(scoremod.ScoreModShapeError, match="must broadcast"):
            fn(x, x, x, bias=jnp.zeros(bad))
    for good in ((8, 8), (1, 8), (2, 1, 8), (1, 1, 1, 1)):   # broadcasting shapes still work
        assert fn(x, x, x, mask=jnp.ones(good, bool)).shape == x.shape
