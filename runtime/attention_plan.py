"""Block plans built once and passed to many attention calls (``scoremod.plan``).

Every implementation that skips blocks asks for the ``BlockPlan`` of its block sizes
(``compiler/plan.py``): the Mosaic forward for (128, block_kv), its backward for (128, 64)
and (64, 128), the Pallas kernels for theirs, xla for its chunks. For a mask that reads
tensors (``doc(ids)``) or takes array offsets, building a plan is work done on the device
inside every call; a model whose layers share one mask can build them once per step:

    plan = scoremod.plan("causal & doc(ids)", T, batch=B, heads=N, head_dim=H, ids=ids)
    for layer in layers:
        out = scoremod.attention(q, k, v, plan=plan)

``AttentionPlan`` holds the plans of the implementation ``attention()`` picks for those
shapes, with the tensors and offsets they were built from (a call with a plan takes them
from the plan, so the plan and the kernel's mask can never disagree). It is a jax pytree:
pass it through ``jit``, ``scan`` and ``remat`` like any array argument. Static masks
(no tensor reads, int offsets) hold no arrays: their plans are NumPy, built at trace time
and cached by ``build_plan``.

``plan_for(source, ...)`` is what the implementations call: ``build_plan`` when there is no
plan, the plan's own ``BlockPlan`` otherwise, and a ``ScoreModError`` saying what to change
when the plan was built for other block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax

from scoremod.compiler.mod import Mod
from scoremod.compiler.plan import BlockPlan, build_plan, plan_is_static
from scoremod.errors import ScoreModError

__all__ = ["AttentionPlan", "PlanRecorder", "plan_for"]


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class AttentionPlan:
    """The block plans of one attention call's shapes, reusable across calls (``scoremod.plan``).

    Attributes (static unless said):
      mod: the compiled mod.
      batch, q_len, kv_len, heads, kv_heads, head_dim, dtype: the call's shapes
        (query ``[batch, q_len, heads, head_dim]``, key/value ``[batch, kv_len, kv_heads,
        head_dim]``, ``dtype`` a numpy dtype name).
      implementation: the implementation the plans were built for.
      q_offset, kv_offset: ints (static) or int32 ``[B]`` arrays (leaves).
      tensors: the mod's tensors by name (leaves): the values the plans were built from,
        which the kernels also read.
      plans: ``{(block_q, block_kv): BlockPlan}`` (leaves); empty for static masks.
    """
    mod: Mod
    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    implementation: str
    q_offset: Any = 0
    kv_offset: Any = 0
    tensors: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)

    @property
    def static(self) -> bool:
        """True when the mask's plans are decided at trace time (nothing to carry)."""
        return plan_is_static(self.mod, self.q_offset, self.kv_offset)

    def block_plan(self, block_q: int, block_kv: int) -> BlockPlan:
        """The ``BlockPlan`` of (block_q, block_kv); ``ScoreModError`` if this plan does not hold it."""
        if self.static:
            return build_plan(self.mod, q_len=self.q_len, kv_len=self.kv_len, block_q=block_q, block_kv=block_kv,
                              batch=self.batch, heads=self.heads, q_offset=self.q_offset, kv_offset=self.kv_offset)
        if (block_q, block_kv) not in self.plans:
            held = ", ".join(f"{a}x{b}" for a, b in sorted(self.plans)) or "none"
            raise ScoreModError(
                f"this plan was built for implementation {self.implementation!r} at head dim {self.head_dim}, "
                f"{self.dtype} (blocks {held}); this call needs {block_q}x{block_kv} blocks",
                hint="build the plan with the call's head_dim=, dtype= and implementation=")
        return self.plans[block_q, block_kv]

    def __str__(self) -> str:
        blocks = ", ".join(f"{a}x{b}" for a, b in sorted(self.plans)) or "static"
        return (f"AttentionPlan({str(self.mod)!r}, B={self.batch}, T={self.q_len}, S={self.kv_len}, "
                f"N={self.heads}, K={self.kv_heads}, H={self.head_dim}, {self.dtype}, "
                f"{self.implementation}, blocks {blocks})")

    def tree_flatten(self):
        keys = tuple(sorted(self.plans))
        names = tuple(sorted(self.tensors))
        offsets = tuple(None if isinstance(o, int) else o for o in (self.q_offset, self.kv_offset))
        static_offsets = tuple(o if isinstance(o, int) else None for o in (self.q_offset, self.kv_offset))
        children = (tuple(self.plans[k] for k in keys), tuple(self.tensors[n] for n in names), offsets)
        aux = (self.mod, self.batch, self.q_len, self.kv_len, self.heads, self.kv_heads, self.head_dim, self.dtype,
               self.implementation, keys, names, static_offsets)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        mod, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, implementation, keys, names, static_offsets = aux
        plans, tensors, offsets = children
        q_offset, kv_offset = (s if s is not None else o for s, o in zip(static_offsets, offsets))
        return cls(mod, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, implementation, q_offset, kv_offset,
                   dict(zip(names, tensors)), dict(zip(keys, plans)))


class PlanRecorder:
    """A plan source that builds as usual and remembers which block sizes were asked for
    (``scoremod.plan`` traces a call abstractly with one to learn what to build)."""

    def __init__(self):
        self.blocks: list[tuple[int, int]] = []

    def block_plan(self, block_q: int, block_kv: int, **build) -> BlockPlan:
        if (block_q, block_kv) not in self.blocks:
            self.blocks.append((block_q, block_kv))
        return build_plan(block_q=block_q, block_kv=block_kv, **build)


def plan_for(source, mod, *, q_len: int, kv_len: int, block_q: int, block_kv: int, batch: int, heads: int,
             q_offset, kv_offset, tensors) -> BlockPlan:
    """The block plan an implementation needs: built here when ``source`` is None, else
    taken from ``source`` (an ``AttentionPlan``, or a ``PlanRecorder``)."""
    build = dict(q_len=q_len, kv_len=kv_len, batch=batch, heads=heads, q_offset=q_offset, kv_offset=kv_offset,
                 tensors=tensors)
    if source is None:
        return build_plan(mod, block_q=block_q, block_kv=block_kv, **build)
    if isinstance(source, PlanRecorder):
        return source.block_plan(block_q, block_kv, mask=mod, **build)
    return source.block_plan(block_q, block_kv)
