"""Paged decode on Mosaic GPU (Hopper, sm_90): work items (sequence, KV head, chunk of new
tokens, split), each reading its share of the chunk's page list with TMA.

The work of an item is a Triton paged program's (``_paged_kernel.py``): the rows are the
``chunk_tokens * G`` queries of one KV head and chunk (token ``t``, query head
``kv_head * G + g`` in row ``t * G + g``, padded to 64, the wgmma M), the keys are the
pages ``walk_pages`` listed for the chunk, ``pages_per_step`` pages per step, and split
``s`` of ``num_splits`` takes the steps ``[s * per_split, (s + 1) * per_split)``. It
writes an f32 partial output and its log-sum-exp; ``_paged_kernel.combine_splits``
merges the splits. ``cfg.ctas`` CUDA blocks take the items round robin (one item each, or
persistent: one block per SM, whose ring of pages runs on from one item to the next, so a
block's start-up and partial output overlap the next item's loads).

``consumers + 1`` warpgroups:

* warpgroup ``consumers`` (the last), the producer, brings each item's Q into one of two
  shared-memory slots (the next item's Q arrives while the consumers work on this one),
  and each step's pages
  of K and V into a ring of ``num_stages`` shared-memory slots, one TMA copy per page (a
  page of one KV head is ``page_size`` rows of H at the pool's stride), together with the
  step's key positions and tensor reads along the keys, waiting for a slot's K (V) to be
  released before refilling it. A list entry of -1 is the sequence's tail copy: its last
  page with the slots past the length zeroed (a slot past a length may hold anything,
  NaN included, which P = 0 would not cancel in P V).
* warpgroups ``0 .. consumers - 1``, the consumers: S = Q K^T (wgmma), the TileProgram's
  logits at the keys' absolute positions (``key_positions``: -1 where no key exists), an
  online softmax in f32 base 2, O += P V (wgmma). Everything a step needs is in shared
  memory when its slot's barrier completes: no global load sits in a consumer's chain of
  steps. With two consumers, consumer ``w`` takes the ring's steps ``w, w + 2, ...``
  (counted over the block's items; with an even number of slots each slot's barrier
  always has the same waiter, which its phase tracking needs) with its own softmax state,
  and the second hands its state to the first at the end of an item through the output
  staging buffer; the first merges the two and writes the item's partial: two
  independent chains of steps per block.

Decode is bandwidth-bound, but a step's chain (two products whose 64 rows hold only the
``T * G`` queries, a 64 x 64 softmax) is long against the time the ring takes to bring a
step: on an H100 two consumers were 4-12% faster than one at B=1 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scoremod.compiler.tile import TileProgram
from scoremod.runtime._mosaic_forward import LN2, _load, _logits2, plgpu, tile_smem
from scoremod.runtime.softmax_numerics import at_most_zero

ROWS = 64   # query rows of a block: the wgmma M


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Everything static about one call of the kernel (hashable)."""
    program: TileProgram
    scale: float
    page_size: int
    pages_per_step: int
    num_stages: int
    num_splits: int
    group: int            # G: query heads per KV head
    out_rows: int         # rows of the partial outputs written (>= chunk_tokens * G, a power of 2 >= 8)
    read_rows: tuple = () # per tensor read: True for a row read [B|1, K|1, C|1, 64], False for a key read [B, C, L * page_size]
    ctas: int = 0         # CUDA blocks, each taking items (sequence, KV head, chunk, split) round robin; 0: one per item
    consumers: int = 1    # consumer warpgroups, taking the ring's steps in turn (1 or 2)

    @property
    def block_kv(self) -> int:
        return self.page_size * self.pages_per_step

    @property
    def mask_only(self) -> bool:
        return self.program.canonical.kind == "mask"


def shared_memory_bytes(head_dim: int, block_kv: int, num_stages: int, itemsize: int = 2, key_reads: int = 0,
                        consumers: int = 1) -> int:
    """Shared memory of one block: the K/V ring with each step's key positions and
    ``key_reads`` tensor reads along the keys (32-bit), two Q slots, the f32 output and lse
    staging (through which a second consumer hands its state to the first, with its row
    statistics beside); each buffer rounded up to 1 KB (Mosaic aligns them), and 1 KB for
    the barriers."""
    def buf(n):
        return -(-n // 1024) * 1024
    ring = 2 * buf(num_stages * block_kv * head_dim * itemsize) + (1 + key_reads) * buf(num_stages * block_kv * 4)
    return ring + buf(2 * ROWS * head_dim * itemsize) + buf(ROWS * head_dim * 4) + consumers * 1024 + 1024


def consumer_share(w, consumers: int, step0, n):
    """``(first, count)``: consumer ``w``'s steps of an item of ``n`` steps whose first is the
    ring's step ``step0`` are the item's steps ``first, first + consumers, ...``, ``count``
    of them: the ring steps ``s`` with ``s % consumers == w``. With a ring whose slots are a
    multiple of ``consumers``, each slot is then always waited on by the same consumer
    (Mosaic's barriers track their phase per thread). Ints or int32 scalars."""
    first = lax.rem(w - lax.rem(step0, consumers) + consumers, consumers)
    return first, lax.div(jnp.maximum(n - first, 0) + (consumers - 1), consumers)


def decode_partials(cfg: DecodeKernelConfig, q_rows, k_pages, v_pages, pages, counts, key_positions, lengths, row_tokens,
                    row_heads, k_tail, v_tail, reads=(), *, num_tokens: int):
    """Per-split partial outputs of every (sequence, KV head, chunk).

    q_rows:        [B, K, C, 64, H] the queries by KV head and chunk (rows ``t * G + g``)
    k_pages:       [P, page_size, K, H] the pool (v_pages alike)
    pages:         int32[B, C, L] the pool page of each listed entry, -1 for the tail copy
                   (L a multiple of pages_per_step); counts int32[B, C]: the entries listed
    key_positions: int32[B, C, L * page_size] each listed slot's absolute key position, -1
                   where no key exists (past the length, past the list's count)
    lengths:       int32[B]; row_tokens int32[C, 64]: the token (0 .. T-1) of each row of
                   each chunk (padding rows: any); row_heads int32[64]: g of each row
    k_tail:        [B, page_size, K, H] each sequence's last page, slots past the length zeroed
    reads:         the TileProgram's tensor reads (``decode_reads``), each along the rows
                   (b, h, q: ``[B|1, K|1, C|1, 64]``) or along the keys (b, kv: ``[B, C, L * page_size]``,
                   at ``key_positions``), as ``cfg.read_rows`` says
    num_tokens:    T (query t of sequence b sits at ``lengths[b] - T + t``)
    Returns (o f32[B, K, C, S, out_rows, H], lse f32[B, K, C, S, out_rows]).
    """
    B, K, C, R, H = q_rows.shape
    assert R == ROWS, q_rows.shape
    S, stages, pps, ps = cfg.num_splits, cfg.num_stages, cfg.pages_per_step, cfg.page_size
    bkv = cfg.block_kv
    dtype = q_rows.dtype
    list_len = pages.shape[-1]
    assert list_len % pps == 0 and key_positions.shape[-1] == list_len * ps, (pages.shape, key_positions.shape)
    n_items = B * K * C * S
    Rw = cfg.out_rows

    n_reads = len(reads)
    assert len(cfg.read_rows) == n_reads, (cfg.read_rows, n_reads)
    key_reads = [r for r, rows in enumerate(cfg.read_rows) if not rows]   # brought into the ring with K
    W = cfg.consumers
    assert W in (1, 2) and stages % W == 0, (W, stages)

    ctas = cfg.ctas or n_items
    assert 0 < ctas <= n_items, (ctas, n_items)

    def kernel(q_ref, k_ref, v_ref, pages_ref, counts_ref, keypos_ref, len_ref, rtok_ref, rhead_ref, ktail_ref, vtail_ref,
               *rest):
        read_refs, (o_ref, lse_ref, scratch, bars, free, hand) = rest[:n_reads], rest[n_reads:]
        q_smem, k_smem, v_smem, o_smem, lse_smem, keypos_smem, *key_read_smem = scratch
        key_read_smem = dict(zip(key_reads, key_read_smem))
        k_bar, v_bar, q_bar = bars
        k_free, v_free, q_free = free
        ml_hand, merge_full, o_free = hand   # consumer 1's row statistics; its acc goes through o_smem
        wg = lax.axis_index("wg")
        cta = lax.axis_index("cta")
        n_local = lax.div(n_items - cta + (ctas - 1), ctas)   # items cta, cta + ctas, ...

        def item(j):
            """(b, kv head, chunk, split, first step, steps) of this block's j-th item."""
            w = cta + j * ctas
            split = lax.rem(w, S)
            c = lax.rem(lax.div(w, S), C)
            bk = lax.div(w, S * C)
            kvh, b = lax.rem(bk, K), lax.div(bk, K)
            steps = lax.div(counts_ref[b, c] + (pps - 1), pps)
            per_split = lax.div(steps + (S - 1), S)
            first = jnp.minimum(split * per_split, steps)
            return b, kvh, c, split, first, jnp.minimum(first + per_split, steps) - first

        def consumer(w):
            """Consumer warpgroup ``w``: the ring's steps ``w, w + W, ...`` of each item."""
            wgmma = plgpu.Layout.WGMMA
            if W > 1:
                plgpu.set_max_registers(232, action="increase")

            def run_item(j, step0):
                """Item j; ``step0``: the ring's steps before it. Returns the steps after it."""
                b, kvh, c, split, first, n = item(j)
                q_slot = lax.rem(j, 2)
                length = len_ref[b]
                row_q_pos = _load(rtok_ref.at[c], wgmma.reduce(1)) + (length - num_tokens)
                row_head = _load(rhead_ref, wgmma.reduce(1)) + kvh * cfg.group
                row_reads = {i: _load(ref.at[tuple(x if d > 1 else 0 for x, d in zip((b, kvh, c), ref.shape))],
                                      wgmma.reduce(1))
                             for i, (ref, rows) in enumerate(zip(read_refs, cfg.read_rows)) if rows}
                plgpu.barrier_wait(q_bar.at[q_slot])

                def step_fn(k, carry):
                    acc, m_i, l_i = carry
                    i = first_mine + k * W   # this item's step
                    slot = lax.rem(step0 + i, stages)
                    plgpu.barrier_wait(k_bar.at[slot])
                    kv_pos = lax.broadcast_in_dim(_load(keypos_smem.at[slot], wgmma.reduce(0)), (ROWS, bkv), [1])
                    q_pos = lax.broadcast_in_dim(row_q_pos, (ROWS, bkv), [0])
                    head = lax.broadcast_in_dim(row_head, (ROWS, bkv), [0])
                    read_tiles = tuple(
                        lax.broadcast_in_dim(row_reads[r], (ROWS, bkv), [0]) if rows else
                        lax.broadcast_in_dim(_load(key_read_smem[r].at[slot], wgmma.reduce(0)), (ROWS, bkv), [1])
                        for r, rows in enumerate(cfg.read_rows))

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem.at[q_slot], k_smem.at[slot].T)
                        return acc_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC((ROWS, bkv), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])

                    logits = _logits2(cfg, s, partial=True, b=b, h=head, q_pos=q_pos, kv_pos=kv_pos,
                                      reads=lambda: read_tiles)
                    logits = jnp.where(kv_pos >= 0, logits, -jnp.inf)
                    m_new = jnp.maximum(m_i, logits.max(axis=1))
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    alpha = jnp.exp2(at_most_zero(m_i - m_use))
                    p = jnp.exp2(at_most_zero(logits - lax.broadcast_in_dim(m_use, logits.shape, [0])))
                    l_i = l_i * alpha + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    p16 = p.astype(dtype)
                    plgpu.barrier_wait(v_bar.at[slot])

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l_i

                m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), wgmma.reduce(1))
                l_i = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), wgmma.reduce(1))
                acc = plgpu.layout_cast(jnp.full((ROWS, H), 0.0, jnp.float32), wgmma)
                first_mine, mine = consumer_share(w, W, step0, n)
                acc, m_i, l_i = lax.fori_loop(0, mine, step_fn, (acc, m_i, l_i))
                plgpu.barrier_arrive(q_free.at[q_slot])   # every product of this consumer that read Q has completed

                if W > 1 and w == 1:   # hand the state to consumer 0 once o_smem is free
                    plgpu.barrier_wait(o_free)
                    o_smem[...] = acc
                    ml_hand.at[0][...] = m_i
                    ml_hand.at[1][...] = l_i
                    plgpu.barrier_arrive(merge_full)
                    return step0 + n
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last item's partials have left o_smem
                if W > 1:   # merge consumer 1's state
                    plgpu.barrier_arrive(o_free)
                    plgpu.barrier_wait(merge_full)
                    acc1 = _load(o_smem, wgmma)
                    m1, l1 = _load(ml_hand.at[0], wgmma.reduce(1)), _load(ml_hand.at[1], wgmma.reduce(1))
                    m_new = jnp.maximum(m_i, m1)
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    a0, a1 = jnp.exp2(at_most_zero(m_i - m_use)), jnp.exp2(at_most_zero(m1 - m_use))
                    acc = acc * lax.broadcast_in_dim(a0, acc.shape, [0]) + acc1 * lax.broadcast_in_dim(a1, acc.shape, [0])
                    m_i, l_i = m_new, l_i * a0 + l1 * a1

                empty = l_i == 0.0
                l_safe = jnp.where(empty, 1.0, l_i)
                o_smem[...] = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
                lse_smem[...] = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * LN2)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, Rw)], o_ref.at[b, kvh, c, split])
                plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, Rw)], lse_ref.at[b, kvh, c, split])
                return step0 + n

            lax.fori_loop(0, n_local, run_item, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        for w in range(W):
            pl.when(wg == w)(lambda w=w: consumer(w))

        @pl.when(wg == W)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def copy_step(pool_ref, tail_ref, b, kvh, c, step, dst, barrier, per_key=()):
                """One step's pages into ``dst``, and each ``(source, destination)`` of
                ``per_key`` (arrays ``[B, C, L * page_size]``) at the step's keys."""
                for src, dst_keys in per_key:
                    plgpu.copy_gmem_to_smem(src.at[b, c, pl.ds(step * bkv, bkv)], dst_keys, barrier)
                for i in range(pps):
                    page = pages_ref[b, c, step * pps + i]
                    part = dst.at[pl.ds(i * ps, ps)]

                    @pl.when(page >= 0)
                    def _():
                        plgpu.copy_gmem_to_smem(pool_ref.at[page, :, kvh], part, barrier)

                    @pl.when(page < 0)
                    def _():
                        plgpu.copy_gmem_to_smem(tail_ref.at[b, :, kvh], part, barrier)

            def load_item(j, step0):
                """Brings item j's steps into the ring (it runs on from one item to the next)."""
                b, kvh, c, _, first, n = item(j)
                q_slot = lax.rem(j, 2)
                pl.when(j >= 2)(lambda: plgpu.barrier_wait(q_free.at[q_slot]))
                plgpu.copy_gmem_to_smem(q_ref.at[b, kvh, c], q_smem.at[q_slot], q_bar.at[q_slot])

                @pl.loop(0, n)
                def _(i):
                    slot = lax.rem(step0 + i, stages)
                    refill = step0 + i >= stages
                    pl.when(refill)(lambda: plgpu.barrier_wait(k_free.at[slot]))
                    per_key = [(keypos_ref, keypos_smem.at[slot])] + [
                        (read_refs[r], key_read_smem[r].at[slot]) for r in key_reads]
                    copy_step(k_ref, ktail_ref, b, kvh, c, first + i, k_smem.at[slot], k_bar.at[slot], per_key)
                    pl.when(refill)(lambda: plgpu.barrier_wait(v_free.at[slot]))
                    copy_step(v_ref, vtail_ref, b, kvh, c, first + i, v_smem.at[slot], v_bar.at[slot])
                return step0 + n

            lax.fori_loop(0, n_local, load_item, jnp.int32(0))

    def entry(*refs):
        scratch = (tile_smem((2, ROWS, H), dtype), tile_smem((stages, bkv, H), dtype),
                   tile_smem((stages, bkv, H), dtype), plgpu.SMEM((ROWS, H), jnp.float32),
                   plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((stages, bkv), jnp.int32),
                   *(plgpu.SMEM((stages, bkv), reads[r].dtype) for r in key_reads))
        # K's slot completes with its pages, its key positions and its key reads.
        bars = (plgpu.Barrier(num_arrivals=pps + 1 + len(key_reads), num_barriers=stages),
                plgpu.Barrier(num_arrivals=pps, num_barriers=stages), plgpu.Barrier(num_barriers=2))
        free = (plgpu.Barrier(num_barriers=stages),) * 2 + (plgpu.Barrier(num_arrivals=W, num_barriers=2),)
        hand = ((plgpu.SMEM((2, ROWS), jnp.float32), plgpu.Barrier(), plgpu.Barrier()) if W > 1 else (None,) * 3)
        pl.run_scoped(lambda *scoped: kernel(*refs, *scoped), scratch, bars, free, hand, collective_axes="wg")

    out_type = (jax.ShapeDtypeStruct((B, K, C, S, Rw, H), jnp.float32),
                jax.ShapeDtypeStruct((B, K, C, S, Rw), jnp.float32))
    return plgpu.kernel(entry, out_type=out_type, grid=(ctas,), grid_names=("cta",), num_threads=W + 1,
                        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True))(
        q_rows, k_pages, v_pages, pages, counts, key_positions, lengths, row_tokens, row_heads, k_tail, v_tail, *reads)


def decode_partials_reference(cfg: DecodeKernelConfig, q_rows, k_pages, v_pages, pages, counts, key_positions,
                              lengths, row_tokens, row_heads, k_tail, v_tail, reads=(), *, num_tokens: int):
    """``decode_partials``' slow twin, in plain jnp over the same inputs (the CPU tests run
    the wrapper with it): every listed entry's page gathered (the tail copy for -1), the
    TileProgram's logits at the same positions and reads, and one f32 softmax per split over
    the keys of that split's steps. Same outputs and layout."""
    B, K, C, R, H = q_rows.shape
    S, pps, ps = cfg.num_splits, cfg.pages_per_step, cfg.page_size
    L = pages.shape[-1]
    f32 = jnp.float32
    tail = lambda t: jnp.broadcast_to(t[:, None, None], (B, C, L) + t.shape[1:])  # noqa: E731
    k = jnp.where(pages[..., None, None, None] >= 0, k_pages[jnp.maximum(pages, 0)], tail(k_tail))
    v = jnp.where(pages[..., None, None, None] >= 0, v_pages[jnp.maximum(pages, 0)], tail(v_tail))
    k = k.reshape(B, C, L * ps, K, H).astype(f32)
    v = v.reshape(B, C, L * ps, K, H).astype(f32)
    hi = lax.Precision.HIGHEST
    scores = jnp.einsum("bkcrh,bcskh->bkcrs", q_rows.astype(f32), k, precision=hi) * cfg.scale

    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None, None]
    head = (jnp.arange(K, dtype=jnp.int32)[:, None, None, None] * cfg.group + row_heads[:, None])[None]
    q_pos = (lengths - num_tokens)[:, None, None, None, None] + row_tokens[None, None, :, :, None]
    kv_pos = key_positions[:, None, :, None, :]
    tiles = tuple(x[..., None] if rows else x[:, None, :, None, :] for x, rows in zip(reads, cfg.read_rows))
    logits = cfg.program.logits(scores, b=b, h=head, q=q_pos, kv=kv_pos, reads=tiles)
    logits = jnp.where(kv_pos >= 0, logits, -jnp.inf)                       # [B, K, C, R, L * ps]

    steps = (counts + (pps - 1)) // pps                                      # [B, C]
    per_split = (steps + (S - 1)) // S
    first = jnp.minimum(jnp.arange(S)[None, None, :] * per_split[..., None], steps[..., None])   # [B, C, S]
    last = jnp.minimum(first + per_split[..., None], steps[..., None])
    step_of_key = jnp.arange(L * ps) // (pps * ps)
    in_split = (step_of_key >= first[..., None]) & (step_of_key < last[..., None])              # [B, C, S, L * ps]
    lg = jnp.where(in_split[:, None, :, :, None, :], logits[:, :, :, None], -jnp.inf)          # [B, K, C, S, R, L*ps]
    m = jnp.max(lg, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(lg - m)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bkcxrs,bcskh->bkcxrh", p, v, precision=hi)
    seen = l != 0
    o = o / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m[..., 0] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    Rw = cfg.out_rows
    return o[..., :Rw, :], lse[..., :Rw]


def reads_reason(program: TileProgram) -> str | None:
    """Why the kernel cannot take the program's tensor reads (None when it can): it reads
    along the query rows (b, h, q) or along the keys (b, kv), at plain positions."""
    for r in program.reads:
        if r.gather or ("kv" in r.axes and {"h", "q"} & set(r.axes)):
            return (f"the mosaic decode kernel reads tensors along the query rows or along the keys, at plain "
                    f"positions; {r.name}[...] is read along {', '.join(r.axes)}"
                    f"{' at computed indices' if r.gather else ''} (the pallas kernel runs it)")
    return None


def decode_reads(program: TileProgram, tensors: dict, *, lengths, num_tokens: int, kv_heads: int, group: int,
                 row_tokens, row_heads, key_positions):
    """Each tensor read of the tile program, materialized for the kernel: ``(arrays,
    read_rows)``. A read along b, h and q only is gathered at the rows' positions
    (``[B|1, K|1, C|1, 64]``: sequence, KV head, chunk, row ``t * G + g``); a read along b and
    kv only at each listed key position (``[B, C, L * page_size]``). Raises
    NotImplementedError for a read along both q (or h) and kv, or at computed indices."""
    from scoremod.compiler.lowering import gather_read
    from scoremod.dsl.ast import Var
    B = lengths.shape[0]
    C = row_tokens.shape[0]
    arrays, read_rows = [], []
    why = reads_reason(program)
    if why:
        raise NotImplementedError(why)
    for r in program.reads:
        axes = set(r.axes)
        if "kv" in axes:
            env = {"b": jnp.arange(B, dtype=jnp.int32)[:, None, None], "kv": jnp.maximum(key_positions, 0)}
            shape = key_positions.shape
        else:
            by_b, by_h, by_q = bool(axes & {"b", "q"}), "h" in axes, "q" in axes
            Bx, Kx, Cx = (B if by_b else 1), (kv_heads if by_h else 1), (C if by_q else 1)
            env = {"b": jnp.arange(Bx, dtype=jnp.int32)[:, None, None, None],
                   "h": (jnp.arange(Kx, dtype=jnp.int32)[:, None] * group + row_heads[None, :])[None, :, None, :],
                   "q": (lengths - num_tokens)[:, None, None, None] + row_tokens[None, None, :, :]}
            shape = (Bx, Kx, Cx, ROWS)
        value = gather_read(tensors[r.name], [env[i.name] if isinstance(i, Var) else None for i in r.node.indices])
        arrays.append(jnp.broadcast_to(value, shape))
        read_rows.append("kv" not in axes)
    return arrays, tuple(read_rows)
