"""Portable block-sparse flash attention in Pallas (Triton lowering on GPU, interpret on CPU).

``pallas_attention(query, key, value, *, mod, ...)`` runs a fused flash-attention kernel
that visits only the tiles the mod's ``BlockPlan`` lists, skips mask evaluation on FULL
tiles, and applies the mod's ``TileProgram`` on every tile it visits. Forward and
backward (``jax.custom_vjp``: dQ over the q-major plan, dK/dV over the transposed plan)
are Pallas kernels; see ``docs/kernels.md``.

Layout BTNH like ``jax.nn.dot_product_attention``: query ``[B, T, N, H]``, key/value
``[B, S, K, H]`` with ``N % K == 0`` (GQA). Any T and S (ragged last blocks are masked in
the kernel, nothing is padded). ``lse`` is ``f32[B, N, T]`` (natural log, ``-inf`` on rows
with no allowed key, whose output is 0).

    out = pallas_attention(q, k, v, mod="causal & doc(ids)", tensors={"ids": ids})
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
import numpy as np

from scoremod.compiler.plan import merged_list, ragged_edge, split_lists
from scoremod.compiler.tensors import check_missing_tensors
from scoremod.compiler.tile import MAX_TABLE_SIZE, TileProgram
from scoremod.errors import ScoreModShapeError
from scoremod.runtime._dispatch import FLOAT_DTYPES, as_mod, kernel_input_reason
from scoremod.runtime.attention_plan import plan_for
from scoremod.runtime.first_order import first_order_only
from scoremod.runtime._pallas_common import KernelConfig, flat_reads
from scoremod.runtime._triton import MIN_TILE, pltriton
from scoremod.runtime._pallas_forward import forward as _forward
from scoremod.runtime._pallas_backward import backward_dkv as _backward_dkv
from scoremod.runtime._pallas_backward import backward_dq as _backward_dq
from scoremod.runtime._pallas_backward import table_slice_size

__all__ = ["PallasBlockSizes", "pallas_attention"]

logger = logging.getLogger("scoremod")

MAX_HEAD_DIM = 256
# A differentiated table read at computed indices is given its gradient in the dQ kernel
# through a per-program accumulator the size of the table slice one (batch, head) reads
# (row h of t[h, bucket]; rounded up to a power of two), held in registers: slices of up
# to this many elements (T5 buckets, relpos(t, m) up to m = 2047).
MAX_GATHER_GRAD_TABLE = 4096


@dataclass(frozen=True)
class PallasBlockSizes:
    """Tile sizes and Triton launch parameters of the Pallas kernels.

    Attributes:
      block_q, block_kv: forward tile (query rows x key columns). Powers of two >= 16.
      num_warps, num_stages: forward launch (warps per program, software-pipelining depth).
      block_q_dq, block_kv_dq: dQ kernel tile (walks the q-major plan).
      block_q_dkv, block_kv_dkv: dK/dV kernel tile (walks the transposed plan).
      num_warps_bwd, num_stages_bwd: launch parameters of both backward kernels.
      fwd_one_loop, bwd_one_loop: the forward / backward kernels walk one list with a
        per-tile FULL/PARTIAL branch instead of two branch-free loops (one per list).

    Each block is clamped to the sequence length (rounded up to a power of two, at least
    16). The block plan is built for each distinct (block_q, block_kv) pair used.
    ``get_default`` picks values measured on an H100 (benchmarks/NOTES_pallas.md).
    """
    block_q: int = 128
    block_kv: int = 64
    num_warps: int = 8
    num_stages: int = 3
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    fwd_one_loop: bool = False
    bwd_one_loop: bool = False

    @classmethod
    def get_default(cls, head_dim: int, dtype=jnp.bfloat16, *, masked: bool = True) -> "PallasBlockSizes":
        """Defaults for a head dimension, input dtype and whether the mod has a mask.

        head_dim <= 64: fwd 128x64, 4 warps, 3 stages; bwd 64x64, 4 warps, 2 stages.
        head_dim <= 128: fwd 128x128, 8 warps, 3 stages, one loop (no mask: 128x64,
          4 warps, 3 stages); bwd 64x64, 4 warps, 2 stages.
        head_dim <= 256: fwd 64x32, 4 warps, 2 stages; bwd 32x32, 4 warps, 1 stage.
        float32 inputs halve the kv block (shared memory) where it stays >= 16.
        """
        backward_64 = dict(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                           num_warps_bwd=4, num_stages_bwd=2)
        if head_dim <= 64:
            bs = cls(block_q=128, block_kv=64, num_warps=4, num_stages=3, **backward_64)
        elif head_dim <= 128 and masked:
            bs = cls(block_q=128, block_kv=128, num_warps=8, num_stages=3, fwd_one_loop=True, **backward_64)
        elif head_dim <= 128:
            bs = cls(block_q=128, block_kv=64, num_warps=4, num_stages=3, **backward_64)
        else:
            bs = cls(block_q=64, block_kv=32, num_warps=4, num_stages=2, block_q_dq=32, block_kv_dq=32,
                     block_q_dkv=32, block_kv_dkv=32, num_warps_bwd=4, num_stages_bwd=1)
        if jnp.dtype(dtype) == jnp.float32:
            bs = dataclasses.replace(bs, block_kv=max(MIN_TILE, bs.block_kv // 2),
                                     block_kv_dq=max(MIN_TILE, bs.block_kv_dq // 2),
                                     block_q_dkv=max(MIN_TILE, bs.block_q_dkv // 2))
        return bs


def _clamp(block: int, length: int) -> int:
    if block < MIN_TILE or block & (block - 1):
        raise ScoreModShapeError(f"block sizes must be powers of two >= {MIN_TILE}, got {block}")
    return max(MIN_TILE, min(block, 1 << max(0, (length - 1).bit_length())))


def _resolve_interpret(interpret):
    if interpret is not None:
        return bool(interpret)
    backend = jax.default_backend()
    if backend == "gpu" or backend == "cuda":
        return False
    _log_interpret_once(backend)
    return True


@functools.lru_cache(maxsize=None)
def _log_interpret_once(backend):
    logger.warning("pallas attention on %s runs in Pallas interpret mode (slow; for testing)",
                   backend)


def check_supported(mod, query, key, value, tensors=None) -> TileProgram:
    """The TileProgram for this call, or NotImplementedError saying why the kernel can't run."""
    mod = as_mod(mod)
    tensors = tensors or {}
    check_missing_tensors(mod, tensors)   # a user's mistake, not a decline
    if pltriton is None:
        raise NotImplementedError("this jax has no Pallas Triton support (jax.experimental.pallas.triton)")
    why = kernel_input_reason("pallas", query, key, value, dtypes=FLOAT_DTYPES,
                              head_dim_ok=lambda H: H <= MAX_HEAD_DIM, head_dims=f"up to {MAX_HEAD_DIM}")
    if why:
        raise NotImplementedError(why)
    program = TileProgram.build(mod.canonical, {n: jnp.ndim(t) for n, t in tensors.items()})
    ok, why = program.kernel_support(gathers=True)
    if not ok:
        raise NotImplementedError(f"pallas kernel cannot run {mod}: {why}")
    for r in program.reads:
        if r.gather and math.prod(jnp.shape(tensors[r.name])) > MAX_TABLE_SIZE:
            raise NotImplementedError(f"pallas kernel cannot run {mod}: tensor read {r.node} gathers from "
                                      f"'{r.name}' of shape {jnp.shape(tensors[r.name])}, more than "
                                      f"{MAX_TABLE_SIZE} elements (int32 offsets)")
    return program


def pallas_attention(query, key, value, *, mod=None, scale=None, q_offset=0, kv_offset=0,
                     return_lse=False, tensors=None, block_sizes: PallasBlockSizes | None = None,
                     interpret=None, plans=None, _debug_counts=False):
    """Block-sparse flash attention with a scoremod mod.

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` (bf16, f16 or f32; one dtype).
      mod: source string, compiled ``Mod`` or None (plain attention).
      scale: score scale (default ``1/sqrt(H)``).
      q_offset, kv_offset: int or ``int32[B]`` absolute position of row/column 0.
      return_lse: also return ``lse f32[B, N, T]``.
      tensors: the mod's tensor parameters by name.
      block_sizes: ``PallasBlockSizes`` (default ``PallasBlockSizes.get_default(H, dtype)``).
      interpret: run Pallas in interpret mode (default: on any non-GPU backend).
      plans: an ``AttentionPlan`` holding this call's block plans (``scoremod.plan``), or
        None to build them here.

    Raises NotImplementedError (with the reason) for calls the kernel cannot run.
    """
    mod = as_mod(mod)
    tensors = dict(tensors or {})
    program = check_supported(mod, query, key, value, tensors)
    cfg, aux = prepare(mod, program, query, key, value, scale=scale, q_offset=q_offset,
                       kv_offset=kv_offset, tensors=tensors, block_sizes=block_sizes,
                       interpret=interpret, debug_counts=_debug_counts, plans=plans)
    q_off, kv_off = aux["q_off"], aux["kv_off"]

    if _debug_counts:
        out, lse, counts = _forward(cfg, query, key, value, aux["fwd"], aux["reads"],
                                    q_off, kv_off)
        return out, lse, counts
    out, lse = _flash(cfg, query, key, value, aux)
    return (out, lse) if return_lse else out


def prepare(mod, program: TileProgram, query, key, value, *, scale=None, q_offset=0, kv_offset=0,
            tensors=None, block_sizes: PallasBlockSizes | None = None, interpret=None,
            debug_counts=False, forward=True, plans=None):
    """The static ``KernelConfig`` and the per-call arrays (plan lists, reads, offsets) of
    the Pallas kernels for one call. ``forward=False`` leaves out the forward's lists (the
    mosaic forward reuses the backward kernels through this)."""
    tensors = dict(tensors or {})
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    if key.shape[0] != B or value.shape[:3] != key.shape[:3]:
        raise ScoreModShapeError(f"key/value shapes {key.shape}, {value.shape} do not match query {query.shape}")
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    bs = block_sizes or PallasBlockSizes.get_default(H, query.dtype, masked=program.canonical.has_mask)
    interpret = _resolve_interpret(interpret)

    cfg = KernelConfig(
        program=program, scale=scale, batch=B, q_len=T, kv_len=S, heads=N, kv_heads=K,
        head_dim=H, read_shapes=(), interpret=interpret,
        blocks=dataclasses.replace(
            bs, block_q=_clamp(bs.block_q, T), block_kv=_clamp(bs.block_kv, S),
            block_q_dq=_clamp(bs.block_q_dq, T), block_kv_dq=_clamp(bs.block_kv_dq, S),
            block_q_dkv=_clamp(bs.block_q_dkv, T), block_kv_dkv=_clamp(bs.block_kv_dkv, S),
            fwd_one_loop=bool(bs.fwd_one_loop), bwd_one_loop=bool(bs.bwd_one_loop)),
        debug_counts=bool(debug_counts))

    q_off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    kv_off = jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (B,))
    q_positions = q_off[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    kv_positions = kv_off[:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
    reads = program.materialize_reads(tensors, B, N, q_positions, kv_positions,
                                      q_per_batch=jnp.ndim(q_offset) > 0, kv_per_batch=jnp.ndim(kv_offset) > 0)
    cfg = dataclasses.replace(cfg, read_shapes=tuple(tuple(r.shape) for r in reads))
    reads = flat_reads(program, reads)   # gather reads' tables flattened (TableLookup offsets)

    built = {}

    def plan(bq, bkv):
        if (bq, bkv) not in built:
            built[bq, bkv] = plan_for(plans, mod, q_len=T, kv_len=S, block_q=bq, block_kv=bkv, batch=B, heads=N,
                                      q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
        return built[bq, bkv]

    dqp = plan(cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq)
    dkvp = plan(cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv)
    aux = dict(
        dq=(merged_list if cfg.blocks.bwd_one_loop else split_lists)(
            dqp.kv_counts, dqp.kv_indices, dqp.kv_full, entry_edge=ragged_edge(S, cfg.blocks.block_kv_dq)),
        dkv=(merged_list if cfg.blocks.bwd_one_loop else split_lists)(
            dkvp.q_counts, dkvp.q_indices, dkvp.q_full, entry_edge=ragged_edge(T, cfg.blocks.block_q_dkv),
            row_edge=ragged_edge(S, cfg.blocks.block_kv_dkv)),
        reads=tuple(reads), q_off=q_off, kv_off=kv_off)
    if forward:
        fp = plan(cfg.blocks.block_q, cfg.blocks.block_kv)
        aux["fwd"] = (merged_list if cfg.blocks.fwd_one_loop else split_lists)(
            fp.kv_counts, fp.kv_indices, fp.kv_full, entry_edge=ragged_edge(S, cfg.blocks.block_kv))
    return cfg, aux


# ---- custom_vjp ---------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, aux):
    out, lse = _forward(cfg, q, k, v, aux["fwd"], aux["reads"], aux["q_off"], aux["kv_off"])
    return out, lse


@jax.tree_util.register_static
@dataclass(frozen=True)
class ReadGrads:
    """Which reads (indices into ``TileProgram.reads``) the backward gives gradients: the
    float reads being differentiated. Static (no arrays), so it rides in the residuals."""
    indices: tuple[int, ...] = ()


def _flash_fwd(cfg, q, k, v, aux):
    (q, k, v, aux), perturbed = primal_values("pallas", q, k, v, aux)
    # A gradient of a gradient differentiates this too (also through a float read in aux).
    q, k, v, aux = first_order_only("pallas", (q, k, v, aux))
    for i in perturbed:
        size = table_slice_size(cfg, i) if cfg.program.reads[i].gather else 0
        if size > MAX_GATHER_GRAD_TABLE:
            raise NotImplementedError(
                f"the pallas kernels give a table read at computed indices "
                f"({cfg.program.reads[i].node}) its gradient where one (batch, head) reads at "
                f"most {MAX_GATHER_GRAD_TABLE} of its elements (here {size}); the xla path "
                f"takes any size (docs/attention.md, Gradients)")
    out, lse = _forward(cfg, q, k, v, aux["fwd"], aux["reads"], aux["q_off"], aux["kv_off"])
    return (out, lse), (q, k, v, aux, out, lse, ReadGrads(perturbed))


def primal_values(kernel: str, *primals):
    """The values of a kernel's custom_vjp inputs (``symbolic_zeros``: each is a
    ``CustomVJPPrimal``) and the indices of the float tensor reads being differentiated
    (``aux["reads"]``, aux being the last input). A differentiated float anywhere else in
    aux raises NotImplementedError (so ``attention`` falls through to an implementation
    that gives it a gradient, never a silent zero). This runs when the call is made
    under ``jax.grad``."""
    *arrays, aux = primals
    is_primal = lambda x: hasattr(x, "perturbed")
    floating = lambda p: jnp.issubdtype(jnp.asarray(p.value).dtype, jnp.floating)
    perturbed = tuple(i for i, p in enumerate(aux.get("reads", ())) if p.perturbed and floating(p))
    rest = {name: part for name, part in aux.items() if name != "reads"}
    for leaf in jax.tree.leaves(rest, is_leaf=is_primal):
        if leaf.perturbed and floating(leaf):
            raise NotImplementedError(f"the {kernel} kernels do not give this tensor parameter its "
                                      f"gradient; the xla path does (docs/attention.md, Gradients)")
    values = (*(p.value for p in arrays), jax.tree.map(lambda p: p.value, aux, is_leaf=is_primal))
    return values, perturbed


def dense_cotangent(ct):
    """A cotangent as an array (``symbolic_zeros``: an unused output's is a SymbolicZero)."""
    if isinstance(ct, SymbolicZero):
        return jnp.zeros(ct.aval.shape, ct.aval.dtype)
    return ct


def flash_backward(cfg, res, cotangents):
    """The Pallas backward: (dq, dk, dv, cotangents for aux) from the residuals
    ``(q, k, v, aux, out, lse [B, N, T], ReadGrads)`` (``prepare`` makes cfg and aux).
    The reads ``ReadGrads`` names get their gradients (``_pallas_backward``: the dQ
    kernel sums those that do not depend on kv, and writes the tiles of ``[T, S]`` reads;
    the dK/dV kernel sums those that depend on kv only); the rest of aux gets zeros."""
    q, k, v, aux, out, lse, read_grads = res
    dout, dlse = map(dense_cotangent, cotangents)
    q, k, v, aux, out, lse, dout, dlse = first_order_only("pallas", (q, k, v, aux, out, lse, dout, dlse))
    dout = dout.astype(q.dtype)
    delta = backward_delta(out, dout, lse, dlse)
    # A read only the mask uses (t[q, kv] > 0) has derivative 0: its cotangent stays zeros.
    wanted = tuple(i for i in read_grads.indices if cfg.program.read_derivative(i) is not None)
    by_dkv = tuple(i for i in wanted if not cfg.program.reads[i].gather
                   and cfg.read_shapes[i][2] == 1 and cfg.read_shapes[i][3] > 1)
    by_dq = tuple(i for i in wanted if i not in by_dkv)
    dq, dreads_q = _backward_dq(cfg, q, k, v, dout, lse, delta, aux["dq"], aux["reads"],
                                aux["q_off"], aux["kv_off"], read_grads=by_dq)
    dk, dv, dreads_kv = _backward_dkv(cfg, q, k, v, dout, lse, delta, aux["dkv"], aux["reads"],
                                      aux["q_off"], aux["kv_off"], read_grads=by_dkv)
    aux_ct = jax.tree_util.tree_map(_zero_cotangent, aux)
    dreads = {**dict(zip(by_dq, dreads_q)), **dict(zip(by_dkv, dreads_kv))}
    aux_ct["reads"] = tuple(dreads.get(i, ct) for i, ct in enumerate(aux_ct["reads"]))
    return dq, dk, dv, aux_ct


def backward_delta(out, dout, lse, dlse):
    """``delta f32[B, N, T] = rowsum(O * dO) - dlse`` (the lse cotangent enters as ``p * dlse``
    on every logit; rows with lse -inf have no logits). Both flash backwards use it."""
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
    return delta


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


_flash.defvjp(_flash_fwd, flash_backward, symbolic_zeros=True)
