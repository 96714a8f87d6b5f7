"""How a tensor read ``t[i, ...]`` maps onto the tensor's axes.

Indices align to the right (docs/language.md, "7. Tensors"): a rank-r tensor read with
k >= r indices uses the last r of them (``used_indices``). Each used axis gets a *role*
(``axis_roles``):

  "b", "h", "q", "kv"  the index is exactly that position variable (first use in the read):
                       the axis has size 1 (broadcast) or B / N / >= the positions read;
                       interval analysis takes per-block min/max along it.
  int                  the index is an integer literal: one slice.
  None                 any other index: interval analysis uses the min/max over the axis;
                       kernels clip the index to the axis.

Interval analysis (``compiler/intervals.py``) and the tensor checks
(``compiler/tensors.py``) read tensors through these roles; tile programs and gathers
(``compiler/tile.py``, ``compiler/lowering.py``) use the right alignment.
"""

from __future__ import annotations

from scoremod.dsl.ast import IntLit, Node, Var, POSITION_VARIABLES

__all__ = ["axis_roles", "used_indices"]


def used_indices(indices, rank: int):
    """The indices a tensor of rank ``rank`` uses: the last ``rank`` of ``indices`` (a tuple
    or a list; empty for a scalar)."""
    return indices[len(indices) - rank:] if rank else indices[:0]


def axis_roles(indices: tuple[Node, ...]) -> tuple:
    """Role of each index of a read (see the module docstring), e.g. ``ids[b, q]`` -> ("b", "q")."""
    roles, seen = [], set()
    for index in indices:
        if isinstance(index, Var) and index.name in POSITION_VARIABLES and index.name not in seen:
            seen.add(index.name)
            roles.append(index.name)
        elif isinstance(index, IntLit):
            roles.append(index.value)
        else:
            roles.append(None)
    return tuple(roles)
