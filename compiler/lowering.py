"""Lowering IR to jax.numpy: one evaluator over environments.

``emit(node, env)`` turns an expanded, checked IR expression into jnp operations.
The environment says what the variables are (``b, h, q, kv, score``: arrays that
broadcast against each other) and how a tensor read is answered. The XLA path
answers reads by gathering from the whole tensor; kernels answer them with the tile
of the tensor they loaded. Integer arithmetic is int32 with Python's floor ``//`` and
``%``; reals are float32. ``dT/dscore`` is built as IR by ``compiler/derivative.py`` and
emitted here like any other expression.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from scoremod.dsl.ast import Binary, BoolLit, Call, IntLit, Node, RealLit, Tensor, Unary, Var
from scoremod.compiler.axes import used_indices

__all__ = ["Env", "emit", "gather_read", "score_mod_fn", "mask_mod_fn"]


class Env(Protocol):
    def var(self, name: str) -> jax.Array: ...
    def tensor(self, node: Tensor, indices: list[jax.Array]) -> jax.Array: ...


_FUNCS: dict[str, Callable] = {
    "exp": jnp.exp, "exp2": jnp.exp2, "log": jnp.log, "log2": jnp.log2, "sqrt": jnp.sqrt,
    "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "abs": jnp.abs, "sign": jnp.sign,
    "sin": jnp.sin, "cos": jnp.cos,
}


def _real(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype == jnp.float32 else x.astype(jnp.float32)


def _num_pair(a, b):
    """Promote an int/real pair the way the language does (int op int stays int32)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(b.dtype, jnp.floating):
        return _real(a), _real(b)
    return a.astype(jnp.int32), b.astype(jnp.int32)


def _floordiv(a, b):
    a, b = _num_pair(a, b)
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.floor(a / b)
    return jnp.floor_divide(a, b)


def _mod(a, b):
    a, b = _num_pair(a, b)
    if jnp.issubdtype(a.dtype, jnp.floating):
        return a - jnp.floor(a / b) * b
    return jnp.remainder(a, b)


_BINARY: dict[str, Callable] = {
    "+": lambda a, b: jnp.add(*_num_pair(a, b)),
    "-": lambda a, b: jnp.subtract(*_num_pair(a, b)),
    "*": lambda a, b: jnp.multiply(*_num_pair(a, b)),
    "/": lambda a, b: _real(a) / _real(b),
    "//": _floordiv,
    "%": _mod,
    "**": lambda a, b: jnp.power(_real(a), _real(b)),
    "<": lambda a, b: jnp.less(*_num_pair(a, b)),
    "<=": lambda a, b: jnp.less_equal(*_num_pair(a, b)),
    ">": lambda a, b: jnp.greater(*_num_pair(a, b)),
    ">=": lambda a, b: jnp.greater_equal(*_num_pair(a, b)),
}


def emit(node: Node, env: Env):
    """jnp value of ``node`` (bool, int32 or float32 array) under ``env``."""
    memo: dict[int, object] = {}

    def go(n: Node):
        key = id(n)
        if key in memo:
            return memo[key]
        out = _emit_one(n, go, env)
        memo[key] = out
        return out

    return go(node)


def _emit_one(n: Node, go, env: Env):
    if isinstance(n, BoolLit):
        return jnp.asarray(n.value, jnp.bool_)
    if isinstance(n, IntLit):
        return jnp.asarray(n.value, jnp.int32)
    if isinstance(n, RealLit):
        return jnp.asarray(n.value, jnp.float32)
    if isinstance(n, Var):
        return env.var(n.name)
    if isinstance(n, Tensor):
        return env.tensor(n, [go(i) for i in n.indices])
    if isinstance(n, Unary):
        x = go(n.operand)
        # ``x == false`` rather than logical_not: Mosaic GPU cannot lower a vector logical_not.
        return jnp.equal(x, False) if n.op == "~" else jnp.negative(x)
    if isinstance(n, Binary):
        a, b = go(n.lhs), go(n.rhs)
        if n.op in ("&", "+") and a.dtype == jnp.bool_ and b.dtype == jnp.bool_:
            return jnp.logical_and(a, b)
        if n.op == "|":
            return jnp.logical_or(a, b)
        if n.op in ("==", "!="):
            if not (a.dtype == jnp.bool_ and b.dtype == jnp.bool_):
                a, b = _num_pair(a, b)
            return jnp.equal(a, b) if n.op == "==" else jnp.not_equal(a, b)
        return _BINARY[n.op](a, b)
    if isinstance(n, Call):
        args = [go(a) for a in n.args]
        fn = n.fn
        if fn == "where":
            c, a, b = args
            if a.dtype != jnp.bool_:
                a, b = _num_pair(a, b)
            # A condition as wide as the result: Mosaic GPU has no select on a scalar condition.
            c = jnp.broadcast_to(c, jnp.broadcast_shapes(c.shape, a.shape, b.shape))
            return jnp.where(c, a, b)
        if fn in ("min", "max"):
            a, b = _num_pair(*args)
            return jnp.minimum(a, b) if fn == "min" else jnp.maximum(a, b)
        if fn == "clip":
            x, lo = _num_pair(args[0], args[1])
            x, hi = _num_pair(x, args[2])
            x, lo = _num_pair(x, lo)
            return jnp.minimum(jnp.maximum(x, lo), hi)
        if fn in ("floor", "ceil"):
            x = args[0]
            if jnp.issubdtype(x.dtype, jnp.floating):
                x = jnp.floor(x) if fn == "floor" else jnp.ceil(x)
            return x.astype(jnp.int32)
        if fn in ("abs", "sign"):
            return _FUNCS[fn](args[0])
        return _FUNCS[fn](_real(args[0]))
    raise TypeError(f"cannot lower {type(n).__name__}")


# ---- tensor reads by gathering (XLA path and Mod closures) -------------------------------

def gather_read(array: jax.Array, indices: list[jax.Array]):
    """``array[indices]`` with right alignment and clipping (docs/language.md, "7. Tensors").

    A rank-r array read with more than r indices ignores the leading ones; each index is
    clipped into range. Ints come back int32, floats float32, bools int32.
    """
    array = jnp.asarray(array)
    rank = array.ndim
    used = used_indices(indices, rank)
    if len(used) < rank:
        raise ValueError(f"tensor of rank {rank} read with {len(indices)} indices")
    idx = tuple(jnp.clip(jnp.asarray(i, jnp.int32), 0, dim - 1) for i, dim in zip(used, array.shape))
    value = array[idx] if idx else array
    if value.dtype == jnp.bool_ or jnp.issubdtype(value.dtype, jnp.integer):
        return value.astype(jnp.int32)
    return value.astype(jnp.float32)


class _GatherEnv:
    def __init__(self, variables: dict, tensors: dict):
        self.variables = variables
        self.tensors = tensors

    def var(self, name):
        return self.variables[name]

    def tensor(self, node, indices):
        return gather_read(self.tensors[node.name], indices)


def score_mod_fn(canonical, tensors: dict):
    """``score_mod(scores, b, h, q, kv) -> logits``: where(M, T(score) + B, -inf) in f32."""
    def score_mod(scores, b_idx, h_idx, q_idx, kv_idx):
        env = _GatherEnv({"b": b_idx, "h": h_idx, "q": q_idx, "kv": kv_idx,
                          "score": _real(scores)}, tensors)
        return logits_from_canonical(canonical, env)
    return score_mod


def mask_mod_fn(canonical, tensors: dict):
    """``mask_mod(b, h, q, kv) -> bool``: the canonical mask M."""
    def mask_mod(b_idx, h_idx, q_idx, kv_idx):
        env = _GatherEnv({"b": b_idx, "h": h_idx, "q": q_idx, "kv": kv_idx}, tensors)
        shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in (b_idx, h_idx, q_idx, kv_idx)))
        return jnp.broadcast_to(emit(canonical.mask, env), shape)
    return mask_mod


def values_from_canonical(canonical, env: Env):
    """``T(score) + B`` (no mask) in float32."""
    score = _real(env.var("score"))
    value = score if canonical.transform is None else _real(emit(canonical.transform, env))
    if canonical.bias is not None:
        value = value + _real(emit(canonical.bias, env))
    return value


def logits_from_canonical(canonical, env: Env):
    """``where(M, T(score) + B, -inf)`` in float32, broadcast to the score's shape."""
    value = values_from_canonical(canonical, env)
    if not canonical.has_mask:
        return jnp.broadcast_to(value, jnp.shape(env.var("score")))
    mask = emit(canonical.mask, env)
    return jnp.where(mask, value, -jnp.inf)

