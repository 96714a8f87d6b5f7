"""as_attention_fn against the calls Flax makes (no Flax needed: the calls are reproduced here).

* flax.nnx.MultiHeadAttention calls ``attention_fn(query, key, value, mask=, dropout_rng=,
  dropout_rate=, broadcast_dropout=, deterministic=, dtype=, precision=, module=)``.
* flax.linen.MultiHeadDotProductAttention builds ``mask, dropout_rng, dropout_rate,
  broadcast_dropout, deterministic, dtype, precision, force_fp32_for_softmax,
  qk_attn_weights_einsum, attn_weights_value_einsum``, keeps those in
  ``inspect.signature(attention_fn).parameters``, and adds ``module=self`` only with
  ``sow_weights=True``.
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


def nnx_call(fn, q, k, v, mask=None, dropout_rate=0.0, deterministic=True, module=None):
    return fn(q, k, v, mask=mask, dropout_rng=None, dropout_rate=dropout_rate, broadcast_dropout=True,
              deterministic=deterministic, dtype=None, precision=None, module=module)


def linen_call(fn, q, k, v, mask=None, dropout_rate=0.0, deterministic=True, sow_weights=False):
    kwargs = dict(mask=mask, dropout_rng=None, dropout_rate=dropout_rate, broadcast_dropout=True,
                  deterministic=deterministic, dtype=None, precision=None, force_fp32_for_softmax=False,
                  qk_attn_weights_einsum=None, attn_weights_value_einsum=None)
    kwargs = {k: v for k, v in kwargs.items() if k in inspect.signature(fn).parameters}
    if sow_weights:
        return fn(q, k, v, **kwargs, module=object())
    return fn(q, k, v, **kwargs)


def causal_mask_like_flax(length, dtype=jnp.float32):
    """flax's make_causal_mask: float 1/0, [batch..., 1, T, T]."""
    idx = jnp.arange(length)
    return (idx[:, None] >= idx[None, :]).astype(dtype)[None, None].repeat(B, 0)


def attention(mod, **kw):
    return scoremod.attention(Q, K, V, mod=mod, implementation="reference", **kw)


@pytest.mark.parametrize("caller", [nnx_call, linen_call])
def test_called_like_flax(caller):
    fn = scoremod.as_attention_fn("causal & doc(ids)", ids=IDS, implementation="reference")
    np.testing.assert_allclose(caller(fn, Q, K, V), attention("causal & doc(ids)", ids=IDS), atol=1e-6)


def test_signature_names_what_flax_passes():
    params = inspect.signature(scoremod.as_attention_fn("causal")).parameters
    for name in ("query", "key", "value", "bias", "mask", "broadcast_dropout", "dropout_rng", "dropout_rate",
                 "deterministic", "dtype", "precision", "module", "force_fp32_for_softmax"):
        assert name in params
    assert list(params)[:5] == ["query", "key", "value", "bias", "mask"]


@pytest.mark.parametrize("caller", [nnx_call, linen_call])
def test_a_flax_mask_is_anded_with_the_mod(caller):
    fn = scoremod.as_attention_fn("doc(ids)", ids=IDS, implementation="reference")
    out = caller(fn, Q, K, V, mask=causal_mask_like_flax(T))
    np.testing.assert_allclose(out, attention("causal & doc(ids)", ids=IDS), atol=1e-6)
    out = caller(fn, Q, K, V, mask=causal_mask_like_flax(T, jnp.bool_)[:1])   # broadcast batch
    np.testing.assert_allclose(out, attention("causal & doc(ids)", ids=IDS), atol=1e-6)


def test_a_bias_is_added():
    bt = jnp.asarray(rng.standard_normal((B, N, T, T)), jnp.float32)
    fn = scoremod.as_attention_fn("causal", implementation="reference")
    out = fn(Q, K, V, bias=bt, mask=causal_mask_like_flax(T))
    np.testing.assert_allclose(out, attention("causal + bias(bt)", bt=bt), atol=1e-5)


def test_rows_masked_by_flax_give_zero():
    mask = jnp.ones((B, 1, T, T), bool).at[:, :, 3].set(False)
    out = scoremod.as_attention_fn()(Q, K, V, mask=mask)
    assert not np.any(np.asarray(out)[:, 3]) and np.all(np.isfinite(out))


def test_dropout_and_sowing_are_refused_clearly():
    fn = scoremod.as_attention_fn("causal")
    with pytest.raises(ScoreModError, match="dropout"):
        nnx_call(fn, Q, K, V, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ScoreModError, match="sow_weights"):
        linen_call(fn, Q, K, V, sow_weights=True)
    # Dropout configured but switched off (evaluation) is fine.
    assert nnx_call(fn, Q, K, V, dropout_rate=0.1, deterministic=True).shape == Q.shape


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
