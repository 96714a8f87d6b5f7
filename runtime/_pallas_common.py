"""Pieces the Pallas forward and backward kernels share.

* ``KernelConfig``: everything static about one call (shapes, blocks, the tile program).
* ``TileLogits``: the logits of one (q-block, kv-block) tile, FULL fast path or PARTIAL
  path (mask evaluated), with ragged edges masked, in base 2 (``log2(e) * logit``).
* read helpers: plain tensor reads of the ``TileProgram`` arrive as 4-D arrays
  ``[B|1, N|1, T|1, S|1]``; each kernel gets a BlockSpec that selects the program's
  (b, h) and keeps whole T|1 and S|1 axes, and loads the tile's slice by dynamic index.
  Gather reads (computed indices, ``relpos``) arrive as whole tables, flattened; every
  program sees the whole table and the tile program gathers from it at the indices it
  computes (``TableLookup``: an integer-array load, a gather in Triton).

All loads that can run past the end of an array go through ``pltriton.load`` with a mask
and ``other``: Triton reads raw pointers (an unmasked load past the end reads garbage),
and interpret mode pads with NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scoremod.dsl.ast import walk
from scoremod.compiler.tile import TableLookup, TileProgram

if TYPE_CHECKING:  # (pallas_attention imports this module)
    from scoremod.runtime.pallas_attention import PallasBlockSizes
from scoremod.runtime._triton import MIN_TILE, pltriton

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)



def dot(a, b, trans_a=False, trans_b=False):
    """Matrix product of two 2-D tiles with f32 accumulation (Triton ``tl.dot``)."""
    fn = getattr(pltriton, "dot", None) or pl.dot
    return fn(a, b, trans_a=trans_a, trans_b=trans_b)


def exp2(x, *, fast: bool):
    """``2**x`` in f32. fast: one ``ex2.approx.ftz.f32`` per element (what Triton's own
    ``tl.exp2`` emits) instead of libdevice's ``__nv_exp2f`` that ``jnp.exp2`` lowers to;
    ``exp2(-inf) = 0`` either way. Interpret mode always uses ``jnp.exp2``."""
    if not fast or pltriton is None or not hasattr(pltriton, "elementwise_inline_asm"):
        return jnp.exp2(x)
    [y] = pltriton.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y


def load(ref, *, mask=None, other=None):
    """``pltriton.load`` with ``other`` only where a mask is given (Triton's rule)."""
    if pltriton is None:
        return ref[...]
    if mask is None:
        return pltriton.load(ref)
    return pltriton.load(ref, mask=mask, other=other)


def store(ref, value, *, mask=None):
    if pltriton is None or mask is None:
        ref[...] = value
        return
    pltriton.store(ref, value, mask=mask)


@dataclass(frozen=True)
class KernelConfig:
    """Static description of one attention call (hashable: a jit/custom_vjp static arg)."""
    program: TileProgram          # hashed by identity; TileProgram.build is cached
    scale: float
    batch: int
    q_len: int
    kv_len: int
    heads: int                    # N, query heads
    kv_heads: int                 # K
    head_dim: int
    read_shapes: tuple            # 4-D shape of each materialized read; a gather read's table shape
    interpret: bool
    blocks: "PallasBlockSizes"    # the call's tiling, each block clamped to the sequence
    debug_counts: bool = False

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def head_dim_padded(self) -> int:
        return max(MIN_TILE, pl.next_power_of_2(self.head_dim))

    @property
    def base2(self) -> bool:
        """Mask-only mods: the logit is the score, so scale by log2(e) in the product."""
        return self.program.canonical.kind == "mask"


# ---- the rows or columns a kernel loads ----------------------------------------------

@dataclass(frozen=True, eq=False)
class Span:
    """``block`` consecutive rows (queries) or columns (keys) of a tile, from ``start``.

    index: int32[block] row numbers; valid: bool[block] of the rows that exist (None when
    all do); mask: bool[block, head_dim_padded] for loads and stores (rows that exist x
    real head dims; None when nothing needs masking)."""
    start: Any
    index: Any
    valid: Any
    mask: Any


def span(cfg: KernelConfig, start, block: int, length: int, *, check_edge: bool = True) -> Span:
    """The ``Span`` of ``block`` rows from ``start`` of a sequence of ``length``.
    ``check_edge=False`` for tiles known not to hold the ragged last block (FULL lists)."""
    index = start + jnp.arange(block, dtype=jnp.int32)
    valid = index < length if (check_edge and length % block) else None
    hp = cfg.head_dim_padded
    head_ok = (jnp.arange(hp) < cfg.head_dim)[None, :] if hp != cfg.head_dim else None
    rows_ok = None if valid is None else valid[:, None]
    if rows_ok is None and head_ok is None:
        mask = None
    else:
        both = head_ok if rows_ok is None else rows_ok if head_ok is None else rows_ok & head_ok
        mask = jnp.broadcast_to(both, (block, hp))
    return Span(start, index, valid, mask)


def listed_span(cfg: KernelConfig, fidx_ref, pidx_ref, is_full, j, block: int, length: int):
    """``(span, full)`` of the j-th tile a kernel walks. ``is_full`` True / False: the
    FULL / PARTIAL list (``compiler.plan.split_lists``; fidx_ref / pidx_ref hold block
    indices); None: one merged list (``merged_list``: fidx_ref the blocks, pidx_ref their
    FULL flags) and ``full`` is traced. FULL lists never hold a ragged last block (the
    wrapper moves it), so their spans skip the edge check."""
    idx_ref = pidx_ref if is_full is False else fidx_ref
    full = is_full if is_full is not None else pidx_ref[j] != 0
    return span(cfg, idx_ref[j] * block, block, length, check_edge=is_full is not True), full


def load_rows(ref, rows: Span):
    """The ``[block, head_dim_padded]`` tile of ``ref`` (already at the span), zero where masked."""
    return load(ref, mask=rows.mask, other=0.0 if rows.mask is not None else None)


def load_row_stats(ref, rows: Span):
    """A per-row vector (lse, delta) of the span, zero where the rows do not exist."""
    return load(ref, mask=rows.valid, other=0.0 if rows.valid is not None else None)


def tile_valid(q_rows: Span, kv_cols: Span):
    """bool ``[bq|1, bkv|1]`` of the tile positions that exist, or None when all do."""
    if q_rows.valid is None and kv_cols.valid is None:
        return None
    if q_rows.valid is None:
        return kv_cols.valid[None, :]
    if kv_cols.valid is None:
        return q_rows.valid[:, None]
    return q_rows.valid[:, None] & kv_cols.valid[None, :]


# ---- plans ------------------------------------------------------------------------------

def plan_spec_rows(arr_shape, grid_fn):
    """BlockSpec for a plan array ``[B', H', n, m]`` (or ``[B', H', n]``) that selects the
    program's (b', h') row. ``grid_fn(*pids) -> (b, h, row)`` gives the batch, query head
    and plan row of a program."""
    bp, hp = arr_shape[0], arr_shape[1]
    if len(arr_shape) == 3:
        def index_map(*pids):
            b, h, _ = grid_fn(*pids)
            return (b if bp > 1 else 0, h if hp > 1 else 0, 0)
        return pl.BlockSpec((None, None, arr_shape[2]), index_map)

    def index_map(*pids):
        b, h, row = grid_fn(*pids)
        return (b if bp > 1 else 0, h if hp > 1 else 0, row, 0)
    return pl.BlockSpec((None, None, None, arr_shape[3]), index_map)


def offset_and_plan_specs(batch: int, plan_arrays, grid_fn):
    """The BlockSpecs of the arguments every kernel takes first: the query and key
    offsets ``int32[B]`` (whole) and the four plan arrays (FULL counts, FULL indices,
    PARTIAL counts, PARTIAL indices: the program's row, see ``plan_spec_rows``)."""
    offsets = [pl.BlockSpec((batch,), lambda *pids: (0,)) for _ in range(2)]
    return offsets + [plan_spec_rows(a.shape, grid_fn) for a in plan_arrays]


# ---- tensor reads -------------------------------------------------------------------------

def read_spec(shape, grid_fn):
    """BlockSpec for one materialized read ``[B|1, N|1, T|1, S|1]``: the program's (b, h)."""
    b1, h1, t1, s1 = shape

    def index_map(*pids):
        b, h, _ = grid_fn(*pids)
        return (b if b1 > 1 else 0, h if h1 > 1 else 0, 0, 0)
    return pl.BlockSpec((None, None, t1, s1), index_map)


def read_specs(cfg: KernelConfig, grid_fn):
    """BlockSpecs of every read argument: ``read_spec`` for plain reads, the whole
    flattened table for gather reads (``flat_reads``)."""
    specs = []
    for r, shape in zip(cfg.program.reads, cfg.read_shapes):
        if r.gather:
            specs.append(pl.BlockSpec((math.prod(shape),), lambda *pids: (0,)))
        else:
            specs.append(read_spec(shape, grid_fn))
    return specs


def flat_reads(program: TileProgram, reads):
    """The read arguments of the kernels: plain reads as they are, gather reads' tables
    flattened (the tile program gathers by row-major offset, ``TableLookup``)."""
    return tuple(jnp.reshape(a, (-1,)) if r.gather else a for r, a in zip(program.reads, reads))


def load_read(ref, shape, *, q_start, block_q, q_valid, kv_start, block_kv, kv_valid):
    """The tile of a read: ``[bq|1, bkv|1]`` (int32 or f32), zeros past the ends."""
    _, _, t1, s1 = shape
    rows = pl.ds(q_start, block_q) if t1 > 1 else pl.ds(0, 1)
    cols = pl.ds(kv_start, block_kv) if s1 > 1 else pl.ds(0, 1)
    mask = None
    if t1 > 1 and q_valid is not None:
        mask = q_valid[:, None]
    if s1 > 1 and kv_valid is not None:
        mask = kv_valid[None, :] if mask is None else mask & kv_valid[None, :]
    if mask is not None:
        out_shape = (block_q if t1 > 1 else 1, block_kv if s1 > 1 else 1)
        mask = jnp.broadcast_to(mask, out_shape)
    return load(ref.at[rows, cols], mask=mask, other=0 if mask is not None else None)


class ReadSet:
    """Which reads a tile needs and when: q-only reads once per program, kv reads per tile;
    reads only the mask uses are loaded on PARTIAL tiles only; gather reads (``tables``)
    are gathered by the tile program from the whole table, when it evaluates them."""

    def __init__(self, program: TileProgram, shapes):
        self.shapes = tuple(shapes)
        n = len(self.shapes)
        mask_reads = set(program.mask_reads())
        self.mask_only = frozenset(i for i in mask_reads if not self._used_by_values(program, i))
        self.tables = frozenset(i for i, r in enumerate(program.reads) if r.gather)
        self.n = n

    @staticmethod
    def _used_by_values(program: TileProgram, i: int) -> bool:
        node = program.reads[i].node
        for part in (program.canonical.transform, program.canonical.bias):
            if part is not None and any(n == node for n in walk(part)):
                return True
        return False


def _gather_load(table_ref, flat):
    # An integer-array index into a 1-D ref: a gather (Triton: one pointer per element).
    return table_ref[flat]


def tile_reads(read_set: ReadSet, refs, *, q_start, block_q, q_valid, kv_start, block_kv,
               kv_valid, fixed, which):
    """List of read tiles for the TileProgram (None where not needed).

    fixed: tiles already loaded once per program (kv-independent reads), by index.
    which: "values" (reads the FULL path needs) or "all" (PARTIAL path).
    """
    out = []
    for i in range(read_set.n):
        if which == "values" and i in read_set.mask_only:
            out.append(None)
        elif i in fixed:
            out.append(fixed[i])
        else:
            out.append(load_read(refs[i], read_set.shapes[i], q_start=q_start, block_q=block_q,
                                 q_valid=q_valid, kv_start=kv_start, block_kv=block_kv,
                                 kv_valid=kv_valid))
    return out


def values_and_all_reads(read_set: ReadSet, refs, *, q_start, block_q, q_valid, kv_start, block_kv,
                         kv_valid, fixed):
    """The read tiles a FULL tile needs, loaded now, and a thunk for every read tile (the
    PARTIAL path) that reuses the ones already loaded. Returns ``(values, all_reads)``."""
    where = dict(q_start=q_start, block_q=block_q, q_valid=q_valid, kv_start=kv_start,
                 block_kv=block_kv, kv_valid=kv_valid)
    values = tile_reads(read_set, refs, **where, fixed=fixed, which="values")

    def all_reads():
        loaded = {n: t for n, t in enumerate(values) if t is not None}
        return tile_reads(read_set, refs, **where, fixed={**fixed, **loaded}, which="all")

    return values, all_reads


def fixed_reads(read_set: ReadSet, refs, *, q_start, block_q, q_valid, kv_start=0, block_kv=1,
                kv_valid=None, kv_fixed=False):
    """Reads that do not change along the loop, loaded once per program.

    kv_fixed=False (q-major kernels): reads that do not depend on kv.
    kv_fixed=True (kv-major kernels): reads that do not depend on q.
    Gather reads are here too, as a ``TableLookup`` on the whole table: it loads nothing
    until the tile program gathers through it on a tile.
    """
    out = {}
    for i in range(read_set.n):
        if i in read_set.tables:
            out[i] = TableLookup(tuple(read_set.shapes[i]), functools.partial(_gather_load, refs[i]))
            continue
        t1, s1 = read_set.shapes[i][2], read_set.shapes[i][3]
        if (not kv_fixed and s1 == 1) or (kv_fixed and t1 == 1):
            out[i] = load_read(refs[i], read_set.shapes[i], q_start=q_start, block_q=block_q,
                               q_valid=q_valid, kv_start=kv_start, block_kv=block_kv,
                               kv_valid=kv_valid)
    return out


# ---- logits of one tile -------------------------------------------------------------------

def tile_logits2(cfg: KernelConfig, s, *, full, b, h, q_pos, kv_pos, valid, reads_values,
                 reads_all):
    """Base-2 logits ``log2(e) * where(M, T(scale*s) + B, -inf)`` of a tile.

    s: f32 [bq, bkv] raw q.k products. full: traced bool (FULL tile: no mask evaluation)
    or a Python bool. valid: bool [bq|1, bkv|1] of rows/columns that exist, or None.
    reads_values / reads_all: thunks returning the read tiles for each path.
    """
    prog = cfg.program
    has_mask = prog.canonical.has_mask

    def values():
        if cfg.base2:
            return s * (cfg.scale * LOG2E)
        sn = s * cfg.scale
        return prog.values(sn, b=b, h=h, q=q_pos, kv=kv_pos, reads=reads_values()) * LOG2E

    def masked():
        if cfg.base2:
            v = s * (cfg.scale * LOG2E)
            m = prog.mask(b=b, h=h, q=q_pos, kv=kv_pos, reads=reads_all()) if has_mask else None
        else:
            sn = s * cfg.scale
            rd = reads_all()
            v = prog.values(sn, b=b, h=h, q=q_pos, kv=kv_pos, reads=rd) * LOG2E
            m = prog.mask(b=b, h=h, q=q_pos, kv=kv_pos, reads=rd) if has_mask else None
        if valid is not None:
            m = valid if m is None else m & valid
        if m is None:
            return v
        return jnp.where(m, v, -jnp.inf)

    if isinstance(full, bool):
        return values() if full else masked()
    return lax.cond(full, values, masked)


def dread(cfg: KernelConfig, i: int, s, *, b, h, q_pos, kv_pos, reads):
    """``d(T + B)/d read_i`` on a tile (``TileProgram.dread``), f32 ``[bq, bkv]``."""
    return cfg.program.dread(i, s * cfg.scale, b=b, h=h, q=q_pos, kv=kv_pos, reads=reads)


def dscore(cfg: KernelConfig, s, *, b, h, q_pos, kv_pos, reads):
    """``dT/dscore`` on a tile, or None when T is the identity."""
    if cfg.program.dtransform is None:
        return None
    return cfg.program.dscore(s * cfg.scale, b=b, h=h, q=q_pos, kv=kv_pos, reads=reads)
