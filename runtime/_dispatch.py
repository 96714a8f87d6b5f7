"""What ``attention`` and ``paged_attention`` share before they pick a kernel: reading the
``mod`` and ``implementation`` arguments, and the checks both make of their float
arrays, head counts and ``scale``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scoremod.errors import ScoreModError, ScoreModShapeError
from scoremod.compiler.mod import Mod, compile_mod

NO_MASK = "true"
FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def as_mod(mod) -> Mod:
    """``mod`` (a source string, a ``Mod`` or None = no mask) as a compiled ``Mod``."""
    if mod is None:
        return compile_mod(NO_MASK)
    if not isinstance(mod, (str, Mod)):
        raise ScoreModError(f"mod must be a source string, a scoremod.Mod or None; got "
                            f"{type(mod).__name__}", hint='for example mod="causal & window(1024)"')
    return compile_mod(mod)


def implementation_names(implementation, *, known: tuple[str, ...], on_gpu: tuple[str, ...],
                         elsewhere: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The implementations to try, in order. ``None`` means the best for this device
    (``on_gpu`` or ``elsewhere``); a name or a sequence of names is checked against ``known``."""
    if implementation is None:
        return on_gpu if jax.default_backend() == "gpu" else elsewhere
    names = (implementation,) if isinstance(implementation, str) else implementation
    if not isinstance(names, Sequence) or not names:
        raise ScoreModError(f"implementation must be None, a name or a non-empty sequence of names; "
                            f"got {implementation!r}", hint=f"names: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise ScoreModError(f"unknown implementation {name!r} for {what}; expected one of "
                                f"{', '.join(known)} (or None for the best available)")
    return tuple(names)


def check_float_arrays(arrays: dict) -> None:
    """Each array (by its argument name) is bf16, f16 or f32, and all share one dtype."""
    for name, x in arrays.items():
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise ScoreModShapeError(f"{name} must be bfloat16, float16 or float32; got {jnp.dtype(x.dtype)}",
                                     hint=f"cast with {name}.astype(jnp.bfloat16)"
                                     if jnp.issubdtype(x.dtype, jnp.integer) else None)
    if len({jnp.dtype(x.dtype) for x in arrays.values()}) > 1:
        names = list(arrays)
        got = ", ".join(f"{n} {jnp.dtype(x.dtype)}" for n, x in arrays.items())
        raise ScoreModShapeError(f"{', '.join(names[:-1])} and {names[-1]} must share one dtype; got {got}",
                                 hint=f"cast {names[0]} with {names[0]}.astype({names[1]}.dtype)")


def check_head_groups(num_heads: int, num_kv_heads: int) -> None:
    """N query heads over K key/value heads: N must be a multiple of K (GQA/MQA)."""
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ScoreModShapeError(f"query heads N={num_heads} must be a multiple of key/value heads "
                                 f"K={num_kv_heads} (GQA: query head h reads kv head h // (N // K))")


def resolve_scale(scale, head_dim: int) -> float:
    """``scale`` as a Python float; None means ``1 / sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, (bool, np.bool_)) or not _is_real_scalar(scale):
        raise ScoreModShapeError(f"scale must be a real number; got {scale!r}")
    try:
        return float(scale)
    except jax.errors.ConcretizationTypeError:
        raise ScoreModShapeError("scale must be a static Python number, not a traced value",
                                 hint="pass it as a constant (or close over it) instead of a jit argument") from None


def _is_real_scalar(x) -> bool:
    if isinstance(x, (int, float)):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and getattr(x, "ndim", None) == 0 and (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
