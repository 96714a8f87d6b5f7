"""Lowering IR to jax.numpy: one evaluator over environments, and ``dT/dscore``.

``emit(node, env)`` turns an expanded, checked IR expression into jnp operations.
The environment says what the variables are (``b, h, q, kv, score``: arrays that
broadcast against each other) and how a tensor read is answered. The XLA path
answers reads by gathering from the whole tensor; kernels answer them with the tile
of the tensor they loaded. Integer arithmetic is int32 with Python's floor ``//`` and
``%``; reals are float32.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from scoremod.dsl.ast import Binary, BoolLit, Call, IntLit, Node, RealLit, Tensor, Unary, Var, mentions
from scoremod.compiler.rewrite import simplify

__all__ = ["Env", "emit", "derivative", "gather_read", "score_mod_fn", "mask_mod_fn"]


class Env(Protocol):
    def var(self, name: str) -> jax.Array: ...
    def tensor(self, node: Tensor, indices: list[jax.Array]) -> jax.Array: ...


_FUNCS: dict[str, Callable] = {
    "exp": jnp.exp, "exp2": jnp.exp2, "log": jnp.log, "log2": jnp.log2, "sqrt": jnp.sqrt,
    "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "abs": jnp.abs, "sign": jnp.sign,
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
        return jnp.logical_not(x) if n.op == "~" else jnp.negative(x)
    if isinstance(n, Binary):
        a, b = go(n.lhs), go(n.rhs)
        if n.op in ("&", "+") and a.dtype == jnp.bool_ and b.dtype == jnp.bool_:
            return jnp.logical_and(a, b)
        if n.op == "|":
            return jnp.logical_or(a, b)
        if n.op in ("==", "!="):
            if a.dtype == jnp.bool_ and b.dtype == jnp.bool_:
                eq = a == b
            else:
                eq = jnp.equal(*_num_pair(a, b))
            return eq if n.op == "==" else jnp.logical_not(eq)
        return _BINARY[n.op](a, b)
    if isinstance(n, Call):
        args = [go(a) for a in n.args]
        fn = n.fn
        if fn == "where":
            c, a, b = args
            if a.dtype != jnp.bool_:
                a, b = _num_pair(a, b)
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
    """``array[indices]`` with right alignment and clipping (LANGUAGE.md §5).

    A rank-r array read with more than r indices ignores the leading ones; each index is
    clipped into range. Ints come back int32, floats float32, bools int32.
    """
    array = jnp.asarray(array)
    rank = array.ndim
    used = indices[len(indices) - rank:] if rank else []
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


# ---- d T / d score -----------------------------------------------------------------------

_ZERO, _ONE = IntLit(0), IntLit(1)
_LN2 = RealLit(math.log(2.0))


def derivative(node: Node, var: str = "score") -> Node:
    """Symbolic d node / d var as IR (simplified). Piecewise functions use the derivative
    of the active piece; floor/ceil/sign/comparisons have derivative 0."""
    return simplify(_d(node, var), ["fold", "arithmetic"])


def _build(op: str, a: Node, b: Node) -> Node:
    """Binary node that drops the zeros and ones a derivative produces (0 * x is 0 here:
    a zero derivative times a finite factor)."""
    zero_a, zero_b = a == _ZERO, b == _ZERO
    if op == "+":
        return b if zero_a else a if zero_b else Binary(op, a, b)
    if op == "-":
        return a if zero_b else Unary("-", b) if zero_a else Binary(op, a, b)
    if op == "*":
        if zero_a or zero_b:
            return _ZERO
        return b if a == _ONE else a if b == _ONE else Binary(op, a, b)
    if op == "/" and zero_a:
        return _ZERO
    return Binary(op, a, b)


def _d(n: Node, v: str) -> Node:
    if not mentions(n, v):
        return _ZERO
    if isinstance(n, Var):
        return _ONE
    B = _build
    if isinstance(n, Unary):
        return _build("-", _ZERO, _d(n.operand, v))
    if isinstance(n, Binary):
        a, b = n.lhs, n.rhs
        da, db = _d(a, v), _d(b, v)
        if n.op in ("+", "-"):
            return B(n.op, da, db)
        if n.op == "*":
            return B("+", B("*", da, b), B("*", a, db))
        if n.op == "/":
            return B("-", B("/", da, b), B("/", B("*", a, db), B("*", b, b)))
        if n.op == "**":
            if not mentions(b, v):
                return B("*", B("*", b, B("**", a, B("-", b, _ONE))), da)
            return B("*", n, B("+", B("*", db, Call("log", (a,))), B("/", B("*", b, da), a)))
        if n.op == "%":
            return B("-", da, B("*", Call("floor", (B("/", a, b),)), db))
        return _ZERO  # //, comparisons
    if isinstance(n, Call):
        args = n.args
        x = args[0]
        dx = _d(x, v)
        fn = n.fn
        if fn == "abs":
            return B("*", Call("sign", (x,)), dx)
        if fn == "exp":
            return B("*", n, dx)
        if fn == "exp2":
            return B("*", B("*", n, _LN2), dx)
        if fn == "log":
            return B("/", dx, x)
        if fn == "log2":
            return B("/", dx, B("*", x, _LN2))
        if fn == "sqrt":
            return B("/", dx, B("*", IntLit(2), n))
        if fn == "tanh":
            return B("*", B("-", _ONE, B("*", n, n)), dx)
        if fn == "sigmoid":
            return B("*", B("*", n, B("-", _ONE, n)), dx)
        if fn in ("floor", "ceil", "sign"):
            return _ZERO
        if fn == "min":
            return Call("where", (B("<=", args[0], args[1]), dx, _d(args[1], v)))
        if fn == "max":
            return Call("where", (B(">=", args[0], args[1]), dx, _d(args[1], v)))
        if fn == "clip":
            lo, hi = args[1], args[2]
            return Call("where", (B("<", x, lo), _d(lo, v),
                                  Call("where", (B(">", x, hi), _d(hi, v), dx))))
        if fn == "where":
            return Call("where", (args[0], _d(args[1], v), _d(args[2], v)))
    raise TypeError(f"cannot differentiate {type(n).__name__}")
