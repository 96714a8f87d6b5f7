"""The "xla" implementation: the mod's score_mod closure on kv-chunks, with an online softmax.

Queries are cut into blocks of ``block_q`` rows and keys into chunks of ``block_kv``
columns (the last ones padded, the padding masked). For each q-block a loop visits only
the kv-chunks the block plan does not prove EMPTY, keeping the running max ``m``, sum
``l`` and output accumulator in float32 (FlashAttention's recurrence). Scores live one
``[B, N, block_q, block_kv]`` tile at a time: memory O(T * block_kv), not O(T * S).

The gradient is a ``custom_vjp`` that recomputes each tile from the saved
log-sum-exp (FlashAttention-2's backward), so the backward pass is O(T * block_kv)
too: one scan over kv-chunks, each visiting the q-blocks the plan lists for it,
accumulating dK/dV for the chunk and adding into dQ. The score_mod's own derivative
(a transform such as softcap) comes from ``jax.vjp`` of the closure on the tile.
Float tensor parameters get gradients, accumulated tile by tile in the backward (int
tensors are constants). Forward-mode autodiff (``jvp``)
is not supported, as for any ``custom_vjp``.

Rows with no allowed key: ``l == 0``; they give 0, lse -inf, and zero gradients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scoremod.compiler.mod import Mod
from scoremod.compiler.intervals import num_blocks
from scoremod.compiler.plan import EMPTY, build_plan, compact_rows, plan_is_static
from scoremod.runtime.attention_plan import plan_for
from scoremod.runtime._dispatch_order import XlaBlockSizes
from scoremod.runtime.first_order import first_order_only
from scoremod.runtime.softmax_numerics import at_most_zero, exponent_reference

__all__ = ["xla_attention", "XlaBlockSizes"]


@dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: the custom_vjp's nondiff argument)."""
    mod: Mod
    scale: float
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    static_offsets: tuple[int, int] | None   # both offsets, when both are Python ints



def _varying_like(refs, *values):
    """``values`` marked as varying over the mesh axes any of ``refs`` varies over. Inside
    a user's ``jax.shard_map`` the loops' carries start as constants but come back
    varying like the shards they read, and a loop wants the two types equal."""
    axes = set()
    for r in jax.tree.leaves(refs):
        axes |= set(getattr(getattr(jax.typeof(r), "manual_axis_type", None), "varying", ()) or ())
    if not axes:
        return values
    return tuple(jax.tree.map(lambda x: lax.pcast(x, tuple(sorted(axes)), to="varying"), v) for v in values)


def xla_attention(query, key, value, *, mod: Mod, scale: float, q_offset=0, kv_offset=0,
                  tensors=None, block_sizes: XlaBlockSizes | None = None, plans=None):
    """Chunked attention with an online softmax (inputs already validated by ``attention()``).

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` with N % K == 0.
      mod: a compiled ``scoremod.Mod``; scale: float.
      q_offset, kv_offset: int or int32 ``[B]``.
      tensors: dict of the mod's tensor parameters.
      block_sizes: tile sizes (default ``XlaBlockSizes.get_default()``; clamped to T and S).
      plans: an ``AttentionPlan`` holding this call's block plan (``scoremod.plan``), or
        None to build it here.

    Returns:
      ``(out [B, T, N, H] in query's dtype, lse f32 [B, T, N])``.

    Example::

        >>> out, lse = xla_attention(q, k, v, mod=scoremod.compile("causal"), scale=0.125,
        ...                          block_sizes=XlaBlockSizes(block_q=64, block_kv=64))
    """
    block_sizes = block_sizes or XlaBlockSizes.get_default()
    B, T = query.shape[:2]
    S = key.shape[1]
    static = (q_offset, kv_offset) if isinstance(q_offset, int) and isinstance(kv_offset, int) else None
    cfg = _Config(mod, float(scale), T, S, _clamp(block_sizes.block_q, T), _clamp(block_sizes.block_kv, S), static)
    tensors = dict(tensors or {})
    # A plan decided at trace time is built inside (NumPy, cached); one from tensor values
    # or array offsets is an argument, so a plan given by the caller is used as it is.
    plan = None
    if mod.canonical.has_mask and not plan_is_static(mod, q_offset, kv_offset):
        plan = plan_for(plans, mod, q_len=T, kv_len=S, block_q=cfg.block_q, block_kv=cfg.block_kv, batch=B,
                        heads=query.shape[2], q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    return _attention_jit(cfg, query, key, value, tensors, _offset_array(q_offset, B), _offset_array(kv_offset, B),
                          plan)


def _clamp(block: int, length: int) -> int:
    """The block, or the smallest power of two >= length when that is smaller (plans take powers of two)."""
    return min(block, 1 << max(0, length - 1).bit_length())


def _offset_array(offset, batch: int):
    if isinstance(offset, int):
        return jnp.full((batch,), offset, jnp.int32)
    return jnp.asarray(offset, jnp.int32)


# ---- which tiles to visit -------------------------------------------------------------------

def _visit_lists(cfg: _Config, plan, batch: int, heads: int):
    """Per q-block, the kv-chunks to visit, and the transpose (for the backward).

    Returns ``(kv_counts [nq], kv_indices [nq, nk], q_counts [nk], q_indices [nk, nq])``,
    int32 (NumPy when decided at trace time); row i lists its non-empty blocks first, in
    increasing order. A tile is visited when it may be non-empty for some batch element
    or head.
    """
    nonempty = _nonempty_tiles(cfg, plan, batch, heads)
    return _lists(nonempty) + _lists(nonempty.T)


def _lists(nonempty):
    return compact_rows(nonempty)


def _nonempty_tiles(cfg: _Config, plan, batch: int, heads: int):
    """bool ``[nq, nk]``: tiles the block plan does not prove EMPTY for every b and h.

    ``plan``: the call's ``BlockPlan`` for masks that read tensors or take array offsets
    (jax arrays: new values never recompile), None otherwise: then the plan is decided at
    trace time (NumPy, cached by ``build_plan``), or there is no mask.
    """
    if not cfg.mod.canonical.has_mask:
        return np.ones((num_blocks(cfg.q_len, cfg.block_q), num_blocks(cfg.kv_len, cfg.block_kv)), bool)
    if plan is None:
        q_offset, kv_offset = cfg.static_offsets
        plan = build_plan(cfg.mod, q_len=cfg.q_len, kv_len=cfg.kv_len, block_q=cfg.block_q, block_kv=cfg.block_kv,
                          batch=batch, heads=heads, q_offset=q_offset, kv_offset=kv_offset)
    return (plan.classes != EMPTY).any(axis=(0, 1))


# ---- the tiles ------------------------------------------------------------------------------

def _layout(cfg: _Config, query, key, value):
    """Padded, head-grouped views: q ``[B, K, G, Tp, H]``, k and v ``[B, K, Sp, H]``."""
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    Tp, Sp = num_blocks(cfg.q_len, cfg.block_q) * cfg.block_q, num_blocks(cfg.kv_len, cfg.block_kv) * cfg.block_kv
    q = jnp.pad(query, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    q = q.reshape(B, Tp, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k = jnp.pad(key, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v = jnp.pad(value, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    return q, k, v


def _grouped(x, cfg: _Config, K: int, fill):
    """``[B, T, N]`` -> padded ``[B, K, G, Tp]`` (padding rows get ``fill``)."""
    B, T, N = x.shape
    Tp = num_blocks(cfg.q_len, cfg.block_q) * cfg.block_q
    x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0)), constant_values=fill)
    return x.reshape(B, Tp, K, N // K).transpose(0, 2, 3, 1)


def _tile_logits_fn(cfg: _Config, tensors, q_off, kv_off, B: int, K: int, G: int):
    """``tile_logits(scores [B, K, G, bq, bk], qi, c, floats)``: the mod's logits of tile
    (qi, c), with the float tensors ``floats`` (a dict, differentiable) and the others
    from ``tensors``."""
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None, None]
    h = jnp.arange(K * G, dtype=jnp.int32).reshape(1, K, G, 1, 1)
    rows = jnp.arange(cfg.block_q, dtype=jnp.int32)
    cols = jnp.arange(cfg.block_kv, dtype=jnp.int32)

    def tile_logits(scores, qi, c, floats):
        score_mod = cfg.mod.score_mod(**{**tensors, **floats})
        qpos = (q_off[:, None] + qi * cfg.block_q + rows)[:, None, None, :, None]
        kv_col = c * cfg.block_kv + cols
        kvpos = (kv_off[:, None] + kv_col)[:, None, None, None, :]
        logits = jnp.broadcast_to(score_mod(scores, b, h, qpos, kvpos), scores.shape)
        return jnp.where(kv_col < cfg.kv_len, logits, -jnp.inf)   # padding columns do not exist

    return tile_logits


def _float_tensors(tensors) -> dict:
    """The tensors that get gradients: the floating ones (ints are indices and ids)."""
    return {n: t for n, t in tensors.items() if jnp.issubdtype(t.dtype, jnp.floating)}


def _scores(cfg, q_blk, k_c):
    s = jnp.einsum("bkgqh,bkch->bkgqc", q_blk, k_c, preferred_element_type=jnp.float32)
    return s * cfg.scale


def _forward(cfg: _Config, query, key, value, tensors, q_off, kv_off, plan):
    B, T, N, H = query.shape
    K = key.shape[2]
    G = N // K
    bq, bk = cfg.block_q, cfg.block_kv
    q, k, v = _layout(cfg, query, key, value)
    kv_counts, kv_indices, _, _ = _visit_lists(cfg, plan, B, N)
    tile_logits = _tile_logits_fn(cfg, tensors, q_off, kv_off, B, K, G)
    floats = _float_tensors(tensors)

    def q_block(qi):
        q_blk = lax.dynamic_slice_in_dim(q, qi * bq, bq, axis=3)

        def visit(j, carry):
            m, l, acc = carry
            c = jnp.asarray(kv_indices)[qi, j]
            k_c = lax.dynamic_slice_in_dim(k, c * bk, bk, axis=2)
            v_c = lax.dynamic_slice_in_dim(v, c * bk, bk, axis=2)
            logits = tile_logits(_scores(cfg, q_blk, k_c), qi, c, floats)
            # The running max m is carried as is; the exponents' reference is m lowered by the
            # rounding slack (softmax_numerics; 0 below logits of about 5e8), a function of m.
            # (Carrying the lowered max let it drift down a slack per block: past 5e8, keys
            # hundreds below the max came to weigh as much as it.)
            m_new = jnp.maximum(m, logits.max(axis=-1))
            ref = exponent_reference(m_new)
            m_safe = jnp.where(ref == -jnp.inf, 0.0, ref)   # all -inf so far: exp(-inf - 0) = 0
            # Exponents are <= 0 by construction; at logit magnitudes near 1e9 and beyond the
            # two sides may round differently after fusion: never let one overflow to inf.
            alpha = jnp.exp(at_most_zero(exponent_reference(m) - m_safe))
            p = jnp.exp(at_most_zero(logits - m_safe[..., None]))
            l = alpha * l + p.sum(axis=-1)
            pv = jnp.einsum("bkgqc,bkch->bkgqh", p.astype(v.dtype), v_c, preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, H), jnp.float32))
        init = _varying_like((q, k, v, tensors, q_off, kv_off), *init)
        m, l, acc = lax.fori_loop(0, jnp.asarray(kv_counts)[qi], visit, init)
        has_key = l != 0    # NaN (a NaN or +inf logit) propagates; only l == 0 is "no key"
        l_safe = jnp.where(has_key, l, 1.0)
        out = jnp.where(has_key[..., None], acc / l_safe[..., None], 0.0)
        lse = jnp.where(has_key, exponent_reference(m) + jnp.log(l_safe), -jnp.inf)
        return out.astype(query.dtype), lse

    outs, lses = lax.map(q_block, jnp.arange(num_blocks(cfg.q_len, cfg.block_q), dtype=jnp.int32))
    # [nq, B, K, G, bq, H] -> [B, nq * bq, K * G, H]
    out = outs.transpose(1, 0, 4, 2, 3, 5).reshape(B, -1, N, H)[:, :T]
    lse = lses.transpose(1, 0, 4, 2, 3).reshape(B, -1, N)[:, :T]
    return out, lse


def _backward(cfg: _Config, query, key, value, tensors, q_off, kv_off, plan, out, lse, dout, dlse):
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    G = N // K
    bq, bk = cfg.block_q, cfg.block_kv
    q, k, v = _layout(cfg, query, key, value)
    do = _layout(cfg, dout.astype(query.dtype), key, value)[0]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)   # [B, T, N]
    lse = _grouped(lse, cfg, K, -jnp.inf)           # padding rows: no keys, so p = 0
    delta = _grouped(delta, cfg, K, 0.0)
    dlse = _grouped(dlse.astype(jnp.float32), cfg, K, 0.0)
    _, _, q_counts, q_indices = _visit_lists(cfg, plan, B, N)
    tile_logits = _tile_logits_fn(cfg, tensors, q_off, kv_off, B, K, G)
    floats = _float_tensors(tensors)

    def kv_chunk(carry, c):
        dq, dfloats = carry
        k_c = lax.dynamic_slice_in_dim(k, c * bk, bk, axis=2)
        v_c = lax.dynamic_slice_in_dim(v, c * bk, bk, axis=2)

        def visit(j, carry):
            dq, dk_c, dv_c, dfloats = carry
            qi = jnp.asarray(q_indices)[c, j]
            rows = lambda x: lax.dynamic_slice_in_dim(x, qi * bq, bq, axis=3)
            q_blk, do_blk, lse_blk, delta_blk, dlse_blk = map(rows, (q, do, lse, delta, dlse))
            logits, logits_vjp = jax.vjp(lambda s, f: tile_logits(s, qi, c, f), _scores(cfg, q_blk, k_c), floats)
            has_key = (lse_blk != -jnp.inf)[..., None]
            p = jnp.where(has_key, jnp.exp(at_most_zero(logits - jnp.where(has_key, lse_blk[..., None], 0.0))), 0.0)
            dv_c = dv_c + jnp.einsum("bkgqc,bkgqh->bkch", p.astype(do.dtype), do_blk,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqh,bkch->bkgqc", do_blk, v_c, preferred_element_type=jnp.float32)
            dlogits = p * (dp - delta_blk[..., None] + dlse_blk[..., None])
            # Only logits with p > 0 carry gradient. Elsewhere (masked, padding rows and
            # columns of ragged tiles, where scores are exactly 0) the transform's derivative
            # may be inf (sqrt(abs(score)) at 0) and 0 * inf would be NaN.
            # The float tensors' cotangent: only logits with p > 0 carry one, as for ds.
            dscores, dtile = logits_vjp(jnp.where(p > 0, dlogits, 0.0))
            ds = (jnp.where(p > 0, dscores, 0.0) * cfg.scale).astype(q.dtype)
            dfloats = jax.tree.map(jnp.add, dfloats, dtile)
            dq_blk = jnp.einsum("bkgqc,bkch->bkgqh", ds, k_c, preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(dq, rows(dq) + dq_blk, qi * bq, axis=3)
            dk_c = dk_c + jnp.einsum("bkgqc,bkgqh->bkch", ds, q_blk, preferred_element_type=jnp.float32)
            return dq, dk_c, dv_c, dfloats

        zeros, = _varying_like((q, k, v, do, tensors, q_off, kv_off), jnp.zeros((B, K, bk, H), jnp.float32))
        dq, dk_c, dv_c, dfloats = lax.fori_loop(0, jnp.asarray(q_counts)[c], visit, (dq, zeros, zeros, dfloats))
        return (dq, dfloats), (dk_c, dv_c)

    start = _varying_like((q, k, v, do, tensors, q_off, kv_off), jnp.zeros(q.shape, jnp.float32),
                          jax.tree.map(jnp.zeros_like, floats))
    chunks = jnp.arange(num_blocks(cfg.kv_len, cfg.block_kv), dtype=jnp.int32)
    (dq, dfloats), (dk, dv) = lax.scan(kv_chunk, start, chunks)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, -1, N, H)[:, :T]
    # [nk, B, K, bk, H] -> [B, nk * bk, K, H]
    dk = dk.transpose(1, 0, 3, 2, 4).reshape(B, -1, K, H)[:, :S]
    dv = dv.transpose(1, 0, 3, 2, 4).reshape(B, -1, K, H)[:, :S]
    return dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype), dfloats


# ---- custom_vjp ---------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, query, key, value, tensors, q_off, kv_off, plan):
    return _forward(cfg, query, key, value, tensors, q_off, kv_off, plan)


def _attention_fwd(cfg, query, key, value, tensors, q_off, kv_off, plan):
    out, lse = _forward(cfg, query, key, value, tensors, q_off, kv_off, plan)
    return (out, lse), (query, key, value, tensors, q_off, kv_off, plan, out, lse)


def _attention_bwd(cfg, residuals, cotangents):
    query, key, value, tensors, q_off, kv_off, plan, out, lse = residuals
    dout, dlse = cotangents
    query, key, value, tensors, out, lse, dout, dlse = first_order_only(
        "xla", (query, key, value, tensors, out, lse, dout, dlse))
    dq, dk, dv, dfloats = _backward(cfg, query, key, value, tensors, q_off, kv_off, plan, out, lse, dout, dlse)
    # Float tensors get their gradients; int tensors, offsets and the plan are constants.
    dtensors = {n: dfloats[n].astype(t.dtype) if n in dfloats else _zero_cotangent(t) for n, t in tensors.items()}
    return (dq, dk, dv, dtensors, _zero_cotangent(q_off), _zero_cotangent(kv_off),
            jax.tree.map(_zero_cotangent, plan))


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)

# One compiled program per static configuration: an eager call (outside the user's jit)
# otherwise retraced the scans of both passes every time (0.5 s per call on a CPU).
_attention_jit = jax.jit(_attention, static_argnums=(0,))
