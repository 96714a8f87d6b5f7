"""Forward block-sparse flash-attention kernel on Mosaic GPU (Hopper, sm_90).

Work is cut into tiles, one per (batch, query head, q-block of ``2 * block_q`` rows), and
run by ``ctas`` CUDA blocks of three warpgroups, FlashAttention-3 style. The wrapper orders
the tiles heaviest first (by the number of kv-blocks their plan row lists, ``tile_order``);
CUDA block ``c`` runs the tiles the snake order deals it (``local_tile_count``,
``scheduled_tile``): with ``ctas`` = the number of SMs the kernel is persistent and one tile's
epilogue overlaps the next tile's loads; with ``ctas`` = the number of tiles each block runs one.

* warpgroup 2, the producer, walks each tile's row of the BlockPlan (its FULL list,
  then its PARTIAL list) and brings each listed K and V tile into a ring of
  ``num_stages`` shared-memory slots with TMA, waiting for a slot's K (V) to be released
  before refilling its K (V); the ring runs on from one tile to the next. Blocks the plan
  leaves out are never read.
* warpgroups 0 and 1, the consumers, each own ``block_q`` query rows. For every listed
  tile: S = Q K^T (wgmma), the tile's logits from the TileProgram (FULL tiles: values
  only; PARTIAL tiles: values and mask, plus the ragged edge), an online softmax in f32
  base 2, then O += P V (wgmma). A schedule barrier alternates the two consumers so the
  softmax of one overlaps the matrix products of the other. Once a tile's last product
  has read Q, the consumer asks TMA for the next tile's Q and writes the finished
  output through its own shared-memory buffer while the next tile's loads run.

The plan is built with ``block_q = 2 * MosaicConfig.block_q`` (the block's rows): both
consumers walk the same list, so the barriers pair up whatever the mask.

Inputs are padded to whole blocks by the wrapper (``mosaic_attention``); the ragged last
kv block is always on the PARTIAL list, where columns past ``kv_len`` are masked.
Writes ``out [B, Tp, N, H]`` and ``lse f32[B, N, Tp]`` (natural log; ``-inf`` on rows with
no allowed key, whose output is 0).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax.experimental import pallas as pl

try:  # Pallas Mosaic GPU; what the kernel needs is checked at call time (mosaic_attention)
    from jax.experimental.pallas import mosaic_gpu as plgpu
    IMPORT_ERROR = None
except ImportError as exc:  # e.g. jax 0.10.2 without absl-py
    plgpu = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

from scoremod.compiler.tile import TileProgram
from scoremod.runtime.softmax_numerics import at_most_zero

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclass(frozen=True)
class MosaicKernelConfig:
    """Everything static about one call of the kernel (hashable)."""
    program: TileProgram
    scale: float
    q_len: int            # T before padding
    kv_len: int           # S before padding
    q_len_padded: int
    kv_len_padded: int
    heads: int
    kv_heads: int
    read_shapes: tuple    # 4-D shape of each materialized (padded) read
    block_q: int          # rows per consumer warpgroup
    block_kv: int
    num_stages: int
    plan_b: int           # B' of the plan (1 or batch)
    plan_h: int           # H' of the plan (1 or heads)
    ctas: int             # CUDA blocks (<= tiles; the SM count for a persistent kernel)
    page_size: int = 0    # 0: k/v are [B, Sp, K, H]; else the page pools [P, page_size, K, H]
    lookahead: bool = False   # load the next step's block index and key reads during this step

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def mask_only(self) -> bool:
        return self.program.canonical.kind == "mask"


def _load(ref, layout):
    """``plgpu.load`` of a whole (already indexed) ref into registers with ``layout``.
    jax 0.10 takes the index as a second positional argument, jax 0.11 deprecates it."""
    if _LOAD_TAKES_INDEX:
        return plgpu.load(ref, None, layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def _load_takes_index() -> bool:
    if plgpu is None:
        return False
    param = inspect.signature(plgpu.load).parameters.get("idx")
    return param is not None and param.default is inspect.Parameter.empty


_LOAD_TAKES_INDEX = _load_takes_index()


def _read_tile(ref, shape, *, b, h, q_start, block_q, kv_start, block_kv, transposed=False):
    """The tile of one materialized read ``[B|1, N|1, T|1, S|1]``, as a ``[block_q, block_kv]``
    array in the WGMMA layout (or a scalar); ``transposed``: as ``[block_kv, block_q]`` (the
    dK/dV kernel's keys-as-rows tiles), for reads along at most one of q and kv."""
    b1, h1, t1, s1 = shape
    bi = b if b1 > 1 else 0
    hi = h if h1 > 1 else 0
    wgmma = plgpu.Layout.WGMMA
    if t1 == 1 and s1 == 1:
        return ref[bi, hi, 0, 0]
    tile = (block_kv, block_q) if transposed else (block_q, block_kv)
    q_axis, kv_axis = (1, 0) if transposed else (0, 1)
    if s1 == 1:   # along q only
        row = _load(ref.at[bi, hi, pl.ds(q_start, block_q), 0], wgmma.reduce(kv_axis))
        return lax.broadcast_in_dim(row, tile, [q_axis])
    if t1 == 1:   # along kv only
        col = _read_kv_column(ref, shape, b=b, h=h, kv_start=kv_start, block_kv=block_kv, q_axis=q_axis)
        return lax.broadcast_in_dim(col, tile, [kv_axis])
    assert not transposed, "reads along q and kv are declined by the dK/dV kernel (backward_reason)"
    return _load(ref.at[bi, hi, pl.ds(q_start, block_q), pl.ds(kv_start, block_kv)], wgmma)


def tile_order(steps):
    """A kernel's tiles, heaviest first: ``int32[B * X * R]`` of flat tile ids
    ``(b * X + x) * R + r``, sorted by ``steps`` (descending; ties in id order, so the tiles
    of one head stay together).

    steps: ``[B, X, R]``, the kv-blocks (or q-blocks) each tile walks: NumPy for a static plan
    (the order is then a constant), a jax array otherwise (sorted on the device)."""
    flat = -steps.reshape(-1)
    if isinstance(steps, np.ndarray):
        return np.argsort(flat, kind="stable").astype(np.int32)
    return jnp.argsort(flat, stable=True).astype(jnp.int32)


def row_step_counts(full_counts, partial_counts, batch: int, heads: int):
    """``[batch, heads, R]``: the blocks each plan row lists, from ``split_lists``' ``[B', H', R]``
    counts (NumPy stays NumPy)."""
    xp = np if isinstance(full_counts, np.ndarray) and isinstance(partial_counts, np.ndarray) else jnp
    return xp.broadcast_to(full_counts + partial_counts, (batch, heads, full_counts.shape[-1]))


def local_tile_count(n_tiles: int, ctas: int, cta):
    """How many tiles CUDA block ``cta`` runs when ``n_tiles`` are dealt to ``ctas`` blocks
    in snake order (``scheduled_tile``)."""
    waves, rest = divmod(n_tiles, ctas)
    if rest == 0:
        return jnp.int32(waves)
    lane = cta if waves % 2 == 0 else ctas - 1 - cta
    return jnp.int32(waves) + (lane < rest).astype(jnp.int32)


def scheduled_tile(order_ref, ctas: int, cta, j):
    """The flat id of the ``j``-th tile CUDA block ``cta`` runs: wave ``j`` deals
    ``order[j * ctas:(j + 1) * ctas]`` to blocks 0, 1, ... on even waves and in reverse on odd
    ones, so the heaviest tiles of one wave and the lightest of the next share a block."""
    lane = jnp.where(lax.rem(j, 2) == 0, cta, ctas - 1 - cta)
    return order_ref[j * ctas + lane]


def split_tile(tile, heads: int, n_q_blocks: int):
    """``(b, h, i)`` of flat tile id ``(b * heads + h) * n_q_blocks + i``."""
    i = lax.rem(tile, n_q_blocks)
    bh = lax.div(tile, n_q_blocks)
    return lax.div(bh, heads), lax.rem(bh, heads), i


def plan_row(plan_shape: tuple[int, int], b, h, block):
    """The index of a kernel's row in its plan's lists: ``(b, h, block)`` where the plan has
    a batch/head axis (``plan_shape`` = (B', H'), 1 where the plan is shared), 0 elsewhere."""
    return (b if plan_shape[0] > 1 else 0, h if plan_shape[1] > 1 else 0, block)


def row_steps(full_counts_ref, partial_counts_ref, row: tuple):
    """(FULL blocks, all listed blocks) of plan row ``row``."""
    n_full = full_counts_ref[row]
    return n_full, n_full + partial_counts_ref[row]


def listed_block(full_ref, partial_ref, row: tuple, n_full, step):
    """The ``step``-th block a kernel visits in plan row ``row`` (an index tuple into the
    lists of ``compiler.plan.split_lists``): the FULL list first, then the PARTIAL list."""
    from_full = full_ref[(*row, jnp.minimum(step, full_ref.shape[-1] - 1))]
    from_part = partial_ref[(*row, jnp.maximum(step - n_full, 0))]
    return jnp.where(step < n_full, from_full, from_part)


def tile_smem(shape, dtype):
    """Shared memory for 16-bit tiles in the layout TMA writes and wgmma reads (8 x 64
    tiles, 128-byte swizzle)."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def launch(kernel, args, *, out_type, grid, grid_names, scratch, barriers):
    """Run ``kernel(*arg_refs, *out_refs, scratch_refs, *barrier_refs)`` once per point of
    ``grid`` (named ``grid_names``), in CUDA blocks of three warpgroups (``"wg"``: 0 and 1
    consume, 2 produces). ``scratch``: a tuple of ``plgpu.SMEM``; ``barriers``: groups of
    ``plgpu.Barrier``, each passed to the kernel as one argument."""
    def entry(*refs):
        pl.run_scoped(lambda *scoped: kernel(*refs, *scoped), scratch, *barriers, collective_axes="wg")

    return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=3,
                        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True))(*args)


def _logits2(cfg: MosaicKernelConfig, s, *, partial, b, h, q_pos, kv_pos, reads):
    """Base-2 logits ``log2(e) * where(M, T(scale * s) + B, -inf)`` of a tile.

    s: f32 [block_q, block_kv] raw q.k products (WGMMA layout); q_pos, kv_pos: int32
    absolute positions of the same shape; reads: thunk returning the read tiles.
    """
    prog = cfg.program
    if cfg.mask_only:
        v = s * (cfg.scale * LOG2E)
        rd = reads() if partial and prog.canonical.has_mask else ()
    else:
        rd = reads()
        v = prog.values(s * cfg.scale, b=b, h=h, q=q_pos, kv=kv_pos, reads=rd) * LOG2E
    # Mask-only mods at a scale of at most 1 (1 / sqrt(H) by default) skip the barrier:
    # on the H100 it cost 8% of the causal forward, and their logits are q.k * scale.
    rounded = _rounded if not cfg.mask_only or abs(cfg.scale) > 1.0 else (lambda x: x)
    if not partial:
        return rounded(v)
    m = prog.mask(b=b, h=h, q=q_pos, kv=kv_pos, reads=rd) if prog.canonical.has_mask else None
    return rounded(v if m is None else jnp.where(m, v, -jnp.inf))


def _rounded(logits):
    """The logits as stored f32 values: the row max and the exponents then read the same
    numbers. Without this the compiler may fuse ``s * c - m`` into one FMA for the exponent
    while the max took the rounded product; once one rounding step of the logits is more
    than exp2's range (from about 1e10 on the H100), a row's largest logit got weight 0
    (lse -inf and a wrong row at scale 1e9: benchmarks/RESULTS.md, 2026-12-06)."""
    return lax.optimization_barrier(logits)


def _read_per_tile(ref, shape, *, b, h, q_start, block_q):
    """The part of a materialized read ``[B|1, N|1, T|1, S|1]`` that is the same for every
    kv-block of a tile, loaded once per tile: the scalar, the q-row ``[block_q]`` (WGMMA
    row layout) of a read along q only, or None for reads along kv."""
    b1, h1, t1, s1 = shape
    bi, hi = (b if b1 > 1 else 0), (h if h1 > 1 else 0)
    if s1 > 1:
        return None
    if t1 == 1:
        return ref[bi, hi, 0, 0]
    return _load(ref.at[bi, hi, pl.ds(q_start, block_q), 0], plgpu.Layout.WGMMA.reduce(1))


def _read_per_step(ref, shape, per_tile, *, b, h, q_start, block_q, kv_start, block_kv, kv_column=None):
    """A read's ``[block_q, block_kv]`` tile (or scalar) at one kv-block, from its per-tile
    part (``_read_per_tile``), from ``kv_column`` (a read along kv only, loaded ahead:
    ``_read_kv_column``) or, for other reads along kv, loaded here."""
    b1, h1, t1, s1 = shape
    if s1 == 1:
        if t1 == 1:
            return per_tile
        return lax.broadcast_in_dim(per_tile, (block_q, block_kv), [0])
    if kv_column is not None:
        return lax.broadcast_in_dim(kv_column, (block_q, block_kv), [1])
    return _read_tile(ref, shape, b=b, h=h, q_start=q_start, block_q=block_q, kv_start=kv_start,
                      block_kv=block_kv)


def _read_kv_column(ref, shape, *, b, h, kv_start, block_kv, q_axis=0):
    """The ``[block_kv]`` keys of a read along kv only, in the WGMMA layout reduced over the
    tile's q axis (0: a ``[block_q, block_kv]`` tile's columns), or None for any other read."""
    b1, h1, t1, s1 = shape
    if t1 > 1 or s1 == 1:
        return None
    return _load(ref.at[b if b1 > 1 else 0, h if h1 > 1 else 0, 0, pl.ds(kv_start, block_kv)],
                 plgpu.Layout.WGMMA.reduce(q_axis))


def forward(cfg: MosaicKernelConfig, q, k, v, plan_arrays, order, reads, q_off, kv_off, pages=()):
    """Run the kernel on padded q ``[B, Tp, N, H]``, k/v ``[B, Sp, K, H]``.

    plan_arrays: (full_counts, full_indices, partial_counts, partial_indices) of the plan
    built with (2 * block_q, block_kv), ``[B', H', nq]`` / ``[B', H', nq, nk]`` int32.
    order: ``int32[B * N * nq]``, the tiles heaviest first (``tile_order``).
    pages: with ``cfg.page_size``, k/v are page pools ``[P, page_size, K, H]`` and pages is
    ``(tables int32[B, Sp / page_size], last int32[B], k_tail, v_tail [B, page_size, K, H])``
    (``mosaic_attention.paged_kv_inputs``): a block is brought in page by page, page
    ``tables[b, i]`` for positions ``i * page_size ...``, except that the sequence's last
    page ``last[b]`` and any after it are its tail copy. Returns (out [B, Tp, N, H], lse f32[B, N, Tp]).
    """
    fcounts, findices, pcounts, pindices = plan_arrays
    B, Tp, N, H = q.shape
    dtype = q.dtype
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.num_stages
    n_reads = len(reads)
    G = cfg.groups
    kv_valid_len = cfg.kv_len
    nq = Tp // (2 * bq)
    n_tiles, ctas = B * N * nq, cfg.ctas
    assert order.shape == (n_tiles,) and 0 < ctas <= n_tiles, (order.shape, n_tiles, ctas)

    paged = cfg.page_size > 0
    assert len(pages) == (4 if paged else 0) and bkv % max(cfg.page_size, 1) == 0, (len(pages), cfg.page_size)
    pages_per_block = bkv // cfg.page_size if paged else 1

    def kernel(qoff_ref, kvoff_ref, order_ref, fc_ref, fi_ref, pc_ref, pi_ref, q_ref, k_ref, v_ref, *rest):
        page_refs, rest = rest[:len(pages)], rest[len(pages):]
        read_refs = rest[:n_reads]
        out_ref, lse_ref = rest[n_reads:n_reads + 2]
        (q_smem2, o_smem2, k_smem, v_smem, lse_smem2), (k_bar, v_bar, q_bar), (k_free, v_free), sched = \
            rest[n_reads + 2:]

        cta = lax.axis_index("cta")
        wg = lax.axis_index("wg")
        n_local = local_tile_count(n_tiles, ctas, cta)

        def tile_at(j):
            """(b, h, i, plan row, FULL blocks, listed blocks) of this block's j-th tile."""
            b, h, i = split_tile(scheduled_tile(order_ref, ctas, cta, j), N, nq)
            row = plan_row((cfg.plan_b, cfg.plan_h), b, h, i)
            n_full, n_steps = row_steps(fc_ref, pc_ref, row)
            return b, h, i, row, n_full, n_steps

        def schedule():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _consumer():
            # 2 x 128 threads x 232 + 128 x 40 registers fill the SM's 64K exactly; more and the
            # block cannot launch.
            plgpu.set_max_registers(232, action="increase")
            q_smem, o_smem, lse_smem = q_smem2.at[wg], o_smem2.at[wg], lse_smem2.at[wg]
            rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
            cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)

            def fetch_q(j):
                b, h, i = split_tile(scheduled_tile(order_ref, ctas, cta, j), N, nq)
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(i * (2 * bq) + wg * bq, bq), h], q_smem, q_bar.at[wg])

            pl.when(n_local > 0)(lambda: fetch_q(0))

            def run_tile(j, step0):
                """Tile j; ``step0``: the K/V ring's steps before it. Returns the steps after it."""
                b, h, i, row, n_full, n_steps = tile_at(j)
                q_start = i * (2 * bq) + wg * bq
                q_base = qoff_ref[b] + q_start
                kv_base = kvoff_ref[b]
                per_tile = [_read_per_tile(r, shp, b=b, h=h, q_start=q_start, block_q=bq)
                            for r, shp in zip(read_refs, cfg.read_shapes)]

                m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                acc = plgpu.layout_cast(jnp.full((bq, H), 0.0, jnp.float32), plgpu.Layout.WGMMA)

                plgpu.barrier_wait(q_bar.at[wg])

                @pl.when(n_steps > 0)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(step0, stages)])

                pl.when(wg == 1)(schedule)

                def step_inputs(step):
                    """The block's first key and the reads along kv only (None for others) of
                    listed step ``step`` (clamped into the row's steps)."""
                    step = jnp.maximum(jnp.minimum(step, n_steps - 1), 0)
                    kv_start = listed_block(fi_ref, pi_ref, row, n_full, step) * bkv
                    return kv_start, tuple(_read_kv_column(r, shp, b=b, h=h, kv_start=kv_start, block_kv=bkv)
                                           for r, shp in zip(read_refs, cfg.read_shapes))

                def step_fn(step, carry, *, partial):
                    if cfg.lookahead:   # this step's inputs were loaded during the last one
                        acc, m_i, l_i, (kv_start, kv_columns) = carry
                        ahead = step_inputs(step + 1)
                    else:
                        acc, m_i, l_i = carry
                        kv_start = listed_block(fi_ref, pi_ref, row, n_full, step) * bkv
                        kv_columns = (None,) * len(read_refs)
                    slot = lax.rem(step0 + step, stages)
                    needs_reads = (partial and cfg.program.canonical.has_mask) if cfg.mask_only else True
                    # Issued before the product so that the loads' latency hides behind it.
                    read_tiles = [_read_per_step(r, shp, pt, b=b, h=h, q_start=q_start, block_q=bq,
                                                 kv_start=kv_start, block_kv=bkv, kv_column=col)
                                  for r, shp, pt, col in zip(read_refs, cfg.read_shapes, per_tile, kv_columns)
                                  ] if needs_reads else []

                    def qk_scope(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                        schedule()
                        return acc_ref[...]
                    s = pl.run_scoped(qk_scope, plgpu.ACC((bq, bkv), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])

                    needs_pos = partial or not cfg.mask_only
                    q_pos = rows + q_base if needs_pos else None
                    kv_pos = cols + (kv_base + kv_start) if needs_pos else None
                    logits = _logits2(cfg, s, partial=partial, b=b, h=h, q_pos=q_pos, kv_pos=kv_pos,
                                      reads=lambda: read_tiles)
                    if partial and kv_valid_len != cfg.kv_len_padded:
                        logits = jnp.where(cols + kv_start < kv_valid_len, logits, -jnp.inf)

                    m_new = jnp.maximum(m_i, logits.max(axis=1))
                    if partial or not cfg.mask_only:
                        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    else:
                        m_use = m_new   # a FULL tile of a mask-only mod has finite logits
                    alpha = jnp.exp2(at_most_zero(m_i - m_use))
                    p = jnp.exp2(at_most_zero(logits - lax.broadcast_in_dim(m_use, logits.shape, [0])))
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l_i = l_i * alpha
                    p16 = p.astype(dtype)

                    def end_softmax():
                        plgpu.barrier_arrive(sched)
                        plgpu.barrier_wait(v_bar.at[slot])
                        plgpu.barrier_wait(sched)
                    if H <= 128:
                        l_i = l_i + p.sum(axis=1)
                        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                        end_softmax()
                    else:
                        end_softmax()
                        l_i = l_i + p.sum(axis=1)

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                        @pl.when(step + 1 < n_steps)
                        def _():
                            plgpu.barrier_wait(k_bar.at[lax.rem(step0 + step + 1, stages)])
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return (acc, m_new, l_i, ahead) if cfg.lookahead else (acc, m_new, l_i)

                carry = (acc, m_i, l_i) + ((step_inputs(0),) if cfg.lookahead else ())
                carry = lax.fori_loop(0, n_full, functools.partial(step_fn, partial=False), carry)
                acc, m_i, l_i = lax.fori_loop(n_full, n_steps, functools.partial(step_fn, partial=True), carry)[:3]
                pl.when(wg == 0)(schedule)

                # The last product has read Q: bring the next tile's while this one is written.
                pl.when(j + 1 < n_local)(lambda: fetch_q(j + 1))

                empty = l_i == 0.0
                l_safe = jnp.where(empty, 1.0, l_i)
                acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile's output has left o_smem
                o_smem[...] = acc.astype(dtype)
                lse_smem[...] = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * LN2)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(q_start, bq), h])
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_start, bq)])
                return step0 + n_steps

            lax.fori_loop(0, n_local, run_tile, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        def copy_block(pool_ref, tail_index, b, kvh, block, dst, barrier):
            """TMA of kv-block ``block`` of sequence ``b`` into ``dst``: one copy, or (paged) one
            per page, each arriving on ``barrier`` (``pages_per_block`` arrivals)."""
            if not paged:
                plgpu.copy_gmem_to_smem(pool_ref.at[b, pl.ds(block * bkv, bkv), kvh], dst, barrier)
                return
            tables_ref, last_ref, tail_ref = page_refs[0], page_refs[1], page_refs[tail_index]
            ps = cfg.page_size
            for i in range(pages_per_block):
                index = block * pages_per_block + i
                part = dst.at[pl.ds(i * ps, ps)]
                # The last page, and the pages past it in the block, come from the tail copy:
                # slots past the length may hold anything (NaN included, which P = 0 would not
                # cancel in P V); the tail copy holds zeros there, and its keys repeated past the
                # length are masked (kv < length is part of the mod).
                is_tail = index >= last_ref[b]

                @pl.when(~is_tail)
                def _():
                    plgpu.copy_gmem_to_smem(pool_ref.at[tables_ref[b, index], :, kvh], part, barrier)

                @pl.when(is_tail)
                def _():
                    plgpu.copy_gmem_to_smem(tail_ref.at[b, :, kvh], part, barrier)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load_tile(j, step0):
                """Brings tile j's listed K/V blocks into the ring, slot by slot as it frees."""
                b, h, i, row, n_full, n_steps = tile_at(j)
                kvh = lax.div(h, jnp.array(G, h.dtype))

                @pl.loop(0, n_steps)
                def _(step):
                    slot = lax.rem(step0 + step, stages)

                    block = listed_block(fi_ref, pi_ref, row, n_full, step)
                    refill = step0 + step >= stages
                    # K of a slot is freed once S is computed, V only after P V: each is refilled as
                    # soon as it is free (on the H100 3.5% off the 1024 window, 2% off documents).
                    pl.when(refill)(lambda: plgpu.barrier_wait(k_free.at[slot]))
                    copy_block(k_ref, 2, b, kvh, block, k_smem.at[slot], k_bar.at[slot])
                    pl.when(refill)(lambda: plgpu.barrier_wait(v_free.at[slot]))
                    copy_block(v_ref, 3, b, kvh, block, v_smem.at[slot], v_bar.at[slot])
                return step0 + n_steps

            lax.fori_loop(0, n_local, load_tile, jnp.int32(0))

    return launch(
        kernel, (q_off, kv_off, order, fcounts, findices, pcounts, pindices, q, k, v, *pages, *reads),
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
        grid=(ctas,), grid_names=("cta",),
        scratch=(tile_smem((2, bq, H), dtype), tile_smem((2, bq, H), dtype), tile_smem((stages, bkv, H), dtype),
                 tile_smem((stages, bkv, H), dtype), plgpu.SMEM((2, bq), jnp.float32)),
        barriers=((plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),
                   plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),
                   plgpu.Barrier(num_barriers=2)),
                  (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
                  plgpu.Barrier(num_arrivals=2)))
