"""The page walk of paged attention: which pages of each sequence a decode kernel reads.

The paged counterpart of ``compiler/plan.py``. For T new tokens per sequence (query
``i`` of sequence ``b`` at ``lengths[b] - T + i``) and keys at positions ``0 ..
lengths[b] - 1`` stored in pages of ``page_size``:

* ``page_classes``: EMPTY / PARTIAL / FULL of every (sequence, logical page), by interval
  analysis (sound, jittable) or, with ``exact=True``, by evaluating the mask;
* ``compact_pages``: the non-EMPTY pages of each sequence, in order, looked up in the
  block table;
* ``WalkPlan`` / ``walk_pages``: both, bounded first by the mask's diagonal band
  (``compiler/band.py``): a window looks at its last ``window / page_size + 1`` pages
  whatever the context, and an exact band (causal, windows) lists its pages by
  arithmetic with no classification at all.

Arrays are jax arrays (the walk runs inside the caller's ``jit``; new lengths or ids
never recompile).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from scoremod.dsl.ast import mentions
from scoremod.compiler.band import diagonal_band
from scoremod.compiler.intervals import EMPTY, FULL, PARTIAL, BlockGrid, PositionBlocks, classify_blocks
from scoremod.compiler.mod import Mod, compile_mod
from scoremod.compiler.plan import compact_rows

__all__ = ["page_classes", "compact_pages", "WalkPlan", "walk_pages", "query_positions",
           "EMPTY", "PARTIAL", "FULL"]


def query_positions(lengths, num_tokens: int):
    """Absolute positions of the T new tokens, int32[B, T]: ``lengths[b] - T + i``."""
    return lengths[:, None] - num_tokens + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]


def page_classes(mod, lengths, num_tokens: int, page_size: int, max_pages: int, *, heads: int,
                 tensors=None, exact: bool = False):
    """int8[B, max_pages]: the block class of each (sequence, logical page).

    EMPTY: no query of the sequence (any head) may attend any existing key of the page;
    pages past the length are EMPTY. FULL: the page lies wholly below the length and
    every query (every head) may attend every key of it. PARTIAL otherwise.

    By default the mask is classified by interval analysis
    (``scoremod.compiler.intervals.classify_blocks``, one rectangle per page: the T
    query positions by the page's key positions): sound for every mask, exact for the
    prelude masks on sorted ids, O(B * max_pages) plus O(size) per tensor, and
    jittable (new lengths or ids never recompile). ``exact=True`` evaluates the mask at
    every (head, query, key) position instead: exact for any mask (unsorted ids,
    ``dilated``), at O(B * T * max_pages * page_size) (times N when the mask reads ``h``).
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    return _page_classes(compile_mod(mod) if mod is not None else compile_mod("true"), lengths, dict(tensors or {}), jnp.zeros(lengths.shape, jnp.int32),
                         num_tokens=num_tokens, page_size=page_size, num_pages=max_pages, heads=heads,
                         exact=exact)


@functools.partial(jax.jit, static_argnames=("mod", "num_tokens", "page_size", "num_pages", "heads", "exact"))
def _page_classes(mod, lengths, tensors, first_page, *, num_tokens, page_size, num_pages, heads, exact,
                  query_end=None):
    """Classes of the pages ``first_page[b] + j`` (j < num_pages) of each sequence: [B, num_pages],
    for the ``num_tokens`` queries ending at ``query_end`` (default ``lengths``)."""
    query_end = lengths if query_end is None else query_end
    page = first_page[:, None] + jnp.arange(num_pages, dtype=jnp.int32)[None, :]
    holds_keys = page * page_size < lengths[:, None]                              # [B, num_pages]
    whole = (page + 1) * page_size <= lengths[:, None]
    if not mod.canonical.has_mask:
        nonempty, full = holds_keys, whole
    elif exact:
        nonempty, full = _exact_page_truth(mod, lengths, tensors, first_page, num_tokens, page_size, num_pages,
                                           heads, query_end)
    else:
        nonempty, full = _interval_page_truth(mod, query_end, tensors, first_page, num_tokens, page_size,
                                              num_pages, heads)
    nonempty = nonempty & holds_keys
    return jnp.where(nonempty, jnp.where(full & whole, FULL, PARTIAL), EMPTY).astype(jnp.int8)


def _interval_page_truth(mod, query_end, tensors, first_page, num_tokens, page_size, num_pages, heads):
    B = query_end.shape[0]
    grid = BlockGrid(B, heads, PositionBlocks(num_tokens, num_tokens, query_end - num_tokens),
                     PositionBlocks(num_pages * page_size, page_size, first_page * page_size))
    reads = {n: tensors[n] for n in mod.tensors if n in tensors}
    classes = jnp.asarray(classify_blocks(mod.canonical.mask, grid, reads, jnp))  # [B'|1, H'|1, 1, num_pages]
    classes = jnp.broadcast_to(classes[:, :, 0, :], (B, classes.shape[1], num_pages))
    return jnp.any(classes != EMPTY, axis=1), jnp.all(classes == FULL, axis=1)


def _exact_page_truth(mod, lengths, tensors, first_page, num_tokens, page_size, num_pages, heads, query_end):
    B = lengths.shape[0]
    S = num_pages * page_size
    kv = first_page[:, None] * page_size + jnp.arange(S, dtype=jnp.int32)[None, :]    # [B, S]
    exists = kv < lengths[:, None]
    n_h = heads if _mask_reads_axis(mod.canonical.mask, "h") else 1
    mask_mod = mod.mask_mod(**{n: tensors[n] for n in mod.tensors})
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(n_h, dtype=jnp.int32)[None, :, None, None]
    qpos = query_positions(query_end, num_tokens)[:, None, :, None]
    allowed = mask_mod(b, h, qpos, kv[:, None, None, :])                          # [B, n_h, T, S]
    allowed = jnp.broadcast_to(allowed, (B, n_h, num_tokens, S)).reshape(B, n_h * num_tokens, num_pages, page_size)
    nonempty = jnp.any(allowed & exists.reshape(B, 1, num_pages, page_size), axis=(1, 3))
    return nonempty, jnp.all(allowed, axis=(1, 3))


def _mask_reads_axis(mask, var: str) -> bool:
    """Whether the mask depends on ``var`` directly or through a tensor index."""
    return mentions(mask, var)


@functools.partial(jax.jit, static_argnames=("num_pool_pages", "list_len"))
def compact_pages(classes, block_tables, num_pool_pages: int, list_len: int | None = None, first_page=None):
    """The non-EMPTY pages of each sequence, in position order.

    ``classes`` int8[B, C] are the classes of the logical pages ``first_page[b] + j``
    (``first_page`` int32[B], default 0: then ``C`` is every page of the table).
    Returns ``(logical int32[B, L], physical int32[B, L], counts int32[B])``: entry ``i``
    of row ``b`` (``i < counts[b]``) is the ``i``-th non-EMPTY logical page and its pool
    page ``block_tables[b, logical]`` (clipped into the pool). Entries past the count are
    the last listed page again (read only by masked lanes). ``L = list_len`` (default C)
    must be at least C.
    """
    C = classes.shape[1]
    max_pages = block_tables.shape[1]
    L = C if list_len is None else list_len
    counts, logical = compact_rows(classes != EMPTY)
    if first_page is not None:
        logical = logical + first_page[:, None]
    logical = jnp.pad(logical, ((0, 0), (0, L - C)))   # past the count: see below
    return _repeat_last_and_look_up(logical, counts, block_tables, num_pool_pages, max_pages)


def _repeat_last_and_look_up(logical, counts, block_tables, num_pool_pages: int, max_pages: int):
    """Past the count, repeat the last listed page (lanes there are masked, and a page the
    walk reads anyway costs no extra memory traffic, where an EMPTY page could hold
    garbage); then the pool pages of the list."""
    L = logical.shape[1]
    last = jnp.take_along_axis(logical, jnp.maximum(counts - 1, 0)[:, None], axis=1)
    logical = jnp.where(jnp.arange(L, dtype=jnp.int32)[None, :] < counts[:, None], logical, last)
    tables = jnp.clip(jnp.asarray(block_tables, jnp.int32), 0, num_pool_pages - 1)
    physical = jnp.take_along_axis(tables, jnp.clip(logical, 0, max_pages - 1), axis=1)
    return logical, physical, counts


# ---- the pages the kernel walks ---------------------------------------------------------------

@dataclass(frozen=True)
class WalkPlan:
    """How the pages to walk are found, decided from the mask alone (static).

    From the mask's diagonal band (``scoremod.compiler.band``): for the T queries ending
    at ``end`` (the length, or a chunk's end), only keys ``kv >= end - T - hi`` can be
    allowed (none when ``hi`` is unbounded), and only keys ``kv <= end - 1 - lo`` (and
    below the length). So each sequence has at most ``num_candidates`` candidate pages,
    starting at ``first_page``, whatever its length.
    ``exact``: the mask is the band itself, so every candidate page that holds an
    allowed key is a run ``first .. last`` found by arithmetic; otherwise the
    candidates are classified by interval analysis and compacted.
    """
    lo: int | None     # lower bound on q - kv; None: unbounded
    hi: int | None     # upper bound, None: unbounded
    exact: bool
    empty: bool
    num_candidates: int

    @classmethod
    def build(cls, mod: Mod, num_tokens: int, page_size: int, max_pages: int,
              keys_after_queries: bool = False) -> "WalkPlan":
        """``keys_after_queries``: keys may exist past the last query (a chunk of new tokens
        that is not the last); otherwise the queries are the newest tokens, so no key lies
        past the last query and a lower bound below 0 bounds nothing (``lo`` is clamped to 0)."""
        band = diagonal_band(mod.canonical.mask)
        lo = band.lo if keys_after_queries else (0 if band.lo is None else max(band.lo, 0))
        hi = band.hi
        empty = band.empty or (hi is not None and lo is not None and hi - lo + num_tokens < 1)
        if empty:
            return cls(lo, hi, True, True, 1)
        if hi is None or lo is None:
            return cls(lo, hi, band.exact, False, max_pages)
        span = hi - lo + num_tokens                                 # candidate keys per sequence
        return cls(lo, hi, band.exact, False, min(max_pages, (span + page_size - 2) // page_size + 1))


def walk_pages(mod: Mod, lengths, block_tables, tensors, *, num_tokens: int, page_size: int, heads: int,
               num_pool_pages: int, multiple_of: int = 1, query_end=None):
    """The pages the kernel walks: ``(logical, physical, counts)`` as ``compact_pages``
    returns them, with a list length that is a multiple of ``multiple_of``.

    Every page holding a key that some query may attend is listed (a superset of the
    non-EMPTY pages, equal to them for exact bands and the prelude masks on sorted
    ids), in position order. Work is O(B * num_candidates) (``WalkPlan``): a sliding
    window looks at its last pages only, whatever the context length.

    query_end: int32[B], the queries are the ``num_tokens`` positions ending just before
    ``query_end[b]`` (default ``lengths``: the newest tokens); keys still exist below
    ``lengths[b]``. Chunked prefill walks each chunk of new tokens so.
    """
    max_pages = block_tables.shape[1]
    plan = WalkPlan.build(mod, num_tokens, page_size, max_pages, keys_after_queries=query_end is not None)
    list_len = -(-plan.num_candidates // multiple_of) * multiple_of
    return _walk_pages(mod, plan, lengths, block_tables, tensors, num_tokens=num_tokens, page_size=page_size,
                       heads=heads, num_pool_pages=num_pool_pages, list_len=list_len,
                       query_end=lengths if query_end is None else query_end)


def _walk_pages(mod, plan: WalkPlan, lengths, block_tables, tensors, *, num_tokens, page_size, heads,
                num_pool_pages, list_len, query_end):
    B, max_pages = block_tables.shape
    if plan.empty:
        zeros = jnp.zeros((B, list_len), jnp.int32)
        return _repeat_last_and_look_up(zeros, jnp.zeros((B,), jnp.int32), block_tables, num_pool_pages,
                                        max(max_pages, 1))
    first_key = jnp.zeros_like(lengths) if plan.hi is None else jnp.maximum(query_end - num_tokens - plan.hi, 0)
    first_page = first_key // page_size
    if plan.exact:
        last_key = lengths - 1 if plan.lo is None else jnp.minimum(query_end - 1 - plan.lo, lengths - 1)
        counts = jnp.where(last_key >= first_key, last_key // page_size - first_page + 1, 0)
        # Under jit a length beyond the table is trusted: walk only the pages the table has.
        counts = jnp.clip(counts, 0, jnp.maximum(max_pages - first_page, 0)).astype(jnp.int32)
        logical = first_page[:, None] + jnp.arange(list_len, dtype=jnp.int32)[None, :]
        return _repeat_last_and_look_up(logical, counts, block_tables, num_pool_pages, max_pages)
    classes = _page_classes(mod, lengths, tensors, first_page, num_tokens=num_tokens, page_size=page_size,
                            num_pages=plan.num_candidates, heads=heads, exact=False, query_end=query_end)
    in_table = first_page[:, None] + jnp.arange(plan.num_candidates, dtype=jnp.int32)[None, :] < max_pages
    classes = jnp.where(in_table, classes, jnp.int8(EMPTY))
    return compact_pages(classes, block_tables, num_pool_pages, list_len, first_page)


# ---- the reference path -----------------------------------------------------------------------
