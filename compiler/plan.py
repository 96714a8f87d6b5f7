"""Block plans: which (q-block, kv-block) tiles a kernel visits, and which are FULL.

Layout (FlexAttention's BCSR-like layout, DESIGN.md §2.4). ``B'``/``H'`` are 1 when the
mask does not depend on the batch/head (after taking tensor ranks and per-batch offsets
into account), else the batch size / number of query heads.

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
tensors or take per-batch offsets. BlockPlan is a jax pytree (sizes are static).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

__all__ = ["BlockPlan", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class BlockPlan:
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
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_kv)

    def tree_flatten(self):
        return (tuple(getattr(self, n) for n in self._ARRAYS),
                (self.block_q, self.block_kv, self.q_len, self.kv_len))

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, *children)
