"""Softmax sinks (``attention(..., sinks=s)``, runtime/sinks.py): every implementation
against a float64 formula written here (the evaluator's logits with one more column, the
sink, which carries no value); gradients to q, k, v and the sinks against the reference
path's autodiff and against finite differences of the formula; rows with no key; bad
sinks; the plan and context-parallel paths."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import scoremod
from evaluator import evaluate_logits
from strategies import shapes, sources


def sink_attention(q, k, v, sinks, source=None, *, scale=None, q_offset=0, kv_offset=0, tensors=None):
    """float64 (out [B, T, N, H], lse [B, T, N]): softmax over the mod's logits and a column
    of sink logits s_h that adds to the denominator only."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    group = N // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = 1 / math.sqrt(H) if scale is None else scale
    scores = scale * np.einsum("btnh,bsnh->bnts", q, k)
    logits = scores if source is None else evaluate_logits(source, scores=scores, q_offset=q_offset,
                                                           kv_offset=kv_offset, tensors=tensors)
    sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], (B, N, T, 1))
    full = np.concatenate([logits, sink], axis=-1)
    m = full.max(axis=-1, keepdims=True)
    with np.errstate(under="ignore"):
        p = np.exp(full - m)
    denom = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p[..., :-1] / denom, v)
    lse = (m + np.log(denom))[..., 0].transpose(0, 2, 1)
    return out, lse


def _inputs(B, T, S, N, K, H, seed, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (B, T, N, H), dtype), jax.random.normal(ks[1], (B, S, K, H), dtype),
            jax.random.normal(ks[2], (B, S, K, H), dtype), 2.0 * jax.random.normal(ks[3], (N,)))


@settings(max_examples=12)
@given(src=sources(max_depth=2), shape=shapes(max_seq=24), seed=st.integers(0, 2**16),
       impl=st.sampled_from(["reference", "xla", "pallas"]))
def test_every_path_matches_the_formula(src, shape, seed, impl):
    tensors = src.make_tensors(shape, np.random.default_rng(seed))
    q, k, v, s = _inputs(shape.B, shape.T, shape.S, shape.N, shape.K, 8, seed)
    call = dict(q_offset=shape.q_offset, kv_offset=shape.kv_offset)
    try:   # jitted: one compilation instead of one per op (tensors and offsets stay concrete, closed over)
        out, lse = jax.jit(lambda q, k, v, s: scoremod.attention(q, k, v, mod=src.text, sinks=s, return_lse=True,
                                                                 implementation=impl, **call, **tensors))(q, k, v, s)
    except NotImplementedError:
        return   # pallas declines some generated mods (and says why); the other paths run them
    want_out, want_lse = sink_attention(q, k, v, s, src.text, tensors={n: np.asarray(t) for n, t in tensors.items()},
                                        **{n: np.asarray(o) for n, o in call.items()})
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5)
    finite = np.isfinite(want_lse)
    assert (np.isfinite(np.asarray(lse)) == finite).all()
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=2e-5, rtol=1e-5)


def test_rows_with_no_key_give_zero_and_the_sink():
    q, k, v, s = _inputs(2, 12, 12, 4, 2, 8, seed=1)
    for impl in ("reference", "xla", "pallas"):
        # one jitted program per path, used for all three sinks below (one compilation)
        run = jax.jit(lambda s, impl=impl: scoremod.attention(q, k, v, mod="causal & kv >= 5", sinks=s,
                                                              return_lse=True, implementation=impl))
        out, lse = run(s)
        np.testing.assert_array_equal(np.asarray(out)[:, :5], 0.0)
        np.testing.assert_allclose(np.asarray(lse)[:, :5], np.broadcast_to(np.asarray(s), (2, 5, 4)), atol=1e-6)
        # a -inf sink is no sink: rows with no key stay 0 and -inf, without NaN
        out, lse = run(jnp.full((4,), -jnp.inf))
        assert np.isneginf(np.asarray(lse)[:, :5]).all() and not np.isnan(np.asarray(out)).any()
        # ... and its gradient is 0 there, never NaN (logaddexp(-inf, -inf)'s derivative
        # is); the finite sink beside it gets its usual gradient
        mixed = jnp.asarray([-jnp.inf, 0.5, -jnp.inf, -1.0])

        def loss(s):
            out, lse = run(s)
            return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        g = np.asarray(jax.jit(jax.grad(loss))(mixed))
        assert g[0] == 0.0 and g[2] == 0.0 and np.isfinite(g).all() and abs(g[1]) > 0, (impl, g)


@pytest.mark.parametrize("mod", ["causal & window(5)", "softcap(3) + causal & window(6)", None])
def test_gradients_to_qkv_and_sinks(mod):
    """Each path's gradients (q, k, v and the sinks) equal the reference path's autodiff,
    and the sinks' equal finite differences of the float64 formula."""
    q, k, v, s = _inputs(2, 13, 13, 4, 2, 8, seed=2)
    w = jax.random.normal(jax.random.key(9), q.shape)

    def loss(impl):
        def f(q, k, v, s):
            out, lse = scoremod.attention(q, k, v, mod=mod, sinks=s, return_lse=True, implementation=impl)
            return jnp.sum(out * w) + jnp.sum(jnp.sin(lse))
        return f
    want = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2, 3)))(q, k, v, s)
    for impl in ("xla", "pallas"):
        got = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2, 3)))(q, k, v, s)
        for name, a, b in zip("qkvs", got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, err_msg=f"{impl} d{name}")

    def formula_loss(s):
        out, lse = sink_attention(q, k, v, s, mod)
        return float(np.sum(out * np.asarray(w, np.float64)) + np.sum(np.sin(lse)))
    eps, s64 = 1e-5, np.asarray(s, np.float64)
    numeric = [(formula_loss(s64 + eps * e) - formula_loss(s64 - eps * e)) / (2 * eps) for e in np.eye(4)]
    np.testing.assert_allclose(np.asarray(want[3]), numeric, atol=2e-4)


def test_sinks_with_a_plan_and_with_context_parallelism():
    q, k, v, s = _inputs(2, 32, 32, 4, 2, 8, seed=3)
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (2, 32)), axis=1).astype(np.int32))
    # each call jitted (one compilation, not one per op); ids and the plan stay concrete, closed over
    want = jax.jit(lambda q, k, v, s: scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=ids, sinks=s,
                                                         implementation="reference"))(q, k, v, s)
    plan = scoremod.plan("causal & doc(ids)", 32, batch=2, heads=4, kv_heads=2, head_dim=8, dtype="float32", ids=ids)
    got = jax.jit(lambda q, k, v, s: scoremod.attention(q, k, v, plan=plan, sinks=s))(q, k, v, s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    if len(jax.devices()) >= 4:
        mesh = jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
        got = jax.jit(lambda q, k, v, s: scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=ids, sinks=s,
                                                            mesh=mesh, context_axis="sp",
                                                            implementation="reference"))(q, k, v, s)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_bf16_keeps_its_dtype():
    q, k, v, s = _inputs(1, 16, 16, 2, 2, 8, seed=4, dtype=jnp.bfloat16)
    out = scoremod.attention(q, k, v, mod="causal", sinks=s, implementation="xla")
    want, _ = sink_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), s, "causal")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)


@pytest.mark.parametrize("sinks, match", [
    (jnp.zeros((3,)), r"sinks must have shape \[N\] = \[4\]"),
    (jnp.zeros((1, 4)), r"sinks must have shape \[N\]"),
    (jnp.zeros((4,), jnp.int32), "sinks must be a float array"),
    ("nope", "sinks must"),
])
def test_bad_sinks(sinks, match):
    q, k, v, _ = _inputs(1, 8, 8, 4, 2, 8, seed=5)
    with pytest.raises(scoremod.ScoreModShapeError, match=match):
        scoremod.attention(q, k, v, mod="causal", sinks=sinks)
