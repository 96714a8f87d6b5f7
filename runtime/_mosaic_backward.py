"""Backward block-sparse flash-attention kernels on Mosaic GPU (Hopper, sm_90).

Two kernels, each walking only the tiles the BlockPlan lists, with the forward's layout
(a producer warpgroup feeding two consumer warpgroups through a TMA ring of
``num_stages`` shared-memory slots; wgmma for every product):

* dQ, tiles ``(batch, query head, q-block of 2 * block_q rows)``: each consumer owns
  ``block_q`` rows (Q, dO, lse, delta stay in shared memory / registers); the producer
  brings the K and V tiles of the q-block's row of the plan (FULL list, then PARTIAL).
  Per tile: S = Q K^T, P = exp2(logits2 - lse2), dP = dO V^T, dS = P (dP - delta) dT,
  dQ += dS K. At the end dQ *= scale.
* dK/dV, tiles ``(batch, kv head, kv-block of 2 * block_kv keys)``: each consumer owns
  ``block_kv`` keys (K, V in shared memory); for every query head of the kv head's group
  (GQA sums in registers, no ``[B, S, N, H]`` temporary) the producer brings the Q, dO,
  lse and delta tiles of the q-blocks the transposed plan lists for the kv-block.
  Per tile, transposed (keys as rows): S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T,
  dS^T = P^T (dP^T - delta) dT, dK += dS^T Q. At the end dK *= scale.

Both kernels take their tiles as the forward does (``_mosaic_forward.tile_order``: heaviest
first, dealt in snake order to ``dq_ctas`` / ``dkv_ctas`` CUDA blocks, persistent when that
is the SM count): the K/V (Q/dO) ring runs on across tiles, and each consumer brings its
next tile's own operands while it writes the finished one through separate buffers.

``lse2`` is the forward's lse in base 2 (0 on rows with no allowed key, whose logits are
all -inf, so P = 0 there); ``delta = rowsum(O * dO) - dlse``. Inputs are padded to whole
blocks by the wrapper (K/V and Q/dO with zeros, lse2 with +inf, delta with 0), so padding
contributes nothing; PARTIAL tiles also mask positions past the true lengths.

dT/dscore comes from the TileProgram (``TileProgram.dscore``); tensor reads are loaded at
the tile's positions. The dK/dV kernel reads a tensor indexed by both q and kv only as a
transposed tile, which it does not do: ``backward_reason`` declines those mods (the
wrapper then runs the Pallas backward).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scoremod.runtime._mosaic_forward import (
    MosaicKernelConfig, _load, _logits2, _read_tile, launch, listed_block, local_tile_count, plan_row,
    plgpu, row_step_counts, row_steps, scheduled_tile, split_tile, tile_smem)
from scoremod.runtime.softmax_numerics import at_most_zero

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class MosaicBackwardConfig:
    """Everything static about one backward call (hashable)."""
    fwd: MosaicKernelConfig       # the forward's call: program, scale, lengths, heads, reads
    block_q: int                  # rows per consumer warpgroup (64, the wgmma M)
    block_kv: int                 # keys per consumer warpgroup in dK/dV; keys per tile in dQ
    num_stages: int
    dq_plan: tuple[int, int]      # (B', H') of the dQ plan (blocks 2 * block_q x block_kv)
    dkv_plan: tuple[int, int]     # (B', H') of the dK/dV plan (blocks block_q x 2 * block_kv)
    dq_ctas: int                  # CUDA blocks of dQ (<= its tiles; the SM count when persistent)
    dkv_ctas: int                 # CUDA blocks of dK/dV


def backward_reason(program) -> str | None:
    """Why the Mosaic backward cannot run this tile program (None when it can)."""
    for r in program.reads:
        if "q" in r.axes and "kv" in r.axes:
            return (f"tensor read {r.node} varies along q and kv; the Mosaic dK/dV kernel reads "
                    "tiles transposed and takes only reads along one of them")
    return None


def read_grad_kernel(program, i: int) -> str | None:
    """Which Mosaic backward kernel gives float read i its gradient: "dq" for reads that do
    not depend on kv (``s[h]``, ``c[b, h]``, ``u[q]``: summed along its kv loop), "dkv" for
    reads along kv only (``w[kv]``, ``x[h, kv]``: summed along its q loop), None for reads
    along both (``backward_reason`` sends those mods to the Pallas backward) or gathers."""
    read = program.reads[i]
    if read.gather or ("q" in read.axes and "kv" in read.axes):
        return None
    return "dkv" if "kv" in read.axes else "dq"


def _grad_tile(cfg: MosaicKernelConfig, s, dp, lse2, delta, *, partial, b, h, q_pos, kv_pos, reads,
               stat_dim: int):
    """(P, dlogit, dS) of a tile from raw products ``s`` and ``dp`` (f32, WGMMA layout).

    ``stat_dim``: the tile axis the per-query ``lse2``/``delta`` run along: 0 in dQ (queries
    as rows), 1 in dK/dV (the tile is transposed, keys as rows)."""
    shape = s.shape
    logits = _logits2(cfg, s, partial=partial, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos, reads=reads)
    p = jnp.exp2(at_most_zero(logits - lax.broadcast_in_dim(lse2, shape, [stat_dim])))
    dlogit = p * (dp - lax.broadcast_in_dim(delta, shape, [stat_dim]))
    ds = dlogit
    if cfg.program.dtransform is not None:
        # Where p = 0 (masked) the product is 0 even if dT/dscore is not finite there.
        dT = cfg.program.dscore(s * cfg.scale, b=b, h=h, q=q_pos, kv=kv_pos, reads=reads())
        ds = jnp.where(p > 0.0, ds * dT, 0.0)
    return p, dlogit, ds


def backward_dq(bcfg: MosaicBackwardConfig, q, k, v, do, lse2, delta, lists, order, reads, q_off, kv_off,
                read_grads: tuple = ()):
    """(dQ ``[B, Tp, N, H]`` in q's dtype, [the gradient of each read ``read_grads`` names,
    f32 ``[B, N, Tp]``]) on padded inputs; ``lists``: the dQ plan's ``split_lists`` (FULL,
    PARTIAL) of (2 * block_q, block_kv) blocks; ``order``: its tiles (b, h, q-block)
    heaviest first (``tile_order``), dealt to ``dq_ctas`` CUDA blocks. ``read_grads``:
    reads that do not depend on kv (``read_grad_kernel``): each query row's sum over its
    keys of ``dL/dlogit * d(T + B)/dread`` where p > 0, per query head (the caller sums
    over what the read does not index)."""
    cfg = bcfg.fwd
    fcounts, findices, pcounts, pindices = lists
    B, Tp, N, H = q.shape
    dtype = q.dtype
    bq, bkv, stages = bcfg.block_q, bcfg.block_kv, bcfg.num_stages
    n_reads = len(reads)
    G = cfg.groups
    nq = Tp // (2 * bq)
    kv_valid_len = cfg.kv_len
    n_tiles, ctas = B * N * nq, bcfg.dq_ctas

    def kernel(qoff_ref, kvoff_ref, order_ref, fc_ref, fi_ref, pc_ref, pi_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, *rest):
        read_refs = rest[:n_reads]
        dq_ref, *dread_refs = rest[n_reads:n_reads + 1 + len(read_grads)]
        (q_smem2, do_smem2, dq_smem2, lse_smem2, delta_smem2, k_smem, v_smem, *dread_smems2), \
            (q_bar, do_bar, lse_bar, delta_bar, k_bar, v_bar), (k_free, v_free) = rest[n_reads + 1 + len(read_grads):]
        cta = lax.axis_index("cta")
        wg = lax.axis_index("wg")
        n_local = local_tile_count(n_tiles, ctas, cta)

        def tile_at(j):
            b, h, i = split_tile(scheduled_tile(order_ref, ctas, cta, j), N, nq)
            row = plan_row(bcfg.dq_plan, b, h, i)
            return (b, h, i, row, *row_steps(fc_ref, pc_ref, row))

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_smem, do_smem, dq_smem = q_smem2.at[wg], do_smem2.at[wg], dq_smem2.at[wg]
            lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
            rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
            cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)

            def fetch_rows(j):
                """Q, dO, lse2 and delta of the consumer's rows of its j-th tile."""
                b, h, i = split_tile(scheduled_tile(order_ref, ctas, cta, j), N, nq)
                rows_q = pl.ds(i * (2 * bq) + wg * bq, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows_q, h], q_smem, q_bar.at[wg])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows_q, h], do_smem, do_bar.at[wg])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows_q], lse_smem, lse_bar.at[wg])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows_q], delta_smem, delta_bar.at[wg])

            pl.when(n_local > 0)(lambda: fetch_rows(0))

            def run_tile(j, step0):
                b, h, i, row, n_full, n_steps = tile_at(j)
                q_start = i * (2 * bq) + wg * bq
                q_base = qoff_ref[b] + q_start
                kv_base = kvoff_ref[b]
                for bar in (q_bar, do_bar, lse_bar, delta_bar):
                    plgpu.barrier_wait(bar.at[wg])
                lse2 = _load(lse_smem, plgpu.Layout.WGMMA.reduce(1))
                delta = _load(delta_smem, plgpu.Layout.WGMMA.reduce(1))
                dq = plgpu.layout_cast(jnp.full((bq, H), 0.0, jnp.float32), plgpu.Layout.WGMMA)

                def step_fn(step, carry, *, partial):
                    dq, sums = carry
                    slot = lax.rem(step0 + step, stages)
                    kv_start = listed_block(fi_ref, pi_ref, row, n_full, step) * bkv
                    plgpu.barrier_wait(k_bar.at[slot])

                    def s_scope(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                        return acc_ref[...]
                    s = pl.run_scoped(s_scope, plgpu.ACC((bq, bkv), jnp.float32))
                    plgpu.barrier_wait(v_bar.at[slot])

                    def dp_scope(acc_ref):
                        plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].T)
                        return acc_ref[...]
                    dp = pl.run_scoped(dp_scope, plgpu.ACC((bq, bkv), jnp.float32))
                    plgpu.barrier_arrive(v_free.at[slot])

                    def tile_reads():
                        return [_read_tile(r, shp, b=b, h=h, q_start=q_start, block_q=bq,
                                           kv_start=kv_start, block_kv=bkv)
                                for r, shp in zip(read_refs, cfg.read_shapes)]
                    q_pos = rows + q_base
                    kv_pos = cols + (kv_base + kv_start)
                    p, dlogit, ds = _grad_tile(cfg, s, dp, lse2, delta, partial=partial, b=b, h=h, q_pos=q_pos,
                                               kv_pos=kv_pos, reads=tile_reads, stat_dim=0)
                    ragged = partial and kv_valid_len != cfg.kv_len_padded
                    if ragged:
                        ds = jnp.where(cols + kv_start < kv_valid_len, ds, 0.0)
                    new_sums = []
                    for r, acc in zip(read_grads, sums):
                        # dL/dlogit * d(T + B)/dread where p > 0, summed over the tile's keys
                        dread = cfg.program.dread(r, s * cfg.scale, b=b, h=h, q=q_pos, kv=kv_pos,
                                                  reads=tile_reads())
                        g = jnp.where(p > 0.0, dlogit * dread, 0.0)
                        if ragged:
                            g = jnp.where(cols + kv_start < kv_valid_len, g, 0.0)
                        new_sums.append(acc + g.sum(axis=1))

                    def dq_scope(acc_ref):
                        plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])
                    dq = pl.run_state(dq_scope)(plgpu.ACC.init(dq))
                    plgpu.barrier_arrive(k_free.at[slot])
                    return dq, tuple(new_sums)

                sums = tuple(plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                             for _ in read_grads)
                carry = lax.fori_loop(0, n_full, functools.partial(step_fn, partial=False), (dq, sums))
                dq, sums = lax.fori_loop(n_full, n_steps, functools.partial(step_fn, partial=True), carry)
                # The last products have read Q and dO: bring the next tile's while this one is written.
                pl.when(j + 1 < n_local)(lambda: fetch_rows(j + 1))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile's dQ has left dq_smem
                dq_smem[...] = (dq * cfg.scale).astype(dtype)
                for smem2, acc in zip(dread_smems2, sums):
                    smem2.at[wg][...] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[b, pl.ds(q_start, bq), h])
                for smem2, ref in zip(dread_smems2, dread_refs):
                    plgpu.copy_smem_to_gmem(smem2.at[wg], ref.at[b, h, pl.ds(q_start, bq)])
                return step0 + n_steps

            lax.fori_loop(0, n_local, run_tile, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load_tile(j, step0):
                b, h, i, row, n_full, n_steps = tile_at(j)
                kvh = lax.div(h, jnp.array(G, h.dtype))

                @pl.loop(0, n_steps)
                def _(step):
                    slot = lax.rem(step0 + step, stages)
                    kv_rows = pl.ds(listed_block(fi_ref, pi_ref, row, n_full, step) * bkv, bkv)

                    @pl.when(step0 + step >= stages)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])
                    plgpu.copy_gmem_to_smem(k_ref.at[b, kv_rows, kvh], k_smem.at[slot], k_bar.at[slot])

                    @pl.when(step0 + step >= stages)
                    def _():
                        plgpu.barrier_wait(v_free.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[b, kv_rows, kvh], v_smem.at[slot], v_bar.at[slot])
                return step0 + n_steps

            lax.fori_loop(0, n_local, load_tile, jnp.int32(0))

    out = launch(
        kernel, (q_off, kv_off, order, fcounts, findices, pcounts, pindices, q, k, v, do, lse2, delta, *reads),
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  *[jax.ShapeDtypeStruct((B, N, Tp), jnp.float32) for _ in read_grads]),
        grid=(ctas,), grid_names=("cta",),
        scratch=(tile_smem((2, bq, H), dtype), tile_smem((2, bq, H), dtype), tile_smem((2, bq, H), dtype),
                 plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32),
                 tile_smem((stages, bkv, H), dtype), tile_smem((stages, bkv, H), dtype),
                 *[plgpu.SMEM((2, bq), jnp.float32) for _ in read_grads]),
        barriers=((plgpu.Barrier(num_barriers=2),) * 4 + (plgpu.Barrier(num_barriers=stages),) * 2,
                  (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2))
    return out[0], list(out[1:])


def backward_dkv(bcfg: MosaicBackwardConfig, q, k, v, do, lse2, delta, lists, order, reads, q_off, kv_off,
                 read_grads: tuple = ()):
    """(dK, dV ``[B, Sp, K, H]`` in k's dtype, [the gradient of each read ``read_grads``
    names, f32 ``[B, N, Sp]``]) on padded inputs; ``lists``: the dK/dV plan's transposed
    ``split_lists`` (FULL, PARTIAL) of (block_q, 2 * block_kv) blocks; ``order``: the tiles
    (b, kv head, kv-block) heaviest first (``tile_order`` of ``dkv_step_counts``), dealt to
    ``dkv_ctas`` CUDA blocks. ``read_grads``: reads along kv only (``read_grad_kernel``):
    each key's sum over its queries of ``dL/dlogit * d(T + B)/dread`` where p > 0, per
    query head of the group, written at the end of that head's loop."""
    cfg = bcfg.fwd
    fcounts, findices, pcounts, pindices = lists
    B, Tp, N, H = q.shape
    Sp, K = k.shape[1], k.shape[2]
    dtype = k.dtype
    bq, bkv, stages = bcfg.block_q, bcfg.block_kv, bcfg.num_stages
    n_reads = len(reads)
    G = cfg.groups
    nk = Sp // (2 * bkv)
    q_valid_len = cfg.q_len
    n_tiles, ctas = B * K * nk, bcfg.dkv_ctas

    def kernel(qoff_ref, kvoff_ref, order_ref, fc_ref, fi_ref, pc_ref, pi_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, *rest):
        read_refs = rest[:n_reads]
        dk_ref, dv_ref, *dread_refs = rest[n_reads:n_reads + 2 + len(read_grads)]
        (k_smem2, v_smem2, dk_smem2, dv_smem2, q_smem, do_smem, lse_smem, delta_smem, *dread_smems2), \
            (k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar), free = rest[n_reads + 2 + len(read_grads):]
        cta = lax.axis_index("cta")
        wg = lax.axis_index("wg")
        n_local = local_tile_count(n_tiles, ctas, cta)

        def tile_at(j):
            """(b, kv head, kv-block) of this block's j-th tile."""
            return split_tile(scheduled_tile(order_ref, ctas, cta, j), K, nk)

        def head_row(b, kvh, jb, g):
            """(h, plan row, n_full, n_steps) of the g-th query head of the group."""
            h = kvh * G + g
            row = plan_row(bcfg.dkv_plan, b, h, jb)
            return (h, row, *row_steps(fc_ref, pc_ref, row))

        def q_block(row, n_full, step):
            return listed_block(fi_ref, pi_ref, row, n_full, step)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            dk_smem, dv_smem = dk_smem2.at[wg], dv_smem2.at[wg]
            rows = plgpu.broadcasted_iota(jnp.int32, (bkv, bq), 0, layout=plgpu.Layout.WGMMA)
            cols = plgpu.broadcasted_iota(jnp.int32, (bkv, bq), 1, layout=plgpu.Layout.WGMMA)

            def fetch_keys(j):
                b, kvh, jb = tile_at(j)
                keys = pl.ds(jb * (2 * bkv) + wg * bkv, bkv)
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kvh], k_smem, k_bar.at[wg])
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kvh], v_smem, v_bar.at[wg])

            pl.when(n_local > 0)(lambda: fetch_keys(0))

            def run_tile(j, step0):
                b, kvh, jb = tile_at(j)
                kv_start = jb * (2 * bkv) + wg * bkv
                kv_base = kvoff_ref[b] + kv_start
                q_off_b = qoff_ref[b]
                plgpu.barrier_wait(k_bar.at[wg])
                plgpu.barrier_wait(v_bar.at[wg])
                zeros = jnp.full((bkv, H), 0.0, jnp.float32)
                dk = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
                dv = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)

                def head_fn(g, carry):
                    dk, dv, done = carry
                    h, row, n_full, n_steps = head_row(b, kvh, jb, g)

                    def step_fn(step, carry, *, partial):
                        dk, dv, sums = carry
                        slot = lax.rem(done + step, stages)
                        q_start = q_block(row, n_full, step) * bq
                        plgpu.barrier_wait(q_bar.at[slot])

                        def s_scope(acc_ref):
                            plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].T)
                            return acc_ref[...]
                        s = pl.run_scoped(s_scope, plgpu.ACC((bkv, bq), jnp.float32))
                        plgpu.barrier_wait(lse_bar.at[slot])
                        plgpu.barrier_wait(delta_bar.at[slot])
                        lse2 = _load(lse_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
                        delta = _load(delta_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
                        plgpu.barrier_wait(do_bar.at[slot])

                        def dp_scope(acc_ref):
                            plgpu.wgmma(acc_ref, v_smem, do_smem.at[slot].T)
                            return acc_ref[...]
                        dp = pl.run_scoped(dp_scope, plgpu.ACC((bkv, bq), jnp.float32))

                        def tile_reads():
                            return [_read_tile(r, shp, b=b, h=h, q_start=q_start, block_q=bq,
                                               kv_start=kv_start, block_kv=bkv, transposed=True)
                                    for r, shp in zip(read_refs, cfg.read_shapes)]
                        q_pos = cols + (q_off_b + q_start)
                        kv_pos = rows + kv_base
                        p, dlogit, ds = _grad_tile(cfg, s, dp, lse2, delta, partial=partial, b=b, h=h,
                                                   q_pos=q_pos, kv_pos=kv_pos, reads=tile_reads, stat_dim=1)
                        if partial and q_valid_len != cfg.q_len_padded:
                            real = cols + q_start < q_valid_len
                            p = jnp.where(real, p, 0.0)
                            ds = jnp.where(real, ds, 0.0)
                        new_sums = []
                        for r, acc in zip(read_grads, sums):
                            # dL/dlogit * d(T + B)/dread where p > 0, summed over the tile's queries
                            dread = cfg.program.dread(r, s * cfg.scale, b=b, h=h, q=q_pos, kv=kv_pos,
                                                      reads=tile_reads())
                            new_sums.append(acc + jnp.where(p > 0.0, dlogit * dread, 0.0).sum(axis=1))

                        def dv_scope(acc_ref):
                            plgpu.wgmma(acc_ref, p.astype(dtype), do_smem.at[slot])
                        dv = pl.run_state(dv_scope)(plgpu.ACC.init(dv))

                        def dk_scope(acc_ref):
                            plgpu.wgmma(acc_ref, ds.astype(dtype), q_smem.at[slot])
                        dk = pl.run_state(dk_scope)(plgpu.ACC.init(dk))
                        plgpu.barrier_arrive(free.at[slot])
                        return dk, dv, tuple(new_sums)

                    sums = tuple(plgpu.layout_cast(jnp.full((bkv,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                                 for _ in read_grads)
                    carry = lax.fori_loop(0, n_full, functools.partial(step_fn, partial=False), (dk, dv, sums))
                    dk, dv, sums = lax.fori_loop(n_full, n_steps, functools.partial(step_fn, partial=True), carry)
                    if read_grads:   # this head's sums leave through shared memory (after the last copy read it)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for smem2, acc in zip(dread_smems2, sums):
                            smem2.at[wg][...] = acc
                        plgpu.commit_smem()
                        for smem2, ref in zip(dread_smems2, dread_refs):
                            plgpu.copy_smem_to_gmem(smem2.at[wg], ref.at[b, h, pl.ds(kv_start, bkv)])
                    return dk, dv, done + n_steps

                dk, dv, step1 = lax.fori_loop(0, G, head_fn, (dk, dv, step0))
                # The last products have read K and V: bring the next tile's while this one is written.
                pl.when(j + 1 < n_local)(lambda: fetch_keys(j + 1))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile's dK/dV have left smem
                dk_smem[...] = (dk * cfg.scale).astype(dtype)
                dv_smem[...] = dv.astype(dtype)
                plgpu.commit_smem()
                keys = pl.ds(kv_start, bkv)
                plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[b, keys, kvh])
                plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[b, keys, kvh])
                return step1

            lax.fori_loop(0, n_local, run_tile, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load_tile(j, step0):
                b, kvh, jb = tile_at(j)

                def head_fn(g, done):
                    h, row, n_full, n_steps = head_row(b, kvh, jb, g)

                    @pl.loop(0, n_steps)
                    def _(step):
                        slot = lax.rem(done + step, stages)
                        rows_q = pl.ds(q_block(row, n_full, step) * bq, bq)

                        @pl.when(done + step >= stages)
                        def _():
                            plgpu.barrier_wait(free.at[slot])
                        plgpu.copy_gmem_to_smem(q_ref.at[b, rows_q, h], q_smem.at[slot], q_bar.at[slot])
                        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows_q], lse_smem.at[slot], lse_bar.at[slot])
                        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows_q], delta_smem.at[slot],
                                                delta_bar.at[slot])
                        plgpu.copy_gmem_to_smem(do_ref.at[b, rows_q, h], do_smem.at[slot], do_bar.at[slot])
                    return done + n_steps

                return lax.fori_loop(0, G, head_fn, step0)

            lax.fori_loop(0, n_local, load_tile, jnp.int32(0))

    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    dk, dv, *dreads = launch(
        kernel, (q_off, kv_off, order, fcounts, findices, pcounts, pindices, q, k, v, do, lse2, delta, *reads),
        out_type=(kv_type, kv_type, *[jax.ShapeDtypeStruct((B, N, Sp), jnp.float32) for _ in read_grads]),
        grid=(ctas,), grid_names=("cta",),
        scratch=(tile_smem((2, bkv, H), dtype), tile_smem((2, bkv, H), dtype), tile_smem((2, bkv, H), dtype),
                 tile_smem((2, bkv, H), dtype), tile_smem((stages, bq, H), dtype),
                 tile_smem((stages, bq, H), dtype), plgpu.SMEM((stages, bq), jnp.float32),
                 plgpu.SMEM((stages, bq), jnp.float32), *[plgpu.SMEM((2, bkv), jnp.float32) for _ in read_grads]),
        barriers=((plgpu.Barrier(num_barriers=2),) * 2 + (plgpu.Barrier(num_barriers=stages),) * 4,
                  plgpu.Barrier(num_arrivals=2, num_barriers=stages)))
    return dk, dv, dreads


def dkv_step_counts(full_counts, partial_counts, batch: int, heads: int, kv_heads: int):
    """``[batch, kv_heads, R]``: the q-blocks each dK/dV tile walks, summed over the query heads
    of its group, from the transposed plan's ``[B', H', R]`` counts (NumPy stays NumPy)."""
    steps = row_step_counts(full_counts, partial_counts, batch, heads)
    return steps.reshape(batch, kv_heads, heads // kv_heads, steps.shape[-1]).sum(axis=2)
