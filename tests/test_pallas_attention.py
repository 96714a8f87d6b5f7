"""The Pallas block-sparse flash kernel against references (interpret mode on CPU).

Output and lse are checked against the independent float64 evaluator
(tests/evaluator.py); the three gradients against jax.grad of a dense f32 jnp reference
(below). Tiny shapes and 16-wide blocks keep interpret mode fast. GPU cases (realistic
sizes, bf16) are marked ``gpu``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from evaluator import attention_reference  # noqa: E402  (independent float64 oracle)

from scoremod.compiler.mod import compile_mod  # noqa: E402
from scoremod.compiler.plan import BlockPlan  # noqa: E402
from scoremod.runtime import attention_plan, pallas_attention as pa  # noqa: E402

# ---- a dense block-plan builder and a dense reference (small sizes only) ----------------------
# The dense builder evaluates the mask on the whole [B, N, T, S] grid and compacts it into the
# BlockPlan layout; it stands in for compiler.plan.build_plan where that is missing and builds
# uncollapsed per-(b, h) plans on purpose.

def dense_mask(mod, *, q_len, kv_len, batch, heads, q_offset=0, kv_offset=0, tensors=None):
    with jax.ensure_compile_time_eval():
        return _dense_mask(mod, q_len=q_len, kv_len=kv_len, batch=batch, heads=heads,
                           q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)


def _dense_mask(mod, *, q_len, kv_len, batch, heads, q_offset, kv_offset, tensors):
    mod = compile_mod("true" if mod is None else mod)
    mm = mod.mask_mod(**(tensors or {}))
    qo = np.broadcast_to(np.asarray(q_offset, np.int32), (batch,))
    ko = np.broadcast_to(np.asarray(kv_offset, np.int32), (batch,))
    b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(heads, dtype=jnp.int32)[None, :, None, None]
    q = jnp.asarray(qo[:, None] + np.arange(q_len, dtype=np.int32))[:, None, :, None]
    kv = jnp.asarray(ko[:, None] + np.arange(kv_len, dtype=np.int32))[:, None, None, :]
    m = np.asarray(mm(b, h, q, kv))
    return np.broadcast_to(m, (batch, heads, q_len, kv_len))


def _compact(classes, axis_len):
    nonempty = classes > 0
    counts = nonempty.sum(-1).astype(np.int32)
    idx = np.zeros(classes.shape, np.int32)
    full = np.zeros(classes.shape, np.int8)
    for pos in np.ndindex(*classes.shape[:-1]):
        lst = np.nonzero(nonempty[pos])[0]
        if len(lst):
            idx[pos][: len(lst)] = lst
            idx[pos][len(lst):] = lst[-1]
            full[pos][: len(lst)] = classes[pos][lst] == 2
    return counts, idx, full


def dense_plan(mod, *, q_len, kv_len, block_q, block_kv, batch, heads, q_offset=0,
               kv_offset=0, tensors=None, collapse=True):
    m = dense_mask(mod, q_len=q_len, kv_len=kv_len, batch=batch, heads=heads,
                   q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    pad = np.zeros((batch, heads, nq * block_q, nk * block_kv), bool)
    valid = np.zeros_like(pad)
    pad[:, :, :q_len, :kv_len] = m
    valid[:, :, :q_len, :kv_len] = True
    blk = pad.reshape(batch, heads, nq, block_q, nk, block_kv)
    vb = valid.reshape(batch, heads, nq, block_q, nk, block_kv)
    anyb = blk.any(axis=(3, 5))
    allb = (blk | ~vb).all(axis=(3, 5))
    classes = np.where(anyb, np.where(allb, 2, 1), 0).astype(np.int8)
    if collapse:
        if (classes == classes[:1]).all():
            classes = classes[:1]
        if (classes == classes[:, :1]).all():
            classes = classes[:, :1]
    kc, ki, kf = _compact(classes, nk)
    qc, qi, qf = _compact(np.swapaxes(classes, 2, 3), nq)
    return BlockPlan(block_q, block_kv, q_len, kv_len, classes, kc, ki, kf, qc, qi, qf)


def reference(q, k, v, mod, *, scale=None, q_offset=0, kv_offset=0, tensors=None):
    """Dense jnp reference in float32 (HIGHEST precision): (out [B,T,N,H], lse [B,N,T])."""
    mod = compile_mod("true" if mod is None else mod)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    kf = jnp.repeat(kf, G, axis=2)
    vf = jnp.repeat(vf, G, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
    qo = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    ko = jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (B,))
    bi = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    hi = jnp.arange(N, dtype=jnp.int32)[None, :, None, None]
    qi = (qo[:, None] + jnp.arange(T, dtype=jnp.int32))[:, None, :, None]
    ki = (ko[:, None] + jnp.arange(S, dtype=jnp.int32))[:, None, None, :]
    logits = mod.score_mod(**(tensors or {}))(s, bi, hi, qi, ki)
    logits = jnp.broadcast_to(logits, s.shape)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    mx = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))
    e = jnp.exp(logits - mx)
    l = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(l == 0, 1.0, l)
    out = jnp.einsum("bnts,bsnh->btnh", p, vf, precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(l[..., 0] == 0, -jnp.inf, mx[..., 0] + jnp.log(jnp.where(l[..., 0] == 0, 1.0, l[..., 0])))
    return out, lse


ON_GPU = jax.default_backend() == "gpu"
SMALL = pa.PallasBlockSizes(block_q=16, block_kv=16, num_warps=4, num_stages=2, block_q_dq=16, block_kv_dq=16,
                            block_q_dkv=16, block_kv_dkv=16, num_warps_bwd=4, num_stages_bwd=2)
INTERPRET = None if ON_GPU else True


def _inputs(key, B, T, S, N, K, H, dtype):
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, T, N, H), jnp.float32)
    return q, k, v, do


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert not np.isnan(a).any(), "NaN in kernel result"
    denom = max(np.linalg.norm(b), 1e-30)
    return np.linalg.norm(a - b) / denom


def _check(mod, *, B=1, T=40, S=40, N=2, K=2, H=16, dtype=jnp.float32, q_offset=0, kv_offset=0,
           tensors=None, seed=0, grads=True, block_sizes=SMALL, plan_builder=None,
           monkeypatch=None):
    if plan_builder is not None:
        monkeypatch.setattr(attention_plan, "build_plan", plan_builder)   # what the kernels' plan_for calls
    q, k, v, do = _inputs(jax.random.PRNGKey(seed), B, T, S, N, K, H, dtype)
    kw = dict(mod=mod, q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    out, lse = pa.pallas_attention(q, k, v, return_lse=True, block_sizes=block_sizes,
                                   interpret=INTERPRET, **kw)
    ref_kw = dict(q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    np_tensors = None if tensors is None else {n: np.asarray(t) for n, t in tensors.items()}
    rout, rlse = attention_reference(np.asarray(q.astype(jnp.float32)), np.asarray(k.astype(jnp.float32)),
                                     np.asarray(v.astype(jnp.float32)), mod, q_offset=np.asarray(q_offset),
                                     kv_offset=np.asarray(kv_offset), tensors=np_tensors)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (B, N, T)
    assert _rel(out, rout) < tol
    finite = np.isfinite(np.asarray(rlse))
    assert (np.isfinite(np.asarray(lse)) == finite).all()
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(rlse)[finite],
                               rtol=tol, atol=tol * 10)
    if not grads:
        return out, lse

    def loss_kernel(q, k, v):
        o, l = pa.pallas_attention(q, k, v, return_lse=True, block_sizes=block_sizes,
                                   interpret=INTERPRET, **kw)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

    def loss_ref(q, k, v):
        o, l = reference(q, k, v, mod, **ref_kw)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

    got = jax.grad(loss_kernel, (0, 1, 2))(q, k, v)
    want = jax.grad(loss_ref, (0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        assert _rel(g, w) < (1e-4 if dtype == jnp.float32 else 3e-2), name
    return out, lse


def test_causal_ragged_f32_and_block_skipping(monkeypatch):
    # T = S = 50 with 16-wide blocks: a ragged last block on both axes.
    _check("causal", T=50, S=50, N=2, K=1, H=16, monkeypatch=monkeypatch)
    # Block skipping is real: the kernel visits exactly the plan's tiles, and evaluates
    # the mask only on PARTIAL ones (and the ragged last kv-block).
    q, k, v, _ = _inputs(jax.random.PRNGKey(1), 1, 64, 64, 1, 1, 16, jnp.float32)
    _, _, counts = pa.pallas_attention(q, k, v, mod="causal", block_sizes=SMALL, interpret=True,
                                       _debug_counts=True)
    counts = np.asarray(counts)[0, 0]        # [nq, 2]: visited, mask-evaluated
    np.testing.assert_array_equal(counts[:, 0], [1, 2, 3, 4])   # 10 of 16 tiles
    np.testing.assert_array_equal(counts[:, 1], [1, 1, 1, 1])   # only the diagonal


def test_dense_cross_gqa_bf16(monkeypatch):
    # mod=None: plain attention; T != S, both ragged; GQA 4 query heads on 2 kv heads.
    _check(None, B=2, T=40, S=72, N=4, K=2, H=32, dtype=jnp.bfloat16, monkeypatch=monkeypatch)


def test_alibi_per_batch_offsets(monkeypatch):
    # h-dependent bias, per-batch q offsets and a kv offset (decode-style alignment).
    # one-loop kernels (per-tile FULL/PARTIAL branch) forward and backward, ragged T and S
    one_loop = dataclasses.replace(SMALL, fwd_one_loop=True, bwd_one_loop=True)
    _check("causal + alibi(4)", B=2, T=24, S=40, N=2, K=2, q_offset=jnp.array([16, 10]),
           kv_offset=0, block_sizes=one_loop, monkeypatch=monkeypatch)


def test_doc_ids_tensor(monkeypatch):
    rng = np.random.default_rng(0)
    ids = np.sort(rng.integers(0, 4, size=(2, 48)), axis=1).astype(np.int32)
    _check("causal & doc(ids)", B=2, T=48, S=48, N=2, K=1, tensors={"ids": jnp.asarray(ids)},
           monkeypatch=monkeypatch)
    # the one-loop forward variant (per-tile FULL/PARTIAL branch) on a ragged length
    one_loop = dataclasses.replace(SMALL, fwd_one_loop=True)
    _check("causal & doc(ids)", B=2, T=40, S=40, N=2, K=1, tensors={"ids": jnp.asarray(ids[:, :40])},
           block_sizes=one_loop, grads=False, monkeypatch=monkeypatch)


def test_fully_masked_rows_transform_per_head_plan(monkeypatch):
    # Rows q < 20 see no key (kv >= 20 & causal): output 0, lse -inf, finite zero grads.
    # softcap exercises dT/dscore; the head-dependent window gives per-head plans
    # (plans built without collapsing b/h, so per-(b, h) plan rows are exercised).
    mod = "softcap(5) & causal & kv >= 20 & window(h * 8 + 8)"
    builder = lambda *a, **kw: dense_plan(*a, collapse=False, **kw)  # noqa: E731
    one_loop = dataclasses.replace(SMALL, fwd_one_loop=True, bwd_one_loop=True)
    out, lse = _check(mod, B=2, T=40, S=40, N=2, K=2, H=24, plan_builder=builder,
                      block_sizes=one_loop, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(np.asarray(out)[:, :20], 0.0)
    assert np.isneginf(np.asarray(lse)[:, :, :20]).all()


def test_dense_bias_tensor_jit(monkeypatch):
    # A tensor read that depends on both q and kv, under jit.
    t = jax.random.normal(jax.random.PRNGKey(5), (36, 36), jnp.float32)
    _check("causal + bias(t)", T=36, S=36, N=2, K=1, tensors={"t": t}, grads=False,
           monkeypatch=monkeypatch)
    q, k, v, _ = _inputs(jax.random.PRNGKey(2), 1, 36, 36, 2, 1, 16, jnp.float32)
    f = jax.jit(lambda q, k, v: pa.pallas_attention(q, k, v, mod="causal", block_sizes=SMALL,
                                                    interpret=True))
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(reference(q, k, v, "causal")[0]),
                               atol=1e-5)


def test_unsupported_raises():
    q = jnp.zeros((1, 16, 2, 16))
    t = jnp.zeros((2, 9))
    with pytest.raises(NotImplementedError, match="computed positions"):
        pa.pallas_attention(q, q, q, mod="causal + relpos(t, 4)", tensors={"t": t}, interpret=True)
    big = jnp.zeros((1, 16, 1, 512))
    with pytest.raises(NotImplementedError, match="head dim"):
        pa.pallas_attention(big, big, big, mod="causal", interpret=True)


def test_block_sizes_defaults():
    bs = pa.PallasBlockSizes.get_default(128, jnp.bfloat16)
    assert bs.block_q >= 16 and bs.block_kv >= 16 and bs.num_warps in (4, 8)
    assert pa.PallasBlockSizes.get_default(64, jnp.float32).block_kv <= bs.block_kv
    with pytest.raises(Exception):
        bs.block_q = 3  # frozen


# ---- GPU (device machine only) ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("mod", ["causal", "causal & window(256)", "causal & doc(ids)", None])
def test_gpu_bf16_realistic(mod, monkeypatch):
    B, T, N, H = 1, 1024, 4, 128
    rng = np.random.default_rng(0)
    tensors = None
    if mod is not None and "doc" in mod:
        ids = np.sort(rng.integers(0, 5, size=(B, T)), axis=1).astype(np.int32)
        tensors = {"ids": jnp.asarray(ids)}
    _check(mod, B=B, T=T, S=T, N=N, K=N // 2, H=H, dtype=jnp.bfloat16, tensors=tensors,
           block_sizes=None, monkeypatch=monkeypatch)
