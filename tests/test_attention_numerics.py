"""attention() with "reference" and "xla" against the independent float64 evaluator.

The oracle for the forward pass and lse is ``evaluator.attention_reference`` (NumPy
float64, no compiler code). The oracle for gradients is the textbook attention backward
written here in NumPy float64 on the evaluator's logits; the only derivative it needs,
``dT/dscore`` of the transform, is a central difference of the evaluator (transforms
act on each score separately). No JAX autodiff is involved in the oracle.

"xla-small" runs the xla path with 8 x 16 tiles, so small shapes cross several q-blocks
and kv-chunks, ragged ones included.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import scoremod
from scoremod.runtime import xla as xla_module
from scoremod.runtime.xla import XlaBlockSizes
from evaluator import attention_reference, evaluate_logits
from strategies import shapes, sources

IMPLS = ["reference", "xla", "xla-small"]


@pytest.fixture(autouse=True)
def float32_matmuls():
    """Full float32 matmuls everywhere (GPUs default to TF32 for float32 inputs)."""
    with jax.default_matmul_precision("float32"):
        yield


@contextmanager
def implementation(name):
    """The implementation name to pass to attention(); xla-small patches the tile sizes."""
    if name != "xla-small":
        yield name
        return
    with mock.patch.object(XlaBlockSizes, "get_default", classmethod(lambda cls: XlaBlockSizes(block_q=8, block_kv=16))):
        yield "xla"


# ---- the float64 oracle -------------------------------------------------------------------

def oracle(q, k, v, source, *, scale, q_offset, kv_offset, tensors, dout, dlse):
    """(out [B,T,N,H], lse [B,T,N], dq, dk, dv) in float64 for the loss <out, dout> + <lse, dlse>."""
    q, k, v, dout, dlse = (np.asarray(x, np.float64) for x in (q, k, v, dout, dlse))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    out, lse = attention_reference(q, k, v, source, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                                   tensors=tensors)                                  # lse [B, N, T]
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = scale * np.einsum("btnh,bsnh->bnts", q, kr)
    logits = lambda x: x if source is None else evaluate_logits(source, scores=x, q_offset=q_offset,
                                                                 kv_offset=kv_offset, tensors=tensors)
    L = logits(s)
    allowed = np.isfinite(L)
    eps = 1e-6
    with np.errstate(invalid="ignore"):
        dT = np.where(allowed, (logits(s + eps) - logits(s - eps)) / (2 * eps), 0.0)
    has_key = np.isfinite(lse)[..., None]
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(allowed & has_key, np.exp(np.where(allowed & has_key, L - np.where(has_key, lse[..., None], 0), 0)), 0.0)
    dlse_bnt = dlse.transpose(0, 2, 1)
    delta = np.einsum("btnh,btnh->bnt", dout, out)
    dp = np.einsum("btnh,bsnh->bnts", dout, vr)
    dL = p * (dp - delta[..., None] + dlse_bnt[..., None])
    ds = dL * dT * scale
    dq = np.einsum("bnts,bsnh->btnh", ds, kr)
    dk = np.einsum("bnts,btnh->bsnh", ds, q).reshape(B, S, K, G, H).sum(axis=3)
    dv = np.einsum("bnts,btnh->bsnh", p, dout).reshape(B, S, K, G, H).sum(axis=3)
    return out, lse.transpose(0, 2, 1), dq, dk, dv, np.max(np.abs(np.where(allowed, L, 0)), initial=1.0)


def run(impl, q, k, v, source, *, scale=None, q_offset=0, kv_offset=0, tensors, dout, dlse):
    """(out, lse, dq, dk, dv) from attention() under jit, for the same loss as ``oracle``."""
    def loss(q, k, v):
        out, lse = scoremod.attention(q, k, v, mod=source, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                                      implementation=name, return_lse=True, **tensors)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(finite_lse * dlse), (out, lse)

    with implementation(impl) as name:
        grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, lse) + tuple(grads)


def inputs(B, T, S, N, K, H, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in
               ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    dout = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    dlse = jnp.asarray(rng.standard_normal((B, T, N)), jnp.float32)
    return q, k, v, dout, dlse


def check(impl, source, q, k, v, dout, dlse, *, tensors, scale=None, q_offset=0, kv_offset=0, tol=2e-5):
    got = run(impl, q, k, v, source, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
              tensors=tensors, dout=dout, dlse=dlse)
    H = q.shape[-1]
    want = oracle(q, k, v, source, scale=1 / np.sqrt(H) if scale is None else scale, q_offset=q_offset,
                  kv_offset=kv_offset, tensors=tensors, dout=dout, dlse=dlse)
    # Logits of magnitude L carry f32 rounding of about L * 6e-8: scale the tolerance.
    tol = tol * max(1.0, float(want[-1]) / 10)
    out, lse = got[:2]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a = np.asarray(a, np.float64)
        assert np.all(np.isfinite(a) | (name == "lse")), f"{name} has NaN/inf"
        if name == "lse":
            assert np.array_equal(np.isneginf(a), np.isneginf(b)), "lse is -inf exactly on rows with no key"
            a, b = np.where(np.isfinite(b), a, 0), np.where(np.isfinite(b), b, 0)
        scale_ = max(1.0, float(np.max(np.abs(b), initial=0)))
        err = float(np.max(np.abs(a - b), initial=0)) / scale_
        assert err < tol, f"{impl} {source!r}: {name} off by {err:.2e} (relative to max {scale_:.2f})"


# ---- fixed cases ---------------------------------------------------------------------------

def _cases():
    rng = np.random.default_rng(1)
    ids = np.sort(rng.integers(0, 4, size=(2, 30)), axis=1).astype(np.int32)
    ids[1] = np.repeat(np.arange(3), 10)  # a different packing in the second row
    qids = np.array([[0, 0, 5, 1, 1, 1, 7, 2, 2, 2, 2], [9, 9, 0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
    kvids = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1, 1]], np.int32)
    return [
        # id, source, (B, T, S, N, K, H), tensors, q_offset, kv_offset, scale
        ("causal", "causal", (1, 17, 17, 2, 2, 8), {}, 0, 0, None),
        ("doc-gqa-offsets", "causal & doc(ids)", (2, 19, 23, 4, 2, 8), {"ids": ids},
         np.array([0, 5], np.int32), np.array([0, 2], np.int32), None),
        ("softcap-window-bottom-right", "softcap(2) + causal & window(5)", (1, 13, 29, 2, 1, 8), {}, 16, 0, 0.5),
        ("prefix-lm", "causal | prefix(n)", (2, 12, 12, 2, 2, 8), {"n": np.array([3, 7], np.int32)}, 0, 0, None),
        ("relpos", "relpos(rp, 3) + causal", (1, 11, 14, 3, 1, 8),
         {"rp": rng.standard_normal((3, 7)).astype(np.float32)}, 3, 0, None),
        ("dense-bias-length", "bias(bt) + length(n)", (2, 9, 10, 2, 2, 8),
         {"bt": rng.standard_normal((2, 1, 9, 10)).astype(np.float32), "n": np.array([4, 10], np.int32)},
         0, 0, None),
        ("no-mod-mqa", None, (1, 10, 21, 4, 1, 8), {}, 0, 0, None),
        ("cross-doc-masked-rows", "doc(qids, kvids)", (2, 11, 9, 2, 2, 8), {"qids": qids, "kvids": kvids},
         0, 0, None),
    ]


CASES = _cases()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_evaluator(impl, case):
    _, source, (B, T, S, N, K, H), tensors, q_offset, kv_offset, scale = case
    q, k, v, dout, dlse = inputs(B, T, S, N, K, H)
    check(impl, source, q, k, v, dout, dlse, tensors=tensors, scale=scale, q_offset=q_offset, kv_offset=kv_offset)


@pytest.mark.parametrize("impl", ["reference", "xla-small"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(impl, dtype):
    ids = np.repeat(np.arange(3), 7)[None].astype(np.int32)
    q, k, v, dout, dlse = inputs(1, 21, 21, 4, 2, 16, dtype=dtype, seed=3)
    # The oracle sees the same rounded inputs; what is left is the f32/bf16 arithmetic inside.
    check(impl, "causal & doc(ids) + alibi(4)", q, k, v, dout, dlse, tensors={"ids": ids}, tol=3e-2)


# ---- generated sources ---------------------------------------------------------------------

@settings(max_examples=12)
@given(src=sources(max_depth=2), shape=shapes(max_seq=20), seed=st.integers(0, 2**16), impl=st.sampled_from(IMPLS))
def test_generated_sources_match_evaluator(src, shape, seed, impl):
    rng = np.random.default_rng(seed)
    tensors = src.make_tensors(shape, rng)
    q, k, v, dout, dlse = inputs(shape.B, shape.T, shape.S, shape.N, shape.K, 8, seed=seed)
    check(impl, src.text, q, k, v, dout, dlse, tensors=tensors, q_offset=shape.q_offset,
          kv_offset=shape.kv_offset, tol=1e-4)


# ---- rows with no key ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("source", ["kv > q + 4", "false", "softcap(5) + causal"])
def test_rows_with_no_key_give_zero_and_finite_grads(impl, source):
    # "kv > q + 4": the last rows see no key; "false": none does; causal with kv_offset 6:
    # the first 6 rows see none.
    B, T, S, N, K, H = 2, 12, 12, 2, 1, 8
    q, k, v, dout, dlse = inputs(B, T, S, N, K, H, seed=4)
    kv_offset = 6 if "causal" in source else 0
    out, lse, dq, dk, dv = run(impl, q, k, v, source, kv_offset=kv_offset, tensors={}, dout=dout, dlse=dlse)
    rows = np.arange(T)
    no_key = {"kv > q + 4": rows + 5 >= S, "false": np.ones(T, bool), "softcap(5) + causal": rows < 6}[source]
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.asarray(out)[:, no_key] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, no_key])) and np.all(np.isfinite(np.asarray(lse)[:, ~no_key]))
    assert np.all(np.asarray(dq)[:, no_key] == 0)
    if source == "false":
        assert not np.any(np.asarray(dk)) and not np.any(np.asarray(dv))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("source", ["sign(score) * sqrt(abs(score))", "sqrt(abs(score)) & causal"])
def test_transforms_not_differentiable_at_zero_give_finite_grads_on_ragged_sizes(impl, source):
    # T = S = 13 is not a tile multiple: padded rows and columns have score exactly 0, where
    # d sqrt(abs(score)) / dscore is inf. They carry no weight, so no NaN may come from them.
    q, k, v, dout, dlse = inputs(1, 13, 13, 2, 1, 8, seed=5)
    check(impl, source, q, k, v, dout, dlse, tensors={}, tol=1e-4)


# ---- jit, vmap, recompilation ---------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_new_tensor_values_and_offsets_do_not_retrace(impl):
    traces = []

    @jax.jit
    def f(q, k, v, ids, w, q_offset):
        traces.append(1)
        return scoremod.attention(q, k, v, mod="causal & doc(ids) & window(w)", ids=ids, w=w,
                                  q_offset=q_offset, implementation=impl)

    q, k, v, _, _ = inputs(2, 8, 16, 2, 2, 8)
    rng = np.random.default_rng(0)
    outs = []
    for step in range(3):
        ids = jnp.asarray(np.sort(rng.integers(0, 3, size=(2, 16)), axis=1), jnp.int32)
        outs.append(f(q, k, v, ids, jnp.int32(3 + step), jnp.array([step, 8], jnp.int32)))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[2])


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_vmap_over_an_extra_batch_axis(impl):
    q, k, v, _, _ = inputs(3 * 2, 9, 9, 2, 1, 8, seed=5)
    q, k, v = (x.reshape((3, 2) + x.shape[1:]) for x in (q, k, v))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(3, 2, 9)), jnp.int32)
    f = lambda q, k, v, ids: scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=ids, implementation=impl)
    batched = jax.jit(jax.vmap(f))(q, k, v, ids)
    one = jax.jit(f)
    for i in range(3):
        np.testing.assert_allclose(batched[i], one(q[i], k[i], v[i], ids[i]), atol=1e-6)


# ---- the xla path's tiles ---------------------------------------------------------------------

def test_xla_visits_only_tiles_the_plan_does_not_prove_empty():
    mod = scoremod.compile("causal")
    cfg = xla_module._Config(mod, 1.0, 64, 64, 16, 16, (0, 0))
    kv_counts, _, q_counts, _ = xla_module._visit_lists(cfg, None, 1, 2)
    assert list(kv_counts) == [1, 2, 3, 4] and list(q_counts) == [4, 3, 2, 1]   # 10 of 16 tiles
    window = xla_module._Config(scoremod.compile("causal & window(16)"), 1.0, 64, 64, 16, 16, (0, 0))
    assert list(xla_module._visit_lists(window, None, 1, 2)[0]) == [1, 2, 2, 2]


def test_empty_sequences():
    q, k, v, _, _ = inputs(1, 4, 3, 2, 2, 8)
    out, lse = scoremod.attention(q, k[:, :0], v[:, :0], return_lse=True)
    assert out.shape == q.shape and not np.any(out) and np.all(np.isneginf(lse))
    assert scoremod.attention(q[:, :0], k, v).shape == (1, 0, 2, 8)


# ---- NaN and inf: one behaviour on every path (docs/attention.md) -------------------------------

NAN_IMPLS = ["reference", "xla", "xla-small", "pallas"]


def _nan_case(which):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 12, 2, 16)).astype(np.float32)
    k = rng.standard_normal((1, 12, 1, 16)).astype(np.float32)
    v = rng.standard_normal((1, 12, 1, 16)).astype(np.float32)
    if which == "q":
        q[0, 5, 1] = np.nan               # one query row of head 1
    elif which == "k":
        k[0, 4] = np.nan                  # a key every row >= 4 may attend
    elif which == "v":
        v[0, 4, 0, 3] = np.nan
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _expected_nan_rows(which, mod):
    rows = np.zeros((12, 2), bool)
    if mod == "where(causal, inf, 0)":
        rows[:] = True                    # a +inf logit on every row
    elif which == "q":
        rows[5, 1] = True
    elif which in ("k", "v"):
        rows[4:, :] = True                # rows that may attend key 4
    return rows


@pytest.mark.parametrize("impl", NAN_IMPLS)
@pytest.mark.parametrize("which, mod", [("q", "causal"), ("k", "causal"), ("v", "causal"),
                                        ("none", "where(causal, inf, 0)")])
def test_nan_and_inf_propagate_the_same_way_everywhere(impl, which, mod):
    q, k, v = _nan_case(which)
    with implementation(impl) as name:
        out, lse = scoremod.attention(q, k, v, mod=mod, implementation=name, return_lse=True)
    out, lse = np.asarray(out), np.asarray(lse)
    want = _expected_nan_rows(which, mod)
    got_out = np.isnan(out).any(axis=-1)[0]        # [T, N]
    if which == "v":
        # A NaN value reaches the output of every row that attends it; rows that may not
        # attend it can still get 0 * NaN in the P @ V product (unspecified, documented).
        # Values never enter the lse.
        assert got_out[want].all() and np.isfinite(lse).all()
        return
    assert (got_out == want).all(), np.argwhere(got_out != want)
    assert (np.isnan(lse[0]) == want).all(), lse[0]
    assert np.isfinite(out[0][~want]).all() and np.isfinite(lse[0][~want]).all()


@pytest.mark.parametrize("impl", ["xla-small", "pallas"])
def test_huge_finite_logits_stay_finite_and_agree(impl):
    # An additive padding bias of -1e30 (batch row 1: every key padded) over several
    # blocks, a bias of -1e20 on every logit, and scores scaled by 1e10: the softmax's
    # exponents are <= 0 by construction, but fused code may round a logit differently in
    # the max and in the exponent; one that came out positive overflowed to inf and the
    # row to NaN (found by an audit: NaN rows, lse +inf).
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 70, 2, 8)), jnp.float32) for _ in range(3))
    cases = [("score + where(kv < n[b], 0.0, -1e30)", {"n": jnp.asarray([40, 0], jnp.int32)}, None),
             ("score - 1e20", {}, None), ("causal", {}, 1e10),
             # no mask at logits ~1e10: xla once dropped whole rows (lse -inf; a third audit)
             (None, {}, 1e9), ("score * 2", {}, 1e9)]
    for mod, tensors, scale in cases:
        want = scoremod.attention(q, k, v, mod=mod, implementation="reference", return_lse=True, scale=scale, **tensors)
        with implementation(impl) as name:
            got = scoremod.attention(q, k, v, mod=mod, implementation=name, return_lse=True, scale=scale, **tensors)
        for g, w in zip(got, want):
            assert np.isfinite(np.asarray(g)).all(), mod
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=mod)
    # the audits' cases for the xla path: scores near 1e10, one tile; no mask at 1e9 (the
    # third audit: 3 of 18 rows dropped, output 0 and lse -inf)
    for shape, scale in (((3, 1, 3, 1, 2), 1e10), ((3, 1, 9, 2, 16), 1e9)):
        q, k, v = (jnp.asarray(x, jnp.float32) for x in np.random.default_rng(0).standard_normal(shape))
        want = scoremod.attention(q, k, v, scale=scale, implementation="reference", return_lse=True)
        got = scoremod.attention(q, k, v, scale=scale, implementation="xla" if impl == "xla-small" else impl,
                                 return_lse=True)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla-small", "pallas"])
def test_huge_logits_a_few_float_steps_apart_over_many_blocks(impl):
    """Logits near -1e9 where every key but the first sits 256 to 1792 below it (4 to 28
    float32 steps): the softmax is the first key's value. The exponents' reference once
    drifted down by the rounding slack (~55) per block and let keys hundreds below the max
    weigh as much as it (output off by 2.2 after 12 blocks; fixed by carrying the max
    itself, softmax_numerics.exponent_reference)."""
    B, T, S, N, H = 1, 4, 640, 1, 8
    q, k = jnp.zeros((B, T, N, H)), jnp.zeros((B, S, N, H))
    v = jax.random.normal(jax.random.key(0), (B, S, N, H))
    t = np.full((B, N, T, S), -1e9, np.float32)
    t[..., 1:] -= 256.0 * (1 + np.arange(S - 1) % 7)
    with implementation(impl) as name:
        out, lse = scoremod.attention(q, k, v, mod="bias(t)", t=jnp.asarray(t), implementation=name, return_lse=True)
    np.testing.assert_array_equal(np.asarray(out[0, :, 0]), np.broadcast_to(np.asarray(v[0, 0, 0]), (T, H)))
    np.testing.assert_allclose(np.asarray(lse), -1e9, rtol=1e-7)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_scale_is_an_error(scale):
    q, k, v = _nan_case("none")
    with pytest.raises(scoremod.ScoreModShapeError, match="finite"):
        scoremod.attention(q, k, v, scale=scale)


def test_eager_xla_calls_do_not_retrace(monkeypatch):
    # Outside jit, a second call with new values must reuse the compiled program (it
    # retraced both passes every time: 0.5 s a call on a CPU).
    traced = []
    forward = xla_module._forward
    monkeypatch.setattr(xla_module, "_forward", lambda *a, **k: traced.append(1) or forward(*a, **k))
    q, k, v, _, _ = inputs(1, 32, 32, 2, 1, 8, seed=7)
    ids = jnp.asarray(np.repeat(np.arange(4), 8)[None], jnp.int32)
    scoremod.attention(q, k, v, mod="causal & doc(ids) + alibi(2)", ids=ids, implementation="xla")
    first = len(traced)
    scoremod.attention(q + 1, k, v, mod="causal & doc(ids) + alibi(2)", ids=ids[:, ::-1], implementation="xla")
    assert first >= 1 and len(traced) == first
