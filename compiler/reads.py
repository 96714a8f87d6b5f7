"""The tensor reads of a canonical form, and which kernels can run them (no jax here).

A ``TensorRead`` is one distinct read ``name[indices]`` of a mod's canonical form: the
position axes it depends on and whether its indices are plain positions (``ids[b, q]``)
or computed ones (a "gather": ``t[h, clip(q - kv, -m, m) + m]``). ``kernel_support``
says whether a kernel can run a form's reads. ``compiler/tile.py`` builds tile programs
on these, and ``dslc explain`` asks ``kernel_support`` without loading jax.

    reads = program_reads(mod.canonical, {"ids": 2})
    ok, why = kernel_support(mod.canonical, reads, gathers=True)
"""

from __future__ import annotations

from dataclasses import dataclass

from scoremod.dsl.ast import Tensor, Var, mentions, walk
from scoremod.compiler.axes import used_indices
from scoremod.compiler.canonical import Canonical

__all__ = ["AXES", "TensorRead", "program_reads", "kernel_support"]

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

    @property
    def reads_score(self) -> bool:
        """Whether an index depends on ``score`` (no kernel can gather at such an index)."""
        return any(mentions(i, "score") for i in used_indices(self.node.indices, self.rank))

    @property
    def fixed_axes(self) -> int:
        """How many leading table axes the read indexes by expressions of neither q nor
        kv (``b``, ``h``, literals, reads of those): a kernel program over one (b, h)
        reads one slice of the table along them (``relpos(t, m)`` reads row h of t)."""
        n = 0
        for index in used_indices(self.node.indices, self.rank):
            if mentions(index, "q") or mentions(index, "kv"):
                break
            n += 1
        return n

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


def program_reads(canonical: Canonical, tensor_ranks: dict[str, int]) -> tuple[TensorRead, ...]:
    """Each distinct tensor read of the mask, transform and bias, in order of first use
    (a tensor missing from ``tensor_ranks`` is taken at the rank its read writes)."""
    reads: dict[Tensor, TensorRead] = {}
    for part in (canonical.mask, canonical.transform, canonical.bias):
        if part is None:
            continue
        for n in walk(part):
            if isinstance(n, Tensor) and n not in reads:
                reads[n] = _read_of(n, tensor_ranks.get(n.name, len(n.indices)))
    return tuple(reads.values())


def kernel_support(canonical: Canonical, reads, *, gathers: bool = False) -> tuple[bool, str]:
    """(True, "") when a kernel can run a form with these reads, else (False, why).

    gathers: the kernel takes gather reads (computed indices) as whole tables and lets
    the tile program gather from them per tile (``TableLookup``: the Pallas kernel).
    Without it (mosaic, the paged kernel) only reads at plain b, h, q, kv run.
    A read whose index depends on ``score`` runs in no kernel.
    """
    if mentions(canonical.mask, "score"):
        return False, "the mask reads score; kernels decide masks from positions and tensors only"
    for r in reads:
        if r.reads_score:
            return False, (f"tensor read {r.node} indexes by score; kernels gather tables "
                           "at indices computed from positions and tensors only")
    for r in reads:
        if r.gather and not gathers:
            return False, (f"tensor read {r.node} indexes by computed positions; "
                           "this kernel takes reads indexed by plain b, h, q, kv "
                           "(the pallas kernel gathers such reads)")
    return True, ""
