"""Tile programs: what a kernel evaluates on one (q-block, kv-block) tile.

A ``TileProgram`` is built from a canonical form and the ranks of the tensors it
reads. Each distinct tensor read becomes a ``TensorRead``; the runtime materializes it
once per call as a 4-D array ``[B|1, H|1, T|1, S|1]`` (an axis is 1 when the read does
not depend on it) and the kernel hands the tile's slice of it back to the program.
Reads whose indices are not plain positions (``t[h, clip(q - kv, -m, m) + m]``,
``t[abs(q - kv)]``, ``t[0, b, h, q]``) are "gather" reads: the runtime hands the kernel
the whole table and the program computes the indices on the tile and gathers through a
``TableLookup`` (clipped into range like every read). Kernels that cannot gather (mosaic,
the paged kernel) decline them (``kernel_support`` says why); a read whose index depends
on ``score`` is declined by every kernel.

    prog = TileProgram.build(mod.canonical, {"ids": 2})
    tile = prog.logits(scores, b=b, h=h, q=q_pos[:, None], kv=kv_pos[None, :], reads=tiles)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import jax.numpy as jnp

from scoremod.dsl.ast import Binary, IntLit, Node, Tensor, walk
from scoremod.compiler.axes import used_indices
from scoremod.compiler.reads import TensorRead, kernel_support, program_reads
from scoremod.compiler.canonical import Canonical
from scoremod.compiler.derivative import derivative
from scoremod.compiler.rewrite import simplify
from scoremod.compiler.lowering import emit, gather_read, logits_from_canonical, values_from_canonical

__all__ = ["TableLookup", "TileProgram", "MAX_TABLE_SIZE"]

# Gathers index a table by a flat int32 offset (row-major), so a table holds fewer elements.
MAX_TABLE_SIZE = 2**31 - 1


@dataclass(frozen=True, eq=False)
class TableLookup:
    """A whole table that a kernel lets a tile program gather from (a gather read).

    shape: the table's shape (rank >= 1). load(flat): the table's elements at int32
    row-major offsets ``flat`` (an array of any shape, every offset in range), e.g.
    ``lambda flat: table_ref[flat]`` on the flattened table in a Pallas kernel.
    """
    shape: tuple[int, ...]
    load: Callable

    def gather(self, indices):
        """``table[indices]`` with the language's rules (docs/language.md, "7. Tensors"):
        right-aligned indices, each clipped into ``[0, dim - 1]``, as ``gather_read``
        does on the XLA path. indices: int arrays that broadcast together (a tile's
        ``[bq|1, bkv|1]`` or scalars)."""
        return self.load(row_major_offsets(used_indices(indices, len(self.shape)), self.shape))


def row_major_offsets(indices, dims):
    """int32 row-major offsets of ``indices`` (one per dim, each clipped into
    ``[0, dim - 1]``) into an array of shape ``dims``; 0 for no dims."""
    flat = jnp.int32(0)
    for index, dim in zip(indices, dims):
        flat = flat * dim + jnp.minimum(jnp.maximum(jnp.asarray(index, jnp.int32), 0), dim - 1)
    return flat


class _TileEnv:
    def __init__(self, program: "TileProgram", variables: dict, reads):
        self.program = program
        self.variables = variables
        self.reads = reads

    def var(self, name):
        return self.variables[name]

    def tensor(self, node, indices):
        value = self.reads[self.program.read_index[node]]
        if isinstance(value, TableLookup):
            value = jnp.asarray(value.gather(indices))
        if value.dtype == jnp.bool_ or jnp.issubdtype(value.dtype, jnp.integer):
            return value.astype(jnp.int32)
        return value.astype(jnp.float32)


@dataclass(frozen=True, eq=False)
class TileProgram:
    """The functions a kernel calls on a tile, and the tensor reads it must feed."""
    canonical: Canonical
    reads: tuple[TensorRead, ...]
    dtransform: Node | None     # d T / d score (None: T is the identity, derivative 1)

    @staticmethod
    def build(canonical: Canonical, tensor_ranks: dict[str, int]) -> "TileProgram":
        return _build(canonical, tuple(sorted(tensor_ranks.items())))

    @property
    def read_index(self) -> dict[Tensor, int]:
        return {r.node: i for i, r in enumerate(self.reads)}

    def kernel_support(self, *, gathers: bool = False) -> tuple[bool, str]:
        """(True, "") when a kernel can run this program, else (False, why)
        (``compiler.reads.kernel_support``; gathers: the kernel takes gather reads)."""
        return kernel_support(self.canonical, self.reads, gathers=gathers)

    def mask_reads(self) -> tuple[int, ...]:
        """Indices (into ``reads``) of the reads the mask needs."""
        nodes = {n for n in walk(self.canonical.mask) if isinstance(n, Tensor)}
        return tuple(i for i, r in enumerate(self.reads) if r.node in nodes)

    # -- materializing reads (outside kernels) --
    def materialize_reads(self, tensors: dict, batch: int, heads: int,
                          q_positions, kv_positions, *, q_per_batch: bool = True,
                          kv_per_batch: bool = True) -> list:
        """Each plain read as a 4-D array ``[B|1, H|1, T|1, S|1]`` (see ``TensorRead.shape``);
        each gather read as its whole table (the tensor in its own shape, int32 for int
        and bool tensors, float32 for floats), for a kernel to gather from per tile
        through a ``TableLookup``.

        q_positions: int32[B, T] absolute query positions; kv_positions: int32[B, S].
        q_per_batch / kv_per_batch: whether those positions may differ between batch rows
        (per-batch offsets): a read along q (kv) then has a B axis even when it does not
        read b (``u[q]`` is ``u[3 + i]`` in row 0 and ``u[8 + i]`` in row 1); False lays
        it out once, from row 0's positions.
        """
        out = []
        for r in self.reads:
            if r.gather:
                table = jnp.asarray(tensors[r.name])
                integral = table.dtype == jnp.bool_ or jnp.issubdtype(table.dtype, jnp.integer)
                out.append(table.astype(jnp.int32 if integral else jnp.float32))
                continue
            by_b = ("b" in r.axes or (q_per_batch and "q" in r.axes)
                    or (kv_per_batch and "kv" in r.axes))
            b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None] if by_b else jnp.zeros((1, 1, 1, 1), jnp.int32)
            h = jnp.arange(heads, dtype=jnp.int32)[None, :, None, None] if "h" in r.axes else jnp.zeros((1, 1, 1, 1), jnp.int32)
            rows = b[:, 0, 0, 0]
            q = jnp.asarray(q_positions)[rows][:, None, :, None] if "q" in r.axes else jnp.zeros((1, 1, 1, 1), jnp.int32)
            kv = jnp.asarray(kv_positions)[rows][:, None, None, :] if "kv" in r.axes else jnp.zeros((1, 1, 1, 1), jnp.int32)
            env = {"b": b, "h": h, "q": q, "kv": kv}
            idx = [env[i.name] for i in r.node.indices]
            value = gather_read(tensors[r.name], idx)
            shape = r.shape(batch, heads, jnp.shape(q_positions)[1], jnp.shape(kv_positions)[1])
            out.append(jnp.broadcast_to(value, (batch if by_b else 1,) + shape[1:]))
        return out

    # -- on a tile --
    def _env(self, scores, b, h, q, kv, reads):
        return _TileEnv(self, {"score": scores, "b": b, "h": h, "q": q, "kv": kv}, reads)

    def logits(self, scores, *, b, h, q, kv, reads=()):
        """``where(M, T(score) + B, -inf)`` on a tile; f32 ``[bq, bkv]``.

        reads: one entry per ``self.reads``: the tile of a plain read (``[bq|1, bkv|1]``),
        a ``TableLookup`` for a gather read, or None for a read this function does not use.
        """
        return logits_from_canonical(self.canonical, self._env(scores, b, h, q, kv, reads))

    def values(self, scores, *, b, h, q, kv, reads=()):
        """``T(score) + B`` without the mask (for FULL tiles); f32."""
        return values_from_canonical(self.canonical, self._env(scores, b, h, q, kv, reads))

    def mask(self, *, b, h, q, kv, reads=()):
        """The mask M on a tile (bool, broadcast of q ``[bq,1]`` and kv ``[1,bkv]``)."""
        env = self._env(None, b, h, q, kv, reads)
        m = emit(self.canonical.mask, env)
        return jnp.broadcast_to(m, jnp.broadcast_shapes(jnp.shape(q), jnp.shape(kv)))

    def dscore(self, scores, *, b, h, q, kv, reads=()):
        """``dT/dscore`` on a tile (1 where T is the identity); f32."""
        if self.dtransform is None:
            return jnp.ones_like(scores, dtype=jnp.float32)
        value = emit(self.dtransform, self._env(scores, b, h, q, kv, reads))
        return jnp.broadcast_to(jnp.asarray(value, jnp.float32), jnp.shape(scores))

    def gather_offsets(self, i: int, *, b, h, q, kv, reads=()):
        """Where gather read i reads its table on a tile, within the slice its
        ``fixed_axes`` select (``gather_slices``): int32 row-major offsets over the
        table's remaining axes, broadcast of q ``[bq,1]`` and kv ``[1,bkv]``. reads as for
        ``logits`` (a ``TableLookup`` at i). A kernel scatters read i's gradient to these
        offsets (``runtime/_pallas_backward.py``)."""
        read = self.reads[i]
        env = self._env(None, b, h, q, kv, reads)
        within = used_indices(read.node.indices, read.rank)[read.fixed_axes:]
        flat = row_major_offsets([emit(index, env) for index in within], reads[i].shape[read.fixed_axes:])
        return jnp.broadcast_to(flat, jnp.broadcast_shapes(jnp.shape(q), jnp.shape(kv)))

    def gather_slices(self, i: int, reads, shapes, batch: int, heads: int):
        """int32 ``[B, N]``: the slice of gather read i's table (row-major over its
        ``fixed_axes``) that kernel programs over (b, query head h) read; with the table
        seen as ``[slices, slice size]``, ``gather_offsets`` index within a slice.

        reads: one entry per ``self.reads`` as a kernel gets them: a plain read
        materialized ``[B|1, N|1, T|1, S|1]``, a gather read's table (flattened or not);
        shapes: each gather read's table shape. The fixed indices depend on neither q nor
        kv, so the plain reads they use are read at q = kv = row 0."""
        views = []
        for r, value, shape in zip(self.reads, reads, shapes):
            if r.gather:
                views.append(TableLookup(tuple(shape), lambda flat, t=jnp.reshape(value, (-1,)): t[flat]))
            else:
                views.append(jnp.asarray(value)[:, :, 0, 0])
        b = jnp.arange(batch, dtype=jnp.int32)[:, None]
        h = jnp.arange(heads, dtype=jnp.int32)[None, :]
        env = self._env(None, b, h, None, None, views)
        read = self.reads[i]
        fixed = used_indices(read.node.indices, read.rank)[:read.fixed_axes]
        flat = row_major_offsets([emit(index, env) for index in fixed], tuple(shapes[i])[:read.fixed_axes])
        return jnp.broadcast_to(flat, (batch, heads))

    def read_derivative(self, i: int) -> Node | None:
        """``d(T(score) + B) / d read_i`` as IR (the read taken as a variable), or None
        where the values do not depend on it (a read only the mask uses). A kernel
        gives a float read its gradient as ``sum(dL/dlogit * this)`` over the logits
        with p > 0 (docs/attention.md, Gradients)."""
        return _read_derivative(self.canonical, self.reads[i].node)

    def dread(self, i: int, scores, *, b, h, q, kv, reads=()):
        """``read_derivative(i)`` on a tile, f32 broadcast to the scores' shape (zeros
        where the values do not depend on the read)."""
        d = self.read_derivative(i)
        if d is None:
            return jnp.zeros_like(scores, dtype=jnp.float32)
        value = emit(d, self._env(scores, b, h, q, kv, reads))
        return jnp.broadcast_to(jnp.asarray(value, jnp.float32), jnp.shape(scores))


# Tile programs kept per (canonical form, tensor ranks): small objects, one per mod in use.
TILE_PROGRAM_CACHE = 512


@lru_cache(maxsize=TILE_PROGRAM_CACHE)
def _read_derivative(canonical: Canonical, node: Tensor) -> Node | None:
    parts = [derivative(p, wrt=node) for p in (canonical.transform, canonical.bias) if p is not None]
    parts = [p for p in parts if p != IntLit(0)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else simplify(Binary("+", parts[0], parts[1]), ["fold", "arithmetic"])


@lru_cache(maxsize=TILE_PROGRAM_CACHE)
def _build(canonical: Canonical, ranks: tuple) -> TileProgram:
    dT = derivative(canonical.transform) if canonical.transform is not None else None
    return TileProgram(canonical, program_reads(canonical, dict(ranks)), dT)
