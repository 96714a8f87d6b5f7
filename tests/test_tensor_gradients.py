"""Gradients to float tensor parameters (learnable biases): reference, xla and pallas give
each element the sum over the logits that read it of dL/dlogit * dlogit/delement, checked
against central finite differences of the independent float64 oracle
(tests/evaluator.py) on T5-bucketed, pair, per-head-slope, relpos and learned-softcap
biases; xla and pallas against reference on generated sources; int tensors get no
gradient. The pallas kernels compute the gradients of reads at plain positions
(``s[h]``, ``t[b, q, kv]``, ...) and of tables read at computed indices (relpos, T5
buckets) of up to ``MAX_GATHER_GRAD_TABLE`` elements; a larger differentiated table makes
them decline under jax.grad (the call falls through to xla), never return zeros."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import dataclasses

import scoremod
from scoremod.runtime import pallas_attention as pa
from evaluator import attention_reference
from strategies import shapes, sources

B, T, N, K, H = 2, 13, 4, 2, 8
T5 = "causal + t[h, where(q - kv < 8, q - kv, min(15, 8 + floor(log((q - kv) / 8) / log(16) * 8)))]"

CASES = [
    ("t5 buckets", T5, lambda rng: {"t": rng.standard_normal((N, 16))}),
    ("pair bias", "causal & window(9) + bias(t)", lambda rng: {"t": rng.standard_normal((B, N, T, T))}),
    ("per-head slopes", "causal + -s[h] * abs(q - kv)", lambda rng: {"s": rng.uniform(0.1, 1.0, N)}),
    ("relpos", "relpos(t, 5) + causal", lambda rng: {"t": rng.standard_normal((N, 11))}),
    ("learned softcap", "g[h] * tanh(score / g[h]) + causal", lambda rng: {"g": rng.uniform(1.0, 3.0, N)}),
    ("gate", "score * sigmoid(g[h]) + causal", lambda rng: {"g": rng.standard_normal(N)}),
]


def _qkv(seed, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (B, T, N, H), dtype), jax.random.normal(ks[1], (B, T, K, H), dtype),
            jax.random.normal(ks[2], (B, T, K, H), dtype), jax.random.normal(ks[3], (B, T, N, H)))


@pytest.mark.parametrize("name, source, make", CASES, ids=[c[0] for c in CASES])
def test_gradients_match_finite_differences_of_the_oracle(name, source, make):
    rng = np.random.default_rng(0)
    q, k, v, w = _qkv(1)
    tensors = {n: np.asarray(t, np.float32) for n, t in make(rng).items()}
    (tname, table), = tensors.items()

    def oracle_loss(value):
        out, lse = attention_reference(np.asarray(q), np.asarray(k), np.asarray(v), source,
                                       tensors={tname: value})
        return float(np.sum(out * np.asarray(w, np.float64)) + np.sum(np.where(np.isfinite(lse), np.sin(lse), 0.0)))

    flat = table.astype(np.float64).ravel()
    picks = rng.choice(flat.size, min(flat.size, 24), replace=False)
    eps = 1e-4
    numeric = []
    for i in picks:
        e = np.zeros_like(flat)
        e[i] = eps
        numeric.append((oracle_loss((flat + e).reshape(table.shape)) - oracle_loss((flat - e).reshape(table.shape)))
                       / (2 * eps))
    for impl in ("reference", "xla", "pallas"):
        def loss(t):
            out, lse = scoremod.attention(q, k, v, mod=source, implementation=impl, return_lse=True, **{tname: t})
            return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
        got = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(table))).ravel()[picks]
        np.testing.assert_allclose(got, numeric, atol=2e-3, rtol=2e-3, err_msg=f"{name} {impl}")
    assert np.abs(numeric).max() > 1e-3   # the table matters to the loss: the test can fail


@settings(max_examples=5)
@given(src=sources(max_depth=2), shape=shapes(max_seq=20), seed=st.integers(0, 2**16),
       impl=st.sampled_from(["xla", ("pallas", "xla")]))
def test_tensor_gradients_equal_the_references(src, shape, seed, impl):
    # (pallas: a read it cannot run, e.g. indexed by score, falls through to xla)
    tensors = src.make_tensors(shape, np.random.default_rng(seed))
    floats = {n: t for n, t in tensors.items() if jnp.issubdtype(jnp.asarray(t).dtype, jnp.floating)}
    assume(floats)
    ints = {n: t for n, t in tensors.items() if n not in floats}
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (shape.B, shape.T, shape.N, 8))
    k, v = (jax.random.normal(kk, (shape.B, shape.S, shape.K, 8)) for kk in ks[1:3])
    w = jax.random.normal(ks[3], q.shape)

    def grads(impl):
        def loss(floats):
            out = scoremod.attention(q, k, v, mod=src.text, implementation=impl, q_offset=shape.q_offset,
                                     kv_offset=shape.kv_offset, **floats, **ints)
            return jnp.sum(out * w)
        return jax.grad(loss)({n: jnp.asarray(t) for n, t in floats.items()})
    want, got = grads("reference"), grads(impl)
    for n in floats:
        scale = max(1.0, float(jnp.abs(want[n]).max()))
        np.testing.assert_allclose(np.asarray(got[n]), np.asarray(want[n]), atol=1e-4 * scale, err_msg=n)


def test_int_tensors_get_no_gradient():
    q, k, v, _ = _qkv(2)
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (B, T)), axis=1), jnp.int32)
    s = jnp.linspace(0.1, 1.0, N)
    for impl in ("reference", "xla"):
        g = jax.grad(lambda ts: jnp.sum(scoremod.attention(q, k, v, mod="causal & doc(ids) + -s[h] * abs(q - kv)",
                                                           implementation=impl, **ts)),
                     allow_int=True)({"ids": ids, "s": s})
        assert g["ids"].dtype == jax.dtypes.float0 and np.abs(np.asarray(g["s"])).max() > 0


SMALL = pa.PallasBlockSizes(block_q=16, block_kv=16, num_warps=4, num_stages=2, block_q_dq=16, block_kv_dq=16,
                            block_q_dkv=16, block_kv_dkv=16, num_warps_bwd=4, num_stages_bwd=2)

# One read of each materialized shape [B|1, N|1, T|1, S|1] the pallas backward handles
# (summed in the dQ kernel, in the dK/dV kernel, or written tile by tile), under a mask
# that leaves rows with no allowed key (q < 6 sees nothing), windows, GQA, ragged tiles.
READ_SHAPES = [
    ("per-head slope", "-s[h] * abs(q - kv)", {"s": (4,)}),
    ("learned softcap", "g[h] * tanh(score / g[h])", {"g": (4,)}),
    ("gate by batch and head", "score * sigmoid(c[b, h])", {"c": (2, 4)}),
    ("per query", "score * u[q]", {"u": (40,)}),
    ("per key", "score * (1 + w[kv])", {"w": (60,)}),
    ("per head and key", "score + x[h, kv] * (q % 3)", {"x": (4, 60)}),
    ("pair bias", "score + bias(t)", {"t": (2, 4, 40, 60)}),
    ("shared pair bias", "score + p[q, kv] * s[h]", {"p": (40, 60), "s": (4,)}),
]
# Tables read at computed indices (gathers: their gradient is scattered to the table in
# the dQ kernel), q - kv running from -35 to 34 here.
TABLE_READS = [
    ("relpos", "score + relpos(t, 6)", {"t": (4, 13)}),
    ("t5 buckets", "score + t[h, where(abs(q - kv) < 8, abs(q - kv), "
                   "min(15, 8 + floor(log(abs(q - kv) / 8) / log(4) * 8)))]", {"t": (4, 16)}),
    ("shifted diagonal", "score + 0.5 * t[q - kv + 35]", {"t": (70,)}),
    ("literal and computed index", "score + t[1, h, q // 4]", {"t": (2, 4, 12)}),
    ("gathered in the transform", "score * sigmoid(g[h, (q - kv) // 4 % 3])", {"g": (4, 3)}),
    ("table beside a slope", "score + relpos(t, 6) - s[h] * abs(q - kv)", {"t": (4, 13), "s": (4,)}),
    ("slice per batch row", "score + t[b, abs(q - kv) // 3]", {"t": (2, 13)}),
]
READS = READ_SHAPES + TABLE_READS


def _positive(shape, rng):
    return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)


@pytest.mark.parametrize("name, values, shapes, one_loop",
                         [(*c, False) for c in READS] + [(*c, True) for c in READS[::3]],
                         ids=[c[0] for c in READS] + [f"{c[0]}, one loop" for c in READS[::3]])
def test_pallas_gives_tensor_gradients(name, values, shapes, one_loop):
    B, T, S, N, K, H = 2, 29, 37, 4, 2, 16
    rng = np.random.default_rng(len(name))
    tensors = {n: _positive(shape, rng) for n, shape in shapes.items()}
    mod = f"(kv <= q - 6 | q - kv > 30) & window(24) & ({values})"   # rows q < 6 see no key
    ks = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k, v = (jax.random.normal(kk, (B, S, K, H)) for kk in ks[1:3])
    w = jax.random.normal(ks[3], q.shape)
    offsets = dict(q_offset=jnp.asarray([3, 8], jnp.int32), kv_offset=2)
    bs = dataclasses.replace(SMALL, bwd_one_loop=one_loop)

    def loss_pallas(q, ts):
        out, lse = pa.pallas_attention(q, k, v, mod=mod, tensors=ts, block_sizes=bs, interpret=True,
                                       return_lse=True, **offsets)
        return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))

    def loss_reference(q, ts):
        out, lse = scoremod.attention(q, k, v, mod=mod, implementation="reference", return_lse=True,
                                      **offsets, **ts)
        return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
    got = jax.jit(jax.grad(loss_pallas, argnums=(0, 1)))(q, tensors)
    want = jax.grad(loss_reference, argnums=(0, 1))(q, tensors)
    for n in tensors:
        assert np.isfinite(np.asarray(got[1][n])).all()
        scale = float(jnp.abs(want[1][n]).max())
        assert scale > 1e-3, n   # the read matters to the loss: the test can fail
        np.testing.assert_allclose(np.asarray(got[1][n]), np.asarray(want[1][n]), atol=2e-4 * scale, rtol=1e-3,
                                   err_msg=n)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-4)


def test_pallas_tensor_gradients_in_bf16_are_repeatable():
    B, T, N, H = 1, 48, 2, 16
    rng = np.random.default_rng(3)
    s, t = _positive((N,), rng), jnp.asarray(rng.standard_normal((T, T)), jnp.float32)
    q, k, v = (jax.random.normal(kk, (B, T, N, H), jnp.bfloat16) for kk in jax.random.split(jax.random.key(1), 3))
    mod = "causal & (-s[h] * abs(q - kv) + t[q, kv])"

    def grad(impl):
        def f(ts):
            out = scoremod.attention(q, k, v, mod=mod, implementation=impl, **ts)
            return jnp.sum(out.astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(f))({"s": s, "t": t})
    got, again, want = grad("pallas"), grad("pallas"), grad("xla")
    for n in ("s", "t"):
        assert np.array_equal(np.asarray(got[n]), np.asarray(again[n]))   # no atomics: bitwise repeatable
        np.testing.assert_allclose(np.asarray(got[n]), np.asarray(want[n]), atol=2e-2 * float(jnp.abs(want[n]).max()))


def test_pallas_gives_gathered_tables_their_gradients_up_to_a_size(caplog, monkeypatch):
    q, k, v, w = _qkv(3)
    t = jnp.linspace(0.1, 1.0, N * 11).reshape(N, 11)
    source = "causal & window(5) + relpos(t, 5)"

    def loss(impl):
        return lambda t: jnp.sum(scoremod.attention(q, k, v, mod=source, t=t, implementation=impl) * w)
    want = jax.grad(loss("reference"))(t)
    with caplog.at_level(logging.INFO, logger="scoremod"):
        got = jax.grad(loss(("pallas", "xla")))(t)
    assert "using pallas" in caplog.text
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # A table larger than the dQ kernel's accumulator: pallas declines with the reason and
    # the default dispatch falls through to xla (never zeros).
    monkeypatch.setattr(pa, "MAX_GATHER_GRAD_TABLE", 10)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scoremod"):
        got = jax.grad(loss(("pallas", "xla")))(t)
    assert "at most 10 of its elements (here 11)" in caplog.text
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    with pytest.raises(NotImplementedError, match="table read at computed indices"):
        jax.grad(loss("pallas"))(t)


def test_pallas_table_slices_chosen_by_int_tensors():
    # The slice of t a (batch, head) reads is chosen by int reads (c[b], which): programs
    # reading the same slice add up; slices nobody reads get 0.
    q, k, v, w = _qkv(4)
    tensors = {"t": jnp.asarray(np.random.default_rng(4).standard_normal((3, N, 5)), jnp.float32),
               "c": jnp.asarray([2, 2], jnp.int32), "which": jnp.int32(1)}
    mod = "causal & (score + t[c[b], h, abs(q - kv) % 5] + 0.5 * t[which, h, kv % 5])"

    def grad(impl):
        loss = lambda t: jnp.sum(scoremod.attention(q, k, v, mod=mod, implementation=impl, **{**tensors, "t": t}) * w)  # noqa: E731
        return np.asarray(jax.jit(jax.grad(loss))(tensors["t"]))
    got, want = grad("pallas"), grad("reference")
    assert not got[0].any() and np.abs(want[1]).max() > 1e-3 and np.abs(want[2]).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pallas_tensor_gradients_under_vmap_and_jit_with_sinks():
    # vmap over an extra leading axis of grad of a loss with learnable slopes, a pair bias
    # and sinks: pallas against the reference, per vmapped slice.
    rng = np.random.default_rng(6)
    T, Hd = 20, 16
    q, k, v = (jax.random.normal(kk, (3, 1, T, 2, Hd)) for kk in jax.random.split(jax.random.key(6), 3))
    tensors = {"s": _positive((2,), rng), "p": jnp.asarray(rng.standard_normal((T, T)), jnp.float32),
               "sinks": jnp.asarray([0.5, -1.0], jnp.float32)}
    mod = "causal & window(7) & (score - s[h] * abs(q - kv) + p[q, kv])"

    def grad(impl):
        def loss(ts, q, k, v):
            out = scoremod.attention(q, k, v, mod=mod, implementation=impl, sinks=ts["sinks"], s=ts["s"], p=ts["p"])
            return jnp.sum(jnp.cos(out))
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0)))(tensors, q, k, v)
    got, want = grad("pallas"), grad("reference")
    for n in tensors:
        assert np.abs(np.asarray(want[n])).max() > 1e-3
        np.testing.assert_allclose(np.asarray(got[n]), np.asarray(want[n]), atol=2e-5, err_msg=n)


def test_pallas_float_table_only_the_mask_reads_gets_zero_gradient():
    # m[q, kv] > 0.3 decides the mask only: its derivative is 0 (no [B, N, T, S] pass is
    # run for it); the slope beside it gets the reference's gradient.
    q, k, v, _ = _qkv(7)
    tensors = {"m": jax.random.uniform(jax.random.key(1), (T, T)), "s": jnp.linspace(0.5, 1.0, N)}
    mod = "causal & (m[q, kv] > 0.3) & (score - s[h] * abs(q - kv))"

    def grad(impl):
        return jax.grad(lambda ts: jnp.sum(scoremod.attention(q, k, v, mod=mod, implementation=impl, **ts) ** 2))(tensors)
    got, want = grad("pallas"), grad("reference")
    assert not np.any(np.asarray(got["m"])) and not np.any(np.asarray(want["m"]))
    np.testing.assert_allclose(np.asarray(got["s"]), np.asarray(want["s"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bfloat16_tensors_are_floats(impl):
    """A bfloat16 bias is a float tensor (NumPy gives bfloat16 the kind "V": it was refused
    as "expected int, float or bool"; a third audit): the same values as in float32 give
    the same output, the gradient comes back in bfloat16, and a bfloat16 tensor read as
    a mask is refused as a float mask is."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 40, 2, 16)) for i in range(3))
    t = jax.random.normal(jax.random.key(9), (1, 2, 40, 40)).astype(jnp.bfloat16)
    mod = "causal + bias(t)"
    want = scoremod.attention(q, k, v, mod=mod, t=t.astype(jnp.float32), implementation=impl)
    got = scoremod.attention(q, k, v, mod=mod, t=t, implementation=impl)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    g = jax.grad(lambda t: scoremod.attention(q, k, v, mod=mod, t=t, implementation=impl).sum())(t)
    assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())
    with pytest.raises(scoremod.ScoreModTensorError, match="reads it as a mask"):
        scoremod.attention(q, k, v, mod="causal & m[b, q, kv]", m=jnp.ones((1, 40, 40), jnp.bfloat16))
