"""The guard of backward passes that cannot be differentiated again.

The "xla", "pallas" and "mosaic" paths are ``custom_vjp``s whose backward runs loops with
dynamic bounds or kernels; differentiating that backward (a gradient of a gradient) ended
in jax's or Pallas' own errors. Their backwards pass their differentiable inputs through
``first_order_only`` first, whose derivative is a clear ``ScoreModError`` instead.
"""

from __future__ import annotations

import functools

import jax

from scoremod.errors import ScoreModError


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def first_order_only(path: str, tree):
    """``tree`` unchanged; differentiated, a ScoreModError naming ``path``."""
    return tree


@first_order_only.defjvp
def _first_order_only_jvp(path, primals, tangents):
    raise ScoreModError(f"second derivatives of attention are not supported by the {path} path (its backward "
                        "is a custom_vjp of loops or kernels)",
                        hint="use implementation='reference' for higher-order derivatives")
