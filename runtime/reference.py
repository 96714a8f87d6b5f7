"""The reference implementation: dense, materialised scores. The oracle among implementations.

Every logit ``[B, N, T, S]`` is computed in float32 (HIGHEST matmul precision), the
mod's ``score_mod`` closure is applied to all of them at once, then a softmax that
gives 0 on rows with no allowed key. Memory is O(B * N * T * S): use it to check the
other implementations, or for small shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["reference_attention", "positions"]


def positions(offset, length: int, batch: int):
    """Absolute positions ``offset + arange(length)``: int32 ``[B, length]`` (``[1, length]`` for an int)."""
    row = jnp.arange(length, dtype=jnp.int32)
    if isinstance(offset, int):
        return (offset + row)[None, :]
    return jnp.asarray(offset, jnp.int32).reshape(batch, 1) + row[None, :]


def reference_attention(query, key, value, *, mod, scale: float, q_offset=0, kv_offset=0, tensors=None):
    """Dense attention with ``mod`` (inputs already validated by ``attention()``).

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` with N % K == 0.
      mod: a compiled ``scoremod.Mod``.
      scale: float; score = scale * <q, k>.
      q_offset, kv_offset: int or int32 ``[B]``.
      tensors: dict of the mod's tensor parameters (float ones get gradients, ints are constants).

    Returns:
      ``(out [B, T, N, H] in query's dtype, lse f32 [B, T, N])``.

    Example::

        >>> mod = scoremod.compile("causal")
        >>> out, lse = reference_attention(q, k, v, mod=mod, scale=0.125)
    """
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    G = N // K
    hi = jax.lax.Precision.HIGHEST
    q = query.astype(jnp.float32).reshape(B, T, K, G, H)
    k = key.astype(jnp.float32)
    v = value.astype(jnp.float32)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, precision=hi).reshape(B, N, T, S) * scale

    # Float tensors are differentiable (the gradient of each element sums over the logits
    # that read it); ints are indices and ids, constants (docs/attention.md, "Gradients").
    tensors = {name: t if jnp.issubdtype(jnp.asarray(t).dtype, jnp.floating) else jax.lax.stop_gradient(t)
               for name, t in (tensors or {}).items()}
    score_mod = mod.score_mod(**tensors)
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(N, dtype=jnp.int32)[None, :, None, None]
    qpos = positions(q_offset, T, B)[:, None, :, None]
    kvpos = positions(kv_offset, S, B)[:, None, None, :]
    logits = jnp.broadcast_to(score_mod(scores, b, h, qpos, kvpos), (B, N, T, S))

    # Softmax with the row max taken out; a row whose logits are all -inf has l = 0 and
    # gives 0 (and lse -inf) instead of 0/0. A NaN or +inf logit makes l NaN: the row's
    # output and lse are NaN, as on every path (docs/attention.md, NaN and inf).
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(row_max == -jnp.inf, 0.0, row_max)
    p = jnp.exp(logits - row_max)
    l = jnp.sum(p, axis=-1, keepdims=True)
    has_key = l != 0
    l_safe = jnp.where(has_key, l, 1.0)
    weights = (p / l_safe).reshape(B, K, G, T, S)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v, precision=hi).reshape(B, T, N, H)
    lse = jnp.where(has_key, row_max + jnp.log(l_safe), -jnp.inf)[..., 0]   # [B, N, T]
    return out.astype(query.dtype), jnp.transpose(lse, (0, 2, 1))
