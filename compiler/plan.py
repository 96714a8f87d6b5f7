"""Block plans: ``build_plan`` and what needs jax.

The layout (``BlockPlan``), the checks of sizes and offsets, the lists kernels walk and the
NumPy builder of static masks' plans are in ``compiler/plan_layout.py``, which never imports
jax (``dslc explain`` of a static mask runs without it); they are re-exported here. This
module adds what needs jax: ``BlockPlan`` as a jax pytree (sizes are static; registered on
import, so every user of plans with jax imports this module), the jittable builder for masks
that read tensors or take array offsets, and ``build_plan``, which checks its arguments and
picks the NumPy or the jax builder.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from scoremod.errors import ScoreModShapeError
from scoremod.dsl.ast import Node, tensor_names
from scoremod.compiler.intervals import classify_blocks
from scoremod.compiler.plan_layout import (
    EMPTY, FULL, MAX_GRID_CELLS, MAX_SEQUENCE, PARTIAL, BlockPlan, block_grid, build_static_plan, check_offset,
    check_positions, compact_rows, merged_list, plan_from_classes, plan_grid_shape, plan_is_static, ragged_edge,
    split_lists, validate_plan_sizes,
)
from scoremod.compiler.rewrite import simplify
# check_tensors is re-exported: tests import it from here.
from scoremod.compiler.tensors import check_missing_tensors, check_tensors, mask_of

__all__ = [
    "BlockPlan", "EMPTY", "PARTIAL", "FULL", "build_plan", "check_offset", "check_positions", "compact_rows", "plan_from_classes",
    "plan_grid_shape",
    "validate_plan_sizes", "check_tensors", "plan_is_static", "MAX_GRID_CELLS", "MAX_SEQUENCE", "TRACE_COUNTS",
    "merged_list", "ragged_edge", "split_lists",
]

jax.tree_util.register_pytree_node_class(BlockPlan)

# How many times the jax builder was traced (tests check that new tensor values never retrace).
TRACE_COUNTS = {"jax_builder": 0}


def _traced_plan(mask: Node, tensors, q_offset, kv_offset, *, q_len, kv_len, block_q, block_kv, batch,
                 heads) -> BlockPlan:
    TRACE_COUNTS["jax_builder"] += 1
    grid = block_grid(q_len, kv_len, block_q, block_kv, batch, heads, q_offset, kv_offset)
    classes = classify_blocks(simplify(mask), grid, tensors, jnp)
    return plan_from_classes(classes, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv)


_jitted_plan = jax.jit(_traced_plan, static_argnames=("mask", "q_len", "kv_len", "block_q", "block_kv",
                                                      "batch", "heads"))


def build_plan(mask, *, q_len: int, kv_len: int, block_q: int = 128, block_kv: int = 128, batch: int = 1,
               heads: int = 1, q_offset=0, kv_offset=0, tensors: Mapping[str, Any] | None = None) -> BlockPlan:
    """The block plan of ``mask`` for these sizes (layout in ``compiler/plan_layout.py``).

    Args:
      mask: the mask IR (``Canonical.mask``), or a ``Canonical`` / ``Mod``.
      q_len, kv_len: T and S (any positive ints, not only block multiples).
      block_q, block_kv: block sizes, powers of two.
      batch, heads: B and N (query heads).
      q_offset, kv_offset: int or int[B]; q = q_offset + row, kv = kv_offset + column.
      tensors: name -> array for the tensors the mask reads (others are ignored).

    Static masks (no tensor reads, int offsets): built with NumPy and cached on (mask IR,
    sizes, offsets); arrays are read-only NumPy (``plan_layout.build_static_plan``).
    Otherwise: a jitted jax builder, also callable inside ``jit`` (new tensor values or
    offsets never recompile); jax arrays.

    Raises ``ScoreModShapeError`` for bad sizes/offsets or a grid of more than
    ``MAX_GRID_CELLS`` cells; ``ScoreModTensorError`` for missing or ill-ranked tensors.
    """
    mask = mask_of(mask)
    validate_plan_sizes(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, batch=batch, heads=heads)
    q_offset = check_offset("q_offset", q_offset, batch, q_len)
    kv_offset = check_offset("kv_offset", kv_offset, batch, kv_len)
    tensors = dict(tensors or {})
    check_missing_tensors(mask, tensors, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, q_offset=q_offset,
                          kv_offset=kv_offset)
    used = {name: tensors[name] for name in tensor_names(mask)}
    shape = plan_grid_shape(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, batch=batch,
                            heads=heads, q_offset=q_offset, kv_offset=kv_offset, tensors=used)
    cells = int(np.prod(shape, dtype=np.int64))
    if cells > MAX_GRID_CELLS:
        raise ScoreModShapeError(
            f"the block grid {list(shape)} has {cells:,} cells, more than {MAX_GRID_CELLS:,}",
            hint=f"use larger blocks (block_q={block_q}, block_kv={block_kv})")
    static = plan_is_static(mask, q_offset, kv_offset)
    sizes = dict(q_len=int(q_len), kv_len=int(kv_len), block_q=int(block_q), block_kv=int(block_kv),
                 batch=int(batch), heads=int(heads))
    if static:
        return build_static_plan(mask, sizes["q_len"], sizes["kv_len"], sizes["block_q"], sizes["block_kv"],
                                 sizes["batch"], sizes["heads"], q_offset, kv_offset)
    arrays = {name: jnp.asarray(value) for name, value in used.items()}
    return _jitted_plan(mask, arrays, jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_offset, jnp.int32), **sizes)
