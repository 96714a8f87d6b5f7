"""The paged kernel: one Pallas program per (sequence, KV head, chunk of new tokens, split).

Each program walks its share of its chunk's *compacted* page list (the pages whose
block class is not EMPTY for the chunk's queries, in position order),
``pages_per_step`` pages at a time: it gathers those pages of K and V from the pool,
scores them against the ``rows = chunk_tokens * G`` queries of its KV head and chunk
(the ``G = N // K`` query heads of the group times the chunk's tokens, padded to a power
of two), applies the tile program with absolute positions, and keeps an online
softmax. It writes an f32 partial output and its log-sum-exp; ``combine_splits`` merges
the splits. Decode (a few new tokens) is one chunk; chunked prefill (hundreds to
thousands of new tokens) is many, each walking only its own pages.

Written against ``jax.experimental.pallas``'s portable subset, so the same body runs
through the Triton lowering on GPU and through the interpreter on CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scoremod.runtime._triton import compiler_params

__all__ = ["ReadLayout", "paged_decode_partials", "combine_splits", "next_power_of_2", "is_power_of_2"]


@dataclass(frozen=True)
class ReadLayout:
    """How one materialized tensor read is laid out for the kernel.

    ``by_kv``: the read depends on the key position; the array is
    ``[B|1, K|1, max_pages, page_size, R|1]`` and the kernel gathers it by logical
    page like K and V. Otherwise it is ``[B|1, K|1, R|1]`` and loaded once.
    ``by_b`` / ``by_k``: the leading axes are full (else 1, broadcast).
    ``rows``: R (the padded query-row axis) is full (else 1).
    """
    by_b: bool
    by_k: bool
    by_kv: bool
    rows: bool


def _kernel(q_ref, k_ref, v_ref, logical_ref, physical_ref, count_ref, length_ref, *refs,
            program, layouts, num_tokens, chunk_tokens, group, scale, page_size, pages_per_step, num_splits):
    read_refs = refs[:len(layouts)]
    o_ref, lse_ref = refs[len(layouts):]
    b = pl.program_id(0)
    kv_head = pl.program_id(1)
    chunk = lax.div(pl.program_id(2), jnp.int32(num_splits))
    split = lax.rem(pl.program_id(2), jnp.int32(num_splits))
    length = length_ref[0]
    count = count_ref[0]
    rows, head_dim = q_ref.shape
    block_kv = pages_per_step * page_size

    row = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    # Row r holds token chunk * chunk_tokens + r // G of query head kv_head * G + r % G (rows
    # past the chunk's tokens, and tokens past T, are padding).
    q_pos = length - num_tokens + chunk * chunk_tokens + lax.div(row, jnp.int32(group))
    head = kv_head * group + lax.rem(row, jnp.int32(group))

    # Reads that do not depend on the key position: one tile for the whole walk.
    fixed_tiles = {}
    for i, (layout, ref) in enumerate(zip(layouts, read_refs)):
        if not layout.by_kv:
            fixed_tiles[i] = ref[...].reshape(ref.shape[0], 1)

    num_chunks = lax.div(count + (pages_per_step - 1), jnp.int32(pages_per_step))
    per_split = lax.div(num_chunks + (num_splits - 1), jnp.int32(num_splits))
    first = split * per_split
    last = jnp.minimum(first + per_split, num_chunks)

    q = q_ref[...]

    def body(chunk, carry):
        acc, m_prev, l_prev = carry
        start = chunk * pages_per_step
        logical = logical_ref[pl.ds(start, pages_per_step)]
        physical = physical_ref[pl.ds(start, pages_per_step)]
        k = k_ref[physical].reshape(block_kv, head_dim)
        v = v_ref[physical].reshape(block_kv, head_dim)
        scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale
        col = lax.broadcasted_iota(jnp.int32, (pages_per_step, page_size), 1)
        slot = lax.broadcasted_iota(jnp.int32, (pages_per_step, page_size), 0) + start
        kv_pos2 = logical[:, None] * page_size + col
        exists = (kv_pos2 < length) & (slot < count)
        kv_pos = kv_pos2.reshape(1, block_kv)
        # Slots past the length (and repeated pages past the count) may hold anything, NaN
        # included; p is 0 there, but 0 * NaN is not, so zero those rows of V.
        v = jnp.where(exists.reshape(block_kv, 1), v, jnp.zeros_like(v))
        exists = exists.reshape(1, block_kv)

        tiles = []
        for i, (layout, ref) in enumerate(zip(layouts, read_refs)):
            if not layout.by_kv:
                tiles.append(fixed_tiles[i])
                continue
            x = ref[logical]                       # [pages_per_step, page_size, R|1]
            r = x.shape[-1]
            x = x.reshape(1, block_kv) if r == 1 else x.reshape(block_kv, r).T
            tiles.append(x)

        logits = program.logits(scores, b=b, h=head, q=q_pos, kv=kv_pos, reads=tuple(tiles))
        logits = jnp.where(exists, logits, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
        # A row that has seen no allowed key keeps m = -inf; shift by 0 so exp gives 0, not NaN.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(logits - m_safe[:, None])
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc, m_next, l_next

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(first, last, body, init)
    seen = l != 0    # NaN (a NaN or +inf logit) propagates; only l == 0 saw no key
    m_safe = jnp.where(seen, m, 0.0)
    o = acc / jnp.where(seen, l, 1.0)[:, None]
    lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    out_rows = lse_ref.shape[0]
    if out_rows < rows:
        # Only the first out_rows rows are queries (the dot needed 16): write just those.
        o = jnp.split(o, rows // out_rows, axis=0)[0]
        lse = jnp.split(lse, rows // out_rows, axis=0)[0]
    o_ref[...] = o
    lse_ref[...] = lse


def paged_decode_partials(q_rows, k_pages, v_pages, logical, physical, counts, lengths, reads, *,
                          program, layouts, num_tokens, chunk_tokens, group, scale, pages_per_step, num_splits,
                          num_warps, num_stages, interpret):
    """Per-chunk, per-split partial outputs and log-sum-exps.

    q_rows:   [B, K, C, R, H]  queries grouped by KV head and chunk of ``chunk_tokens`` new
              tokens, rows r = t * G + g (token ``c * chunk_tokens + t``), R a power of 2
    k_pages:  [P, page_size, K, H] (v_pages alike)
    logical:  int32[B, C, L]   each chunk's compacted logical pages (L a multiple of pages_per_step)
    physical: int32[B, C, L]   the same pages' slots in the pool
    counts:   int32[B, C]      listed pages per sequence and chunk; lengths: int32[B]
    reads:    the tile program's tensor reads, laid out as ``layouts`` say (row axes C * R)
    num_tokens: T, the new tokens (query t of a sequence sits at ``lengths[b] - T + t``).
    Returns (o f32[B, K, C, S, R', H], lse f32[B, K, C, S, R']) with S = num_splits and
    R' = min(R, next power of 2 >= chunk_tokens * G) (the padding rows past R' are not written).
    """
    batch, num_kv_heads, n_chunks, rows, head_dim = q_rows.shape
    out_rows = min(rows, next_power_of_2(chunk_tokens * group))
    num_pages, page_size = k_pages.shape[:2]
    list_len = logical.shape[-1]
    S = num_splits

    def read_spec(layout: ReadLayout, shape):
        def index_map(b, k, p):
            lead = (b if layout.by_b else 0, k if layout.by_k else 0)
            return lead + (0,) * (len(shape) - 3) + (lax.div(p, S) if layout.rows else 0,)
        return pl.BlockSpec((None, None) + tuple(shape[2:-1]) + (rows if layout.rows else 1,), index_map)

    in_specs = [
        pl.BlockSpec((None, None, None, rows, head_dim), lambda b, k, p: (b, k, lax.div(p, S), 0, 0)),
        pl.BlockSpec((num_pages, page_size, None, head_dim), lambda b, k, p: (0, 0, k, 0)),
        pl.BlockSpec((num_pages, page_size, None, head_dim), lambda b, k, p: (0, 0, k, 0)),
        pl.BlockSpec((None, None, list_len), lambda b, k, p: (b, lax.div(p, S), 0)),
        pl.BlockSpec((None, None, list_len), lambda b, k, p: (b, lax.div(p, S), 0)),
        pl.BlockSpec((None, 1), lambda b, k, p: (b, lax.div(p, S))),
        pl.BlockSpec((1,), lambda b, k, p: (b,)),
    ] + [read_spec(layout, r.shape) for layout, r in zip(layouts, reads)]
    out_specs = [
        pl.BlockSpec((None, None, None, out_rows, head_dim), lambda b, k, p: (b, k, p, 0, 0)),
        pl.BlockSpec((None, None, None, out_rows), lambda b, k, p: (b, k, p, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, num_kv_heads, n_chunks * S, out_rows, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, num_kv_heads, n_chunks * S, out_rows), jnp.float32),
    ]
    kernel = functools.partial(
        _kernel, program=program, layouts=tuple(layouts), num_tokens=num_tokens, chunk_tokens=chunk_tokens,
        group=group, scale=scale, page_size=page_size, pages_per_step=pages_per_step, num_splits=num_splits)
    extra = {} if interpret else {"compiler_params": compiler_params(num_warps, num_stages)}
    o, lse = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, n_chunks * S),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name=f"scoremod_paged_{pages_per_step=}_{num_splits=}",
        **extra,
    )(q_rows, k_pages, v_pages, logical, physical, counts, lengths, *reads)
    return (o.reshape(batch, num_kv_heads, n_chunks, S, out_rows, head_dim),
            lse.reshape(batch, num_kv_heads, n_chunks, S, out_rows))


def combine_splits(o, lse):
    """Log-sum-exp merge over the split axis (the one before the rows):
    ([..., S, R, H], [..., S, R]) -> ([..., R, H], [..., R])."""
    m = jnp.max(lse, axis=-2, keepdims=True)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    w = jnp.exp(lse - m_safe)                                    # 0 for empty splits
    denom = jnp.sum(w, axis=-2)
    seen = denom != 0
    out = jnp.sum(w[..., None] * o, axis=-3) / jnp.where(seen, denom, 1.0)[..., None]
    lse_out = jnp.where(seen, jnp.squeeze(m_safe, -2) + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
    return out, lse_out


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_power_of_2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0

