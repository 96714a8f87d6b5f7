"""Tile programs: what a kernel evaluates on one (q-block, kv-block) tile.

A ``TileProgram`` is built from a canonical form and the ranks of the tensors it
reads. Each distinct tensor read becomes a ``TensorRead``; the runtime materializes it
once per call as a 4-D array ``[B|1, H|1, T|1, S|1]`` (an axis is 1 when the read does
not depend on it) and the kernel hands the tile's slice of it back to the program.
Reads whose indices are not plain positions (``t[h, clip(q - kv, -m, m) + m]``) are
"gather" reads: the XLA path runs them, kernels do not (``kernel_support`` says why).

    prog = TileProgram.build(mod.canonical, {"ids": 2})
    tile = prog.logits(scores, b=b, h=h, q=q_pos[:, None], kv=kv_pos[None, :], reads=tiles)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import jax.numpy as jnp

from scoremod.dsl.ast import Node, Tensor, Var, mentions, walk
from scoremod.compiler.axes import used_indices
from scoremod.compiler.canonical import Canonical
from scoremod.compiler.derivative import derivative
from scoremod.compiler.lowering import emit, gather_read, logits_from_canonical, values_from_canonical

__all__ = ["TensorRead", "TileProgram", "AXES"]

AXES = ("b", "h", "q", "kv")


@dataclass(frozen=True)
class TensorRead:
    """One tensor read ``name[indices]`` of the IR and the position axes it depends on."""
    node: Tensor
    rank: int
    axes: tuple[str, ...]      # subset of AXES, in AXES order
    gather: bool               # indices are not plain, distinct position variables

    @property
    def name(self) -> str:
        return self.node.name

    def shape(self, batch: int, heads: int, q_len: int, kv_len: int) -> tuple[int, int, int, int]:
        """Shape of the materialized read: ``[B|1, H|1, T|1, S|1]``."""
        sizes = {"b": batch, "h": heads, "q": q_len, "kv": kv_len}
        return tuple(sizes[a] if a in self.axes else 1 for a in AXES)


def _read_of(node: Tensor, rank: int) -> TensorRead:
    used = used_indices(node.indices, rank)
    names = [i.name if isinstance(i, Var) and i.name != "score" else None for i in used]
    plain = all(n is not None for n in names) and len(set(names)) == len(names)
    depends = {v.name for i in used for v in walk(i) if isinstance(v, Var)}
    axes = tuple(a for a in AXES if a in depends)
    return TensorRead(node, rank, axes, gather=not plain)


class _TileEnv:
    def __init__(self, program: "TileProgram", variables: dict, reads):
        self.program = program
        self.variables = variables
        self.reads = reads

    def var(self, name):
        return self.variables[name]

    def tensor(self, node, indices):
        value = self.reads[self.program.read_index[node]]
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

    def kernel_support(self) -> tuple[bool, str]:
        """(True, "") when a kernel can run this program, else (False, why)."""
        if mentions(self.canonical.mask, "score"):
            return False, "the mask reads score; kernels decide masks from positions and tensors only"
        for r in self.reads:
            if r.gather:
                return False, (f"tensor read {r.node} indexes by computed positions; "
                               "kernels take reads indexed by plain b, h, q, kv")
        return True, ""

    def mask_reads(self) -> tuple[int, ...]:
        """Indices (into ``reads``) of the reads the mask needs."""
        nodes = {n for n in walk(self.canonical.mask) if isinstance(n, Tensor)}
        return tuple(i for i, r in enumerate(self.reads) if r.node in nodes)

    # -- materializing reads (outside kernels) --
    def materialize_reads(self, tensors: dict, batch: int, heads: int,
                          q_positions, kv_positions) -> list:
        """Each read as a 4-D array ``[B|1, H|1, T|1, S|1]`` (see ``TensorRead.shape``).

        q_positions: int32[B, T] absolute query positions; kv_positions: int32[B, S].
        """
        out = []
        for r in self.reads:
            if r.gather:
                out.append(None)
                continue
            b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None] if "b" in r.axes else jnp.zeros((1, 1, 1, 1), jnp.int32)
            h = jnp.arange(heads, dtype=jnp.int32)[None, :, None, None] if "h" in r.axes else jnp.zeros((1, 1, 1, 1), jnp.int32)
            bsel = b[:, 0, 0, 0]
            if "q" in r.axes:
                q = jnp.asarray(q_positions)[bsel if "b" in r.axes else jnp.zeros((1,), jnp.int32)][:, None, :, None]
            else:
                q = jnp.zeros((1, 1, 1, 1), jnp.int32)
            if "kv" in r.axes:
                kv = jnp.asarray(kv_positions)[bsel if "b" in r.axes else jnp.zeros((1,), jnp.int32)][:, None, None, :]
            else:
                kv = jnp.zeros((1, 1, 1, 1), jnp.int32)
            env = {"b": b, "h": h, "q": q, "kv": kv}
            idx = [env[i.name] for i in r.node.indices]
            value = gather_read(tensors[r.name], idx)
            out.append(jnp.broadcast_to(value, r.shape(batch, heads, jnp.shape(q_positions)[1],
                                                       jnp.shape(kv_positions)[1])))
        return out

    # -- on a tile --
    def _env(self, scores, b, h, q, kv, reads):
        return _TileEnv(self, {"score": scores, "b": b, "h": h, "q": q, "kv": kv}, reads)

    def logits(self, scores, *, b, h, q, kv, reads=()):
        """``where(M, T(score) + B, -inf)`` on a tile; f32 ``[bq, bkv]``."""
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


# Tile programs kept per (canonical form, tensor ranks): small objects, one per mod in use.
TILE_PROGRAM_CACHE = 512


@lru_cache(maxsize=TILE_PROGRAM_CACHE)
def _build(canonical: Canonical, ranks: tuple) -> TileProgram:
    rank_of = dict(ranks)
    reads: dict[Tensor, TensorRead] = {}
    for part in (canonical.mask, canonical.transform, canonical.bias):
        if part is None:
            continue
        for n in walk(part):
            if isinstance(n, Tensor) and n not in reads:
                reads[n] = _read_of(n, rank_of.get(n.name, len(n.indices)))
    dT = derivative(canonical.transform) if canonical.transform is not None else None
    return TileProgram(canonical, tuple(reads.values()), dT)
