"""What ``attention`` and ``paged_attention`` share before they pick a kernel: reading the
``mod`` and ``implementation`` arguments, and the checks both make of their float
arrays, head counts and ``scale``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scoremod.errors import ScoreModError, ScoreModShapeError, ScoreModTensorError
from scoremod.compiler.intervals import check_heads
from scoremod.compiler.mod import Mod, compile_mod
from scoremod.compiler.tensors import concrete, int32_range_error   # re-exported: attention.py and paged.py use them

logger = logging.getLogger("scoremod")

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


def run_first(names: Sequence[str], runners: Mapping[str, Callable], *, what: str, mod: Mod,
              record: list | None = None, **call):
    """Run ``runners[name](mod=mod, **call)`` for the first of ``names`` that does not decline.

    A runner declines with ``NotImplementedError`` (or an ``ImportError`` of its module);
    each decline and the final choice are logged on ``logging.getLogger("scoremod")`` at
    INFO, and appended to ``record`` (when given) as ``(name, why)`` / ``(name, None)``.
    When every one declines, a ``NotImplementedError`` gives every reason.
    """
    reasons = [] if record is None else record   # (name, why it declined)
    for name in names:
        try:
            result = runners[name](mod=mod, **call)
        except (NotImplementedError, ImportError) as exc:
            reasons.append((name, str(exc)))
            logger.info("scoremod.%s: %s cannot run %r: %s", what, name, str(mod), exc)
            continue
        except TypeError as exc:
            if "forward-mode autodiff" not in str(exc):
                raise
            # jax.jvp / jacfwd through a custom_vjp: a decline with the way out, not jax's trace.
            why = ("forward-mode autodiff (jax.jvp, jax.jacfwd) does not pass through its custom_vjp "
                   "gradient; implementation='reference' supports it")
            reasons.append((name, why))
            logger.info("scoremod.%s: %s cannot run %r: %s", what, name, str(mod), why)
            continue
        logger.info("scoremod.%s: using %s for %r", what, name, str(mod))
        if record is not None:
            record.append((name, None))
        return result
    if len(reasons) == 1:
        raise NotImplementedError(f"{names[0]} cannot run {str(mod)!r}: {reasons[0][1]}")
    raise NotImplementedError(f"no implementation among {', '.join(names)} can run {str(mod)!r}: "
                              + "; ".join(f"{name}: {why}" for name, why in reasons))


def sm_count() -> int:
    """The default device's streaming multiprocessors, for the kernels' schedules and split
    rules; an H100's or H200's 132 where the device does not say (a CPU, or lowering for a
    GPU on one)."""
    try:
        cores = int(getattr(jax.devices()[0], "core_count", 0) or 0)
    except Exception:  # noqa: BLE001 - a device without the attribute
        cores = 0
    return cores or 132


def kernel_input_reason(kernel: str, query, key, value, *, dtypes, head_dim_ok, head_dims: str) -> str | None:
    """Why a kernel cannot take these query/key/value (None when it can): the checks the
    pallas and mosaic kernels share. ``dtypes``: what it runs; ``head_dim_ok(H)`` and its
    description ``head_dims`` say which head dims."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        return f"the {kernel} kernel takes 4-D BTNH query/key/value"
    H = query.shape[-1]
    if key.shape[-1] != H or value.shape[-1] != H:
        return (f"the {kernel} kernel needs one head dim for query, key and value "
                f"(got {query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]})")
    if not head_dim_ok(H):
        return f"the {kernel} kernel runs head dims {head_dims}; got {H}"
    if not (query.dtype == key.dtype == value.dtype) or jnp.dtype(query.dtype) not in dtypes:
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        return (f"the {kernel} kernel runs {names} (one dtype for query, key and value); "
                f"got {query.dtype}, {key.dtype}, {value.dtype}")
    if query.shape[2] % key.shape[2]:
        return f"query heads {query.shape[2]} not a multiple of kv heads {key.shape[2]}"
    return None


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
    """N query heads over K key/value heads: N must be a multiple of K (GQA/MQA), and at most
    ``MAX_HEADS``."""
    check_heads(num_heads)
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
        value = float(scale)
    except jax.errors.ConcretizationTypeError:
        raise ScoreModShapeError("scale must be a static Python number, not a traced value",
                                 hint="pass it as a constant (or close over it) instead of a jit argument") from None
    if not math.isfinite(value):
        raise ScoreModShapeError(f"scale must be a finite number; got {value}")
    return value


def _is_real_scalar(x) -> bool:
    if isinstance(x, (int, float)):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and getattr(x, "ndim", None) == 0 and (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))


def as_tensor(name: str, value, source: str | None = None):
    """A tensor parameter as a jax array: bool stays bool, ints become int32, reals float32.

    Callers check the tensors first (``compiler.tensors.check_tensors``: shapes, dtypes,
    and concrete integers within int32); a traced int64 array under ``jax_enable_x64`` is
    cast unchecked.
    """
    if isinstance(value, (bool, np.bool_)):
        return jnp.asarray(value, jnp.bool_)
    if isinstance(value, (int, np.integer)):
        return jnp.asarray(value, jnp.int32)
    if isinstance(value, (float, np.floating)):
        return jnp.asarray(value, jnp.float32)
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
    dtype = getattr(value, "dtype", None)
    if dtype is None or not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
                             or dtype == np.bool_):
        raise ScoreModTensorError(f"tensor parameter '{name}' must be a number or an int, float or bool array; "
                                  f"got {getattr(value, 'dtype', type(value).__name__)}", source=source)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(value).astype(jnp.int32)
    return jnp.asarray(value)
