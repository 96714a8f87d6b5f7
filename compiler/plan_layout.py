"""Block plans without jax: which (q-block, kv-block) tiles a kernel visits, which are FULL.

This module never imports jax at import time: ``dslc explain`` of a static mask and plans of
static masks run without it. ``compiler/plan.py`` adds what needs jax (``build_plan``, the
jittable builder for masks with tensors, ``BlockPlan`` as a jax pytree) and re-exports
everything here; the list functions take jax arrays too (NumPy in, NumPy out; jax in, jax
out), importing jax.numpy only when given them.

Layout (FlexAttention's BCSR-like layout; docs/compiler.md, "Block plans"). ``B'``/``H'``
are 1 when the mask does not depend on the batch/head (after taking tensor ranks and
per-batch offsets into account), else the batch size / number of query heads.

  classes    int8 [B', H', nq, nk]   0 EMPTY, 1 PARTIAL, 2 FULL  (explain, tests)
  kv_counts  int32[B', H', nq]       number of non-empty kv-blocks of each q-block
  kv_indices int32[B', H', nq, nk]   those kv-blocks in increasing order; entries past
                                     kv_counts repeat the last listed block (0 when none)
  kv_full    int8 [B', H', nq, nk]   1 where the listed kv-block is FULL (mask skipped)
  q_counts   int32[B', H', nk]       the transpose, for the dK/dV backward
  q_indices  int32[B', H', nk, nq]
  q_full     int8 [B', H', nk, nq]

nq = ceil(q_len / block_q), nk = ceil(kv_len / block_kv). A ragged last block is
classified on its valid positions only. Arrays are NumPy for static masks (built at
trace time, cached) and jax arrays from the jittable builder for masks that read
tensors or take array offsets. BlockPlan is a jax pytree (sizes are static), registered
by ``compiler/plan.py``: import that before handing plans to jax (the runtime does).
``kv_full``/``q_full`` are 0 past the counts.

Builders:
  build_plan(...)            compiler/plan.py: checks, then the NumPy or the jax builder
  build_static_plan(mask, q_len, kv_len, block_q, block_kv, batch, heads, q_offset, kv_offset)
  plan_from_classes(classes, *, q_len, kv_len, block_q, block_kv)

The lists as kernels walk them (the one place a plan's rows become kernel lists; a
ragged last block, ``ragged_edge``, always counts as PARTIAL there):
  split_lists(counts, indices, full, *, entry_edge, row_edge)   FULL list + PARTIAL list
  merged_list(counts, indices, full, *, entry_edge, row_edge)   one list with FULL flags
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from scoremod.errors import ScoreModShapeError
from scoremod.dsl.ast import Node, tensor_names
from scoremod.dsl.typecheck import INT32_MAX, INT32_MIN
from scoremod.compiler.intervals import (
    EMPTY, FULL, NUMPY_CHUNK_CELLS, PARTIAL, BlockGrid, PositionBlocks, batch_head_dependence, check_heads,
    classify_blocks, num_blocks,
)
from scoremod.compiler.rewrite import simplify
from scoremod.compiler.tensors import mask_of

__all__ = [
    "BlockPlan", "EMPTY", "PARTIAL", "FULL", "build_static_plan", "block_grid", "check_offset", "check_positions",
    "compact_rows", "plan_from_classes", "plan_grid_shape", "validate_plan_sizes", "plan_is_static",
    "MAX_GRID_CELLS", "MAX_SEQUENCE", "merged_list", "ragged_edge", "split_lists",
]

# Largest block grid B' * H' * nq * nk a plan may have (int32 flat indices; ~1.4 GB of plan).
MAX_GRID_CELLS = 2**28
# Positions are int32 (docs/language.md, "8. Arithmetic").
MAX_SEQUENCE = INT32_MAX


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """A block plan (the layout in the module docstring): NumPy arrays for static masks, jax
    arrays from the jittable builder. A jax pytree once ``compiler/plan.py`` is imported."""
    block_q: int
    block_kv: int
    q_len: int
    kv_len: int
    classes: Any
    kv_counts: Any
    kv_indices: Any
    kv_full: Any
    q_counts: Any
    q_indices: Any
    q_full: Any

    _ARRAYS = ("classes", "kv_counts", "kv_indices", "kv_full", "q_counts", "q_indices", "q_full")

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.block_kv)

    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        """``(B', H', nq, nk)``."""
        return tuple(self.classes.shape)

    @property
    def metadata_bytes(self) -> int:
        """Bytes of what kernels read (counts, indices, full flags, both directions)."""
        return sum(int(np.prod(getattr(self, n).shape)) * np.dtype(getattr(self, n).dtype).itemsize
                   for n in self._ARRAYS[1:])

    def tree_flatten(self):
        return (tuple(getattr(self, n) for n in self._ARRAYS),
                (self.block_q, self.block_kv, self.q_len, self.kv_len))

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, *children)


# ---- validation ---------------------------------------------------------------------------

def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ScoreModShapeError(f"{name}={value!r} must be a positive int")
    return int(value)


def validate_plan_sizes(*, q_len, kv_len, block_q, block_kv, batch=1, heads=1) -> None:
    """Raise ``ScoreModShapeError`` for non-positive sizes, block sizes not powers of two, more
    positions than int32 holds or more heads than ``MAX_HEADS``."""
    for name, value in (("q_len", q_len), ("kv_len", kv_len), ("batch", batch), ("heads", heads),
                        ("block_q", block_q), ("block_kv", block_kv)):
        _positive_int(name, value)
    check_heads(heads)
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if value > MAX_SEQUENCE:
            raise ScoreModShapeError(f"{name}={value} is more positions than int32 holds (at most {MAX_SEQUENCE:,})")
    for name, value in (("block_q", block_q), ("block_kv", block_kv)):
        if value & (value - 1):
            raise ScoreModShapeError(f"{name}={value} must be a power of two",
                                     hint="for example 64 or 128")


def check_positions(name: str, offsets: list[int], length: int):
    """Raise when ``offset`` or ``offset + length - 1`` leaves int32 (Python ints: no overflow here)."""
    if not offsets:
        return
    lo, hi = min(offsets), max(offsets) + max(length - 1, 0)
    if lo < INT32_MIN or hi > INT32_MAX:
        raise ScoreModShapeError(f"{name} puts positions at {lo if lo < INT32_MIN else hi}, outside int32 "
                                 f"[{INT32_MIN}, {INT32_MAX}]: positions are int32 in every implementation")


def check_offset(name: str, offset, batch: int, length: int):
    """An offset (int, or int array ``[B]``) as plans take it; positions ``offset ..
    offset + length - 1`` must stay in int32 (``check_positions``, where the values are known)."""
    if isinstance(offset, bool):
        raise ScoreModShapeError(f"{name}={offset!r} must be an int or an int[B] array")
    if isinstance(offset, (int, np.integer)):
        check_positions(name, [int(offset)], length)
        return int(offset)
    shape = np.shape(offset)
    dtype = np.dtype(offset.dtype) if hasattr(offset, "dtype") else np.asarray(offset).dtype
    if dtype.kind not in "iu" or shape not in ((), (batch,)):
        raise ScoreModShapeError(
            f"{name} must be an int or an int array of shape [{batch}] (the batch), got "
            f"{dtype} array of shape {list(shape)}")
    if isinstance(offset, np.ndarray):
        check_positions(name, [int(v) for v in offset.reshape(-1)], length)
    return offset


def plan_grid_shape(mask, *, q_len, kv_len, block_q, block_kv, batch=1, heads=1, q_offset=0, kv_offset=0,
                    tensors: Mapping[str, Any] | None = None) -> tuple[int, int, int, int]:
    """``(B', H', nq, nk)`` of the plan ``build_plan`` would make (nothing is computed)."""
    mask = mask_of(mask)
    shapes = {k: np.shape(v) for k, v in (tensors or {}).items()}
    dep_b, dep_h = batch_head_dependence(mask, shapes, q_per_batch=np.ndim(q_offset) == 1,
                                         kv_per_batch=np.ndim(kv_offset) == 1)
    return (batch if dep_b else 1, heads if dep_h else 1, num_blocks(q_len, block_q), num_blocks(kv_len, block_kv))


# ---- from classes to the compact layout ---------------------------------------------------

def _transposed(planes: np.ndarray, tile: int = 1024) -> np.ndarray:
    """A contiguous copy of ``planes`` [P, n, m] with the last two axes swapped, copied
    tile by tile (cache-friendly: about twice as fast as ``np.ascontiguousarray`` of the
    swapped view for large int8 grids)."""
    P, n, m = planes.shape
    out = np.empty((P, m, n), planes.dtype)
    for p in range(P):
        for i in range(0, n, tile):
            for j in range(0, m, tile):
                out[p, j:j + tile, i:i + tile] = planes[p, i:i + tile, j:j + tile].T
    return out


def compact_rows(selected):
    """The one way a row of blocks becomes a list: ``(counts int32[...], positions int32[..., m])``
    of a bool ``selected [..., m]``: each row's selected positions first, in increasing
    order; entries past the count repeat the last selected position (0 when none).

    NumPy in, NumPy out (``np.nonzero`` a slice of rows at a time, so a 1M-token static
    plan never holds more than ``NUMPY_CHUNK_CELLS`` temporaries); jax in, jax out:
    jittable, no sort on the device; short rows by two fused reductions
    (``_compact_rows_by_counting``), long ones by a cumsum and a scatter. Plans, the
    split of a plan into FULL and PARTIAL lists, the xla path's visit lists and the paged
    walk all use it.
    """
    if isinstance(selected, np.ndarray):
        return _compact_rows_numpy(selected)
    import jax.numpy as jnp   # given jax arrays: jax is loaded already
    lead, m = selected.shape[:-1], selected.shape[-1]
    flat = selected.reshape(-1, m)
    rows = flat.shape[0]
    if 0 < m and rows * m * m <= COUNTING_COMPACTION_CELLS:
        count, out = _compact_rows_by_counting(flat)
        return count.reshape(lead), out.reshape(selected.shape)
    pos = jnp.cumsum(flat, axis=1, dtype=jnp.int32)
    count = pos[:, -1] if m else jnp.zeros((rows,), jnp.int32)
    cols = jnp.arange(m, dtype=jnp.int32)
    slot = jnp.arange(rows, dtype=jnp.int32)[:, None] * m + pos - 1
    slot = jnp.where(flat, slot, rows * m)  # out of range: dropped
    out = jnp.zeros(rows * m, jnp.int32).at[slot.reshape(-1)].set(
        jnp.broadcast_to(cols, (rows, m)).reshape(-1), mode="drop").reshape(rows, m)
    last = jnp.take_along_axis(out, jnp.maximum(count - 1, 0)[:, None], axis=1)
    out = jnp.where(cols[None, :] < count[:, None], out, last)
    return count.reshape(lead), out.reshape(selected.shape)


# Rows x m x m at most for compacting by counting: its two reductions touch that many
# cells (at T=8192 and 64-blocks, 16 heads and batch 2: 2^25), where the cumsum-and-scatter
# path is a dozen small kernels on the GPU (measured on an H100: benchmarks/RESULTS.md).
COUNTING_COMPACTION_CELLS = 2**27


def _compact_rows_by_counting(flat):
    """``compact_rows`` of a jax bool ``[rows, m]`` by counting, no scatter: with ``pos[i]``
    the number of selected entries in ``0..i``, the (j+1)-th selected entry is at the
    number of ``i`` with ``pos[i] <= j`` (``pos`` never decreases); entries past the count
    take ``j = count - 1``, the last one (0 when none is selected)."""
    import jax.numpy as jnp   # given jax arrays: jax is loaded already
    rows, m = flat.shape
    cols = jnp.arange(m, dtype=jnp.int32)
    upto_col = cols[None, :] <= cols[:, None]                                         # [i, i']: i' <= i
    pos = jnp.sum(upto_col[None] & flat[:, None, :], axis=-1, dtype=jnp.int32)       # [rows, m]
    count = pos[:, -1]
    j = jnp.minimum(cols[None, :], count[:, None] - 1)                                 # [rows, m]
    out = jnp.sum(pos[:, None, :] <= j[:, :, None], axis=-1, dtype=jnp.int32)         # [rows, m]
    return count, out


# ---- the plan's lists as kernels walk them ------------------------------------------------

def _array_module(*arrays):
    """NumPy for NumPy arrays, else jax.numpy (imported only then: static plans need no jax)."""
    if all(isinstance(x, np.ndarray) for x in arrays):
        return np
    import jax.numpy as jnp
    return jnp


def ragged_edge(length: int, block: int):
    """Index of the ragged last block, or None when the length is a block multiple."""
    return None if length % block == 0 else length // block


def merged_list(counts, indices, full, *, entry_edge=None, row_edge=None):
    """One list with FULL flags (ragged last blocks flagged PARTIAL, as in ``split_lists``),
    in the layout the one-loop kernels read: (counts, indices, counts (unused), flags int8)."""
    xp = _array_module(counts, indices, full)
    counts, indices, full = xp.asarray(counts), xp.asarray(indices), xp.asarray(full)
    flags = full != 0
    if entry_edge is not None:
        flags = flags & (indices != entry_edge)
    if row_edge is not None:
        flags = flags & (xp.arange(indices.shape[-2]) != row_edge)[None, None, :, None]
    return (counts.astype(np.int32), indices.astype(np.int32), counts.astype(np.int32),
            flags.astype(np.int8))


def split_lists(counts, indices, full, *, entry_edge=None, row_edge=None):
    """Split a plan's lists into FULL and PARTIAL lists for the kernels' two loops.

    counts int32[B', H', R], indices int32[B', H', R, E], full int8[B', H', R, E] (a plan's
    kv_* lists, R = q-blocks; or its q_* lists, R = kv-blocks). A ragged last block must
    have its rows/columns masked, so entries equal to ``entry_edge`` and every entry of
    row ``row_edge`` go to the PARTIAL list whatever the plan says.

    Returns (full_counts [B',H',R], full_indices [B',H',R,E], partial_counts,
    partial_indices), each list in increasing order; entries past a count are unused.
    NumPy in, NumPy out (static plans cost nothing at run time); jax arrays otherwise.
    """
    xp = _array_module(counts, indices, full)
    counts, indices, full = xp.asarray(counts), xp.asarray(indices), xp.asarray(full)
    n_rows, n_entries = indices.shape[-2], indices.shape[-1]
    listed = xp.arange(n_entries)[None, None, None, :] < counts[..., None]
    is_full = listed & (full != 0)
    if entry_edge is not None:
        is_full = is_full & (indices != entry_edge)
    if row_edge is not None:
        is_full = is_full & (xp.arange(n_rows) != row_edge)[None, None, :, None]
    is_part = listed & ~is_full

    def compact(sel):
        counts, positions = compact_rows(sel)
        return counts, xp.take_along_axis(indices, positions, axis=-1).astype(np.int32)

    return (*compact(is_full), *compact(is_part))


def _compact_rows_numpy(selected: np.ndarray):
    lead, m = selected.shape[:-1], selected.shape[-1]
    counts = selected.sum(axis=-1, dtype=np.int32)
    if m == 0 or selected.size == 0:
        return counts, np.zeros(selected.shape, np.int32)
    flat = selected.reshape(-1, m)
    flat_counts = counts.reshape(-1)
    out = np.empty(flat.shape, np.int32)
    step = max(1, NUMPY_CHUNK_CELLS // m)
    for first in range(0, flat.shape[0], step):
        count = flat_counts[first:first + step]
        row, col = np.nonzero(flat[first:first + step])     # row by row, in order
        ends = np.cumsum(count, dtype=np.int64)
        rank = np.arange(len(row), dtype=np.int64) - (ends - count)[row]
        block = out[first:first + step]
        last = col[np.maximum(ends - 1, 0)] if len(col) else np.zeros(len(count), np.int64)
        block[...] = np.where(count > 0, last, 0)[:, None]
        block[row, rank] = col
    return counts, out.reshape(lead + (m,))


def _compact(classes):
    """``(counts, indices, full int8)`` of a plan's rows (``compact_rows`` of the non-EMPTY
    blocks, and which of them are FULL). NumPy in, NumPy out; jax in, jax out."""
    xp = _array_module(classes)
    count, out = compact_rows(classes != EMPTY)
    listed = xp.arange(classes.shape[-1], dtype=np.int32) < count[..., None]
    is_full = (xp.take_along_axis(classes, out, axis=-1) == FULL) & listed
    return count, out, is_full.astype(np.int8)


def plan_from_classes(classes, *, q_len: int, kv_len: int, block_q: int, block_kv: int) -> BlockPlan:
    """A ``BlockPlan`` from classes int8 [B', H', nq, nk] (NumPy in, NumPy out; jax in, jax out)."""
    if isinstance(classes, np.ndarray):
        B, H, nq, nk = classes.shape
        planes = np.ascontiguousarray(classes).reshape(B * H, nq, nk)
        transposed = _transposed(planes)
        kv = [x.reshape((B, H) + x.shape[1:]) for x in _compact(planes)]
        q = [x.reshape((B, H) + x.shape[1:]) for x in _compact(transposed)]
    else:
        kv = _compact(classes)
        q = _compact(classes.swapaxes(-1, -2))
    return BlockPlan(block_q, block_kv, q_len, kv_len, classes, *kv, *q)


# ---- the NumPy builder -------------------------------------------------------------------

def block_grid(q_len, kv_len, block_q, block_kv, batch, heads, q_offset, kv_offset) -> BlockGrid:
    """The ``BlockGrid`` a plan of these sizes classifies."""
    return BlockGrid(batch, heads, PositionBlocks(q_len, block_q, q_offset), PositionBlocks(kv_len, block_kv, kv_offset))


# Static plans kept: each holds NumPy arrays of B' x H' x nq x nk entries (up to hundreds
# of MB for a 1M-token plan), and a model uses a handful of masks and shapes.
STATIC_PLAN_CACHE = 64


@lru_cache(maxsize=STATIC_PLAN_CACHE)
def build_static_plan(mask: Node, q_len: int, kv_len: int, block_q: int, block_kv: int, batch: int, heads: int,
                      q_offset: int, kv_offset: int) -> BlockPlan:
    """The plan of a static mask (no tensor reads; int offsets), built with NumPy and cached
    on all its arguments; its arrays are read-only (shared by every caller). The arguments
    are checked already (``build_plan`` does, so does ``explain``)."""
    grid = block_grid(q_len, kv_len, block_q, block_kv, batch, heads, q_offset, kv_offset)
    classes = classify_blocks(simplify(mask), grid, {}, np)
    plan = plan_from_classes(np.ascontiguousarray(classes), q_len=q_len, kv_len=kv_len, block_q=block_q,
                             block_kv=block_kv)
    for name in BlockPlan._ARRAYS:
        getattr(plan, name).flags.writeable = False  # shared by every caller of the cache
    return plan


def plan_is_static(mask, q_offset, kv_offset) -> bool:
    """Whether ``build_plan`` builds this plan with NumPy at trace time (and caches it): the
    mask (IR, Canonical or Mod) reads no tensor and both offsets are Python ints."""
    mask = mask_of(mask)
    return (mask is None or not tensor_names(mask)) and isinstance(q_offset, int) and isinstance(kv_offset, int)
