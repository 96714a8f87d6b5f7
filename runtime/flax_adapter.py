"""``as_attention_fn``: scoremod attention as the ``attention_fn`` of Flax's MultiHeadAttention.

    layer = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False, rngs=rngs,
                                   attention_fn=scoremod.as_attention_fn("causal & doc(ids)", ids=ids))
    layer = nn.MultiHeadDotProductAttention(num_heads=8,                      # linen
                                            attention_fn=scoremod.as_attention_fn("causal"))

No Flax import: the returned function has the parameters of
``flax.linen.dot_product_attention`` / ``flax.nnx.dot_product_attention`` by name
(linen filters its keyword arguments by the function's signature; nnx passes
``mask, dropout_rng, dropout_rate, broadcast_dropout, deterministic, dtype, precision,
module, is_causal`` unconditionally). Tested against flax 0.12 (tests/test_flax_adapter.py
calls the real layers: nnx and linen, training steps, nnx decoding with a cache).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from scoremod.errors import ScoreModError, ScoreModShapeError
from scoremod.dsl.ast import Var, walk
from scoremod.compiler.mod import compile_mod
from scoremod.runtime.attention import attention

__all__ = ["as_attention_fn"]

MASK_TENSOR = "flax_mask"
BIAS_TENSOR = "flax_bias"


def as_attention_fn(mod=None, *, implementation=None, scale=None, **tensors):
    """A drop-in ``attention_fn`` for Flax (nnx and linen) multi-head attention.

    Args:
      mod: source string, ``scoremod.Mod`` or None (no mask).
      implementation, scale: passed to ``scoremod.attention``.
      **tensors: the mod's tensor parameters, fixed for the function's lifetime (make a
        new function, which is cheap, when they change; inside ``jit`` they may be traced).

    The returned ``attention_fn(query, key, value, bias=None, mask=None, ...)`` takes
    Flax's layout ``[batch..., length, num_heads, head_dim]`` (any number of batch axes,
    or none) and combines what Flax passes with the mod:

    * ``mask`` (bool or 0/1 numbers, broadcastable to ``[batch..., num_heads, T, S]``,
      e.g. Flax's padding or decode-cache mask) is ANDed with the mod's mask:
      ``mod & (flax_mask[b, h, q, kv] != 0)``. Rows left with no key give 0, where Flax's
      own function gives the mean of the values.
    * ``bias`` (real, broadcastable the same way) is added: ``mod + flax_bias[b, h, q, kv]``.
    * ``is_causal=True`` (what ``nnx.MultiHeadAttention(..., is_causal=True)`` passes) ANDs
      ``causal`` with the mod.
    * dropout on the attention weights (``dropout_rate > 0`` and not ``deterministic``)
      and ``module`` (sowing the weights, which are never materialised) raise
      ``ScoreModError``. ``dtype`` casts query/key/value; ``precision`` and
      ``force_fp32_for_softmax`` are accepted and ignored (the softmax is always f32).

    Example::

        >>> fn = scoremod.as_attention_fn("causal")
        >>> fn(q, k, v).shape          # q, k, v: [2, 16, 4, 8]
        (2, 16, 4, 8)
    """
    mod = compile_mod("true" if mod is None else mod)
    taken = [n for n in (MASK_TENSOR, BIAS_TENSOR) if n in mod.tensors]
    if taken:
        raise ScoreModError(f"tensor name '{taken[0]}' is reserved by as_attention_fn for Flax's "
                            f"{'mask' if taken[0] == MASK_TENSOR else 'bias'}", source=str(mod),
                            hint="rename the tensor in the source")

    def combined(is_causal: bool, with_mask: bool, with_bias: bool):
        # Built once per combination (compile_mod caches by source text). The masks join the
        # top-level chain with '+', which means '&' there (a mask next to a real is a -inf
        # bias, two masks are ANDed) but never makes a mod that is a bare tensor read, like
        # bias(t), into a mask (under '&' a read is one: docs/language.md, "3. Types").
        source = f"({mod})"
        if is_causal:
            source += " + causal"
        if with_mask:
            source += f" + ({MASK_TENSOR}[b, h, q, kv] != 0)"
        if with_bias:
            source += f" + {BIAS_TENSOR}[b, h, q, kv]"
        return compile_mod(source)

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                     dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                     force_fp32_for_softmax=False, is_causal=False):
        """Flax-compatible attention: ``[batch..., T, N, H]`` -> ``[batch..., T, N, H]``."""
        if dropout_rate > 0.0 and not deterministic:
            raise ScoreModError(f"attention dropout is not supported (dropout_rate={dropout_rate}, "
                                "deterministic=False): the attention weights are never materialised",
                                hint="set dropout_rate=0.0 on the layer, or pass deterministic=True")
        if module is not None:
            raise ScoreModError("sow_weights=True is not supported: scoremod never materialises the "
                                "attention weights", hint="call the layer with sow_weights=False")
        if dtype is not None:
            query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
        else:
            common = jnp.result_type(query, key, value)
            query, key, value = (jnp.asarray(x, common) for x in (query, key, value))
        if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ScoreModShapeError(f"query, key and value must be [batch..., length, heads, head_dim] of "
                                     f"one rank; got {query.shape}, {key.shape}, {value.shape}")
        batch_shape = query.shape[:-3]
        if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
            raise ScoreModShapeError(f"batch axes differ: query {query.shape}, key {key.shape}, "
                                     f"value {value.shape}")
        flat = math.prod(batch_shape)
        q, k, v = (x.reshape((flat,) + x.shape[-3:]) for x in (query, key, value))
        extra = {}
        if mask is not None:
            extra[MASK_TENSOR] = _flat_grid(mask, batch_shape, "mask", q.shape[1:3], k.shape[1])
        if bias is not None:
            extra[BIAS_TENSOR] = _flat_grid(bias, batch_shape, "bias", q.shape[1:3], k.shape[1])
        call_mod = combined(bool(is_causal), mask is not None, bias is not None)
        if q.shape[1] != k.shape[1] and (is_causal or _reads_query_positions(mod)):
            # Flax's decode cache passes one query and the whole cache, never the query's
            # position: at offset 0 a position-dependent mod would be silently wrong.
            positional = call_mod if is_causal else mod
            raise ScoreModError(
                f"{positional} depends on query positions, but attention_fn gets {q.shape[1]} queries for "
                f"{k.shape[1]} keys and no positions (Flax's decode cache does not pass its index), so it "
                "cannot place the queries",
                hint="decode with scoremod.attention(..., q_offset=cache_index) in your own attention, or "
                     "keep the layer's mod position-free (Flax's cache mask still applies)")
        out = attention(q, k, v, mod=call_mod, scale=scale, implementation=implementation, **tensors, **extra)
        return out.reshape(query.shape)

    attention_fn.mod = mod
    return attention_fn


def _reads_query_positions(mod) -> bool:
    """Whether the mod's meaning depends on the query position ``q``."""
    return any(isinstance(n, Var) and n.name == "q" for n in walk(mod.canonical.as_node()))


def _flat_grid(x, batch_shape: tuple, name: str, q_shape: tuple, kv_len: int):
    """A ``[batch..., N|1, T|1, S|1]``-broadcastable array as ``[prod(batch)|1, N|1, T|1, S|1]``;
    ``q_shape``: (T, N). Any other size is an error (a mask one key wider was once read
    in part, silently)."""
    x = jnp.asarray(x)
    rank = len(batch_shape) + 3
    T, N = q_shape
    want = batch_shape + (N, T, kv_len)
    if x.ndim > rank or any(d not in (1, w) for d, w in zip(x.shape[::-1], want[::-1])):
        raise ScoreModShapeError(f"{name} must broadcast to [batch..., num_heads, q_length, kv_length] = "
                                 f"{list(want)}; got shape {x.shape}")
    x = x.reshape((1,) * (rank - x.ndim) + x.shape)
    lead = x.shape[:len(batch_shape)]
    if all(d == 1 for d in lead):
        return x.reshape((1,) + x.shape[len(batch_shape):])
    x = jnp.broadcast_to(x, batch_shape + x.shape[len(batch_shape):])
    return x.reshape((math.prod(batch_shape),) + x.shape[len(batch_shape):])
