"""Two guards of the online softmaxes' exponents: both in xla and pallas; mosaic takes
``at_most_zero`` and, for the max, an optimization barrier (``_mosaic_forward._rounded``).

The exponent ``logit - max`` is <= 0 by construction, and its largest term is 0. Fused
code can break both at huge logits: the compiler may compute the max from the rounded
logits but an exponent as one fused multiply-add (``s * scale - max``), which misses 0
by up to half a float32 step of the max (``|max| * 2**-24``). Positive, the exponent
overflowed exp to inf (the row NaN); negative beyond exp's range, the row's every term
came out 0 (the row dropped: output 0, lse -inf). See docs/attention.md, "Numerics".
"""

from __future__ import annotations

import jax.numpy as jnp


def at_most_zero(d):
    """``d`` with positive entries set to 0 (NaN kept)."""
    return jnp.where(d > 0.0, 0.0, d)


def exponent_reference(m):
    """The exponents' reference for a running row max ``m``: ``m - rounding_slack(m)``. The
    online softmaxes carry ``m`` itself and take this of it wherever they exponentiate
    (and in lse): carrying the lowered value instead let it drift a slack lower per block.
    Nondecreasing in ``m`` (so the rescale factors stay <= 1); -inf stays -inf."""
    return m - rounding_slack(m)


def rounding_slack(m):
    """How far below a row max ``m`` the exponents' reference goes: more than half a
    float32 step of ``m`` less a margin of 64 that exp and exp2 take in their stride, so
    the max's own exponent is 0 or above (``at_most_zero`` keeps it at 0). Zero for
    ``|m|`` up to 64 * 2**23 (about 5.4e8), so ordinary logits are untouched; -inf stays
    -inf. Entries within the slack of the max weigh 1: they are within a float32 step."""
    return jnp.maximum(jnp.abs(m) * 2.0 ** -23 - 64.0, 0.0)
