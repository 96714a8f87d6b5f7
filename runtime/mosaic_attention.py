"""Block-sparse flash attention on Mosaic GPU, for Hopper (sm_90).

``mosaic_attention(query, key, value, *, mod, ...)`` runs the forward kernel of
``runtime/_mosaic_forward.py``: TMA brings only the K/V tiles the mod's ``BlockPlan``
lists into a shared-memory ring, wgmma computes both products, a producer warpgroup
feeds two consumer warpgroups (FlashAttention-3's layout), FULL tiles skip the mask and
the ``TileProgram`` runs on every tile that needs it. ``jax.grad`` runs the Mosaic
backward (``runtime/_mosaic_backward.py``: dQ and dK/dV kernels over the plan), or the
Pallas backward (``pallas_attention.flash_backward``, fed with this forward's lse) for
mods it cannot run and with ``MosaicBlockSizes(backward="pallas")``. Either gives
differentiated float tensor reads their gradients.

Same layout and meaning as ``pallas_attention``: query ``[B, T, N, H]``, key/value
``[B, S, K, H]`` with ``N % K == 0``, any T and S (the wrapper pads to whole blocks and
the kernel masks the padding), ``lse f32[B, N, T]``.

    out = mosaic_attention(q, k, v, mod="causal & doc(ids)", tensors={"ids": ids})

What it declines (``NotImplementedError`` with the reason; ``attention()`` falls through
to the next implementation): no sm_90 GPU, a jax without Mosaic GPU, dtypes other than
bf16/f16, head dims other than 64, 128 and 256, mods the TileProgram cannot run in a
kernel, and expressions using operations Mosaic GPU cannot lower (real ``//``, ``%``,
``floor``, ``ceil``, ``**``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from scoremod.compiler.intervals import num_blocks
from scoremod.compiler.plan import ragged_edge, split_lists
from scoremod.compiler.tensors import check_missing_tensors
from scoremod.compiler.tile import TileProgram
from scoremod.errors import ScoreModShapeError
from scoremod.runtime import _mosaic_backward, _mosaic_forward
from scoremod.runtime.attention_plan import plan_for
from scoremod.runtime.first_order import first_order_only
from scoremod.runtime._dispatch import as_mod, kernel_input_reason, sm_count
from scoremod.runtime._mosaic_forward import MosaicKernelConfig
from scoremod.runtime import pallas_attention as _pallas

__all__ = ["MosaicBlockSizes", "mosaic_attention", "mosaic_paged_attention", "check_supported"]

# Head dim 256 is declined (falls through to pallas): on the H200 the kernel hung at 256
# (64 x 64 tiles, 2 stages; 2026-12-02), cause not yet found.
HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_NEEDED = ("kernel", "wgmma", "ACC", "SMEM", "Barrier", "Layout", "layout_cast", "set_max_registers",
           "copy_gmem_to_smem", "copy_smem_to_gmem", "barrier_wait", "barrier_arrive",
           "broadcasted_iota", "commit_smem", "wait_smem_to_gmem", "TilingTransform", "SwizzleTransform")


# Backward tiles (rows per consumer warpgroup, keys per tile in dQ / per consumer in dK/dV).
BACKWARD_BLOCK = 64


@dataclass(frozen=True)
class MosaicBlockSizes:
    """Tiling of the Mosaic forward kernel.

    Attributes:
      block_q: query rows per consumer warpgroup; a CUDA block runs two, so the plan's
        q-block is ``2 * block_q`` rows. 64 (the wgmma M).
      block_kv: keys per tile, a multiple of 64.
      num_stages: K/V tiles in flight (shared-memory ring slots), at least 2.
      backward: which kernels ``jax.grad`` runs: ``"mosaic"`` (default;
        ``_mosaic_backward.py``: dQ and dK/dV on Mosaic GPU over the plan, 64 x 64 tiles;
        mods it cannot run, a tensor read along both q and kv, use "pallas") or
        ``"pallas"`` (the Pallas/Triton backward, fed with this forward's lse). On the
        H200 (bf16, B=2, N=16, T=S=8192, H=128; 2026-12-02) forward+backward with the
        Mosaic backward took 0.80x the time with the Pallas one on dense and causal,
        0.91x on a 1024 window and 0.94x on packed documents (benchmarks/RESULTS.md).
      backward_stages: the Mosaic backward's shared-memory ring slots (Q/dO tiles in dK/dV,
        K/V tiles in dQ), at least 2.
      persistent: the forward runs one CUDA block per SM, each taking tiles (q-blocks of one
        head) heaviest first in snake order, so that one tile's epilogue overlaps the next
        tile's loads (True, the default), or one CUDA block per tile (False). On the H200
        (2026-12-06, benchmarks/mosaic_schedule.py: bf16, B=2, N=16, T=S=8192, H=128)
        persistent took 0.96x the time on a 1024 window, 0.93x on packed documents, 1.01x
        on causal.
      backward_persistent: the same schedule for the Mosaic backward's dQ and dK/dV kernels;
        off by default: in the same run it took 1.04x the backward's time on causal and the
        window and 1.10x on packed documents.
      lookahead: the forward's consumers load the next step's block index and its reads
        along the keys (``ids[b, kv]``) during this step, so that on PARTIAL steps no global
        load sits between a step's start and its mask (True), or at the step's start
        (False, the default until measured: an experiment for the document masks).

    ``get_default(head_dim)`` picks values measured on the H200 (benchmarks/RESULTS.md).
    """
    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    backward: str = "mosaic"
    backward_stages: int = 2
    persistent: bool = True
    backward_persistent: bool = False
    lookahead: bool = False

    def __post_init__(self):
        if self.block_q != 64:
            raise ScoreModShapeError(f"block_q={self.block_q} must be 64 (one wgmma M per warpgroup)")
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ScoreModShapeError(f"block_kv={self.block_kv} must be a positive multiple of 64")
        if self.num_stages < 2:
            raise ScoreModShapeError(f"num_stages={self.num_stages} must be at least 2")
        if self.backward_stages < 2:
            raise ScoreModShapeError(f"backward_stages={self.backward_stages} must be at least 2")
        if self.backward not in ("pallas", "mosaic"):
            raise ScoreModShapeError(f"backward={self.backward!r} must be 'pallas' or 'mosaic'")
        for name in ("persistent", "backward_persistent", "lookahead"):
            if not isinstance(getattr(self, name), bool):
                raise ScoreModShapeError(f"MosaicBlockSizes.{name}={getattr(self, name)!r} must be True or False")

    @classmethod
    def get_default(cls, head_dim: int) -> "MosaicBlockSizes":
        """head dim 64: 64 x 256 tiles, 2 stages; 128: 64 x 128, 2 stages; 256: 64 x 64, 2 stages."""
        if head_dim <= 64:
            return cls(64, 256, 2)
        if head_dim <= 128:
            return cls(64, 128, 2)
        return cls(64, 64, 2)

    def smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
        """Shared memory the forward asks for: Q and O of both consumers, the K/V ring, lse,
        and 4 KiB for barriers and alignment (Mosaic asked for 232568 bytes at 64 x 128 x 3
        stages, head dim 128, with one buffer for Q and O, where the buffers alone were 229888)."""
        return (4 * self.block_q * head_dim + 2 * self.num_stages * self.block_kv * head_dim) * itemsize \
            + 2 * self.block_q * 4 + 4096


    def backward_smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
        """Shared memory the larger Mosaic backward kernel (dK/dV) asks for: two 64-row tiles
        of K, V, dK and dV (operands held and outputs written), ``backward_stages`` 64-row
        tiles of Q and dO, their f32 lse/delta rows, and 4 KiB of slack."""
        rows = BACKWARD_BLOCK
        return (8 * rows * head_dim + 2 * self.backward_stages * rows * head_dim) * itemsize \
            + 2 * self.backward_stages * rows * 4 + 4096


def padded_lengths(T: int, S: int, bs: MosaicBlockSizes) -> tuple[int, int]:
    """(Tp, Sp): the lengths q and k/v (and the reads along them) are padded to, whole
    blocks of both the forward (2 * block_q rows, block_kv keys) and the backward
    (2 * BACKWARD_BLOCK), so no kernel reads past a padded read (block_kv=64 with S=320
    once left the backward's last 64 keys unpadded)."""
    rows = 2 * bs.block_q
    q_block = math.lcm(rows, 2 * BACKWARD_BLOCK)
    kv_block = math.lcm(bs.block_kv, 2 * BACKWARD_BLOCK)
    return num_blocks(T, q_block) * q_block, num_blocks(S, kv_block) * kv_block


SMEM_LIMIT = 227 * 1024   # bytes of shared memory one block may take on sm_90

def _mosaic_missing() -> str | None:
    if _mosaic_forward.plgpu is None:
        return (f"jax {jax.__version__} cannot import Pallas Mosaic GPU "
                f"(jax.experimental.pallas.mosaic_gpu: {_mosaic_forward.IMPORT_ERROR})")
    missing = [n for n in _NEEDED if not hasattr(_mosaic_forward.plgpu, n)]
    if missing:
        return f"jax {jax.__version__}'s Pallas Mosaic GPU lacks {', '.join(missing)}"
    return None


def _device_reason() -> str | None:
    if jax.default_backend() != "gpu":
        return f"the mosaic kernel needs an sm_90 GPU; the default backend is {jax.default_backend()}"
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is None or not str(cc).startswith("9."):
        return f"the mosaic kernel is built for sm_90 (Hopper); {dev.device_kind} has compute capability {cc}"
    return None


def _lowering_reason(program: TileProgram, read_dtypes) -> str | None:
    """Why Mosaic GPU cannot lower the tile program, or None.

    Traces what the kernel evaluates on a PARTIAL tile (values and mask) to a jaxpr and
    looks up each primitive in Mosaic GPU's own table of lowering rules (lane semantics),
    so a mod using an operation it cannot lower (``floor`` of a real, ``**``) declines here
    instead of failing inside the user's ``jit``."""
    try:
        from jax._src.pallas.mosaic_gpu import core as gpu_core
        from jax._src.pallas.mosaic_gpu import lowering as mgpu_lowering
        rules = mgpu_lowering.mosaic_lowering_rules[gpu_core.LANExWG_SEMANTICS]
    except (ImportError, AttributeError, KeyError):
        return f"jax {jax.__version__}'s Mosaic GPU lowering table could not be read"
    shape = (64, 64)
    tile = jax.ShapeDtypeStruct(shape, jnp.float32)
    pos = jax.ShapeDtypeStruct(shape, jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    read_avals = [jax.ShapeDtypeStruct(shape, jnp.float32 if jnp.issubdtype(dt, jnp.floating) else jnp.int32)
                  for dt in read_dtypes]

    def on_tile(s, b, h, q, kv, *rd):
        out = [program.values(s, b=b, h=h, q=q, kv=kv, reads=rd)]
        if program.canonical.has_mask:
            out.append(program.mask(b=b, h=h, q=q, kv=kv, reads=rd))
        return out

    jaxpr = jax.make_jaxpr(on_tile)(tile, scalar, scalar, pos, pos, *read_avals)
    for prim in _primitives(jaxpr.jaxpr):
        if prim not in rules:
            return f"Mosaic GPU has no lowering for {prim.name} (used by the mod's expression)"
    return None


def _primitives(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive
        for sub in _sub_jaxprs(eqn.params):
            yield from _primitives(sub)


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v


def check_supported(mod, query, key, value, tensors=None, block_sizes: MosaicBlockSizes | None = None
                    ) -> TileProgram:
    """The TileProgram for this call, or NotImplementedError saying why mosaic can't run it."""
    mod = as_mod(mod)
    tensors = tensors or {}
    check_missing_tensors(mod, tensors)   # a user's mistake, not a decline
    why = _device_reason() or _mosaic_missing()
    if why:
        raise NotImplementedError(why)
    why = kernel_input_reason("mosaic", query, key, value, dtypes=DTYPES, head_dim_ok=lambda H: H in HEAD_DIMS,
                              head_dims=" and ".join(map(str, HEAD_DIMS)))
    if why:
        raise NotImplementedError(why)
    H = query.shape[-1]
    bs = block_sizes or MosaicBlockSizes.get_default(H)
    if bs.smem_bytes(H) > SMEM_LIMIT:
        raise NotImplementedError(f"{bs} needs {bs.smem_bytes(H)} bytes of shared memory at head dim {H}; "
                                  f"sm_90 has {SMEM_LIMIT}")
    if bs.backward == "mosaic" and bs.backward_smem_bytes(H) > SMEM_LIMIT:
        raise NotImplementedError(f"{bs}: the backward needs {bs.backward_smem_bytes(H)} bytes of shared memory at "
                                  f"head dim {H}; sm_90 has {SMEM_LIMIT} (use fewer backward_stages)")
    program = TileProgram.build(mod.canonical, {n: jnp.ndim(t) for n, t in tensors.items()})
    ok, why = program.kernel_support()
    if not ok:
        raise NotImplementedError(f"mosaic kernel cannot run {mod}: {why}")
    why = _lowering_reason(program, [jnp.asarray(tensors[r.name]).dtype for r in program.reads])
    if why:
        raise NotImplementedError(f"mosaic kernel cannot run {mod}: {why}")
    return program


def mosaic_attention(query, key, value, *, mod=None, scale=None, q_offset=0, kv_offset=0,
                     return_lse=False, tensors=None, block_sizes: MosaicBlockSizes | None = None, plans=None):
    """Block-sparse flash attention with a scoremod mod, on Mosaic GPU.

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` (bf16 or f16; one dtype;
        H in 64, 128, 256; N a multiple of K).
      mod: source string, compiled ``Mod`` or None (plain attention).
      scale: score scale (default ``1/sqrt(H)``).
      q_offset, kv_offset: int or ``int32[B]`` absolute position of row/column 0.
      return_lse: also return ``lse f32[B, N, T]``.
      tensors: the mod's tensor parameters by name.
      block_sizes: ``MosaicBlockSizes`` (default ``MosaicBlockSizes.get_default(H)``).
      plans: an ``AttentionPlan`` holding this call's block plans (``scoremod.plan``), or
        None to build them here.

    Raises NotImplementedError (with the reason) for calls the kernel cannot run.

    Example::

        >>> out = mosaic_attention(q, k, v, mod="causal & window(1024)")   # on an H100/H200
    """
    mod = as_mod(mod)
    tensors = dict(tensors or {})
    program = check_supported(mod, query, key, value, tensors, block_sizes)
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    if key.shape[0] != B or value.shape != key.shape:
        raise ScoreModShapeError(f"key/value shapes {key.shape}, {value.shape} do not match query {query.shape}")
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    bs = block_sizes or MosaicBlockSizes.get_default(H)
    Tp, Sp = padded_lengths(T, S, bs)

    cfg, aux = _forward_inputs(program, mod, plans, tensors, bs, B=B, N=N, K=K, T=T, S=S, Tp=Tp, Sp=Sp,
                               q_offset=q_offset, kv_offset=kv_offset, scale=scale)
    mosaic_backward = bs.backward == "mosaic" and _mosaic_backward.backward_reason(program) is None
    mcfg = pcfg = None
    pallas_aux = {}
    if mosaic_backward:
        mcfg, aux["mosaic_bwd"] = _prepare_mosaic_backward(
            mod, cfg, plans, B=B, N=N, q_offset=q_offset, kv_offset=kv_offset, tensors=tensors,
            stages=bs.backward_stages, persistent=bs.backward_persistent)
    if not mosaic_backward:
        pcfg, pallas_aux = _pallas.prepare(mod, program, query, key, value, scale=scale, q_offset=q_offset,
                                           kv_offset=kv_offset, tensors=tensors, forward=False, plans=plans)
    out, lse = _flash(cfg, (mcfg, pcfg), query, key, value, aux, pallas_aux)
    return (out, lse) if return_lse else out


# ---- chunked prefill over a paged KV cache ------------------------------------------------

def with_length_bound(mod) -> tuple:
    """``(mod & kv < name[b], name)``: the mod with the paged cache's rule that keys at or past
    a sequence's length do not exist, as a mask reading the lengths as tensor ``name`` (one
    the mod does not use). The plan then skips blocks past each length, and PARTIAL tiles
    mask the rest."""
    mod = as_mod(mod)
    name = "paged_lengths"
    while name in mod.source_tensors:
        name += "_"
    text = str(mod)
    return as_mod(f"kv < {name}[b]" if text == "true" else f"({text}) & kv < {name}[b]"), name


def paged_kv_inputs(k_pages, v_pages, block_tables, lengths, kv_len_padded: int):
    """The kernel's page inputs (``_mosaic_forward.forward``'s ``pages``): the block tables
    padded to ``kv_len_padded / page_size`` entries and clipped into the pool, the index of
    each sequence's last page, and that page of K and V with the slots past the length
    zeroed (``[B, page_size, K, H]``: a slot past a length may hold anything, NaN included)."""
    P, ps = k_pages.shape[:2]
    B, max_pages = block_tables.shape
    per_seq = kv_len_padded // ps
    tables = jnp.clip(jnp.pad(block_tables, ((0, 0), (0, per_seq - max_pages))), 0, P - 1).astype(jnp.int32)
    last = jnp.clip((lengths - 1) // ps, 0, max_pages - 1).astype(jnp.int32)
    tail_page = jnp.take_along_axis(tables, last[:, None], axis=1)[:, 0]
    keep = (jnp.arange(ps)[None, :] < (lengths - last * ps)[:, None])[:, :, None, None]
    tail = lambda pages: jnp.where(keep, pages[tail_page], jnp.zeros((), pages.dtype))
    return tables, last, tail(k_pages), tail(v_pages)


def paged_kv_dense(k_pages, v_pages, tables, last, k_tail, v_tail):
    """The producer's copies as dense K/V ``[B, Sp, K, H]`` (its slow twin, for tests): page
    ``i`` of sequence ``b`` is the pool's ``tables[b, i]`` before ``last[b]``, the tail copy
    from there on (``paged_kv_inputs``' outputs; ``_mosaic_forward.forward``'s ``copy_block``)."""
    B, per_seq = tables.shape
    ps = k_pages.shape[1]
    from_tail = (jnp.arange(per_seq)[None, :] >= last[:, None])[:, :, None, None, None]

    def dense(pages, tail):
        x = jnp.where(from_tail, tail[:, None], pages[tables])               # [B, per_seq, ps, K, H]
        return x.reshape(B, per_seq * ps, *pages.shape[2:])
    return dense(k_pages, k_tail), dense(v_pages, v_tail)


def mosaic_paged_attention(q, k_pages, v_pages, block_tables, lengths, *, mod=None, tensors=None, scale=None,
                           block_sizes: MosaicBlockSizes | None = None):
    """Chunked prefill over a paged KV cache on the Mosaic forward kernel (forward only).

    Inputs as ``scoremod.paged_attention`` (runtime/paged.py), validated there: q
    ``[B, T, N, H]`` at positions ``lengths[b] - T + i``, the pools ``[P, page_size, K, H]``,
    ``block_tables int32[B, max_pages]``, ``lengths int32[B]``, tensors indexed by absolute
    position. The producer brings each listed block of 128 keys in page by page with TMA
    (``page_size`` a multiple of 8 dividing ``block_kv``); the plan is the mod's with keys
    past each length masked (``with_length_bound``), built in the call.

    Returns ``(out [B, T, N, H], lse f32[B, T, N])``. Raises NotImplementedError for calls the
    kernel cannot run (those of ``check_supported``, and page sizes it cannot tile).

    Example::

        >>> out, lse = mosaic_paged_attention(q, k_pages, v_pages, tables, lengths, mod="causal")
    """
    B, T, N, H = q.shape
    P, ps, K, _ = k_pages.shape
    bs = block_sizes or MosaicBlockSizes.get_default(H)
    if ps % 8 or bs.block_kv % ps:
        raise NotImplementedError(f"the mosaic prefill needs a page size that is a multiple of 8 and divides "
                                  f"block_kv={bs.block_kv}; got page_size={ps}")
    bounded, name = with_length_bound(mod)
    tensors = {**(tensors or {}), name: lengths}
    program = check_supported(bounded, q, k_pages, v_pages, tensors, bs)
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    rows = 2 * bs.block_q
    S = block_tables.shape[1] * ps
    Tp, Sp = -(-T // rows) * rows, -(-S // bs.block_kv) * bs.block_kv
    cfg, aux = _forward_inputs(program, bounded, None, tensors, bs, B=B, N=N, K=K, T=T, S=S, Tp=Tp, Sp=Sp,
                               q_offset=(lengths - T).astype(jnp.int32), kv_offset=0, scale=scale, page_size=ps)
    pages = paged_kv_inputs(k_pages, v_pages, block_tables, lengths, Sp)
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0))) if Tp != T else q
    out, lse = _mosaic_forward.forward(cfg, q, k_pages, v_pages, aux["lists"], aux["order"], aux["reads"],
                                       aux["q_off"], aux["kv_off"], pages=pages)
    return out[:, :T], lse[:, :, :T].transpose(0, 2, 1)


def _forward_inputs(program, mod, plans, tensors, bs: MosaicBlockSizes, *, B, N, K, T, S, Tp, Sp, q_offset,
                    kv_offset, scale, page_size=0):
    """The forward kernel's config and its array inputs ``aux`` (the plan's FULL/PARTIAL
    lists, the tile order, the materialized reads padded to (Tp, Sp), per-batch offsets)
    for a call of T queries at ``q_offset`` over S keys at ``kv_offset``."""
    rows = 2 * bs.block_q
    q_off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    kv_off = jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (B,))
    q_positions = q_off[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    kv_positions = kv_off[:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
    reads = program.materialize_reads(tensors, B, N, q_positions, kv_positions,
                                      q_per_batch=jnp.ndim(q_offset) > 0, kv_per_batch=jnp.ndim(kv_offset) > 0)
    reads = tuple(_pad_read(r, Tp, Sp) for r in reads)

    plan = plan_for(plans, mod, q_len=T, kv_len=S, block_q=rows, block_kv=bs.block_kv, batch=B, heads=N,
                    q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    lists = split_lists(plan.kv_counts, plan.kv_indices, plan.kv_full, entry_edge=ragged_edge(S, bs.block_kv))
    order = jnp.asarray(_mosaic_forward.tile_order(_mosaic_forward.row_step_counts(lists[0], lists[2], B, N)))
    lists = tuple(jnp.asarray(x, jnp.int32) for x in lists)
    n_tiles = B * N * (Tp // rows)

    cfg = MosaicKernelConfig(
        program=program, scale=scale, q_len=T, kv_len=S, q_len_padded=Tp, kv_len_padded=Sp,
        heads=N, kv_heads=K, read_shapes=tuple(tuple(r.shape) for r in reads), block_q=bs.block_q,
        block_kv=bs.block_kv, num_stages=bs.num_stages, plan_b=plan.grid_shape[0], plan_h=plan.grid_shape[1],
        ctas=min(n_tiles, sm_count()) if bs.persistent else n_tiles, page_size=page_size, lookahead=bs.lookahead)
    return cfg, dict(lists=lists, order=order, reads=reads, q_off=q_off, kv_off=kv_off)


def _pad_read(r, Tp: int, Sp: int):
    b1, h1, t1, s1 = r.shape
    pad = ((0, 0), (0, 0), (0, Tp - t1 if t1 > 1 else 0), (0, Sp - s1 if s1 > 1 else 0))
    return jnp.pad(r, pad) if any(p[1] for p in pad) else r


def _run_forward(cfg: MosaicKernelConfig, q, k, v, aux):
    T, S = cfg.q_len, cfg.kv_len
    Tp, Sp = cfg.q_len_padded, cfg.kv_len_padded
    if Tp != T:
        q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    if Sp != S:
        k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    out, lse = _mosaic_forward.forward(cfg, q, k, v, aux["lists"], aux["order"], aux["reads"], aux["q_off"],
                                       aux["kv_off"])
    if Tp != T:
        out, lse = out[:, :T], lse[:, :, :T]
    return out, lse




def _prepare_mosaic_backward(mod, cfg: MosaicKernelConfig, plans, *, B, N, q_offset, kv_offset, tensors,
                             stages: int, persistent: bool):
    """The Mosaic backward's config and, per kernel, its plan's lists and tile order: dQ walks
    (128 x 64)-block rows, dK/dV the transposed (64 x 128)-block plan."""
    T, S, blk = cfg.q_len, cfg.kv_len, BACKWARD_BLOCK
    K = cfg.kv_heads
    dq_plan = plan_for(plans, mod, q_len=T, kv_len=S, block_q=2 * blk, block_kv=blk, batch=B, heads=N,
                       q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    dkv_plan = plan_for(plans, mod, q_len=T, kv_len=S, block_q=blk, block_kv=2 * blk, batch=B, heads=N,
                        q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    dq_lists = split_lists(dq_plan.kv_counts, dq_plan.kv_indices, dq_plan.kv_full, entry_edge=ragged_edge(S, blk))
    dkv_lists = split_lists(dkv_plan.q_counts, dkv_plan.q_indices, dkv_plan.q_full, entry_edge=ragged_edge(T, blk),
                            row_edge=ragged_edge(S, 2 * blk))
    orders = dict(
        dq=_mosaic_forward.tile_order(_mosaic_forward.row_step_counts(dq_lists[0], dq_lists[2], B, N)),
        dkv=_mosaic_forward.tile_order(_mosaic_backward.dkv_step_counts(dkv_lists[0], dkv_lists[2], B, N, K)))
    lists = {name: (tuple(jnp.asarray(x, jnp.int32) for x in arrays), jnp.asarray(orders[name]))
             for name, arrays in (("dq", dq_lists), ("dkv", dkv_lists))}
    dq_tiles = B * N * (num_blocks(T, 2 * blk))
    dkv_tiles = B * K * (num_blocks(S, 2 * blk))
    sms = sm_count()
    bcfg = _mosaic_backward.MosaicBackwardConfig(
        fwd=cfg, block_q=blk, block_kv=blk, num_stages=stages, dq_plan=dq_plan.grid_shape[:2],
        dkv_plan=dkv_plan.grid_shape[:2], dq_ctas=min(dq_tiles, sms) if persistent else dq_tiles,
        dkv_ctas=min(dkv_tiles, sms) if persistent else dkv_tiles)
    return bcfg, lists


def _run_mosaic_backward(bcfg, q, k, v, aux, out, lse, cotangents, read_grads=()):
    """(dq, dk, dv, {read index: its gradient in the read's padded materialized shape})
    from the Mosaic backward kernels (see ``_mosaic_backward.py``); ``read_grads``: float
    reads along at most one of q and kv (``read_grad_kernel`` says which kernel sums each)."""
    dout, dlse = cotangents
    B, T, N, H = q.shape
    S = k.shape[1]
    rows = 2 * bcfg.block_q
    Tb, Sb = num_blocks(T, rows) * rows, num_blocks(S, rows) * rows
    dout = dout.astype(q.dtype)
    delta = _pallas.backward_delta(out, dout, lse, dlse)
    # lse in base 2; 0 on rows with no allowed key (their logits are all -inf: P = 0).
    lse2 = jnp.where(lse == -jnp.inf, 0.0, lse * _mosaic_backward.LOG2E)
    pad_t = ((0, 0), (0, Tb - T), (0, 0), (0, 0))
    pad_s = ((0, 0), (0, Sb - S), (0, 0), (0, 0))
    qp, dop = jnp.pad(q, pad_t), jnp.pad(dout, pad_t)
    kp, vp = jnp.pad(k, pad_s), jnp.pad(v, pad_s)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, Tb - T)), constant_values=jnp.inf)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, Tb - T)))
    (dq_lists, dq_order), (dkv_lists, dkv_order) = aux["mosaic_bwd"]["dq"], aux["mosaic_bwd"]["dkv"]
    by_kernel = {kind: tuple(i for i in read_grads if _mosaic_backward.read_grad_kernel(bcfg.fwd.program, i) == kind)
                 for kind in ("dq", "dkv")}
    dq, row_sums = _mosaic_backward.backward_dq(bcfg, qp, kp, vp, dop, lse2, delta, dq_lists, dq_order,
                                                aux["reads"], aux["q_off"], aux["kv_off"], read_grads=by_kernel["dq"])
    dk, dv, col_sums = _mosaic_backward.backward_dkv(bcfg, qp, kp, vp, dop, lse2, delta, dkv_lists, dkv_order,
                                                     aux["reads"], aux["q_off"], aux["kv_off"],
                                                     read_grads=by_kernel["dkv"])
    dreads = {i: _sum_to_read(g[..., :, None], jnp.shape(aux["reads"][i])) for i, g in zip(by_kernel["dq"], row_sums)}
    dreads.update({i: _sum_to_read(g[..., None, :], jnp.shape(aux["reads"][i]))
                   for i, g in zip(by_kernel["dkv"], col_sums)})
    return dq[:, :T], dk[:, :S], dv[:, :S], dreads


def _sum_to_read(grad, shape):
    """A read's gradient from the kernels' per-(b, query head) sums, ``[B, N, Tp, 1]`` (per
    query row, dQ) or ``[B, N, 1, Sp]`` (per key, dK/dV), to the read's materialized
    (padded) shape ``[B|1, N|1, Tp|1, Sp|1]``. The forward pads reads to its own blocks
    (``block_kv`` may be 256), the backward to 128: the padding's sums are 0 either way."""
    for axis, size in enumerate(shape):
        have = grad.shape[axis]
        if size == 1 and have > 1:
            grad = jnp.sum(grad, axis=axis, keepdims=True)
        elif have > size:
            grad = lax.slice_in_dim(grad, 0, size, axis=axis)
        elif have < size:
            grad = jnp.pad(grad, [(0, size - have) if a == axis else (0, 0) for a in range(grad.ndim)])
    return grad


@jax.tree_util.register_static
@dataclass(frozen=True)
class _BackwardRoute:
    """Which backward a call's gradient runs, chosen in the forward rule when jax.grad says
    which inputs are differentiated: "mosaic" (``read_grads``: float reads along at most
    one of q and kv, summed in its dQ or dK/dV kernel) or "pallas" (``read_grads``:
    indices into its own reads). Static (no arrays), so it rides in the residuals."""
    kernel: str
    read_grads: tuple[int, ...] = ()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(cfg, backward, q, k, v, aux, pallas_aux):
    return _run_forward(cfg, q, k, v, aux)


def _flash_fwd(cfg, backward, q, k, v, aux, pallas_aux):
    # Differentiated float reads: the Mosaic backward gives reads along at most one of q
    # and kv their gradients; any other makes the Pallas backward run (through its own
    # materialized reads, pallas_aux["reads"]).
    (q, k, v, aux), forward_perturbed = _pallas.primal_values("mosaic", q, k, v, aux)
    (pallas_aux,), perturbed = _pallas.primal_values("mosaic", pallas_aux)
    # A gradient of a gradient differentiates this too (also through a float read in aux).
    q, k, v, aux, pallas_aux = first_order_only("mosaic", (q, k, v, aux, pallas_aux))
    wanted = tuple(i for i in forward_perturbed if cfg.program.read_derivative(i) is not None)
    if backward[0] is not None and all(_mosaic_backward.read_grad_kernel(cfg.program, i) for i in wanted):
        route = _BackwardRoute("mosaic", wanted)
    elif forward_perturbed and not perturbed:   # (no such call: a safety net, never zeros)
        raise NotImplementedError("the mosaic kernels cannot give this call's tensor parameters their "
                                  "gradients; the pallas and xla paths can (docs/attention.md, Gradients)")
    else:
        route = _BackwardRoute("pallas", perturbed)
    out, lse = _run_forward(cfg, q, k, v, aux)
    return (out, lse), (q, k, v, aux, pallas_aux, out, lse, route)


def _flash_bwd(cfg, backward, res, cotangents):
    """``backward``: (MosaicBackwardConfig or None, the Pallas KernelConfig or None); the
    residuals' ``_BackwardRoute`` says which runs: the Mosaic backward (giving reads that
    do not depend on kv their gradients), or the Pallas backward (fed with this forward's
    output and lse), which gives any float read its gradient."""
    q, k, v, aux, pallas_aux, out, lse, route = res
    cotangents = tuple(map(_pallas.dense_cotangent, cotangents))
    q, k, v, aux, pallas_aux, out, lse, cotangents = first_order_only(
        "mosaic", (q, k, v, aux, pallas_aux, out, lse, cotangents))
    mcfg, pcfg = backward
    aux_ct = jax.tree_util.tree_map(_pallas._zero_cotangent, aux)
    pallas_ct = jax.tree_util.tree_map(_pallas._zero_cotangent, pallas_aux)
    if route.kernel == "mosaic":
        dq, dk, dv, dreads = _run_mosaic_backward(mcfg, q, k, v, aux, out, lse, cotangents, route.read_grads)
        aux_ct["reads"] = tuple(dreads.get(i, ct) for i, ct in enumerate(aux_ct["reads"]))
    else:
        dq, dk, dv, pallas_ct = _pallas.flash_backward(
            pcfg, (q, k, v, pallas_aux, out, lse, _pallas.ReadGrads(route.read_grads)), cotangents)
    return dq, dk, dv, aux_ct, pallas_ct


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)
