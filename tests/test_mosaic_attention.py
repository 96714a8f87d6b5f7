"""The Mosaic GPU forward (runtime/mosaic_attention.py).

On the CPU (CI): what mosaic declines and why, config validation, and that the kernel
*lowers* for Mosaic GPU (the Python lowering to Mosaic's MLIR runs on any machine: this
catches a mod whose TileProgram the kernel cannot express before it reaches a GPU).
On a GPU (``-m gpu``, run on the H200): out and lse against the independent float64
evaluator on generated sources and shapes, and K/V blocks the plan skips filled with NaN.
The Mosaic GPU interpreter cannot run the kernel on the CPU (it has no rule for the
``run_state`` the wgmma accumulator needs), so numbers are only checked on the GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
from evaluator import attention_reference  # noqa: E402  (independent float64 oracle)
from read_gradient_check import assert_read_gradients_match_xla  # noqa: E402
from strategies import shapes, sources, tensors_for  # noqa: E402

import scoremod  # noqa: E402
from scoremod.compiler.plan import build_plan  # noqa: E402
from scoremod.errors import ScoreModShapeError  # noqa: E402
from scoremod.runtime import _mosaic_forward, mosaic_attention as ma  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"
HAS_MOSAIC = _mosaic_forward.plgpu is not None
needs_mosaic = pytest.mark.skipif(not HAS_MOSAIC, reason=f"no Pallas Mosaic GPU: {_mosaic_forward.IMPORT_ERROR}")


def _qkv(B, T, S, N, K, H, dtype=jnp.bfloat16, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (B, T, N, H), jnp.float32).astype(dtype),
            jax.random.normal(k2, (B, S, K, H), jnp.float32).astype(dtype),
            jax.random.normal(k3, (B, S, K, H), jnp.float32).astype(dtype))


@pytest.fixture
def pretend_hopper(monkeypatch):
    """Let check_supported and the wrapper run as if on an sm_90 GPU (lowering only)."""
    monkeypatch.setattr(ma, "_device_reason", lambda: None)


# ---- CPU: declines and configuration -----------------------------------------------------

@pytest.mark.skipif(ON_GPU, reason="checks the CPU decline")
def test_forced_mosaic_on_cpu_says_why():
    q, k, v = _qkv(1, 8, 8, 2, 2, 64)
    with pytest.raises(NotImplementedError, match="mosaic") as info:
        scoremod.attention(q, k, v, mod="causal", implementation="mosaic")
    assert "sm_90" in str(info.value) or "Mosaic GPU" in str(info.value)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU fallback")
def test_mosaic_then_xla_falls_through_on_cpu():
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, jnp.float32)
    out = scoremod.attention(q, k, v, mod="causal", implementation=("mosaic", "xla"))
    ref = scoremod.attention(q, k, v, mod="causal", implementation="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_padding_covers_forward_and_backward_blocks():
    """q, k/v and reads are padded to whole blocks of every kernel that reads them: with
    block_kv=64 and S=320 the backward walks 128-key blocks, so S pads to 384, not 320."""
    for bs in (ma.MosaicBlockSizes(64, 64, 2), ma.MosaicBlockSizes(64, 128, 2), ma.MosaicBlockSizes(64, 192, 2),
               ma.MosaicBlockSizes(64, 256, 2)):
        for T, S in ((1, 1), (300, 320), (128, 128), (129, 257), (1000, 700)):
            Tp, Sp = ma.padded_lengths(T, S, bs)
            assert Tp >= T and Sp >= S
            assert Tp % (2 * bs.block_q) == 0 and Tp % (2 * ma.BACKWARD_BLOCK) == 0
            assert Sp % bs.block_kv == 0 and Sp % (2 * ma.BACKWARD_BLOCK) == 0
            assert Sp - S < math.lcm(bs.block_kv, 2 * ma.BACKWARD_BLOCK)
    assert ma.padded_lengths(300, 320, ma.MosaicBlockSizes(64, 64, 2)) == (384, 384)


def test_block_sizes_validation():
    assert ma.MosaicBlockSizes.get_default(128) == ma.MosaicBlockSizes(64, 128, 2)
    assert ma.MosaicBlockSizes.get_default(64).block_kv == 256
    for bad in (dict(block_q=128), dict(block_kv=96), dict(block_kv=0), dict(num_stages=1), dict(lookahead=1),
                dict(persistent="False"), dict(backward_persistent=None)):
        with pytest.raises(ScoreModShapeError):
            ma.MosaicBlockSizes(**bad)
    with pytest.raises(Exception):
        ma.MosaicBlockSizes().block_kv = 64   # frozen
    # What the H200 run reported: 128 x 3 at head dim 128 is 232568 bytes, over the limit.
    assert ma.MosaicBlockSizes(64, 128, 3).smem_bytes(128) > ma.SMEM_LIMIT
    assert ma.MosaicBlockSizes(64, 128, 2).smem_bytes(128) <= ma.SMEM_LIMIT


@needs_mosaic
@pytest.mark.parametrize("case, match", [
    (dict(H=256), "head dims"),
    (dict(H=32), "head dims"),
    (dict(dtype=jnp.float32), r"bfloat16, float16 \(one dtype"),
    (dict(mod="causal + relpos(t, 4)", tensors={"t": np.zeros((9,), np.float32)}), "computed positions"),
    (dict(mod="score ** 2 & causal"), "no lowering"),
    (dict(mod="floor(score) & causal"), "no lowering"),
    (dict(H=128, block_sizes=ma.MosaicBlockSizes(64, 256, 2)), "shared memory"),
])
def test_check_supported_declines(pretend_hopper, case, match):
    H = case.get("H", 64)
    q, k, v = _qkv(1, 16, 16, 2, 2, H, case.get("dtype", jnp.bfloat16))
    with pytest.raises(NotImplementedError, match=match):
        ma.check_supported(case.get("mod", "causal"), q, k, v, case.get("tensors"), case.get("block_sizes"))


@needs_mosaic
def test_check_supported_accepts_integer_arithmetic(pretend_hopper):
    q, k, v = _qkv(1, 16, 16, 2, 2, 128)
    ma.check_supported("(q // 64) == (kv // 64) | kv % 100 == 0", q, k, v)
    ma.check_supported("softcap(30) & causal + alibi(2)", q, k, v)


# ---- CPU: the tile schedule -------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), nq=st.integers(1, 9), ctas=st.integers(1, 40),
       plan_b=st.booleans(), plan_h=st.booleans(), traced=st.booleans(), seed=st.integers(0, 2**16))
def test_tile_schedule_runs_every_tile_once_heaviest_first(batch, heads, nq, ctas, plan_b, plan_h, traced, seed):
    """The persistent forward's schedule: every tile on exactly one CUDA block, tiles sorted
    by their plan row's listed blocks (descending), each block's tiles in that order, and
    (snake dealing) no block's total work more than one heaviest tile above any other's."""
    rng = np.random.default_rng(seed)
    shape = (batch if plan_b else 1, heads if plan_h else 1, nq)
    full = rng.integers(0, 5, shape).astype(np.int32)
    part = rng.integers(0, 3, shape).astype(np.int32)
    order = _mosaic_forward.tile_order(
        _mosaic_forward.row_step_counts(jnp.asarray(full) if traced else full, part, batch, heads))
    order = np.asarray(order)
    n_tiles = batch * heads * nq
    ctas = min(ctas, n_tiles)
    steps = np.broadcast_to(full + part, (batch, heads, nq)).reshape(-1)
    assert sorted(order.tolist()) == list(range(n_tiles))
    assert (np.diff(steps[order]) <= 0).all()
    seen, work = [], []
    for cta in range(ctas):
        count = int(_mosaic_forward.local_tile_count(n_tiles, ctas, jnp.int32(cta)))
        mine = [int(_mosaic_forward.scheduled_tile(order, ctas, jnp.int32(cta), jnp.int32(j))) for j in range(count)]
        for t in mine:
            b, h, i = (int(x) for x in _mosaic_forward.split_tile(jnp.int32(t), heads, nq))
            assert t == (b * heads + h) * nq + i
        assert (np.diff(steps[mine]) <= 0).all() if mine else True
        seen += mine
        work.append(int(steps[mine].sum()))
    assert sorted(seen) == list(range(n_tiles))
    assert max(work) - min(work) <= steps.max()


def test_dkv_tiles_weigh_every_query_head_of_their_group():
    from scoremod.runtime._mosaic_backward import dkv_step_counts
    full = np.arange(2 * 4 * 3, dtype=np.int32).reshape(2, 4, 3)
    part = np.ones((2, 4, 3), np.int32)
    steps = dkv_step_counts(full, part, 2, 4, 2)
    assert steps.shape == (2, 2, 3)
    assert steps[1, 0, 2] == (full[1, 0, 2] + 1) + (full[1, 1, 2] + 1)
    shared = dkv_step_counts(full[:1, :1], part[:1, :1], 2, 4, 1)   # one plan for every (b, h)
    assert (np.asarray(shared) == 4 * (full[0, 0] + 1)).all()
    assert (np.asarray(dkv_step_counts(jnp.asarray(full), part, 2, 4, 2)) == steps).all()


# ---- CPU: the kernel lowers to Mosaic GPU for generated mods ---------------------------------

def _lower(mod, q, k, v, tensors, q_offset=0, kv_offset=0, block_sizes=None):
    fn = lambda q, k, v: ma.mosaic_attention(q, k, v, mod=mod, tensors=tensors, q_offset=q_offset,
                                             kv_offset=kv_offset, return_lse=True, block_sizes=block_sizes)
    return jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("cuda",))


@needs_mosaic
@pytest.mark.parametrize("mod, tensors", [
    (None, {}),
    ("causal & window(100)", {}),
    ("causal & doc(ids)", {"ids": np.zeros((2, 200), np.int32)}),
    ("causal + bias(t)", {"t": np.zeros((2, 2, 200, 260), np.float32)}),
    ("causal | prefix(n)", {"n": np.array([3, 50], np.int32)}),
    ("softcap(20) & causal & window(64) + alibi(2)", {}),
    # jax 0.11's warpgroup lowering has no vector logical_not and no scalar-condition select:
    ("q != kv & causal", {}),
    ("~(ids[b, q] == ids[b, kv])", {"ids": np.zeros((2, 260), np.int32)}),
    ("where(h == 0, q >= kv, q > kv)", {}),
    ("causal + where(h == 0, 1.0, alibi(2))", {}),
])
def test_kernel_lowers(pretend_hopper, mod, tensors):
    q, k, v = _qkv(2, 200, 260, 2, 1, 128)
    _lower(mod, q, k, v, tensors, q_offset=jnp.array([0, 60], jnp.int32), kv_offset=0)
    # The consumers loading each step's block index and key reads a step ahead.
    _lower(mod, q, k, v, tensors, q_offset=jnp.array([0, 60], jnp.int32), kv_offset=0,
           block_sizes=dataclasses.replace(ma.MosaicBlockSizes.get_default(128), lookahead=True))


@needs_mosaic
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=sources(), shape=shapes(max_seq=150, min_seq=1), seed=st.integers(0, 2**16))
def test_generated_mods_lower_or_decline(src, shape, seed):
    import scoremod.runtime.mosaic_attention as mod_ma
    saved = mod_ma._device_reason
    mod_ma._device_reason = lambda: None
    try:
        rng = np.random.default_rng(seed)
        tensors = tensors_for(src.text, shape.B, shape.N, shape.T, shape.S, rng,
                              q_offset=shape.q_offset, kv_offset=shape.kv_offset)
        q, k, v = _qkv(shape.B, shape.T, shape.S, shape.N, shape.K, 64)
        try:
            ma.check_supported(src.text, q, k, v, tensors)
        except NotImplementedError:
            assume(False)
        _lower(src.text, q, k, v, tensors, shape.q_offset, shape.kv_offset)
    finally:
        mod_ma._device_reason = saved


# ---- GPU: numbers against the evaluator ------------------------------------------------------

def _check_against_evaluator(mod, q, k, v, tensors, q_offset=0, kv_offset=0, tol=2e-2):
    call = dict(mod=mod, q_offset=q_offset, kv_offset=kv_offset, return_lse=True, **tensors)
    out, lse = jax.jit(lambda q, k, v: scoremod.attention(q, k, v, implementation="mosaic", **call))(q, k, v)
    ref, ref_lse = attention_reference(np.asarray(q, np.float32), np.asarray(k, np.float32),
                                       np.asarray(v, np.float32), mod, q_offset=q_offset,
                                       kv_offset=kv_offset, tensors=tensors)
    out = np.asarray(out, np.float64)
    lse = np.asarray(lse, np.float64).transpose(0, 2, 1)   # attention() gives [B, T, N]
    assert not np.isnan(out).any()
    err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-6)
    assert err < tol, err
    finite = np.isfinite(ref_lse)
    assert (np.isfinite(lse) == finite).all()
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-3, rtol=1e-3)
    return out


@pytest.mark.gpu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=sources(), shape=shapes(max_seq=300, min_seq=1), seed=st.integers(0, 2**16),
       head_dim=st.sampled_from([64, 128]), dtype=st.sampled_from([jnp.bfloat16, jnp.float16]))
def test_gpu_generated_against_evaluator(src, shape, seed, head_dim, dtype):
    rng = np.random.default_rng(seed)
    tensors = tensors_for(src.text, shape.B, shape.N, shape.T, shape.S, rng,
                          q_offset=shape.q_offset, kv_offset=shape.kv_offset)
    q, k, v = _qkv(shape.B, shape.T, shape.S, shape.N, shape.K, head_dim, dtype, seed)
    try:
        ma.check_supported(src.text, q, k, v, tensors)
    except NotImplementedError:
        assume(False)
    _check_against_evaluator(src.text, q, k, v, tensors, shape.q_offset, shape.kv_offset,
                             tol=2e-2 if dtype == jnp.bfloat16 else 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("mod", ["causal & window(100)", "causal & doc(ids)", "kv >= 500 | kv < 64"])
def test_gpu_skipped_blocks_are_never_read(mod):
    """One q-block of 128 rows over 768 keys: every kv-block its plan row leaves out is
    filled with NaN; the output must stay finite and correct."""
    B, T, S, N, H = 1, 128, 768, 2, 128
    q_offset = 640
    tensors = {"ids": np.repeat(np.arange(6, dtype=np.int32), 128)[None]} if "ids" in mod else {}
    q, k, v = _qkv(B, T, S, N, N, H)
    bs = ma.MosaicBlockSizes.get_default(H)
    plan = build_plan(scoremod.compile(mod), q_len=T, kv_len=S, block_q=2 * bs.block_q, block_kv=bs.block_kv,
                      batch=B, heads=N, q_offset=q_offset, tensors={n: jnp.asarray(t) for n, t in tensors.items()})
    listed = (np.asarray(plan.classes)[0, 0, 0] != 0)
    assert not listed.all(), "the case must skip some blocks"
    skipped = ~np.repeat(listed, bs.block_kv)[:S]
    poison = jnp.asarray(skipped)[None, :, None, None]
    k = jnp.where(poison, jnp.nan, k).astype(k.dtype)
    v = jnp.where(poison, jnp.nan, v).astype(v.dtype)
    ref_k = jnp.where(poison, 0, k).astype(k.dtype)
    ref_v = jnp.where(poison, 0, v).astype(v.dtype)
    call = dict(mod=mod, q_offset=q_offset, **tensors)
    out = scoremod.attention(q, k, v, implementation="mosaic", **call)
    ref = scoremod.attention(q.astype(jnp.float32), ref_k.astype(jnp.float32), ref_v.astype(jnp.float32),
                             implementation="reference", **call)
    assert not np.isnan(np.asarray(out, np.float32)).any()
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mod, tensors", [
    ("causal & doc(ids)", {"ids": np.repeat(np.arange(9, dtype=np.int32), 64)[None, :520].repeat(2, 0)}),
    ("causal & window(100) + alibi(2)", {}),
    ("kv >= 300 & w[kv] > 0", {"w": np.sign(np.arange(520) % 7 - 3).astype(np.float32)}),
])
def test_gpu_lookahead_gives_the_same_numbers(mod, tensors):
    """The consumers loading each step's block index and key reads a step ahead
    (MosaicBlockSizes.lookahead) change when the loads happen, not what they load: out and
    lse bitwise equal to the plain kernel's (ragged sizes, per-batch offsets, masked rows)."""
    q, k, v = _qkv(2, 300, 520, 4, 2, 128)
    bs = ma.MosaicBlockSizes.get_default(128)
    call = dict(mod=mod, tensors=tensors, q_offset=jnp.array([220, 0], jnp.int32), return_lse=True)
    out, lse = ma.mosaic_attention(q, k, v, block_sizes=bs, **call)
    out2, lse2 = ma.mosaic_attention(q, k, v, block_sizes=dataclasses.replace(bs, lookahead=True), **call)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(lse2), np.asarray(lse))


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["mosaic", "pallas"])
def test_gpu_fully_masked_rows_and_grad(backward):
    q, k, v = _qkv(1, 256, 256, 2, 2, 128)
    out, lse = scoremod.attention(q, k, v, mod="kv >= 200 & causal", implementation="mosaic", return_lse=True)
    assert (np.asarray(out[:, :200], np.float32) == 0).all()
    assert np.isneginf(np.asarray(lse[:, :200])).all()

    def loss(q, k, v, impl):
        if impl == "mosaic":
            out = ma.mosaic_attention(q, k, v, mod="causal & window(64)",
                                      block_sizes=ma.MosaicBlockSizes(backward=backward))
        else:
            out = scoremod.attention(q, k, v, mod="causal & window(64)", implementation=impl)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "mosaic")
    g_ref = jax.grad(loss, argnums=(0, 1, 2))(q.astype(jnp.float32), k.astype(jnp.float32),
                                              v.astype(jnp.float32), "reference")
    for a, b in zip(g, g_ref):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 3e-2


@pytest.mark.gpu
def test_gpu_default_dispatch_picks_mosaic(caplog):
    import logging
    q, k, v = _qkv(1, 256, 256, 2, 2, 128)
    with caplog.at_level(logging.INFO, logger="scoremod"):
        scoremod.attention(q, k, v, mod="causal")
    assert "using mosaic" in caplog.text


@needs_mosaic
def test_a_missing_tensor_is_a_clear_error_not_a_decline(pretend_hopper):
    # mosaic_attention and pallas_attention are public: called directly without the tensor
    # the mod reads, they said KeyError.
    from scoremod.runtime.pallas_attention import pallas_attention
    q, k, v = _qkv(1, 16, 16, 2, 2, 64)
    with pytest.raises(scoremod.ScoreModTensorError, match="missing tensor parameter 'ids'"):
        ma.mosaic_attention(q, k, v, mod="causal & doc(ids)")
    with pytest.raises(scoremod.ScoreModTensorError, match="missing tensor parameter 'ids'"):
        pallas_attention(q, k, v, mod="causal & doc(ids)")


# ---- the Mosaic backward (MosaicBlockSizes(backward="mosaic"), the default) ----------------

def test_backward_choice_is_validated():
    with pytest.raises(scoremod.ScoreModShapeError, match="backward='cudnn' must be"):
        ma.MosaicBlockSizes(backward="cudnn")
    with pytest.raises(scoremod.ScoreModShapeError, match="backward_stages=1 must be at least 2"):
        ma.MosaicBlockSizes(backward_stages=1)
    # dK/dV holds K, V, dK, dV (2 x 64 rows each) and streams `stages` Q/dO tiles
    assert ma.MosaicBlockSizes().backward_smem_bytes(128) <= ma.SMEM_LIMIT
    assert ma.MosaicBlockSizes(backward_stages=4).backward_smem_bytes(64) <= ma.SMEM_LIMIT
    assert ma.MosaicBlockSizes(backward_stages=3).backward_smem_bytes(128) > ma.SMEM_LIMIT
    assert ma.MosaicBlockSizes(backward_stages=3).backward_smem_bytes(128) > \
        ma.MosaicBlockSizes(backward_stages=2).backward_smem_bytes(128) + 2 * 64 * 128 * 2


def _lower_grad(mod, q, k, v, tensors, block_sizes, q_offset=0, kv_offset=0):
    def loss(q, k, v):
        out = ma.mosaic_attention(q, k, v, mod=mod, tensors=tensors, q_offset=q_offset, kv_offset=kv_offset,
                                  block_sizes=block_sizes)
        return out.astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",))


@needs_mosaic
@pytest.mark.parametrize("mod, tensors, shape", [
    ("causal", {}, (2, 200, 260, 2, 1, 128)),
    (None, {}, (1, 128, 128, 2, 2, 64)),
    ("causal & window(100) & doc(ids)", {"ids": np.zeros((2, 300), np.int32)}, (2, 300, 300, 4, 2, 128)),
    ("softcap(20) & causal + alibi(2)", {}, (1, 256, 256, 2, 2, 128)),
    ("causal | prefix(n)", {"n": np.array([3], np.int32)}, (1, 130, 190, 2, 2, 128)),
])
def test_mosaic_backward_lowers(pretend_hopper, monkeypatch, mod, tensors, shape):
    import scoremod.runtime._mosaic_backward as mb
    used = []
    monkeypatch.setattr(mb, "backward_dkv", lambda *a, _f=mb.backward_dkv, **kw: (used.append(1), _f(*a, **kw))[1])
    q, k, v = _qkv(*shape)
    _lower_grad(mod, q, k, v, tensors, ma.MosaicBlockSizes(backward="mosaic"), q_offset=3)
    assert used, "the Mosaic backward was not used"
    if mod == "causal":   # deeper rings (where they fit: head dim 64) and one CUDA block per tile lower too
        _lower_grad(mod, *_qkv(2, 200, 260, 2, 1, 64), tensors, ma.MosaicBlockSizes(64, 256, 2, backward_stages=4),
                    q_offset=3)
        _lower_grad(mod, q, k, v, tensors, ma.MosaicBlockSizes(persistent=False), q_offset=3)
        _lower_grad(mod, q, k, v, tensors, ma.MosaicBlockSizes(backward_persistent=True), q_offset=3)


@needs_mosaic
@pytest.mark.parametrize("mod, tensors", [
    ("score + sin(score)", {}),
    ("causal & cos(q - kv) * 0.5 + 2 * sin(score / 2) + score", {}),
    ("causal & m[b, q, kv] & cos(h) * score", {"m": np.ones((2, 200, 260), bool)}),   # a bool tensor as a mask
])
def test_sin_cos_and_bool_masks_lower_or_decline_with_a_reason(pretend_hopper, mod, tensors):
    """Mosaic GPU lowers sin and cos (jax 0.10 and 0.11 have lane rules for both); should a jax
    lack one, mosaic must decline saying which, never fail with a lowering traceback."""
    q, k, v = _qkv(2, 200, 260, 2, 1, 64)
    try:
        ma.check_supported(mod, q, k, v, tensors)
    except NotImplementedError as exc:
        assert "Mosaic GPU has no lowering for" in str(exc) and ("sin" in str(exc) or "cos" in str(exc))
        return
    _lower(mod, q, k, v, tensors, q_offset=jnp.array([0, 60], jnp.int32))
    # The backward evaluates dT/dscore = 1 + cos(score) (or its like) on tiles too.
    _lower_grad(mod, q, k, v, tensors, ma.MosaicBlockSizes(backward="mosaic"), q_offset=3)


@needs_mosaic
def test_mosaic_backward_leaves_reads_along_q_and_kv_to_pallas(pretend_hopper, monkeypatch):
    # The dK/dV kernel reads tiles transposed; a [T, S] table goes to the Pallas backward.
    import scoremod.runtime._mosaic_backward as mb
    from scoremod.compiler.tile import TileProgram
    program = TileProgram.build(scoremod.compile("causal + bias(t)").canonical, {"t": 4})
    assert "varies along q and kv" in mb.backward_reason(program)
    assert mb.backward_reason(TileProgram.build(scoremod.compile("causal & doc(ids)").canonical, {"ids": 2})) is None
    used = []
    monkeypatch.setattr(mb, "backward_dkv", lambda *a: used.append(1))
    q, k, v = _qkv(1, 128, 128, 2, 2, 128)
    _lower_grad("causal + bias(t)", q, k, v, {"t": np.zeros((1, 2, 128, 128), np.float32)},
                ma.MosaicBlockSizes(backward="mosaic"))
    assert not used


@pytest.mark.gpu
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=sources(), shape=shapes(max_seq=300, min_seq=1), head_dim=st.sampled_from([64, 128]),
       seed=st.integers(0, 2**16))
def test_gpu_mosaic_backward_against_reference(src, shape, head_dim, seed):
    rng = np.random.default_rng(seed)
    tensors = tensors_for(src.text, shape.B, shape.N, shape.T, shape.S, rng,
                          q_offset=shape.q_offset, kv_offset=shape.kv_offset)
    q, k, v = _qkv(shape.B, shape.T, shape.S, shape.N, shape.K, head_dim, jnp.bfloat16, seed)
    try:
        ma.check_supported(src.text, q, k, v, tensors)
    except NotImplementedError:
        assume(False)
    bs = ma.MosaicBlockSizes.get_default(head_dim)
    assert bs.backward == "mosaic"
    w = jnp.asarray(rng.standard_normal((shape.B, shape.T, shape.N, head_dim)), jnp.float32)

    def loss(q, k, v, impl):
        call = dict(mod=src.text, q_offset=shape.q_offset, kv_offset=shape.kv_offset, tensors=tensors)
        if impl == "mosaic":
            out = ma.mosaic_attention(q, k, v, block_sizes=bs, **call)
        else:
            out = scoremod.attention(q, k, v, implementation="reference", mod=src.text, q_offset=shape.q_offset,
                                     kv_offset=shape.kv_offset, **tensors)
        return jnp.sum(out.astype(jnp.float32) * w)
    got = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, "mosaic"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda q, k, v: loss(q, k, v, "reference"), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, a, b in zip("qkv", got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.isfinite(a).all(), name
        assert np.linalg.norm(a - b) <= 3e-2 * max(np.linalg.norm(b), 1e-3), name


@pytest.mark.gpu
@pytest.mark.parametrize("mod, q_offset", [("causal & window(100)", 256), ("causal & doc(ids)", 256),
                                           ("kv >= 200 & causal", 0)])
def test_gpu_mosaic_backward_skips_and_masked_rows(mod, q_offset):
    """NaN in every K/V block no plan lists, and rows with no allowed key: finite gradients
    equal to the reference's."""
    B, T, S, N, H = 1, 256, 512, 2, 128
    tensors = {"ids": np.repeat(np.arange(4, dtype=np.int32), 128)[None]} if "ids" in mod else {}
    q, k, v = _qkv(B, T, S, N, N, H)
    used = np.zeros(S, bool)
    for blocks in ((128, 64), (64, 128)):
        plan = build_plan(scoremod.compile(mod), q_len=T, kv_len=S, block_q=blocks[0], block_kv=blocks[1],
                          batch=B, heads=N, q_offset=q_offset, tensors={n: jnp.asarray(t) for n, t in tensors.items()})
        listed = (np.asarray(plan.classes)[0] != 0).any(axis=(0, 1))
        used |= np.repeat(listed, blocks[1])[:S]
    poison = jnp.asarray(~used)[None, :, None, None]
    kn, vn = jnp.where(poison, jnp.nan, k).astype(k.dtype), jnp.where(poison, jnp.nan, v).astype(v.dtype)

    def loss(q, k, v, impl):
        if impl == "mosaic":
            out = ma.mosaic_attention(q, k, v, mod=mod, q_offset=q_offset, tensors=tensors,
                                      block_sizes=ma.MosaicBlockSizes(backward="mosaic"))
        else:
            out = scoremod.attention(q, k, v, mod=mod, q_offset=q_offset, implementation="reference", **tensors)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    got = jax.grad(lambda q, k, v: loss(q, k, v, "mosaic"), argnums=(0, 1, 2))(q, kn, vn)
    want = jax.grad(lambda q, k, v: loss(q, k, v, "reference"), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, a, b in zip("qkv", got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.isfinite(a).all(), name
        assert np.linalg.norm(a - b) <= 3e-2 * max(np.linalg.norm(b), 1e-3), name


@needs_mosaic
@pytest.mark.parametrize("backward, pair", [("pallas", False), ("mosaic", True)])
def test_mosaic_gives_float_tensors_gradients_through_the_pallas_backward(pretend_hopper, monkeypatch, backward,
                                                                          pair):
    """Where the Mosaic backward does not run (MosaicBlockSizes(backward="pallas"), or a
    read along both q and kv), the Mosaic forward hands the backward to the Pallas
    kernels (interpret mode here), which give the reads their gradients (a slope per
    head, a per-key bias, a pair bias; GQA, per-batch offsets, rows with no key). The
    Mosaic forward cannot run on a CPU: the reference stands in for it (on the same
    values), so this checks the routing and the cotangents."""
    B, T, N, K, H = 2, 70, 4, 2, 64
    q, k, v = _qkv(B, T, T, N, K, H)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    rng = np.random.default_rng(0)
    ts = {"s": jnp.asarray(rng.uniform(0.5, 1.5, N), jnp.float32), "w": jnp.asarray(rng.standard_normal(90), jnp.float32)}
    mod = "kv <= q - 5 & window(40) & (score - s[h] * abs(q - kv) / 8 + w[kv])"
    if pair:
        ts["p"] = jnp.asarray(rng.standard_normal((80, 80)), jnp.float32)
        mod = "kv <= q - 5 & window(40) & (score - s[h] * abs(q - kv) / 8 + w[kv] + p[q, kv])"
    off = dict(q_offset=jnp.asarray([0, 7], jnp.int32), kv_offset=0)

    def reference(q, k, v, ts):
        return scoremod.attention(f32(q), f32(k), f32(v), mod=mod, implementation="reference", return_lse=True,
                                  **off, **ts)

    def stand_in(cfg, q, k, v, aux):
        out, lse = reference(q, k, v, ts)
        return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))   # the kernels' lse is [B, N, T]
    monkeypatch.setattr(ma, "_run_forward", stand_in)
    bs = dataclasses.replace(ma.MosaicBlockSizes.get_default(H), backward=backward)
    w_out = jax.random.normal(jax.random.key(3), q.shape)

    def loss(impl):
        def f(q, ts):
            if impl == "mosaic":
                out = ma.mosaic_attention(q, k, v, mod=mod, tensors=ts, block_sizes=bs, **off)
            else:
                out = reference(q, k, v, ts)[0]
            return jnp.sum(f32(out) * w_out)
        return f
    got = jax.grad(loss("mosaic"), argnums=(0, 1))(q, ts)
    want = jax.grad(loss("reference"), argnums=(0, 1))(q, ts)
    for n in ts:
        scale = float(jnp.abs(want[1][n]).max())
        assert scale > 1e-3, n
        np.testing.assert_allclose(np.asarray(got[1][n]), np.asarray(want[1][n]), atol=3e-2 * scale, err_msg=n)
    dq, want_dq = np.asarray(f32(got[0])), np.asarray(want[0])
    assert np.linalg.norm(dq - want_dq) <= 3e-2 * np.linalg.norm(want_dq)


@needs_mosaic
def test_mosaic_backward_lowers_read_gradients(pretend_hopper, monkeypatch):
    """Float reads along at most one of q and kv (a slope per head, a gate per (b, h), a
    per-query scale: the dQ kernel; a per-key bias: the dK/dV kernel) get their gradients
    in the Mosaic backward: it lowers with the Pallas backward unused (ragged S, GQA,
    per-batch offsets); a mod with a read along both runs the Pallas backward."""
    q, k, v = _qkv(2, 200, 260, 4, 2, 128)
    ts = {"s": jnp.linspace(0.1, 1.0, 4), "c": jnp.ones((2, 4)), "u": jnp.ones(300), "w": jnp.ones(300)}
    mod = "causal & (score * u[q] * sigmoid(c[b, h]) - s[h] * abs(q - kv) + w[kv])"
    used = []
    monkeypatch.setattr(ma._pallas, "flash_backward", lambda *a, _f=ma._pallas.flash_backward: (used.append(1), _f(*a))[1])

    def loss(ts, wanted):
        live = {n: (t if n in wanted else lax.stop_gradient(t)) for n, t in ts.items()}
        return ma.mosaic_attention(q, k, v, mod=mod, tensors=live, q_offset=jnp.asarray([0, 5])).astype(
            jnp.float32).sum()
    text = jax.jit(jax.grad(lambda ts: loss(ts, "scuw"))).trace(ts).lower(lowering_platforms=("cuda",)).as_text()
    assert not used and "mosaic" in text
    # a [T, S] read (p[q, kv]) beside them: the Mosaic backward does not take the mod at all
    both = "causal & (score * u[q] - s[h] * abs(q - kv) + p[q, kv])"
    ts2 = {"s": ts["s"], "u": ts["u"], "p": jnp.ones((300, 300))}
    jax.jit(jax.grad(lambda ts: ma.mosaic_attention(q, k, v, mod=both, tensors=ts).astype(jnp.float32).sum())).trace(ts2)
    assert used


@needs_mosaic
def test_mosaic_backward_lowers_with_float_tensors_held_constant(pretend_hopper, monkeypatch):
    # Only q differentiated: the Mosaic backward runs.
    import scoremod.runtime._mosaic_backward as mb
    used = []
    monkeypatch.setattr(mb, "backward_dkv", lambda *a, _f=mb.backward_dkv, **kw: (used.append(1), _f(*a, **kw))[1])
    q, k, v = _qkv(1, 128, 128, 2, 2, 128)
    s = jnp.linspace(0.1, 1.0, 2)

    def loss(q, s):
        return ma.mosaic_attention(q, k, v, mod="causal + -s[h] * abs(q - kv)", tensors={"s": s}).astype(
            jnp.float32).sum()
    jax.jit(jax.grad(loss, argnums=0)).trace(q, s).lower(lowering_platforms=("cuda",))
    assert used, "the Mosaic backward was not used"


@pytest.mark.gpu
@pytest.mark.parametrize("mod, sinks", [
    ("causal & m[b, q, kv]", False),                      # a bool tensor read as a mask
    ("score + sin(q - kv) * cos(h)", False),              # sin/cos in values
    ("causal & window(128)", True),                       # sinks with a window (gpt-oss)
    ("causal & (m[b, q, kv] | window(32))", True),
])
def test_gpu_mask_reads_trig_and_sinks(mod, sinks):
    """The language features of issue 17 on the Mosaic kernels: out, lse and dq in bf16
    against the reference in f32 (a ragged size, GQA)."""
    B, T, N, K, H = 2, 300, 4, 2, 128
    q, k, v = _qkv(B, T, T, N, K, H)
    tensors = {"m": jax.random.bernoulli(jax.random.key(3), 0.3, (B, T, T))} if "m[" in mod else {}
    s = jnp.linspace(-1.0, 2.0, N) if sinks else None
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def run(q, k, v, impl):
        return scoremod.attention(q, k, v, mod=mod, implementation=impl, return_lse=True, sinks=s, **tensors)
    assert str(scoremod.dispatch(q, k, v, mod=mod, **tensors).implementation) == "mosaic"
    out, lse = jax.jit(lambda q, k, v: run(q, k, v, "mosaic"))(q, k, v)
    want, want_lse = run(f32(q), f32(k), f32(v), "reference")
    np.testing.assert_allclose(np.asarray(f32(out)), np.asarray(want), atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=3e-2, rtol=1e-2)
    dq = jax.grad(lambda q: jnp.sum(f32(run(q, k, v, "mosaic")[0]) ** 2))(q)
    want_dq = jax.grad(lambda q: jnp.sum(run(q, f32(k), f32(v), "reference")[0] ** 2))(f32(q))
    assert np.linalg.norm(np.asarray(f32(dq)) - np.asarray(want_dq)) <= 3e-2 * np.linalg.norm(np.asarray(want_dq))


@pytest.mark.gpu
def test_gpu_gradient_to_a_float_table(caplog):
    """A differentiated float table: the default dispatch runs the Mosaic forward and the
    Pallas backward (which gives reads their gradients), and the table gets the
    reference's gradient (never zeros)."""
    q, k, v = _qkv(1, 256, 256, 2, 2, 128)
    t = jnp.linspace(0.1, 1.0, 2)
    mod = "causal + -t[h] * abs(q - kv)"   # a per-head slope (ALiBi learned)
    with caplog.at_level(logging.INFO, logger="scoremod"):
        got = jax.jit(jax.grad(lambda t: jnp.sum(scoremod.attention(q, k, v, mod=mod, t=t).astype(jnp.float32) ** 2)))(t)
    assert "using mosaic" in caplog.text
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = jax.grad(lambda t: jnp.sum(scoremod.attention(f32(q), f32(k), f32(v), mod=mod, t=t,
                                                         implementation="reference") ** 2))(t)
    assert np.abs(np.asarray(got)).max() > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-2 * float(jnp.abs(want).max()))


@pytest.mark.gpu
def test_gpu_huge_finite_logits_stay_finite():
    """A -1e30 padding bias (batch row 1: every key padded), a -1e20 bias on every logit,
    scores scaled by 1e10 (logits ~4e11): the Mosaic softmax keeps its exponents at or
    below 0 and takes the row max of the same rounded logits it exponentiates, so out,
    lse and the gradients stay finite, lse agrees with the reference, and out too where
    float32 can tell the keys apart (once lse was -inf on rows with keys)."""
    q, k, v = _qkv(2, 300, 300, 2, 2, 64)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    cases = [("score + where(kv < n[b], 0.0, -1e30)", {"n": jnp.asarray([140, 0], jnp.int32)}, None),
             ("score - 1e20", {}, None), ("causal", {}, 1e10)]
    for mod, tensors, scale in cases:
        def run(q, k, v, impl):
            return scoremod.attention(q, k, v, mod=mod, implementation=impl, return_lse=True, scale=scale, **tensors)
        out, lse = jax.jit(lambda q, k, v: run(q, k, v, "mosaic"))(q, k, v)
        want, want_lse = run(f32(q), f32(k), f32(v), "reference")
        assert np.isfinite(np.asarray(f32(out))).all() and np.isfinite(np.asarray(lse)).all(), mod
        np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-3, err_msg=mod)
        if scale is None:   # at |logits| ~ 4e11 one float32 step decides which key wins
            np.testing.assert_allclose(np.asarray(f32(out)), np.asarray(want), atol=3e-2, rtol=3e-2, err_msg=mod)
        dq = jax.jit(jax.grad(lambda q: jnp.sum(f32(run(q, k, v, "mosaic")[0]) ** 2)))(q)
        assert np.isfinite(np.asarray(f32(dq))).all(), mod


@pytest.mark.gpu
def test_gpu_backward_with_64_key_blocks_and_a_read_along_kv():
    """block_kv=64 with S=320: the backward's 128-key blocks reach keys 320..383, which
    must be padding (they once read past the padded w[kv])."""
    q, k, v = _qkv(1, 200, 320, 4, 2, 128)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(320), jnp.float32)
    mod = "score + w[kv]"
    bs = ma.MosaicBlockSizes(64, 64, 2)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def grads(impl, q, k, v):
        def loss(q, k, v):
            if impl == "mosaic":
                out = ma.mosaic_attention(q, k, v, mod=mod, tensors={"w": w}, block_sizes=bs)
            else:
                out = scoremod.attention(q, k, v, mod=mod, implementation=impl, w=w)
            return jnp.sum(f32(out) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    got, want = grads("mosaic", q, k, v), grads("xla", f32(q), f32(k), f32(v))
    for a, b in zip(got, want):
        a, b = np.asarray(f32(a)), np.asarray(b)
        assert np.isfinite(a).all() and np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b)


@pytest.mark.gpu
def test_gpu_mosaic_read_gradients():
    """Reads along at most one of q and kv get their gradients in the Mosaic backward (dQ:
    s[h], c[b, h], u[q]; dK/dV: w[kv]; bf16, ragged T, GQA, per-batch offsets, rows with no
    key) against xla's f32 gradients; repeated runs are bitwise equal."""
    B, T, N, K, H = 2, 700, 4, 2, 128
    rng = np.random.default_rng(5)
    ts = {"s": jnp.asarray(rng.uniform(0.5, 1.5, N), jnp.float32), "c": jnp.asarray(rng.standard_normal((B, N)), jnp.float32),
          "u": jnp.asarray(rng.uniform(0.5, 1.5, 900), jnp.float32), "w": jnp.asarray(rng.standard_normal(900), jnp.float32)}
    mod = "kv <= q - 3 & window(300) & (score * u[q] * sigmoid(c[b, h]) - s[h] * abs(q - kv) / 64 + w[kv])"
    q, k, v = _qkv(B, T, T, N, K, H)
    do = jax.random.normal(jax.random.key(8), q.shape, jnp.float32)
    off = dict(q_offset=jnp.asarray([0, 150], jnp.int32), kv_offset=jnp.asarray([0, 150], jnp.int32))
    assert_read_gradients_match_xla("mosaic", mod, ts, q, k, v, do, off)


@pytest.mark.gpu
def test_gpu_per_batch_offsets_with_reads_along_q_and_kv():
    """u[q] and w[kv] read at each batch row's own positions (offsets [3, 200], [0, 64])."""
    q, k, v = _qkv(2, 300, 320, 4, 2, 128)
    rng = np.random.default_rng(0)
    u, w = (jnp.asarray(rng.uniform(0.5, 1.5, 600), jnp.float32) for _ in range(2))
    mod = "causal & (score * u[q] + w[kv])"
    kw = dict(q_offset=jnp.asarray([3, 200], jnp.int32), kv_offset=jnp.asarray([0, 64], jnp.int32), u=u, w=w)
    out = jax.jit(lambda q, k, v: scoremod.attention(q, k, v, mod=mod, implementation="mosaic", **kw))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = scoremod.attention(f32(q), f32(k), f32(v), mod=mod, implementation="reference", **kw)
    np.testing.assert_allclose(np.asarray(f32(out)), np.asarray(want), atol=3e-2, rtol=3e-2)


# ---- chunked prefill over a paged KV cache (mosaic_paged_attention) ----------------------------

def test_paged_length_bound_is_a_mask_on_a_name_the_mod_leaves_free():
    bounded, name = ma.with_length_bound("causal + alibi(4)")
    assert name == "paged_lengths" and str(bounded) == str(scoremod.compile("(causal + alibi(4)) & kv < paged_lengths[b]"))
    assert str(ma.with_length_bound(None)[0]) == "kv < paged_lengths[b]"
    assert ma.with_length_bound("causal & kv < paged_lengths[b]")[1] == "paged_lengths_"


def test_paged_kv_inputs_zero_the_slots_past_each_length():
    """The tail copies equal the last page's slots before the length and are 0 after it,
    whatever the pool holds there (NaN here); tables are padded and clipped into the pool."""
    rng = np.random.default_rng(3)
    P, ps, K, H = 12, 8, 2, 4
    k_pages = rng.standard_normal((P, ps, K, H)).astype(np.float32)
    k_pages[:, 5:] = np.nan
    tables = np.array([[3, 7, -1], [11, 0, 4]], np.int32)
    lengths = np.array([13, 24], np.int32)
    got_tables, last, k_tail, v_tail = (np.asarray(x) for x in ma.paged_kv_inputs(
        jnp.asarray(k_pages), jnp.asarray(k_pages), jnp.asarray(tables), jnp.asarray(lengths), 32))
    assert got_tables.shape == (2, 4) and (got_tables == [[3, 7, 0, 0], [11, 0, 4, 0]]).all()
    assert list(last) == [1, 2]
    np.testing.assert_array_equal(k_tail[0, :5], k_pages[7, :5])          # 13 = 8 + 5 keys
    assert (k_tail[0, 5:] == 0).all() and (v_tail[0, 5:] == 0).all()
    np.testing.assert_array_equal(k_tail[1, :5], k_pages[4, :5])          # a full last page: its NaN slots stay
    assert np.isnan(k_tail[1, 5:]).all()


@needs_mosaic
@pytest.mark.parametrize("page_size, mod, tensors", [
    (16, "causal", {}),
    (64, None, {}),
    (16, "causal & doc(ids)", {"ids": np.zeros((2, 512), np.int32)}),
    (32, "causal & window(64) + alibi(4)", {}),
])
def test_paged_prefill_lowers(pretend_hopper, page_size, mod, tensors):
    B, T, N, K, H, P = 2, 200, 4, 2, 128, 64
    q, _, _ = _qkv(B, T, 1, N, K, H)
    pool = jnp.zeros((P, page_size, K, H), jnp.bfloat16)
    tables = jnp.asarray(np.random.default_rng(0).permutation(P)[:B * (384 // page_size)].reshape(B, -1), jnp.int32)
    lengths = jnp.array([300, 384], jnp.int32)
    fn = lambda q, kp, vp, t, n: ma.mosaic_paged_attention(q, kp, vp, t, n, mod=mod, tensors=tensors)  # noqa: E731
    jax.jit(fn).trace(q, pool, pool, tables, lengths).lower(lowering_platforms=("cuda",))


def test_paged_prefill_declines_page_sizes_it_cannot_tile(pretend_hopper):
    q, _, _ = _qkv(1, 8, 1, 2, 2, 128)
    pool = jnp.zeros((4, 12, 2, 128), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="page size"):
        ma.mosaic_paged_attention(q, pool, pool, jnp.zeros((1, 2), jnp.int32), jnp.array([20], jnp.int32))


@pytest.mark.skipif(ON_GPU, reason="checks the CPU decline")
def test_paged_mosaic_on_cpu_says_why():
    q, _, _ = _qkv(1, 4, 1, 2, 2, 128)
    pool = jnp.zeros((4, 16, 2, 128), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="sm_90|Mosaic GPU"):
        scoremod.paged_attention(q, pool, pool, jnp.zeros((1, 2), jnp.int32), jnp.array([20], jnp.int32),
                                 mod="causal", implementation="mosaic")


PAGED_PREFILL_GPU_CASES = [("causal", 16), ("causal & window(100)", 64), ("causal & doc(ids)", 16),
                           (None, 64), ("causal & softcap(20) + alibi(8)", 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("mod, page_size", PAGED_PREFILL_GPU_CASES)
def test_gpu_paged_prefill_matches_oracle(mod, page_size):
    """A chunk of 200 new tokens over ragged cached contexts (one a whole table, one only the
    chunk), GQA, shuffled pages: against the float64 paged oracle, with every pool page no
    sequence uses, and every slot past a length, filled with NaN."""
    from test_paged_attention import make_cache, oracle, poison_unread_slots
    rng = np.random.default_rng(sum(map(ord, f"{mod}{page_size}")))
    B, T, N, K, H, max_pages = 3, 200, 8, 2, 128, 1024 // page_size
    lengths = np.array([max_pages * page_size, T, 611], np.int32)
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, H=H, page_size=page_size,
                                            max_pages=max_pages, lengths=lengths)
    tensors = {}
    if mod and "ids" in mod:
        tensors["ids"] = np.sort(rng.integers(0, 4, size=(B, max_pages * page_size)), axis=1).astype(np.int32)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    f32 = lambda x: np.asarray(bf(x), np.float32)  # noqa: E731
    want = oracle(f32(q), f32(kp), f32(vp), tables, lengths, mod, tensors)
    kp_bad, vp_bad = poison_unread_slots(f32(kp), f32(vp), tables, lengths)
    out = scoremod.paged_attention(bf(q), bf(kp_bad), bf(vp_bad), tables, lengths, mod=mod,
                                   implementation="mosaic", **tensors)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_paged_prefill_is_the_default_on_hopper(caplog):
    """implementation=None runs a chunk of 128 or more new tokens on the Mosaic forward on an
    sm_90 GPU, and decode on pallas; both against the reference, with sinks (which read
    each path's lse)."""
    from test_paged_attention import make_cache
    if ma._device_reason() is not None:
        pytest.skip(ma._device_reason())
    rng = np.random.default_rng(7)
    q, kp, vp, tables, lengths = make_cache(rng, B=2, T=128, N=8, K=2, H=128, page_size=16, max_pages=32,
                                            lengths=np.array([512, 300], np.int32))
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    f32 = lambda x: np.asarray(bf(x), np.float32)  # noqa: E731
    sinks = np.linspace(-1.0, 2.0, 8).astype(np.float32)   # the lse reaches the output through them
    for T, impl in ((128, "mosaic"), (1, "pallas")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="scoremod"):
            out = scoremod.paged_attention(bf(q[:, -T:]), bf(kp), bf(vp), tables, lengths, mod="causal", sinks=sinks)
        assert f"using {impl}" in caplog.text, caplog.text
        want = scoremod.paged_attention(f32(q[:, -T:]), f32(kp), f32(vp), tables, lengths, mod="causal", sinks=sinks,
                                        implementation="reference")
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)


# ---- paged decode on Mosaic GPU (paged._paged_mosaic_decode) -----------------------------------

@needs_mosaic
@pytest.mark.parametrize("T, page_size, mod, tensors", [
    (1, 16, "causal", {}), (4, 16, "causal & window(100)", {}), (1, 64, None, {}),
    (8, 32, "causal & softcap(20) + alibi(8)", {}), (40, 16, "causal", {}),
    (2, 16, "causal & doc(ids) + t[h] * (kv - q)", {"ids": np.zeros((2, 512), np.int32),
                                                     "t": np.ones((8,), np.float32)}),
])
def test_paged_decode_lowers(pretend_hopper, T, page_size, mod, tensors):
    """Decode, speculative decode and a few chunks of new tokens lower for sm_90 (page sizes
    16-64, GQA, masks with values, tensor reads along the rows and the keys)."""
    B, N, K, H, P = 2, 8, 2, 128, 64
    q = jnp.zeros((B, T, N, H), jnp.bfloat16)
    pool = jnp.zeros((P, page_size, K, H), jnp.bfloat16)
    tables = jnp.asarray(np.random.default_rng(0).permutation(P)[:B * (512 // page_size)].reshape(B, -1), jnp.int32)
    lengths = jnp.array([300, 512], jnp.int32)
    from scoremod.runtime.paged import PagedBlockSizes
    # block_kv=16 (the Triton kernel's keys per step) is rounded up to the 64 keys a P V product takes.
    for bs in (PagedBlockSizes(), PagedBlockSizes(persistent=False), PagedBlockSizes(block_kv=16),
               PagedBlockSizes(consumers=1), PagedBlockSizes(consumers=1, persistent=False)):
        fn = lambda q, kp, vp, t, n: scoremod.paged_attention(  # noqa: E731
            q, kp, vp, t, n, mod=mod, implementation="mosaic", block_sizes=bs, **tensors)
        jax.jit(fn).trace(q, pool, pool, tables, lengths).lower(lowering_platforms=("cuda",))


@needs_mosaic
@pytest.mark.parametrize("H, block_kv, consumers", [(64, 64, 2), (64, 128, 1), (64, 192, 2), (128, 64, 1),
                                                    (128, 64, 2), (128, 128, 2)])
def test_paged_decode_ring_that_the_estimate_allows_lowers(pretend_hopper, H, block_kv, consumers):
    """Asked for 8 slots, the decode check keeps as many as its shared-memory estimate allows
    (pairs with two consumers), and Mosaic's own accounting accepts them: the estimate is
    never optimistic (with a read along the keys, which takes ring space too)."""
    from scoremod.runtime import paged
    mod, tensors = "causal & doc(ids)", {"ids": np.zeros((2, 1024), np.int32)}
    q = jnp.zeros((2, 1, 8, H), jnp.bfloat16)
    pool = jnp.zeros((128, 16, 2, H), jnp.bfloat16)
    tables = jnp.asarray(np.random.default_rng(0).permutation(128).reshape(2, -1), jnp.int32)
    lengths = jnp.array([300, 1024], jnp.int32)
    bs = paged.PagedBlockSizes(consumers=consumers, block_kv=block_kv, num_stages=8)
    stages = paged._mosaic_decode_check(scoremod.compile(mod), q, pool, pool, tensors, bs)
    assert 2 <= stages < 8 or H == 64 and block_kv == 64
    assert stages % consumers == 0
    fn = lambda q, kp, vp, t, n: scoremod.paged_attention(  # noqa: E731
        q, kp, vp, t, n, mod=mod, implementation="mosaic", block_sizes=bs, **tensors)
    jax.jit(fn).trace(q, pool, pool, tables, lengths).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("mod, tensors, page_size, match", [
    ("causal & t[h, kv] > 0", {"t": np.zeros((4, 64), np.float32)}, 16, "along the query rows or along the keys"),
    ("causal", {}, 12, "multiple of 8"),
])
def test_paged_decode_declines_what_it_cannot_run(pretend_hopper, mod, tensors, page_size, match):
    from scoremod.runtime import paged
    q = jnp.zeros((1, 1, 4, 128), jnp.bfloat16)
    pool = jnp.zeros((8, page_size, 2, 128), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match=match):
        paged._mosaic_decode_check(scoremod.compile(mod), q, pool, pool, tensors, paged.PagedBlockSizes())


PAGED_DECODE_GPU_CASES = [(1, 8, 2, 16, "causal"), (1, 32, 8, 16, "causal & window(100)"), (4, 32, 1, 64, "causal"),
                          (8, 16, 2, 32, "causal & softcap(20) + alibi(8)"), (1, 4, 4, 16, None), (40, 8, 2, 16, "causal"),
                          (3, 16, 4, 16, "causal & doc(ids)")]


@pytest.mark.gpu
@pytest.mark.parametrize("T, N, K, page_size, mod", PAGED_DECODE_GPU_CASES)
@pytest.mark.parametrize("num_splits, persistent, consumers", [(None, True, 1), (3, False, 1), (None, True, 2),
                                                               (5, True, 2)])
def test_gpu_paged_decode_matches_oracle(T, N, K, page_size, mod, num_splits, persistent, consumers):
    """Decode and speculative decode over ragged contexts (one a whole table, one only the new
    tokens), GQA and MQA, shuffled pages, forced splits, one or two consumer warpgroups:
    against the float64 paged oracle, with every pool page no sequence uses, and every slot
    past a length, filled with NaN."""
    from test_paged_attention import make_cache, oracle, poison_unread_slots
    from scoremod.runtime.paged import PagedBlockSizes
    rng = np.random.default_rng(sum(map(ord, f"{T}{N}{K}{page_size}{mod}")))
    B, H, max_pages = 3, 128, 2048 // page_size
    lengths = np.array([max_pages * page_size, T, 611], np.int32)
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, H=H, page_size=page_size,
                                            max_pages=max_pages, lengths=lengths)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    f32 = lambda x: np.asarray(bf(x), np.float32)  # noqa: E731
    tensors = {}
    if mod and "ids" in mod:
        tensors["ids"] = np.sort(rng.integers(0, 4, size=(B, max_pages * page_size)), axis=1).astype(np.int32)
    want = oracle(f32(q), f32(kp), f32(vp), tables, lengths, mod, tensors)
    kp_bad, vp_bad = poison_unread_slots(f32(kp), f32(vp), tables, lengths)
    out = scoremod.paged_attention(bf(q), bf(kp_bad), bf(vp_bad), tables, lengths, mod=mod, implementation="mosaic",
                                   block_sizes=PagedBlockSizes(num_splits=num_splits, persistent=persistent,
                                                               consumers=consumers), **tensors)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("T", [1, 128])
def test_paged_mosaic_is_forward_only(pretend_hopper, T):
    """Decode (T=1) and chunked prefill (T=128) on Mosaic: a ScoreModError under jax.grad,
    not a Mosaic or custom-call traceback."""
    from scoremod.errors import ScoreModError
    q = jnp.zeros((1, T, 4, 128), jnp.bfloat16)
    pool = jnp.zeros((16, 16, 2, 128), jnp.bfloat16)
    tables = jnp.arange(16, dtype=jnp.int32)[None]
    lengths = jnp.array([200], jnp.int32)
    loss = lambda q: scoremod.paged_attention(q, pool, pool, tables, lengths, mod="causal",  # noqa: E731
                                              implementation="mosaic").astype(jnp.float32).sum()
    with pytest.raises(ScoreModError, match="forward only"):
        jax.grad(loss)(q)


@pytest.mark.parametrize("mod, page_size, T", [("causal", 16, 20), ("causal & window(40)", 8, 33),
                                               ("causal & doc(ids)", 16, 7), (None, 32, 50)])
def test_paged_prefill_inputs_match_oracle_through_the_twin(mod, page_size, T):
    """What the Mosaic prefill gives the forward kernel (padded, clipped tables; each
    sequence's last page; tail copies with the slots past the length zeroed; the mod with
    ``kv < lengths[b]``; queries at ``lengths[b] - T``), assembled as the producer's copies
    would be (``paged_kv_dense``) and run by the reference path: the float64 oracle's answer,
    with NaN in every unused page and every slot past a length (CPU)."""
    from test_paged_attention import _tensors, make_cache, oracle, poison_unread_slots
    rng = np.random.default_rng(sum(map(ord, f"{mod}{page_size}{T}")))
    B, N, K, H, max_pages = 3, 4, 2, 16, 160 // page_size
    lengths = np.array([max_pages * page_size, T, 97], np.int32)
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, H=H, page_size=page_size,
                                            max_pages=max_pages, lengths=lengths)
    tensors = _tensors(mod, B, N, T, max_pages * page_size, lengths, rng)
    want = oracle(q, kp, vp, tables, lengths, mod, tensors)
    kp, vp = poison_unread_slots(kp, vp, tables, lengths)
    bounded, name = ma.with_length_bound(mod)
    Sp = -(-max_pages * page_size // 128) * 128
    pages = ma.paged_kv_inputs(jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(tables), jnp.asarray(lengths), Sp)
    k, v = ma.paged_kv_dense(jnp.asarray(kp), jnp.asarray(vp), *pages)
    S = max_pages * page_size     # the kernel's keys past S are padding (no key exists there)
    out = scoremod.attention(jnp.asarray(q), k[:, :S], v[:, :S], mod=bounded, q_offset=jnp.asarray(lengths - T),
                             implementation="reference", **{name: jnp.asarray(lengths)}, **tensors)
    out = np.asarray(out)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)
