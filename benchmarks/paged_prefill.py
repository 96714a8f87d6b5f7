"""Chunked prefill on the page pool: 2048 new tokens (the last of the context), causal, on 32k
and 128k contexts, bf16, N=32, K=8, H=128, pages of 16 in a shuffled pool; beside cuDNN
(jax.nn.dot_product_attention) over the same context gathered into one dense array,
non-causal (cuDNN's causal mask is top-left aligned when T != S, so it cannot run the
bottom-right mask; its T x S is 3% more work than ours at 32k). Each of our kernels ("pallas":
the paged Triton kernel; "mosaic": the Mosaic forward with K/V brought in page by page) has
its last 64 rows checked against the xla path in f32 on the dense context first.

    python benchmarks/paged_prefill.py                  # on an H100/H200
    python benchmarks/paged_prefill.py --impls mosaic
    python benchmarks/paged_prefill.py --impls mosaic,mosaic:block_kv=64+num_stages=4

``IMPL:FIELD=VALUE+...`` runs the Mosaic prefill (``mosaic_paged_attention``) with those
``MosaicBlockSizes`` fields set over the head dim's defaults.
"""
import argparse
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np, jax, jax.numpy as jnp
from attention_bench import _time_jax
import scoremod
from scoremod.runtime import mosaic_attention as ma
from paged_bench import with_fields


def prefill_call(spec: str):
    """The call ``spec`` names: an implementation of ``paged_attention``, or ``mosaic:FIELD=VALUE+...``
    (the Mosaic prefill with those MosaicBlockSizes fields)."""
    impl, _, fields = spec.partition(":")
    if not fields:
        return lambda q, kp, vp, t, n: scoremod.paged_attention(q, kp, vp, t, n, mod="causal", implementation=impl)
    assert impl == "mosaic", spec
    bs = with_fields(ma.MosaicBlockSizes.get_default(128), fields, "+")
    return lambda q, kp, vp, t, n: ma.mosaic_paged_attention(q, kp, vp, t, n, mod="causal", block_sizes=bs)[0]


ap = argparse.ArgumentParser()
ap.add_argument("--impls", default="pallas,mosaic")
impls = ap.parse_args().impls.split(",")
N, K, H, ps, T = 32, 8, 128, 16, 2048
for B, ctx in ((1, 32768), (1, 131072), (4, 32768)):
    pages = ctx // ps
    rng = np.random.default_rng(0)
    tables = jnp.asarray(rng.permutation(B * pages).reshape(B, pages).astype(np.int32))
    lengths = jnp.full((B,), ctx, jnp.int32)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
    kp = jax.random.normal(ks[1], (B * pages, ps, K, H), jnp.bfloat16)
    vp = jax.random.normal(ks[2], (B * pages, ps, K, H), jnp.bfloat16)
    kd = kp[tables].reshape(B, ctx, K, H); vd = vp[tables].reshape(B, ctx, K, H)
    # a few rows of the reference on the dense context (bottom-right causal)
    ref = scoremod.attention(q[:, -64:].astype(jnp.float32), kd.astype(jnp.float32), vd.astype(jnp.float32), mod="causal",
                             q_offset=ctx - 64, implementation="xla")
    c = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    cms = _time_jax(c, (q, kd, vd))
    flops = 4 * B * N * T * H * (ctx - T / 2)
    for impl in impls:
        f = jax.jit(prefill_call(impl))
        try:
            out = f(q, kp, vp, tables, lengths)
        except NotImplementedError as exc:
            print(f"prefill B={B} ctx={ctx}: {impl} declined: {exc}", flush=True)
            continue
        err = float(jnp.max(jnp.abs(out[:, -64:].astype(jnp.float32) - ref)))
        assert err < 5e-2, (impl, err)
        ms = _time_jax(f, (q, kp, vp, tables, lengths))
        print(f"prefill B={B} ctx={ctx}: {impl} {ms:.3f} ms ({flops/ms/1e9:.0f} TF/s)  cudnn dense non-causal "
              f"{cms:.3f} ms  ratio {ms/cms:.2f}  err {err:.1e}", flush=True)
