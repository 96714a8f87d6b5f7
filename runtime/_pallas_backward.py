"""Backward block-sparse flash-attention kernels (Pallas, Triton lowering or interpret).

Two kernels, each visiting only the tiles its plan lists:

* dQ, grid ``(nq, B, N)``: walks a q-block's kv lists (the q-major plan).
* dK/dV, grid ``(nk, B, N)``: walks a kv-block's q lists (the transposed plan).

Each plan row arrives split into a FULL and a PARTIAL list (``split_lists``): a
branch-free loop over FULL tiles (no mask evaluation), then one over PARTIAL tiles. One program per *query* head; with GQA (N > K) each writes its
  head's share in f32 and the caller sums the G heads of a group.

With ``p = exp(logit - lse)``, ``dP = dO V^T`` and ``delta = rowsum(O * dO) - dlse``:
``dlogit = p (dP - delta)``, ``dscore = dlogit * T'(score)`` (TileProgram.dscore),
``dQ = scale dscore K``, ``dK = scale dscore^T Q``, ``dV = p^T dO``. Masked entries have
``p = 0``; ``T'`` is only used where ``p > 0`` so a transform undefined off the mask
cannot leak NaN. Rows with lse = -inf (nothing allowed) get p = 0 and zero gradients.

Float tensor reads being differentiated (``read_grads``: indices into the program's
reads) get ``dread = sum(dlogit * d(T + B)/dread)`` over the logits with p > 0
(``TileProgram.dread``), per query head and batch, as per-program partial sums the
caller reduces (no atomics: deterministic): the dQ kernel sums a read that does not
depend on kv along its kv loop (``[B, N, T]`` out) and writes each tile of a read that
depends on both q and kv (``[B, N, T, S]`` out, zero where no tile is listed); the dK/dV
kernel sums a read that depends on kv only along its q loop (``[B, N, S]`` out). A table
read at computed indices (a gather: ``relpos(t, m)``, ``t[h, bucket(q - kv)]``) gets its
gradient in the dQ kernel, scattered to the offsets the tile read within the table slice its
program reads (``TileProgram.gather_offsets``; row h of a relpos table) into a
per-program accumulator the size of that slice (``[B, N, nq, Mp]`` out; ``_scatter_add``:
one masked tile sum per offset in the tile's range, no atomics); ``reduce_table_grad``
adds the slices up into the table. ``reduce_read_grad`` brings the others to the read's
materialized shape.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scoremod.runtime._triton import compiler_params
from scoremod.runtime._pallas_common import (
    LOG2E, KernelConfig, ReadSet, dot, dread, exp2, dscore, fixed_reads, listed_span, load_row_stats,
    load_rows, offset_and_plan_specs, read_specs, span, store, tile_logits2, tile_valid, values_and_all_reads)
from scoremod.runtime.softmax_numerics import at_most_zero


def _safe_lse2(lse):
    # lse = -inf only on rows whose logits are all -inf; 0 there makes p = exp2(-inf) = 0.
    return jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E)


def _ds(cfg, dlogit, p, s, *, b, h, q_pos, kv_pos, reads):
    dT = dscore(cfg, s, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos, reads=reads)
    if dT is None:
        return dlogit
    return jnp.where(p > 0.0, dlogit * dT, 0.0)


def _read_grad_tiles(cfg, read_grads, dlogit, p, s, *, b, h, q_pos, kv_pos, reads):
    """Each differentiated read's ``dlogit * d(T + B)/dread`` on the tile, 0 where p = 0
    (masked, padding, rows without keys: the derivative may be inf or NaN there)."""
    return [jnp.where(p > 0.0, dlogit * dread(cfg, i, s, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos, reads=reads), 0.0)
            for i in read_grads]


def _tile_read(cfg, i) -> bool:
    """Whether plain read i depends on both q and kv (its gradient is written tile by tile)."""
    if cfg.program.reads[i].gather:
        return False
    _, _, t1, s1 = cfg.read_shapes[i]
    return t1 > 1 and s1 > 1


def table_slice_size(cfg: KernelConfig, i: int) -> int:
    """Elements of the slice of gather read i's table that one kernel program reads (the
    axes after its ``fixed_axes``: 2m + 1 for ``relpos(t, m)`` with t ``[N, 2m + 1]``)."""
    return math.prod(cfg.read_shapes[i][cfg.program.reads[i].fixed_axes:])


def gather_grad_size(cfg: KernelConfig, i: int) -> int:
    """Length of the dQ kernel's per-program accumulator for gather read i: its table
    slice rounded up to a power of two (a Triton block), at least 16."""
    return max(16, pl.next_power_of_2(table_slice_size(cfg, i)))


def _scatter_add(acc, grad, offsets):
    """``acc[offsets] += grad`` for one tile, deterministically: one masked tile sum per
    offset between the smallest and largest offset where ``grad != 0`` (a T5 bucket
    table spans a few per tile, ``relpos(t, m)`` up to bq + bkv - 1 on tiles near the
    diagonal, 1 on tiles it clips)."""
    live = grad != 0.0
    lo = jnp.min(jnp.where(live, offsets, acc.shape[0]))
    hi = jnp.max(jnp.where(live, offsets, -1))
    slots = lax.broadcasted_iota(jnp.int32, acc.shape, 0)

    def add(m, acc):
        return acc + jnp.where(slots == m, jnp.sum(jnp.where(offsets == m, grad, 0.0)), 0.0)
    return lax.fori_loop(lo, hi + 1, add, acc)


def reduce_read_grad(cfg: KernelConfig, i: int, grad):
    """A read's gradient from the kernels' per-query-head output (``[B, N, T]``,
    ``[B, N, S]`` or ``[B, N, T, S]``, see the module docstring) to the read's
    materialized shape ``[B|1, N|1, T|1, S|1]`` (a gather read's: ``reduce_table_grad``)."""
    b1, h1, t1, s1 = cfg.read_shapes[i]
    B, N, T, S = cfg.batch, cfg.heads, cfg.q_len, cfg.kv_len
    if grad.ndim == 3:
        grad = grad.reshape(B, N, 1, S) if (t1 == 1 and s1 > 1) else grad.reshape(B, N, T, 1)
    if t1 == 1 and grad.shape[2] > 1:
        grad = grad.sum(axis=2, keepdims=True)
    if h1 == 1:
        grad = grad.sum(axis=1, keepdims=True)
    if b1 == 1:
        grad = grad.sum(axis=0, keepdims=True)
    return grad


def reduce_table_grad(cfg: KernelConfig, i: int, grad, slices):
    """Gather read i's gradient, its flattened table (``flat_reads``), from the dQ
    kernel's per-program sums ``[B, N, nq, Mp]`` over the table slice each program reads
    (``slices`` int32 ``[B, N]``, ``TileProgram.gather_slices``): programs that read the
    same slice add up, through a one-hot product (no scatter: deterministic)."""
    size = table_slice_size(cfg, i)
    rows = grad.sum(axis=2)[..., :size]                                  # [B, N, size]
    count = math.prod(cfg.read_shapes[i]) // size
    onehot = (slices[..., None] == jnp.arange(count, dtype=jnp.int32)).astype(jnp.float32)
    table = jnp.einsum("bnr,bns->rs", onehot, rows, precision=lax.Precision.HIGHEST)
    return table.reshape(-1)


# ---- dQ ---------------------------------------------------------------------------------

def _dq_kernel(qoff_ref, kvoff_ref, fcount_ref, fidx_ref, pcount_ref, pidx_ref, q_ref, k_ref,
               v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: KernelConfig, read_set: ReadSet,
               read_grads: tuple):
    read_refs = refs[:read_set.n]
    tiled = [i for i in read_grads if _tile_read(cfg, i)]
    dq_ref, *dread_refs = refs[read_set.n + len(tiled):]   # (the tiled reads' zeros come aliased)
    bq, bkv = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
    hp = cfg.head_dim_padded

    i = pl.num_programs(0) - 1 - pl.program_id(0)   # heaviest (last) q-blocks first
    b, h = pl.program_id(1), pl.program_id(2)
    q_start = i * bq
    rows = span(cfg, q_start, bq, cfg.q_len)
    q_valid = rows.valid
    q = load_rows(q_ref, rows)
    do = load_rows(do_ref, rows)
    lse2 = _safe_lse2(load_row_stats(lse_ref, rows))
    delta = load_row_stats(delta_ref, rows)
    q_pos = (qoff_ref[b] + rows.index)[:, None]
    kv_base = kvoff_ref[b]
    fixed = fixed_reads(read_set, read_refs, q_start=q_start, block_q=bq, q_valid=q_valid)

    def make_body(is_full):
        # True / False: the FULL / PARTIAL list; None: one merged list (fidx_ref: blocks,
        # pidx_ref: their FULL flags) with a per-tile branch (PallasBlockSizes.bwd_one_loop).
        def body(j, carry):
            dq, sums = carry
            cols, full = listed_span(cfg, fidx_ref, pidx_ref, is_full, j, bkv, cfg.kv_len)
            kv_start = cols.start
            kv_valid = cols.valid
            k = load_rows(k_ref.at[pl.ds(kv_start, bkv), :], cols)
            v = load_rows(v_ref.at[pl.ds(kv_start, bkv), :], cols)
            kv_pos = (kv_base + cols.index)[None, :]
            s = dot(q, k, trans_b=True)
            rv, reads_all = values_and_all_reads(read_set, read_refs, q_start=q_start, block_q=bq,
                                                 q_valid=q_valid, kv_start=kv_start, block_kv=bkv,
                                                 kv_valid=kv_valid, fixed=fixed)

            logits = tile_logits2(cfg, s, full=full, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos,
                                  valid=None if kv_valid is None else kv_valid[None, :],
                                  reads_values=lambda: rv, reads_all=reads_all)
            p = exp2(at_most_zero(logits - lse2[:, None]), fast=not cfg.interpret)
            dp = dot(do, v, trans_b=True)
            dlogit = p * (dp - delta[:, None])
            ds = _ds(cfg, dlogit, p, s, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos, reads=rv)
            grads = _read_grad_tiles(cfg, read_grads, dlogit, p, s, b=b, h=h, q_pos=q_pos,
                                     kv_pos=kv_pos, reads=rv)
            new_sums = []
            for n, (r, g) in enumerate(zip(read_grads, grads)):
                if cfg.program.reads[r].gather:
                    offsets = cfg.program.gather_offsets(r, b=b, h=h, q=q_pos, kv=kv_pos, reads=rv)
                    new_sums.append(_scatter_add(sums[n], g, offsets))
                elif _tile_read(cfg, r):
                    valid = tile_valid(rows, cols)
                    store(dread_refs[n].at[:, pl.ds(kv_start, bkv)], g,
                          mask=None if valid is None else jnp.broadcast_to(valid, g.shape))
                    new_sums.append(sums[n])
                else:
                    new_sums.append(sums[n] + jnp.sum(g, axis=1))
            return dq + dot(ds.astype(k.dtype), k), tuple(new_sums)
        return body

    carry = (jnp.zeros((bq, hp), jnp.float32),
             tuple(jnp.zeros((gather_grad_size(cfg, r) if cfg.program.reads[r].gather else bq,), jnp.float32)
                   for r in read_grads))
    if cfg.blocks.bwd_one_loop:
        carry = lax.fori_loop(0, fcount_ref[i], make_body(None), carry)
    else:
        carry = lax.fori_loop(0, fcount_ref[i], make_body(True), carry)
        carry = lax.fori_loop(0, pcount_ref[i], make_body(False), carry)
    dq, sums = carry
    store(dq_ref, (dq * cfg.scale).astype(dq_ref.dtype), mask=rows.mask)
    for n, r in enumerate(read_grads):
        if cfg.program.reads[r].gather:
            store(dread_refs[n], sums[n])
        elif not _tile_read(cfg, r):
            store(dread_refs[n], sums[n], mask=rows.valid)


def backward_dq(cfg: KernelConfig, q, k, v, do, lse, delta, plan_arrays, reads, q_off, kv_off, *,
                read_grads: tuple = ()):
    """(dQ in q's dtype, the gradients of the reads ``read_grads`` names, each in its
    materialized shape). plan_arrays: the split q-major lists of (block_q_dq, block_kv_dq)."""
    fcounts, findices, pcounts, pindices = plan_arrays
    B, T, N, H = q.shape
    S = k.shape[1]
    G = cfg.groups
    hp = cfg.head_dim_padded
    bq = cfg.blocks.block_q_dq
    nq = pl.cdiv(T, bq)
    read_set = ReadSet(cfg.program, cfg.read_shapes)

    def grid_fn(i, b, h):
        return b, h, nq - 1 - i

    q_spec = pl.BlockSpec((None, bq, None, hp), lambda i, b, h: (b, nq - 1 - i, h, 0))
    kv_spec = pl.BlockSpec((None, cfg.kv_len, None, hp), lambda i, b, h: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i))
    in_specs = [
        *offset_and_plan_specs(B, (fcounts, findices, pcounts, pindices), grid_fn),
        q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
    ] + read_specs(cfg, grid_fn)
    # Read gradients, per (b, query head): row sums [B, N, T]; tiles of [T, S] reads into
    # [B, N, T, S] zeros (aliased in: tiles no list names stay 0); a gather read's table
    # gradient per program, [B, N, nq, Mp].
    tile_spec = pl.BlockSpec((None, None, bq, S), lambda i, b, h: (b, h, nq - 1 - i, 0))
    tiled = [r for r in read_grads if _tile_read(cfg, r)]
    zeros = [jnp.zeros((B, N, T, S), jnp.float32) for _ in tiled]

    def grad_spec_and_shape(r):
        if cfg.program.reads[r].gather:
            mp = gather_grad_size(cfg, r)
            return (pl.BlockSpec((None, None, None, mp), lambda i, b, h: (b, h, nq - 1 - i, 0)),
                    jax.ShapeDtypeStruct((B, N, nq, mp), jnp.float32))
        if _tile_read(cfg, r):
            return tile_spec, jax.ShapeDtypeStruct((B, N, T, S), jnp.float32)
        return row_spec, jax.ShapeDtypeStruct((B, N, T), jnp.float32)

    grad_outs = [grad_spec_and_shape(r) for r in read_grads]
    out_specs = [q_spec] + [spec for spec, _ in grad_outs]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)] + [shape for _, shape in grad_outs]
    first_zero = len(in_specs)
    aliases = {first_zero + n: 1 + read_grads.index(r) for n, r in enumerate(tiled)}
    kernel = functools.partial(_dq_kernel, cfg=cfg, read_set=read_set, read_grads=tuple(read_grads))
    dq, *dreads = pl.pallas_call(
        kernel,
        grid=(nq, B, N),
        in_specs=in_specs + [tile_spec] * len(tiled),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=None if cfg.interpret else compiler_params(cfg.blocks.num_warps_bwd,
                                                                   cfg.blocks.num_stages_bwd),
        interpret=cfg.interpret,
        name="scoremod_flash_dq",
    )(q_off, kv_off, fcounts, findices, pcounts, pindices, q, k, v, do, lse, delta, *reads, *zeros)
    return dq, [reduce_table_grad(cfg, r, g, cfg.program.gather_slices(r, reads, cfg.read_shapes, B, N))
                if cfg.program.reads[r].gather else reduce_read_grad(cfg, r, g)
                for r, g in zip(read_grads, dreads)]


# ---- dK / dV ----------------------------------------------------------------------------

def _dkv_kernel(qoff_ref, kvoff_ref, fcount_ref, fidx_ref, pcount_ref, pidx_ref, q_ref, k_ref,
                v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: KernelConfig, read_set: ReadSet,
                read_grads: tuple):
    read_refs = refs[:read_set.n]
    dk_ref, dv_ref, *dread_refs = refs[read_set.n:]
    bq, bkv = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
    hp = cfg.head_dim_padded

    kb, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_start = kb * bkv
    cols = span(cfg, kv_start, bkv, cfg.kv_len)
    kv_valid = cols.valid
    k = load_rows(k_ref, cols)
    v = load_rows(v_ref, cols)
    kv_pos = (kvoff_ref[b] + cols.index)[None, :]
    q_base = qoff_ref[b]
    fixed = fixed_reads(read_set, read_refs, q_start=0, block_q=1, q_valid=None,
                        kv_start=kv_start, block_kv=bkv, kv_valid=kv_valid, kv_fixed=True)

    def make_body(is_full):
        def body(j, carry):
            dk, dv, sums = carry
            # FULL lists hold neither the ragged last q-block nor any tile of a ragged last
            # kv-block (the wrapper moves those to the PARTIAL lists).
            rows, full = listed_span(cfg, fidx_ref, pidx_ref, is_full, j, bq, cfg.q_len)
            q_start = rows.start
            q_valid = rows.valid
            q = load_rows(q_ref.at[pl.ds(q_start, bq), :], rows)
            do = load_rows(do_ref.at[pl.ds(q_start, bq), :], rows)
            lse2 = _safe_lse2(load_row_stats(lse_ref.at[pl.ds(q_start, bq)], rows))
            delta = load_row_stats(delta_ref.at[pl.ds(q_start, bq)], rows)
            q_pos = (q_base + rows.index)[:, None]
            s = dot(q, k, trans_b=True)
            rv, reads_all = values_and_all_reads(read_set, read_refs, q_start=q_start, block_q=bq,
                                                 q_valid=q_valid, kv_start=kv_start, block_kv=bkv,
                                                 kv_valid=kv_valid, fixed=fixed)

            valid = None if is_full is True else tile_valid(rows, cols)
            logits = tile_logits2(cfg, s, full=full, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos,
                                  valid=valid, reads_values=lambda: rv, reads_all=reads_all)
            p = exp2(at_most_zero(logits - lse2[:, None]), fast=not cfg.interpret)
            dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
            dp = dot(do, v, trans_b=True)
            dlogit = p * (dp - delta[:, None])
            ds = _ds(cfg, dlogit, p, s, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos, reads=rv)
            dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
            grads = _read_grad_tiles(cfg, read_grads, dlogit, p, s, b=b, h=h, q_pos=q_pos,
                                     kv_pos=kv_pos, reads=rv)
            return dk, dv, tuple(acc + jnp.sum(g, axis=0) for acc, g in zip(sums, grads))
        return body

    zeros = jnp.zeros((bkv, hp), jnp.float32)
    carry = (zeros, zeros, tuple(jnp.zeros((bkv,), jnp.float32) for _ in read_grads))
    if cfg.blocks.bwd_one_loop:
        carry = lax.fori_loop(0, fcount_ref[kb], make_body(None), carry)
    else:
        carry = lax.fori_loop(0, fcount_ref[kb], make_body(True), carry)
        carry = lax.fori_loop(0, pcount_ref[kb], make_body(False), carry)
    dk, dv, sums = carry
    store(dk_ref, (dk * cfg.scale).astype(dk_ref.dtype), mask=cols.mask)
    store(dv_ref, dv.astype(dv_ref.dtype), mask=cols.mask)
    for ref, acc in zip(dread_refs, sums):
        store(ref, acc, mask=cols.valid)


def backward_dkv(cfg: KernelConfig, q, k, v, do, lse, delta, plan_arrays, reads, q_off, kv_off, *,
                 read_grads: tuple = ()):
    """(dK, dV in k's dtype, the gradients of the reads ``read_grads`` names: reads that
    depend on kv and not on q, each in its materialized shape). plan_arrays: the split
    kv-major (transposed) lists."""
    fcounts, findices, pcounts, pindices = plan_arrays
    B, T, N, H = q.shape
    S = k.shape[1]
    G = cfg.groups
    hp = cfg.head_dim_padded
    bkv = cfg.blocks.block_kv_dkv
    nk = pl.cdiv(S, bkv)
    read_set = ReadSet(cfg.program, cfg.read_shapes)

    def grid_fn(kb, b, h):
        return b, h, kb

    q_spec = pl.BlockSpec((None, T, None, hp), lambda kb, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bkv, None, hp), lambda kb, b, h: (b, kb, h // G, 0))
    row_spec = pl.BlockSpec((None, None, T), lambda kb, b, h: (b, h, 0))
    in_specs = [
        *offset_and_plan_specs(B, (fcounts, findices, pcounts, pindices), grid_fn),
        q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
    ] + read_specs(cfg, grid_fn)
    if G == 1:
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    else:  # one share per query head, summed over the group below
        out_shape = [jax.ShapeDtypeStruct((B, S, N, H), jnp.float32)] * 2
    out_spec = pl.BlockSpec((None, bkv, None, hp), lambda kb, b, h: (b, kb, h, 0))
    col_spec = pl.BlockSpec((None, None, bkv), lambda kb, b, h: (b, h, kb))
    kernel = functools.partial(_dkv_kernel, cfg=cfg, read_set=read_set, read_grads=tuple(read_grads))
    dk, dv, *dreads = pl.pallas_call(
        kernel,
        grid=(nk, B, N),
        in_specs=in_specs,
        out_specs=[out_spec, out_spec] + [col_spec] * len(read_grads),
        out_shape=out_shape + [jax.ShapeDtypeStruct((B, N, S), jnp.float32)] * len(read_grads),
        compiler_params=None if cfg.interpret else compiler_params(cfg.blocks.num_warps_bwd,
                                                                   cfg.blocks.num_stages_bwd),
        interpret=cfg.interpret,
        name="scoremod_flash_dkv",
    )(q_off, kv_off, fcounts, findices, pcounts, pindices, q, k, v, do, lse, delta, *reads)
    if G > 1:
        K = cfg.kv_heads
        dk = dk.reshape(B, S, K, G, H).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(B, S, K, G, H).sum(axis=3).astype(v.dtype)
    return dk, dv, [reduce_read_grad(cfg, r, g) for r, g in zip(read_grads, dreads)]
