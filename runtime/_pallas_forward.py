"""Forward block-sparse flash-attention kernel (Pallas, Triton lowering or interpret mode).

Grid ``(nq, B, N)``: one program per (q-block, batch, query head), heaviest q-blocks
launched first. Each program walks its q-block's non-empty kv-blocks from the BlockPlan,
loading K/V blocks by dynamic index and keeping an online softmax in f32 (base 2). FULL
tiles skip the mask; PARTIAL tiles (and ragged last blocks) evaluate it. Either one loop
over a merged list with a per-tile branch (``fwd_one_loop``) or two branch-free loops
(FULL list, then PARTIAL list). Writes ``out [B, T, N, H]`` and ``lse [B, N, T]``
(natural log; ``-inf`` on rows with no allowed key, whose output is 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scoremod.runtime._triton import compiler_params
from scoremod.runtime._pallas_common import (
    LN2, KernelConfig, ReadSet, dot, exp2, fixed_reads, listed_span, load_rows, offset_and_plan_specs,
    read_specs, span, store, tile_logits2, tile_reads)
from scoremod.runtime.softmax_numerics import at_most_zero, exponent_reference


def _forward_kernel(qoff_ref, kvoff_ref, fcount_ref, fidx_ref, pcount_ref, pidx_ref, q_ref, k_ref,
                    v_ref, *refs, cfg: KernelConfig, read_set: ReadSet):
    read_refs = refs[:read_set.n]
    o_ref, lse_ref = refs[read_set.n:read_set.n + 2]
    debug_ref = refs[read_set.n + 2] if cfg.debug_counts else None

    bq, bkv = cfg.blocks.block_q, cfg.blocks.block_kv
    hp = cfg.head_dim_padded

    i = pl.num_programs(0) - 1 - pl.program_id(0)   # heaviest (last) q-blocks first
    b = pl.program_id(1)
    h = pl.program_id(2)

    q_start = i * bq
    rows = span(cfg, q_start, bq, cfg.q_len)
    q_valid = rows.valid
    q = load_rows(q_ref, rows)

    q_pos = (qoff_ref[b] + rows.index)[:, None]
    kv_base = kvoff_ref[b]
    fixed = fixed_reads(read_set, read_refs, q_start=q_start, block_q=bq, q_valid=q_valid)
    fast = not cfg.interpret

    def make_body(is_full):
        # is_full: True / False for the FULL / PARTIAL list; None for one merged list
        # (``PallasBlockSizes.fwd_one_loop``, each tile branches).
        def body(j, carry):
            acc, m_prev, l_prev = carry
            cols, full = listed_span(cfg, fidx_ref, pidx_ref, is_full, j, bkv, cfg.kv_len)
            kv_start = cols.start
            kv_valid = cols.valid
            k = load_rows(k_ref.at[pl.ds(kv_start, bkv), :], cols)
            s = dot(q, k, trans_b=True)
            kv_pos = (kv_base + cols.index)[None, :]

            def reads(which):
                return tile_reads(read_set, read_refs, q_start=q_start, block_q=bq,
                                  q_valid=q_valid, kv_start=kv_start, block_kv=bkv,
                                  kv_valid=kv_valid, fixed=fixed, which=which)

            logits = tile_logits2(cfg, s, full=full, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos,
                                  valid=None if kv_valid is None else kv_valid[None, :],
                                  reads_values=lambda: reads("values"),
                                  reads_all=lambda: reads("all"))

            m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1))
            ref = exponent_reference(m_new)   # m_new below logits of about 5e8 (softmax_numerics)
            if is_full is True and cfg.base2:
                m_safe = ref   # a FULL tile of a mask-only mod has finite logits
            else:
                m_safe = jnp.where(ref == -jnp.inf, 0.0, ref)
            alpha = exp2(at_most_zero(exponent_reference(m_prev) - m_safe), fast=fast)
            p = exp2(at_most_zero(logits - m_safe[:, None]), fast=fast)
            l_new = l_prev * alpha + jnp.sum(p, axis=1)
            v = load_rows(v_ref.at[pl.ds(kv_start, bkv), :], cols)
            acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
            return acc, m_new, l_new
        return body

    carry = (jnp.zeros((bq, hp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    if cfg.blocks.fwd_one_loop:
        n_full, n_part = fcount_ref[i], 0
        acc, m, l = lax.fori_loop(0, n_full, make_body(None), carry)
    else:
        n_full = fcount_ref[i]
        n_part = pcount_ref[i]
        carry = lax.fori_loop(0, n_full, make_body(True), carry)
        acc, m, l = lax.fori_loop(0, n_part, make_body(False), carry)

    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[:, None]
    lse = jnp.where(empty, -jnp.inf, (exponent_reference(m) + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)
    store(o_ref, out.astype(o_ref.dtype), mask=rows.mask)
    store(lse_ref, lse, mask=q_valid)
    if debug_ref is not None:
        debug_ref[0] = n_full + n_part
        debug_ref[1] = n_part


def forward(cfg: KernelConfig, q, k, v, plan_arrays, reads, q_off, kv_off):
    """Run the forward kernel. Returns (out [B,T,N,H], lse f32[B,N,T][, debug int32[B,N,nq,2]]).

    plan_arrays: (full_counts, full_indices, partial_counts, partial_indices): the q-major
    plan of (block_q, block_kv) split into FULL and PARTIAL lists (``split_lists``).
    """
    fcounts, findices, pcounts, pindices = plan_arrays
    B, T, N, H = q.shape
    G = cfg.groups
    hp = cfg.head_dim_padded
    nq = pl.cdiv(T, cfg.blocks.block_q)
    read_set = ReadSet(cfg.program, cfg.read_shapes)

    def grid_fn(i, b, h):
        return b, h, nq - 1 - i

    in_specs = [
        *offset_and_plan_specs(B, (fcounts, findices, pcounts, pindices), grid_fn),
        pl.BlockSpec((None, cfg.blocks.block_q, None, hp), lambda i, b, h: (b, nq - 1 - i, h, 0)),
        pl.BlockSpec((None, cfg.kv_len, None, hp), lambda i, b, h: (b, 0, h // G, 0)),
        pl.BlockSpec((None, cfg.kv_len, None, hp), lambda i, b, h: (b, 0, h // G, 0)),
    ] + read_specs(cfg, grid_fn)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, N, T), jnp.float32)]
    out_specs = [pl.BlockSpec((None, cfg.blocks.block_q, None, hp), lambda i, b, h: (b, nq - 1 - i, h, 0)),
                 pl.BlockSpec((None, None, cfg.blocks.block_q), lambda i, b, h: (b, h, nq - 1 - i))]
    if cfg.debug_counts:
        out_shape.append(jax.ShapeDtypeStruct((B, N, nq, 2), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, None, 2), lambda i, b, h: (b, h, nq - 1 - i, 0)))

    kernel = functools.partial(_forward_kernel, cfg=cfg, read_set=read_set)
    outs = pl.pallas_call(
        kernel,
        grid=(nq, B, N),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if cfg.interpret else compiler_params(cfg.blocks.num_warps, cfg.blocks.num_stages),
        interpret=cfg.interpret,
        name="scoremod_flash_forward",
    )(q_off, kv_off, fcounts, findices, pcounts, pindices, q, k, v, *reads)
    return tuple(outs)
