"""Softmax sinks: one learned logit per query head that joins every row's softmax
denominator and carries no value (gpt-oss; docs/attention.md, "Sinks").

    out_i = sum_j exp(l_ij - m) v_j / (exp(s_h - m) + sum_j exp(l_ij - m))

Every implementation gets them the same way, from its output and log-sum-exp over the
keys: with ``lse' = logaddexp(lse, s_h)``, ``out' = out * exp(lse - lse')`` exactly, and
``lse'`` is the log-sum-exp with the sink. A row with no allowed key gets 0 and
``lse' = s_h``. Gradients reach q, k, v through the kernels' lse cotangent and reach the
sinks through this correction.
"""

from __future__ import annotations

import jax.numpy as jnp

from scoremod.errors import ScoreModShapeError

__all__ = ["check_sinks", "add_sinks"]


def check_sinks(sinks, heads: int):
    """``sinks`` as float32 ``[heads]``; a ScoreModShapeError naming ``sinks`` otherwise."""
    if not hasattr(sinks, "shape") or not hasattr(sinks, "dtype"):
        try:
            sinks = jnp.asarray(sinks)
        except TypeError:
            raise ScoreModShapeError(f"sinks must be a float array [N]; got {type(sinks).__name__}") from None
    if tuple(sinks.shape) != (heads,):
        raise ScoreModShapeError(f"sinks must have shape [N] = [{heads}] (one logit per query head); "
                                 f"got {list(sinks.shape)}")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ScoreModShapeError(f"sinks must be a float array (learned logits); got dtype {sinks.dtype}",
                                 hint="sinks=jnp.asarray(s, jnp.float32)")
    return jnp.asarray(sinks, jnp.float32)


def add_sinks(out, lse, sinks):
    """(out, lse) with the sinks in the softmax: ``out [B, T, N, H]`` (any float dtype, kept),
    ``lse`` f32 ``[B, T, N]`` over the keys, ``sinks`` f32 ``[N]``.

        >>> out, lse = add_sinks(out, lse, jnp.zeros(N))   # a sink of logit 0 in every head
    """
    s = sinks[None, None, :]
    # A row with no key and a -inf sink (no sink): logaddexp(-inf, -inf) is -inf but its
    # derivative is NaN, so such entries take it of safe operands (gradient 0 there).
    both = jnp.isneginf(lse) & jnp.isneginf(s)
    new_lse = jnp.where(both, -jnp.inf, jnp.logaddexp(jnp.where(both, 0.0, lse), jnp.where(both, 0.0, s)))
    # exp(lse - new_lse): 0 for a row with no key (lse = -inf), and no NaN when both are
    # -inf (a -inf sink on such a row); the safe operands keep the gradient finite there.
    none = jnp.isneginf(lse) | jnp.isneginf(new_lse)
    weight = jnp.where(none, 0.0, jnp.exp(jnp.where(none, 0.0, lse) - jnp.where(none, 0.0, new_lse)))
    return (out.astype(jnp.float32) * weight[..., None]).astype(out.dtype), new_lse
