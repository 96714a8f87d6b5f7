"""The Triton flavour of Pallas, as the portable kernels (pallas attention, paged decode) use it.

* ``pltriton``: ``jax.experimental.pallas.triton`` (None when this jax lacks it);
* ``compiler_params(num_warps, num_stages)``: its ``CompilerParams`` across jax versions
  (``TritonCompilerParams`` in older ones);
* jax 0.11 warns on every lowering that the Triton backend is deprecated. It still works
  and is what these kernels opt into on purpose (the Hopper path is Mosaic GPU): the
  warning is silenced here, once, for the whole package.
"""

from __future__ import annotations

import warnings

try:  # jax 0.10.2 and 0.11.2 both have it
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - very old or stripped jax
    pltriton = None

__all__ = ["pltriton", "compiler_params", "MIN_TILE"]

# The smallest side of a tile Triton's dot takes (rows, columns, head dim).
MIN_TILE = 16

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


def compiler_params(num_warps: int, num_stages: int):
    """The Triton ``CompilerParams`` for a launch (opts the call into the Triton lowering on GPU)."""
    if pltriton is None:
        return None
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)
