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
from hypothesis import assume, given, settings, strategies as st

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from evaluator import attention_reference  # noqa: E402  (independent float64 oracle)
from read_gradient_check import assert_read_gradients_match_xla  # noqa: E402
from strategies import gather_sources, shapes, sources  # noqa: E402

import scoremod  # noqa: E402
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
    t = jnp.zeros((8,))
    with pytest.raises(NotImplementedError, match="indexes by score"):
        pa.pallas_attention(q, q, q, mod="t[clip(floor(score), 0, 7)] + score", tensors={"t": t}, interpret=True)
    big = jnp.zeros((1, 16, 1, 512))
    with pytest.raises(NotImplementedError, match="head dim"):
        pa.pallas_attention(big, big, big, mod="causal", interpret=True)


# ---- tables read at computed indices (gathered per tile) ---------------------------------------

def test_relpos_gqa_offsets_one_loop(monkeypatch):
    # relpos gathers t[h, clip(q - kv, -4, 4) + 4] per tile; GQA, per-batch offsets,
    # ragged T and S, the one-loop kernels (the gather inside the per-tile branch).
    t = jax.random.normal(jax.random.PRNGKey(7), (2, 9), jnp.float32)
    one_loop = dataclasses.replace(SMALL, fwd_one_loop=True, bwd_one_loop=True)
    _check("causal + relpos(t, 4)", B=2, T=20, S=36, N=2, K=1, q_offset=jnp.array([16, 9]),
           kv_offset=jnp.array([0, 2]), tensors={"t": t}, block_sizes=one_loop, monkeypatch=monkeypatch)


def test_gather_out_of_range_bool_table_mask_and_fully_masked_rows(monkeypatch):
    # t[q - kv + 131] runs past the end of t (clipped to its last element, as xla and the
    # evaluator do), u's index runs below 0 (clipped to 0); a bool table gathered in the
    # mask (PARTIAL tiles only); rows q < 20 see no key: output 0, lse -inf, zero grads.
    rng = np.random.default_rng(3)
    tensors = {"t": jnp.asarray(rng.standard_normal(150), jnp.float32),
               "u": jnp.asarray(rng.standard_normal((2, 30)), jnp.float32),
               "m": jnp.asarray(rng.random(7) < 0.6)}
    mod = "(kv >= 20 & causal & m[abs(q - kv) % 7]) + t[q - kv + 131] + 0.5 * u[h, (q - kv) // 2 - 3]"
    out, lse = _check(mod, B=1, T=36, S=36, N=2, K=1, tensors=tensors, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(np.asarray(out)[:, :20], 0.0)
    assert np.isneginf(np.asarray(lse)[:, :, :20]).all()


def test_gather_literal_nested_and_transform(monkeypatch):
    # t[1, b, h, q]: a literal index; s[h, which, q]: an index that is another read (a
    # runtime scalar); a transform whose derivative in score gathers (score * sigmoid(g[...])).
    rng = np.random.default_rng(4)
    B, T, S, N = 2, 20, 18, 2
    tensors = {"t": jnp.asarray(rng.standard_normal((2, B, N, T)), jnp.float32),
               "s": jnp.asarray(rng.standard_normal((N, 2, T)), jnp.float32),
               "which": jnp.int32(1),
               "g": jnp.asarray(rng.standard_normal((N, 3)), jnp.float32)}
    mod = "score * sigmoid(g[h, (q - kv) // 4 % 3]) + t[1, b, h, q] + s[h, which, q] + (kv <= q + 2)"
    _check(mod, B=B, T=T, S=S, N=N, K=1, q_offset=3, tensors=tensors, monkeypatch=monkeypatch)


def test_per_batch_offsets_with_reads_along_q_and_kv():
    # u[q] and w[kv] do not mention b, but with offsets [3, 8] and [0, 5] each batch row
    # reads them at its own positions (they were once laid out from row 0's only).
    rng = np.random.default_rng(2)
    tensors = {"u": jnp.asarray(rng.uniform(0.5, 1.5, 60), jnp.float32),
               "w": jnp.asarray(rng.standard_normal(60), jnp.float32)}
    _check("causal & (score * u[q] + w[kv])", B=2, T=37, S=45, N=2, K=1, q_offset=np.array([3, 8], np.int32),
           kv_offset=np.array([0, 5], np.int32), tensors=tensors)


@pytest.mark.skipif(pa.pltriton is None, reason="this jax has no Pallas Triton")
def test_gather_reads_lower_through_triton():
    # The Triton lowering (no GPU needed to lower) takes the integer-array loads of the
    # gathers: forward (one loop) and both backward kernels; a scalar index (u[h + 1]) too;
    # and the scatter of a gathered table's gradient in the dQ kernel.
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    tensors = {"t": jnp.zeros((2, 9)), "m": jnp.zeros((7,), bool), "u": jnp.ones(3)}
    bs = dataclasses.replace(SMALL, block_q=64, block_kv=64, block_q_dq=32, block_kv_dq=32, block_q_dkv=32,
                             block_kv_dkv=32, fwd_one_loop=True)
    mod = "(causal & m[abs(q - kv) % 7]) + relpos(t, 4) + u[h + 1]"

    def loss(q, t):
        out = pa.pallas_attention(q, q, q, mod=mod, tensors={**tensors, "t": t}, block_sizes=bs, interpret=False)
        return out.astype(jnp.float32).sum()
    # t differentiated too: the dQ kernel scatters its gradient to the table (a loop per tile)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(q, tensors["t"]).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3


@pytest.mark.skipif(pa.pltriton is None, reason="this jax has no Pallas Triton")
def test_tensor_gradient_kernels_lower_through_triton():
    # The backward kernels with read gradients of every layout (summed along kv in dQ,
    # along q in dK/dV, written tile by tile into aliased zeros) lower for cuda.
    T = 200
    q = jnp.zeros((1, T, 2, 64), jnp.bfloat16)
    tensors = {"s": jnp.ones(2), "u": jnp.ones(T), "w": jnp.ones(T), "p": jnp.ones((T, T))}
    mod = "causal & (score * u[q] + w[kv] * s[h] + p[q, kv])"
    bs = dataclasses.replace(SMALL, block_q=64, block_kv=64, block_q_dq=32, block_kv_dq=32, block_q_dkv=32,
                             block_kv_dkv=32)

    def loss(q, ts):
        out = pa.pallas_attention(q, q, q, mod=mod, tensors=ts, block_sizes=bs, interpret=False)
        return out.astype(jnp.float32).sum()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(q, tensors).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("triton") >= 3


@settings(max_examples=3)
@given(src=sources(max_depth=2), shape=shapes(max_seq=24), seed=st.integers(0, 2**16))
def test_generated_sources_match_reference(src, shape, seed):
    # Generated mods with plain tensor reads, GQA, int and per-batch offsets: out and lse
    # against the float64 oracle, dq/dk/dv against the dense reference's autodiff.
    tensors = src.make_tensors(shape, np.random.default_rng(seed))
    program = pa.TileProgram.build(compile_mod(src.text).canonical, {n: np.ndim(t) for n, t in tensors.items()})
    assume(program.kernel_support(gathers=True)[0])
    _check(src.text, B=shape.B, T=shape.T, S=shape.S, N=shape.N, K=shape.K, q_offset=shape.q_offset,
           kv_offset=shape.kv_offset, tensors={n: jnp.asarray(t) for n, t in tensors.items()}, seed=seed)


@settings(max_examples=3)
@given(src=gather_sources(), shape=shapes(max_seq=24), seed=st.integers(0, 2**16), shrink=st.booleans())
def test_generated_gather_reads_match_reference(src, shape, seed, shrink):
    rng = np.random.default_rng(seed)
    tensors = src.make_tensors(shape, rng)
    if shrink:   # half of each table's last axis: indices run past the end (clipped)
        tensors = {n: t if t.ndim == 0 else t[..., : max(1, t.shape[-1] // 2)] for n, t in tensors.items()}
    _check(src.text, B=shape.B, T=shape.T, S=shape.S, N=shape.N, K=shape.K, q_offset=shape.q_offset,
           kv_offset=shape.kv_offset, tensors={n: jnp.asarray(t) for n, t in tensors.items()}, seed=seed)


def test_block_sizes_defaults():
    bs = pa.PallasBlockSizes.get_default(128, jnp.bfloat16)
    assert bs.block_q >= 16 and bs.block_kv >= 16 and bs.num_warps in (4, 8)
    assert pa.PallasBlockSizes.get_default(64, jnp.float32).block_kv <= bs.block_kv
    with pytest.raises(Exception):
        bs.block_q = 3  # frozen


# ---- GPU (device machine only) ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("mod", ["causal", "causal & window(256)", "causal & doc(ids)", None,
                                 "causal + relpos(rp, 64)",
                                 "(causal & window(256) & m[abs(q - kv) % 7]) + t[h, q - kv + 1000]"])
def test_gpu_bf16_realistic(mod, monkeypatch):
    B, T, N, H = 1, 1024, 4, 128
    rng = np.random.default_rng(0)
    tensors = None
    if mod is not None and "doc" in mod:
        ids = np.sort(rng.integers(0, 5, size=(B, T)), axis=1).astype(np.int32)
        tensors = {"ids": jnp.asarray(ids)}
    if mod is not None and "relpos" in mod:   # gathered per tile
        tensors = {"rp": jnp.asarray(rng.standard_normal((N, 129)), jnp.float32)}
    if mod is not None and "t[" in mod:       # indices past both ends of t (clipped)
        tensors = {"m": jnp.asarray(rng.random(7) < 0.7), "t": jnp.asarray(rng.standard_normal((N, 1500)), jnp.float32)}
    _check(mod, B=B, T=T, S=T, N=N, K=N // 2, H=H, dtype=jnp.bfloat16, tensors=tensors,
           block_sizes=None, monkeypatch=monkeypatch)


def _layout_tables(rng, N):
    return {"s": jnp.asarray(rng.uniform(0.5, 1.5, N), jnp.float32),
            "u": jnp.asarray(rng.uniform(0.5, 1.5, 900), jnp.float32),
            "w": jnp.asarray(rng.standard_normal(900), jnp.float32),
            "p": jnp.asarray(rng.standard_normal((900, 900)), jnp.float32)}


def _gathered_tables(rng, N):
    return {"t": jnp.asarray(rng.standard_normal((N, 129)), jnp.float32),
            "u": jnp.asarray(rng.standard_normal(16), jnp.float32)}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("mod, make_tables", [
    # every plain layout: summed in dQ (s[h], u[q]), in dK/dV (w[kv]), tile by tile (p[q, kv])
    ("causal & window(300) & (score * u[q] + w[kv] - s[h] * abs(q - kv) / 64 + p[q, kv])", _layout_tables),
    # tables read at computed indices (relpos per head, T5-style buckets shared by heads),
    # scattered in the dQ kernel
    ("causal & window(300) + relpos(t, 64) "
     "+ u[where(q - kv < 8, q - kv, min(15, 8 + floor(log((q - kv) / 8) / log(32) * 8)))]", _gathered_tables),
], ids=["plain layouts", "gathered tables"])
def test_gpu_tensor_gradients(mod, make_tables):
    # Read gradients on the Triton kernels (bf16, default blocks, ragged T, GQA, per-batch
    # offsets) against xla's f32 gradients; repeated runs are bitwise equal.
    B, T, N, K, H = 2, 700, 4, 2, 128
    ts = make_tables(np.random.default_rng(1), N)
    q, k, v, do = _inputs(jax.random.PRNGKey(2), B, T, T, N, K, H, jnp.bfloat16)
    off = dict(q_offset=jnp.asarray([0, 150], jnp.int32), kv_offset=jnp.asarray([0, 150], jnp.int32))
    assert_read_gradients_match_xla("pallas", mod, ts, q, k, v, do, off)
