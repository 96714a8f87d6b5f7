"""``paged_attention()``: decode, speculative decode and chunked prefill over a paged KV cache, with any mod.

    out = scoremod.paged_attention(q, k_pages, v_pages, block_tables, lengths,
                                   mod="causal & window(4096)")

Shapes:

    q             [B, T, N, H]       the T newest tokens of each sequence (T = 1: decode)
    k_pages       [P, page_size, K, H]   the page pool (v_pages alike), N % K == 0
    block_tables  int32[B, max_pages]    the pages of each sequence, in position order
    lengths       int32[B]           valid tokens per sequence, the T new ones included
    out           [B, T, N, H]       in q's dtype

Positions (docs/language.md §1 Meaning, bottom-right alignment): query ``i`` of sequence ``b`` sits
at ``lengths[b] - T + i``; key ``j`` of the sequence (slot ``j % page_size`` of page
``block_tables[b, j // page_size]``) at ``j``. Keys at ``j >= lengths[b]`` do not exist.
Tensor parameters are indexed by these absolute positions: ``ids`` for ``doc(ids)`` is
``[B, max_len]`` or ``[max_len]`` with ``max_len`` covering the longest sequence.
Rows with no allowed key give 0, never NaN.

Page skipping: before the kernel runs, ``walk_pages`` lists the pages of each sequence
the kernel must read. The mask's diagonal band (``scoremod.compiler.band``) bounds the
candidates (a sliding window: its last ``window / page_size + 1`` pages, whatever the
context); an exact band (``causal``, windows) needs nothing more, and other masks have
their candidates classified EMPTY/PARTIAL/FULL (``page_classes``) and the non-EMPTY ones
compacted (``compact_pages``): a document mask reads the pages of its own document.

Validation runs on shapes and dtypes always, and on the values of ``block_tables`` and
``lengths`` when they are concrete. Under ``jit`` they are traced: block-table entries
are then clipped into the pool ``[0, P)`` (an out-of-range page reads some valid page),
and lengths are trusted (a length beyond ``max_pages * page_size`` reads clipped pages;
one below T puts queries at negative positions).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from scoremod.errors import ScoreModError, ScoreModShapeError, ScoreModTensorError
from scoremod.dsl.ast import Var
from scoremod.compiler.lowering import gather_read
from scoremod.compiler.mod import Mod
from scoremod.compiler.page_walk import query_positions, walk_pages
from scoremod.compiler.tensors import check_tensors, read_tensors
from scoremod.runtime._dispatch import (as_mod, as_tensor, check_float_arrays, check_head_groups, concrete,
                                        implementation_names, int32_range_error, resolve_scale, run_first,
                                        sm_count)
from scoremod.compiler.tile import TileProgram
from scoremod.runtime import _paged_kernel as _k
from scoremod.runtime.sinks import add_sinks, check_sinks
from scoremod.runtime._triton import MIN_TILE

__all__ = ["paged_attention", "paged_attention_reference", "PagedBlockSizes", "PAGED_IMPLEMENTATIONS"]


PAGED_IMPLEMENTATIONS = ("pallas", "mosaic", "reference", "xla")
# implementation="mosaic": calls with at least this many new tokens run the chunked prefill
# on the Mosaic forward kernel (a q-block of 128 rows per query head is full), fewer the
# paged decode kernel (the tokens of a KV head's G query heads packed into 64 rows).
MOSAIC_PREFILL_TOKENS = 128
# The Mosaic decode kernel's split rule (PagedBlockSizes.num_splits=None) gives each work
# item at least this many steps: its start (Q, the ring's first pages) and its partial
# output cost more than a Triton program's. Not yet tuned on a GPU.
MOSAIC_MIN_STEPS_PER_SPLIT = 8
# PagedBlockSizes.programs_per_core=None: waves of programs for the Triton kernel (and the
# Mosaic kernel with one CUDA block per item), items per SM for the Mosaic kernel's
# persistent schedule. Measured on an H100 (benchmarks/RESULTS.md, 2026-12-06, sixth
# session): the persistent Mosaic kernel with 2 items per SM against 16 was 10% faster at
# B=1/128k, 3% at B=8/128k, 1-7% on windows.
PROGRAMS_PER_CORE = 16
MOSAIC_ITEMS_PER_SM = 2


@dataclass(frozen=True)
class PagedBlockSizes:
    """Tiling of the paged kernel.

    block_kv: keys per step of a program (rounded to whole pages, at least one page).
    num_splits: programs per (sequence, KV head) that share its page list (split-K);
      None picks enough for ``programs_per_core`` programs on every SM (long contexts
      with few sequences need the split to fill the GPU).
    programs_per_core: None picks the kernel's default: 16 waves of programs for the
      Triton kernel (and the Mosaic one with ``persistent=False``), 2 work items per SM
      for the Mosaic decode kernel's persistent schedule.
    num_warps, num_stages: Triton launch parameters. The Mosaic decode kernel
      (``implementation="mosaic"``) takes block_kv, num_splits, programs_per_core and
      num_stages (its ring's slots, fewer where they do not fit in shared memory, and an
      even number with two consumers) too.
    chunk_rows: query rows (new tokens times the G query heads of a KV head) one program
      takes. More new tokens than fit (chunked prefill) are cut into chunks of
      ``max(1, chunk_rows // G)`` tokens, each its own program walking only the pages its
      queries need.
    persistent: the Mosaic decode kernel runs one CUDA block per SM, each taking the
      programs' work round robin with its ring of pages running on from one to the next
      (True), or one CUDA block per program (False). The Triton kernel ignores it.
    consumers: warpgroups of the Mosaic decode kernel that run the products and the softmax
      (1 or 2; two take the ring's steps in turn, each with its own chain, and merge at the
      end of each program's work; on an H100 two were 4-12% faster at B=1 and level at
      B=8). The Triton kernel ignores it.
    """
    # Defaults: the best all-round setting of benchmarks/paged_profile.py's sweeps on an
    # H100 (bf16, N=32, K=8, H=128, pages of 16, B 1-32, contexts 8k-128k; RESULTS.md).
    # 4 stages of 64 keys take 128 KB of shared memory: one program per SM, so
    # programs_per_core is the number of waves of programs. 16 waves of small programs
    # had the best worst case over the machines measured (4 waves was fastest on some
    # and 40% slower on others).
    block_kv: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 4
    programs_per_core: int | None = None
    chunk_rows: int = 128
    persistent: bool = True
    consumers: int = 2

    def __post_init__(self):
        for name in ("block_kv", "num_warps", "num_stages", "chunk_rows") + (
                ("programs_per_core",) if self.programs_per_core is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScoreModShapeError(f"PagedBlockSizes.{name}={value!r} must be a positive int")
        if self.consumers not in (1, 2) or isinstance(self.consumers, bool):
            raise ScoreModShapeError(f"PagedBlockSizes.consumers={self.consumers!r} must be 1 or 2")
        if not isinstance(self.persistent, bool):
            raise ScoreModShapeError(f"PagedBlockSizes.persistent={self.persistent!r} must be a bool")
        if self.num_splits is not None and (isinstance(self.num_splits, bool) or not isinstance(self.num_splits, int)
                                            or self.num_splits < 1):
            raise ScoreModShapeError(f"PagedBlockSizes.num_splits={self.num_splits!r} must be None or a positive int")

    @classmethod
    def get_default(cls) -> "PagedBlockSizes":
        return cls()


# ---- the public entry -----------------------------------------------------------------------

def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, mod=None, scale=None,
                    implementation=None, interpret=None, block_sizes=None, sinks=None, **tensors):
    """Attention of the newest tokens over a paged KV cache, with the score modification ``mod``.

    Args:
      q: ``[B, T, N, H]`` bf16, f16 or f32: the T newest tokens of each sequence; query
        ``i`` of sequence ``b`` is at absolute position ``lengths[b] - T + i``.
      k_pages, v_pages: ``[P, page_size, K, H]``, q's dtype, N a multiple of K.
      block_tables: int32 ``[B, max_pages]``: entry ``j`` is the pool page holding the
        keys ``j * page_size ...`` of the sequence. Entries past a sequence's length are
        never read (they may hold anything, e.g. -1).
      lengths: int32 ``[B]``: valid keys per sequence, the T new tokens included
        (``T <= lengths[b] <= max_pages * page_size``).
      mod: a source string, a ``scoremod.Mod`` or None (no mask).
      scale: a Python number; default ``1 / sqrt(H)``.
      implementation: None (on a GPU: from 128 new tokens mosaic, then pallas; under 128
        pallas; the reference elsewhere), "pallas", "mosaic" (Mosaic GPU kernels, sm_90:
        the paged decode kernel under 128 new tokens, chunked prefill on the forward
        kernel from 128),
        "reference", "xla" (the reference's gather path), or a sequence tried
        in order; an implementation that cannot run the call (NotImplementedError)
        falls through to the next, logged on ``logging.getLogger("scoremod")``.
      interpret: run the Pallas kernel in interpret mode; None: on CPU only.
      block_sizes: ``PagedBlockSizes`` for the kernel (None: defaults).
      sinks: None, or float ``[N]``: one logit per query head in every row's softmax
        denominator, carrying no value (as ``attention(..., sinks=)``; runtime/sinks.py).
      **tensors: the mod's tensor parameters, indexed by absolute position
        (``ids=int32[B, max_len]``).

    Returns:
      ``[B, T, N, H]`` in q's dtype.

    Example::

        >>> out = scoremod.paged_attention(q, k_pages, v_pages, tables, lengths,
        ...                                mod="causal & doc(ids)", ids=ids)
    """
    mod = as_mod(mod)
    scale = _check_arrays(q, k_pages, v_pages, block_tables, lengths, scale)
    names = implementation_names(implementation, known=PAGED_IMPLEMENTATIONS, on_gpu=_default_on_gpu(q.shape[1]),
                                 elsewhere=("reference",), what="paged_attention")
    block_tables = jnp.asarray(block_tables, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    tensors = _check_tensors(mod, tensors, q, block_tables, lengths, k_pages.shape[1])
    if block_sizes is None:
        block_sizes = PagedBlockSizes.get_default()
    if not isinstance(block_sizes, PagedBlockSizes):
        raise ScoreModError(f"block_sizes must be a PagedBlockSizes; got {type(block_sizes).__name__}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"

    if sinks is not None:
        sinks = check_sinks(sinks, q.shape[2])
    if q.shape[0] == 0 or q.shape[1] == 0:   # no sequences or no new tokens: nothing to attend
        return jnp.zeros(q.shape, q.dtype)

    out, lse = run_first(names, _RUNNERS, what="paged_attention", mod=mod, q=q, k_pages=k_pages, v_pages=v_pages,
                         block_tables=block_tables, lengths=lengths, tensors=tensors, scale=scale,
                         block_sizes=block_sizes, interpret=bool(interpret))
    return out if sinks is None else add_sinks(out, lse, sinks)[0]


def _default_on_gpu(num_tokens: int) -> tuple[str, ...]:
    """``implementation=None`` on a GPU: chunked prefill (at least ``MOSAIC_PREFILL_TOKENS``
    new tokens) tries the Mosaic forward first (sm_90 only; on an H100 it ran a 2048-token
    chunk 1.7x faster than the pallas kernel, benchmarks/RESULTS.md 2026-12-06, sixth
    session); decode runs on the pallas kernel (the Mosaic decode kernel is not faster
    everywhere yet)."""
    if num_tokens >= MOSAIC_PREFILL_TOKENS:
        return ("mosaic", "pallas", "reference")
    return ("pallas", "reference")


# ---- implementations ------------------------------------------------------------------------
# Each runner takes validated inputs and returns (out [B, T, N, H], lse f32 [B, T, N]), or
# raises NotImplementedError saying why it cannot run this call.

def _run_pallas(q, k_pages, v_pages, block_tables, lengths, *, mod, tensors, scale, block_sizes, interpret):
    _check_kernel_support(mod, q, k_pages, tensors)
    if not interpret and jax.default_backend() == "cpu":
        raise NotImplementedError("interpret=False compiles the Pallas kernel for a GPU; this backend is the CPU "
                                  "(leave interpret=None: interpret mode on the CPU)")
    return _paged_pallas_forward_only(q, k_pages, v_pages, block_tables, lengths, tensors, mod, scale, block_sizes,
                                      interpret)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8, 9))
def _paged_pallas_forward_only(q, k_pages, v_pages, block_tables, lengths, tensors, mod, scale, block_sizes,
                               interpret):
    """``_paged_pallas``, with a clear error in place of Pallas' own under differentiation."""
    return _paged_pallas(q, k_pages, v_pages, block_tables, lengths, tensors, mod=mod, scale=scale,
                         block_sizes=block_sizes, interpret=interpret)


@_paged_pallas_forward_only.defjvp
def _paged_pallas_jvp(mod, scale, block_sizes, interpret, primals, tangents):
    raise ScoreModError("paged_attention's pallas kernel is forward only (decode and chunked prefill need no "
                        "gradient; docs/paged.md)",
                        hint="differentiate with implementation='reference', or train with scoremod.attention")


def _run_mosaic(q, k_pages, v_pages, block_tables, lengths, *, mod, tensors, scale, block_sizes, interpret):
    """Mosaic GPU kernels (an sm_90 GPU): fewer than ``MOSAIC_PREFILL_TOKENS`` new tokens
    (decode, speculative decode) on the paged decode kernel (``_mosaic_paged_decode.py``,
    tiled by ``block_sizes``), more on the forward kernel (chunked prefill,
    ``mosaic_attention.mosaic_paged_attention``). ``interpret`` is the Pallas kernel's, unused."""
    stages = None
    if q.shape[1] < MOSAIC_PREFILL_TOKENS:
        stages = _mosaic_decode_check(mod, q, k_pages, v_pages, tensors, block_sizes)
    return _paged_mosaic_forward_only(q, k_pages, v_pages, block_tables, lengths, tensors, mod, scale, block_sizes,
                                      stages)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8, 9))
def _paged_mosaic_forward_only(q, k_pages, v_pages, block_tables, lengths, tensors, mod, scale, block_sizes, stages):
    """The decode kernel with a ring of ``stages`` slots, or (``stages`` None) the chunked
    prefill on the forward kernel; a clear error under differentiation."""
    if stages is not None:
        return _paged_mosaic_decode(q, k_pages, v_pages, block_tables, lengths, tensors, mod=mod, scale=scale,
                                    block_sizes=block_sizes, stages=stages)
    from scoremod.runtime.mosaic_attention import mosaic_paged_attention
    return mosaic_paged_attention(q, k_pages, v_pages, block_tables, lengths, mod=mod, tensors=tensors, scale=scale)


@_paged_mosaic_forward_only.defjvp
def _paged_mosaic_jvp(mod, scale, block_sizes, stages, primals, tangents):
    raise ScoreModError("paged_attention's mosaic kernels are forward only (decode and chunked prefill need no "
                        "gradient; docs/paged.md)",
                        hint="differentiate with implementation='reference', or train with scoremod.attention")


def _run_reference(q, k_pages, v_pages, block_tables, lengths, *, mod, tensors, scale, block_sizes, interpret):
    return _paged_reference_jit(q, k_pages, v_pages, block_tables, lengths, tensors, mod=mod, scale=scale)


# "xla" is the reference's gather path (there is no separate chunked one for decode).
_RUNNERS = {"pallas": _run_pallas, "mosaic": _run_mosaic, "reference": _run_reference, "xla": _run_reference}


# ---- validation -----------------------------------------------------------------------------

def _check_arrays(q, k_pages, v_pages, block_tables, lengths, scale) -> float:
    """Shapes, dtypes, and (when concrete) the values of block_tables and lengths."""
    for name, x, layout in (("q", q, "[B, T, N, H]"), ("k_pages", k_pages, "[P, page_size, K, H]"),
                            ("v_pages", v_pages, "[P, page_size, K, H]"),
                            ("block_tables", block_tables, "int32[B, max_pages]"),
                            ("lengths", lengths, "int32[B]")):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ScoreModShapeError(f"{name} must be an array {layout}, got {type(x).__name__}")
        rank = layout.count(",") + 1
        if x.ndim != rank:
            raise ScoreModShapeError(f"{name} must have rank {rank} ({layout}); got shape {tuple(x.shape)}")
    B, T, N, H = q.shape
    if k_pages.shape != v_pages.shape:
        raise ScoreModShapeError(f"k_pages and v_pages must have the same shape [P, page_size, K, H]; "
                                 f"got {tuple(k_pages.shape)} and {tuple(v_pages.shape)}")
    P, page_size, K, Hk = k_pages.shape
    if Hk != H:
        raise ScoreModShapeError(f"head dims differ: q has H={H}, k_pages/v_pages have H={Hk}")
    check_head_groups(N, K)
    if P == 0 or page_size == 0:
        raise ScoreModShapeError(f"the page pool is empty: k_pages has shape {tuple(k_pages.shape)}")
    check_float_arrays({"q": q, "k_pages": k_pages, "v_pages": v_pages})
    for name, x in (("block_tables", block_tables), ("lengths", lengths)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ScoreModShapeError(f"{name} must be an int32 array; got {x.dtype}")
    if block_tables.shape[0] != B:
        raise ScoreModShapeError(f"block_tables has {block_tables.shape[0]} rows but q has B={B} sequences")
    if lengths.shape != (B,):
        raise ScoreModShapeError(f"lengths must have shape [B] = ({B},); got {tuple(lengths.shape)}")
    max_pages = block_tables.shape[1]
    capacity = max_pages * page_size
    if max_pages == 0 and B and T:
        raise ScoreModShapeError(f"block_tables has shape {tuple(block_tables.shape)}: no pages, so no room for the "
                                 f"T={T} new tokens of each sequence")

    lens = concrete(lengths)
    tables = concrete(block_tables)
    # With the lengths known, only the table entries that hold keys are checked (below): the
    # rest may hold anything, an out-of-int32 "no page" marker included (never read).
    for name, values in (("lengths", lens), ("block_tables", tables if lens is None else None)):
        why = int32_range_error(name, values) if values is not None else None
        if why:
            raise ScoreModShapeError(why)
    if lens is not None and B:
        if (lens < T).any():
            b = int(np.argmax(lens < T))
            raise ScoreModShapeError(f"lengths[{b}]={int(lens[b])} is smaller than T={T}: the T query tokens "
                                     "are the newest tokens of the sequence and count in its length")
        if (lens > capacity).any():
            b = int(np.argmax(lens > capacity))
            raise ScoreModShapeError(f"lengths[{b}]={int(lens[b])} exceeds the block table's capacity "
                                     f"max_pages * page_size = {max_pages} * {page_size} = {capacity}")
    if tables is not None and lens is not None and B and max_pages:
        used = np.arange(max_pages)[None, :] < -(-lens[:, None] // page_size)   # pages holding keys
        bad = used & ((tables < 0) | (tables >= P))
        if bad.any():
            b, j = map(int, np.argwhere(bad)[0])
            raise ScoreModShapeError(f"block_tables[{b}, {j}]={int(tables[b, j])} points outside the page pool "
                                     f"[0, {P}) (sequence {b} has length {int(lens[b])}, so page {j} holds keys)")

    return resolve_scale(scale, H)


def _check_tensors(mod: Mod, tensors: dict, q, block_tables, lengths, page_size: int) -> dict:
    """The mod's tensor parameters, checked against the paged positions (queries at
    ``lengths - T ..``, keys at ``0 .. max(lengths) - 1``); returned as jax arrays.
    Under jit (traced lengths) only ranks and the B/N axes are checked."""
    B, T, N, _ = q.shape
    lens = concrete(lengths)
    if lens is not None:
        kv = dict(kv_len=max(int(lens.max()), 1) if B else 1, kv_offset=0)
        q_offset = lens.astype(np.int64) - T
    else:   # traced: positions unknown before running
        kv = dict(kv_len=1, kv_offset=lengths - 1)
        q_offset = lengths - T
    try:
        check_tensors(mod, tensors, B, N, T, q_offset=q_offset, **kv)
    except ScoreModTensorError as exc:
        raise ScoreModTensorError(exc.message, source=str(mod), hint=exc.hint) from None
    return {name: as_tensor(name, value, str(mod)) for name, value in read_tensors(mod, tensors).items()}


def _check_kernel_support(mod: Mod, q, k_pages, tensors):
    """Raise NotImplementedError when the Pallas kernel cannot run this call."""
    program = _program(mod, tensors)
    ok, why = program.kernel_support()
    if not ok:
        raise NotImplementedError(why)
    head_dim = q.shape[-1]
    page_size = k_pages.shape[1]
    if not _k.is_power_of_2(head_dim) or head_dim < MIN_TILE:
        raise NotImplementedError(f"the paged kernel needs a power-of-2 head dim >= {MIN_TILE}; got H={head_dim}")
    if not _k.is_power_of_2(page_size):
        raise NotImplementedError(f"the paged kernel needs a power-of-2 page size; got page_size={page_size}")


def _program(mod: Mod, tensors: dict) -> TileProgram:
    return TileProgram.build(mod.canonical, {n: jnp.ndim(t) for n, t in tensors.items()})


# ---- positions, page classes and the compacted page list ------------------------------------

def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, mod=None, scale=None,
                              **tensors):
    """Gather every sequence's pages into dense K/V, then dense masked attention in f32.

    Inputs as for ``paged_attention`` (validated the same way). Memory O(B * N * T * S).
    """
    return paged_attention(q, k_pages, v_pages, block_tables, lengths, mod=mod, scale=scale,
                           implementation="reference", **tensors)


@functools.partial(jax.jit, static_argnames=("mod", "scale"))
def _paged_reference_jit(q, k_pages, v_pages, block_tables, lengths, tensors, *, mod, scale):
    B, T, N, H = q.shape
    P, page_size, K, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    S = max_pages * page_size
    G = N // K
    tables = jnp.clip(block_tables, 0, P - 1)
    k = k_pages[tables].reshape(B, S, K, H).astype(jnp.float32)
    v = v_pages[tables].reshape(B, S, K, H).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    qf = q.astype(jnp.float32).reshape(B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qf, k, precision=hi).reshape(B, N, T, S) * scale

    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(N, dtype=jnp.int32)[None, :, None, None]
    qpos = query_positions(lengths, T)[:, None, :, None]
    kvpos = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
    score_mod = mod.score_mod(**{n: jax.lax.stop_gradient(t) for n, t in tensors.items()})
    logits = jnp.broadcast_to(score_mod(scores, b, h, qpos, kvpos), (B, N, T, S))
    exists = kvpos < lengths[:, None, None, None]
    logits = jnp.where(exists, logits, -jnp.inf)
    # Slots past a length hold whatever the cache left there (NaN included): never let them in.
    v = jnp.where(exists[:, 0, 0, :, None, None], v, 0.0)

    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(logits - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l != 0, l, 1.0)
    out = jnp.einsum("bkgts,bskh->btkgh", p.reshape(B, K, G, T, S), v, precision=hi)
    lse = jnp.where(l != 0, m + jnp.log(jnp.where(l != 0, l, 1.0)), -jnp.inf)[..., 0]     # [B, N, T]
    return out.reshape(B, T, N, H).astype(q.dtype), lse.transpose(0, 2, 1)


# ---- the Pallas path --------------------------------------------------------------------------

def _num_splits(block_sizes: PagedBlockSizes, programs: int, max_chunks: int, min_chunks: int = 1,
                per_core: int = PROGRAMS_PER_CORE) -> int:
    """Programs per (sequence, KV head): as many as keep ``programs * splits`` at most
    ``programs_per_core`` per SM (``per_core`` where it is None; rounded down: a last,
    partly filled wave of programs costs as much as a full one), at least 1 and at most
    one per ``min_chunks`` chunks."""
    if block_sizes.num_splits is not None:
        return max(1, min(int(block_sizes.num_splits), max_chunks))
    max_chunks = max(1, max_chunks // min_chunks)
    target = (block_sizes.programs_per_core or per_core) * sm_count()
    return max(1, min(max_chunks, target // max(programs, 1)))


def _layout_reads(program: TileProgram, tensors: dict, *, batch, heads, kv_heads, num_tokens, chunk_tokens, rows,
                  max_pages, page_size, q_positions):
    """Each tensor read of the tile program, materialized for the kernel (see ``ReadLayout``).

    A read is gathered once per call at the positions the kernel can visit: per chunk of
    ``chunk_tokens`` of the ``num_tokens`` (padded) new tokens, rows ``r = t * G + g``
    (token t of the chunk, query head ``kv_head * G + g``, padded to ``rows``; the row
    axis holds the chunks one after another) and keys ``0 .. max_pages * page_size - 1``.
    Query positions differ per sequence, so a read that depends on ``q`` is laid out per
    sequence.
    """
    S = max_pages * page_size
    G = heads // kv_heads
    arrays, layouts = [], []
    for r in program.reads:
        axes = set(r.axes)
        by_q, by_h, by_kv = "q" in axes, "h" in axes, "kv" in axes
        by_b = "b" in axes or by_q
        Bx = batch if by_b else 1
        Kx = kv_heads if by_h else 1
        Sx = S if by_kv else 1
        env = {
            "b": jnp.arange(Bx, dtype=jnp.int32).reshape(Bx, 1, 1, 1),
            "h": jnp.arange(heads if by_h else 1, dtype=jnp.int32).reshape(1, -1, 1, 1),
            "q": q_positions[:, None, :, None] if by_q else jnp.zeros((1, 1, 1, 1), jnp.int32),
            "kv": jnp.arange(Sx, dtype=jnp.int32).reshape(1, 1, 1, Sx),
        }
        value = gather_read(tensors[r.name], [env[i.name] if isinstance(i, Var) else None
                                             for i in r.node.indices])
        Nx = heads if by_h else 1
        Tx = num_tokens if by_q else 1
        value = jnp.broadcast_to(value, (Bx, Nx, Tx, Sx))
        has_rows = by_h or by_q
        if has_rows:
            n_chunks = num_tokens // chunk_tokens
            x = value.reshape(Bx, Kx, G if by_h else 1, Tx, Sx)
            x = jnp.broadcast_to(x, (Bx, Kx, G, num_tokens, Sx))
            x = x.transpose(0, 1, 4, 3, 2).reshape(Bx, Kx, Sx, n_chunks, chunk_tokens * G)
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 0), (0, rows - chunk_tokens * G)))
            x = x.reshape(Bx, Kx, Sx, n_chunks * rows)
        else:
            x = value.reshape(Bx, 1, Sx, 1)
        Rx = x.shape[-1]
        x = x.reshape(Bx, Kx, max_pages, page_size, Rx) if by_kv else x.reshape(Bx, Kx, Rx)
        arrays.append(x)
        layouts.append(_k.ReadLayout(by_b=by_b, by_k=by_h, by_kv=by_kv, rows=has_rows))
    return arrays, layouts


def chunking(num_tokens: int, group: int, chunk_rows: int) -> tuple[int, int]:
    """(tokens per chunk, chunks) for ``num_tokens`` new tokens of ``group`` query heads per
    KV head: one chunk when ``num_tokens * group <= chunk_rows`` (decode), else chunks of
    ``max(1, chunk_rows // group)`` tokens (chunked prefill)."""
    if num_tokens * group <= chunk_rows:
        return num_tokens, 1
    tokens = max(1, chunk_rows // group)
    return tokens, -(-num_tokens // tokens)


def _walk_chunks(mod, lengths, block_tables, tensors, *, num_tokens, chunk_tokens, n_chunks, page_size, heads,
                 num_pool_pages, pages_per_step):
    """``(logical, physical, counts)`` ``[B, C, L]`` / ``[B, C]``: the pages each chunk of
    ``chunk_tokens`` new tokens walks (``walk_pages``; the last chunk's padding tokens sit
    past the length, where no key exists), lists a multiple of ``pages_per_step`` long."""
    chunk_end = (lengths[:, None] - num_tokens
                 + chunk_tokens * (1 + jnp.arange(n_chunks, dtype=jnp.int32))[None, :])
    walk = functools.partial(walk_pages, mod, lengths, block_tables, tensors, num_tokens=chunk_tokens,
                             page_size=page_size, heads=heads, num_pool_pages=num_pool_pages,
                             multiple_of=pages_per_step)
    return jax.vmap(lambda end: walk(query_end=end), in_axes=1, out_axes=1)(chunk_end)


def _rows_by_kv_head(q, kv_heads: int, chunk_tokens: int, n_chunks: int, rows: int):
    """q ``[B, T, N, H]`` as ``[B, K, C, rows, H]``: per KV head and chunk, row ``t * G + g``
    holds token ``c * chunk_tokens + t`` of query head ``k * G + g`` (zero padding after the
    T tokens and after the ``chunk_tokens * G`` rows)."""
    B, T, N, H = q.shape
    G = N // kv_heads
    used = chunk_tokens * G
    q = jnp.pad(q, ((0, 0), (0, chunk_tokens * n_chunks - T), (0, 0), (0, 0)))
    q = q.reshape(B, n_chunks, chunk_tokens, kv_heads, G, H).transpose(0, 3, 1, 2, 4, 5)
    q = q.reshape(B, kv_heads, n_chunks, used, H)
    return jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, rows - used), (0, 0)))


def _merge_to_tokens(o, lse, *, num_tokens: int, heads: int, chunk_tokens: int):
    """Partials ``(o f32[B, K, C, S, R, H], lse f32[B, K, C, S, R])`` merged over the splits
    (``combine_splits``) and laid out as ``(out [B, T, N, H] f32, lse f32[B, T, N])``: the
    inverse of ``_rows_by_kv_head``."""
    B, K, C, S, _, H = o.shape
    G = heads // K
    used, Tp = chunk_tokens * G, chunk_tokens * C
    out, lse = (o[:, :, :, 0], lse[:, :, :, 0]) if S == 1 else _k.combine_splits(o, lse)
    out = out[:, :, :, :used].reshape(B, K, Tp, G, H).transpose(0, 2, 1, 3, 4)
    lse = lse[:, :, :, :used].reshape(B, K, Tp, G).transpose(0, 2, 1, 3)
    return out[:, :num_tokens].reshape(B, num_tokens, heads, H), lse[:, :num_tokens].reshape(B, num_tokens, heads)


@functools.partial(jax.jit, static_argnames=("mod", "scale", "block_sizes", "interpret"))
def _paged_pallas(q, k_pages, v_pages, block_tables, lengths, tensors, *, mod, scale, block_sizes,
                  interpret):
    B, T, N, H = q.shape
    P, page_size, K, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    G = N // K
    program = _program(mod, tensors)
    pages_per_step = max(1, block_sizes.block_kv // page_size)
    chunk_tokens, n_chunks = chunking(T, G, block_sizes.chunk_rows)
    Tp = chunk_tokens * n_chunks
    # Each chunk walks the pages its own queries need.
    logical, physical, counts = _walk_chunks(mod, lengths, block_tables, tensors, num_tokens=T,
                                             chunk_tokens=chunk_tokens, n_chunks=n_chunks, page_size=page_size,
                                             heads=N, num_pool_pages=P, pages_per_step=pages_per_step)
    max_chunks = logical.shape[-1] // pages_per_step
    num_splits = _num_splits(block_sizes, B * K * n_chunks, max_chunks)
    rows = max(MIN_TILE, _k.next_power_of_2(chunk_tokens * G))
    q_rows = _rows_by_kv_head(q, K, chunk_tokens, n_chunks, rows)
    q_positions = query_positions(lengths + (Tp - T), Tp)   # the T tokens, then the padding after them
    reads, layouts = _layout_reads(program, tensors, batch=B, heads=N, kv_heads=K, num_tokens=Tp,
                                   chunk_tokens=chunk_tokens, rows=rows, max_pages=max_pages, page_size=page_size,
                                   q_positions=q_positions)
    o, lse = _k.paged_decode_partials(
        q_rows, k_pages, v_pages, logical, physical, counts, lengths, reads,
        program=program, layouts=layouts, num_tokens=T, chunk_tokens=chunk_tokens, group=G, scale=scale,
        pages_per_step=pages_per_step, num_splits=num_splits, num_warps=block_sizes.num_warps,
        num_stages=block_sizes.num_stages, interpret=interpret)
    out, lse = _merge_to_tokens(o, lse, num_tokens=T, heads=N, chunk_tokens=chunk_tokens)
    return out.astype(q.dtype), lse


# ---- the Mosaic decode path -------------------------------------------------------------------

def _mosaic_decode_check(mod: Mod, q, k_pages, v_pages, tensors: dict, block_sizes: PagedBlockSizes) -> int:
    """The K/V ring's slots for the Mosaic decode kernel, or NotImplementedError saying why it
    cannot run this call."""
    from scoremod.runtime import _mosaic_paged_decode as _md
    from scoremod.runtime.mosaic_attention import SMEM_LIMIT, check_supported
    program = check_supported(mod, q, k_pages, v_pages, tensors)   # device, dtype, head dim, the mod
    why = _md.reads_reason(program)
    if why:
        raise NotImplementedError(why)
    page_size = k_pages.shape[1]
    if page_size % 8:
        raise NotImplementedError(f"the mosaic decode kernel needs a page size that is a multiple of 8; "
                                  f"got page_size={page_size}")
    block_kv = _mosaic_block_kv(block_sizes, page_size)
    # With two consumers the slots come in pairs (each slot keeps one consumer waiting on it).
    W = block_sizes.consumers
    stages = max(block_sizes.num_stages // W * W, 2)
    key_reads = sum("kv" in r.axes for r in program.reads)
    while stages >= 2 and _md.shared_memory_bytes(q.shape[-1], block_kv, stages, key_reads=key_reads,
                                                  consumers=W) > SMEM_LIMIT:
        stages -= W
    if stages < 2:
        raise NotImplementedError(f"the mosaic decode kernel cannot fit two steps of {block_kv} keys at head dim "
                                  f"{q.shape[-1]} in {SMEM_LIMIT} bytes of shared memory")
    return stages


def _mosaic_block_kv(block_sizes: PagedBlockSizes, page_size: int) -> int:
    """Keys per step of the Mosaic decode kernel: ``block_kv`` rounded down to whole pages and
    to a multiple of 64 keys (the reduction of P V on the tensor cores takes 64 at a time),
    at least one such unit."""
    unit = math.lcm(64, page_size)
    return max(1, block_sizes.block_kv // unit) * unit


@functools.partial(jax.jit, static_argnames=("mod", "scale", "block_sizes", "stages", "twin"))
def _paged_mosaic_decode(q, k_pages, v_pages, block_tables, lengths, tensors, *, mod, scale, block_sizes, stages,
                         twin=False):
    """The Mosaic decode kernel's inputs from the walk (as ``_paged_pallas``), its call, and
    the merge of its splits. Returns (out [B, T, N, H], lse f32[B, T, N]). ``twin``: run the
    kernel's slow twin (``decode_partials_reference``) on the same inputs instead (any backend)."""
    from scoremod.runtime import _mosaic_paged_decode as _md
    from scoremod.runtime.mosaic_attention import paged_kv_inputs
    B, T, N, H = q.shape
    P, page_size, K, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    G = N // K
    rows = _md.ROWS
    pages_per_step = _mosaic_block_kv(block_sizes, page_size) // page_size
    chunk_tokens, n_chunks = chunking(T, G, rows)
    logical, physical, counts = _walk_chunks(mod, lengths, block_tables, tensors, num_tokens=T,
                                             chunk_tokens=chunk_tokens, n_chunks=n_chunks, page_size=page_size,
                                             heads=N, num_pool_pages=P, pages_per_step=pages_per_step)
    list_len = logical.shape[-1]
    num_splits = _num_splits(block_sizes, B * K * n_chunks, list_len // pages_per_step, MOSAIC_MIN_STEPS_PER_SPLIT,
                             per_core=MOSAIC_ITEMS_PER_SM if block_sizes.persistent else PROGRAMS_PER_CORE)

    # A sequence's last page (and list entries past the count, which are masked) come from its
    # tail copy, whose slots past the length are zero: the pool may hold NaN there.
    _, last, k_tail, v_tail = paged_kv_inputs(k_pages, v_pages, block_tables, lengths, max_pages * page_size)
    listed = jnp.arange(list_len, dtype=jnp.int32)[None, None, :] < counts[:, :, None]
    pages = jnp.where(listed & (logical < last[:, None, None]), physical, -1).astype(jnp.int32)
    key_pos = logical[..., None] * page_size + jnp.arange(page_size, dtype=jnp.int32)
    key_pos = jnp.where(listed[..., None] & (key_pos < lengths[:, None, None, None]), key_pos, -1)
    key_pos = key_pos.reshape(B, n_chunks, list_len * page_size).astype(jnp.int32)

    used_rows = chunk_tokens * G
    q_rows = _rows_by_kv_head(q, K, chunk_tokens, n_chunks, rows)
    r = np.arange(rows)
    row_tokens = jnp.asarray(np.where(r < used_rows, r // G, 0)[None, :] + chunk_tokens * np.arange(n_chunks)[:, None],
                             jnp.int32)
    row_heads = jnp.asarray(np.where(r < used_rows, r % G, 0), jnp.int32)
    program = _program(mod, tensors)
    reads, read_rows = _md.decode_reads(program, tensors, lengths=lengths, num_tokens=T, kv_heads=K, group=G,
                                        row_tokens=row_tokens, row_heads=row_heads, key_positions=key_pos)
    cfg = _md.DecodeKernelConfig(program=program, scale=scale, page_size=page_size, pages_per_step=pages_per_step,
                                 num_stages=stages, num_splits=num_splits, group=G,
                                 out_rows=min(rows, max(8, _k.next_power_of_2(used_rows))), read_rows=read_rows,
                                 ctas=min(B * K * n_chunks * num_splits, sm_count()) if block_sizes.persistent else 0,
                                 consumers=block_sizes.consumers)
    partials = _md.decode_partials_reference if twin else _md.decode_partials
    o, lse = partials(cfg, q_rows, k_pages, v_pages, pages, counts, key_pos, lengths, row_tokens, row_heads,
                      k_tail, v_tail, reads, num_tokens=T)
    out, lse = _merge_to_tokens(o, lse, num_tokens=T, heads=N, chunk_tokens=chunk_tokens)
    return out.astype(q.dtype), lse
