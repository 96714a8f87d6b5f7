"""An independent evaluator of scoremod sources: the meaning of docs/language.md, in NumPy float64.

This is the oracle every other path (canonical form, rewrites, plans, kernels) is tested
against, so it shares no code with the compiler. It takes the *parsed* AST from
``scoremod.dsl.parser`` and the definition ASTs of the prelude and of ``scoremod.define``
(``scoremod.dsl.definitions.prelude()``/``global_definitions()``), and does everything
else itself: names are resolved while evaluating, a call of a definition evaluates its
body with the parameters bound to the unevaluated arguments (call by name, like the
macro expansion it has to agree with), and values are NumPy arrays broadcast over the
grid of positions ``[B, N, T, S]``.

Semantics implemented here (docs/language.md, with the choices the brief leaves open):

* Positions: ``b`` in ``0..B-1``, ``h`` in ``0..N-1``, ``q = q_offset + row``,
  ``kv = kv_offset + column``; offsets are ints or int arrays of shape ``[B]``.
* Top level (§1): a bool ``E`` gives ``where(E, score, -inf)``; a real ``E`` that never
  mentions ``score`` gives ``score + E``; one that mentions it gives ``E``. In the
  top-level chain of ``+``/``&`` (seen through definitions and parameters, however
  bracketed) a mask next to a real reads as ``0`` where it holds and ``-inf`` elsewhere;
  two masks combine by conjunction; an ``&`` with no mask in the chain on either side
  (``alibi(8) & alibi(4)``) is an error. "Mentions ``score``" is syntactic, after expansion:
  ``score * 0 + alibi(8)`` is a transform; an argument a definition never uses does not
  count.
* Ints are int64, reals float64, masks bool. ``//`` and ``%`` on ints are Python's floor
  division and modulo (``-7 // 2 == -4``, ``-7 % 2 == 1``); on reals ``a // b`` is
  ``floor(a / b)`` and ``a % b`` is ``a - floor(a / b) * b``. Integer division by zero
  raises ``ZeroDivisionError`` (the language leaves it undefined; generators avoid it).
  ``/`` and ``**`` always give reals. ``floor``/``ceil`` of a real give an int.
  ``clip(x, lo, hi)`` is ``min(max(x, lo), hi)``. ``sign`` is -1, 0 or 1. ``sin``/``cos``
  take radians.
* Tensors (§5): values are converted with ``np.asarray``; bool and int tensors read as
  int64, float tensors as float64. A tensor read written (after following parameters and
  definitions) as an operand of ``&``, ``|`` or ``~``, or as ``where``'s condition, is a
  mask: ``read != 0``; anywhere else (alone, under ``+``, in arithmetic) it is a number. Indices align to the right: a rank-r tensor indexed
  with k >= r indices uses the last r (fewer than r is an error). Every index is
  **clipped** to ``[0, dim - 1]`` (kernels clip too). A bare tensor name must be a
  scalar (0-d). An expression that is not a tensor (a literal, or a parameter bound to
  one) indexed with anything is itself: ``n[b]`` with ``n = 4`` is ``4``.
* Definitions are looked up by (name, number of arguments): the source's own first,
  then ``scoremod.define``'d ones, then the prelude; a definition named like a built-in
  function replaces it for its arity. Names inside any body are resolved in that same
  scope (the source's definitions are visible to global ones, as in expansion).

The input is assumed to be well typed (compile it with ``scoremod.compile`` first if in
doubt); the evaluator checks only what it needs to compute a value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from scoremod.dsl import ast
from scoremod.dsl.definitions import global_definitions, prelude
from scoremod.dsl.parser import parse_source

__all__ = [
    "evaluate_logits", "evaluate_mask", "evaluate_expr", "mentions_score", "attention_reference", "Grid",
    "BUILTIN_FUNCTIONS",
]

BUILTIN_FUNCTIONS = {
    "abs": 1, "min": 2, "max": 2, "clip": 3, "where": 3, "exp": 1, "exp2": 1, "log": 1,
    "log2": 1, "sqrt": 1, "tanh": 1, "sigmoid": 1, "floor": 1, "ceil": 1, "sign": 1, "sin": 1, "cos": 1,
}
_VARIABLES = ("b", "h", "q", "kv", "score")


@dataclass
class Grid:
    """The positions of a ``[B, N, T, S]`` grid, each broadcastable to that shape."""
    B: int
    N: int
    T: int
    S: int
    q_offset: Any = 0
    kv_offset: Any = 0
    scores: np.ndarray | None = None  # float64[B, N, T, S]; zeros when None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.B, self.N, self.T, self.S)

    def variable(self, name: str) -> np.ndarray:
        B, N, T, S = self.shape
        if name == "b":
            return np.arange(B, dtype=np.int64).reshape(B, 1, 1, 1)
        if name == "h":
            return np.arange(N, dtype=np.int64).reshape(1, N, 1, 1)
        if name == "q":
            return _offset(self.q_offset, B) + np.arange(T, dtype=np.int64).reshape(1, 1, T, 1)
        if name == "kv":
            return _offset(self.kv_offset, B) + np.arange(S, dtype=np.int64).reshape(1, 1, 1, S)
        if name == "score":
            if self.scores is None:
                return np.zeros(self.shape)
            return np.asarray(self.scores, dtype=np.float64)
        raise KeyError(name)


def _offset(offset, B: int) -> np.ndarray:
    off = np.asarray(offset, dtype=np.int64)
    if off.ndim == 0:
        return off.reshape(1, 1, 1, 1)
    if off.shape != (B,):
        raise ValueError(f"an offset must be an int or int[{B}], got shape {off.shape}")
    return off.reshape(B, 1, 1, 1)


@dataclass(frozen=True)
class _Thunk:
    """An unevaluated argument: the node and the environment it was written in."""
    node: ast.Node
    env: Mapping[str, "_Thunk"]


class _Evaluator:
    """Evaluates AST nodes over a ``Grid`` with definitions looked up by (name, arity)."""

    def __init__(self, grid: Grid, tensors: Mapping[str, Any] | None, local_definitions=()):
        self.grid = grid
        self.tensors = {} if tensors is None else dict(tensors)
        self.tables = []
        local: dict[tuple[str, int], ast.Definition] = {}
        for d in local_definitions:
            local[(d.name, len(d.params))] = d
        self.tables.append(local)
        self.tables.append({(d.name, len(d.params)): d for d in global_definitions()})
        self.tables.append({(d.name, len(d.params)): d for d in prelude()})
        self.depth = 0

    # ---- name resolution -------------------------------------------------------------

    def definition(self, name: str, arity: int) -> ast.Definition | None:
        for table in self.tables:
            if (name, arity) in table:
                return table[(name, arity)]
        return None

    def has_definitions_named(self, name: str) -> bool:
        return any(key[0] == name for table in self.tables for key in table)

    def bind(self, d: ast.Definition, args, env) -> dict:
        if len(args) != len(d.params):
            raise ValueError(f"{d.name} takes {len(d.params)} arguments, got {len(args)}")
        return {p: _Thunk(a, env) for p, a in zip(d.params, args)}

    def unfold(self, node: ast.Node, env) -> tuple[ast.Node, Mapping]:
        """Follow parameters and definition calls to the node that gives ``node`` its value."""
        for _ in range(10_000):
            if isinstance(node, ast.Name) and node.name in env:
                thunk = env[node.name]
                node, env = thunk.node, thunk.env
                continue
            if isinstance(node, (ast.Name, ast.Call)):
                name = node.name if isinstance(node, ast.Name) else node.fn
                args = () if isinstance(node, ast.Name) else node.args
                d = self.definition(name, len(args))
                if d is not None:
                    env = self.bind(d, args, env)
                    node = d.body
                    continue
            return node, env
        raise RecursionError("definitions nest too deeply (recursive?)")

    # ---- evaluation ------------------------------------------------------------------

    def top(self, node: ast.Node, env) -> np.ndarray:
        """The value of a top-level chain of ``+``/``&``: bool when every part is a mask,
        else real with mask parts read as 0 / -inf."""
        return self._top(node, env)[0]

    def _top(self, node, env) -> tuple[np.ndarray, bool]:
        """(value, whether the chain has a mask part). '&' needs a mask part in the chain
        on one of its sides (``alibi(8) & alibi(4)`` is an error)."""
        node, env = self.unfold(node, env)
        if isinstance(node, ast.Binary) and node.op in ("+", "&"):
            if node.op == "&":   # a tensor read under '&' is a mask
                (lhs, lmask), (rhs, rmask) = (
                    (self.value(x, env) != 0, True) if self.is_tensor_read(x, env) else self._top(x, env)
                    for x in (node.lhs, node.rhs))
            else:
                (lhs, lmask), (rhs, rmask) = self._top(node.lhs, env), self._top(node.rhs, env)
            if lhs.dtype == bool and rhs.dtype == bool:
                return np.logical_and(lhs, rhs), True
            if node.op == "&" and not lmask and not rmask:
                raise TypeError("'&' needs a mask on at least one side")
            return _as_bias(lhs) + _as_bias(rhs), lmask or rmask
        value = self.value(node, env)
        return value, value.dtype == bool

    def is_tensor_read(self, node: ast.Node, env) -> bool:
        """Whether ``node`` (through parameters and definitions) reads a tensor parameter:
        a bare name that names nothing else, or an indexed one (``m[b, q, kv]``)."""
        node, env = self.unfold(node, env)
        if isinstance(node, ast.Tensor):
            return True
        if isinstance(node, ast.Name):
            return self._names_tensor(node.name, env)
        if isinstance(node, ast.Index):
            base, base_env = self.unfold(node.base, env)
            if isinstance(base, ast.Name):
                return self._names_tensor(base.name, base_env)
            return isinstance(base, ast.Tensor)
        return False

    def _names_tensor(self, name: str, env) -> bool:
        return name not in env and not self.has_definitions_named(name) and name not in BUILTIN_FUNCTIONS

    def as_mask(self, node: ast.Node, env) -> np.ndarray:
        """The value of ``node`` where a mask is expected: a tensor read there is ``read != 0``."""
        value = self.value(node, env)
        return value != 0 if self.is_tensor_read(node, env) else value

    def value(self, node: ast.Node, env) -> np.ndarray:
        """The value of ``node`` as an inner expression (masks stay bool)."""
        self.depth += 1
        if self.depth > 5_000:
            raise RecursionError("expression nests too deeply")
        try:
            return self._value(node, env)
        finally:
            self.depth -= 1

    def _value(self, node, env) -> np.ndarray:
        if isinstance(node, ast.BoolLit):
            return np.asarray(bool(node.value))
        if isinstance(node, ast.IntLit):
            return np.asarray(int(node.value), dtype=np.int64)
        if isinstance(node, ast.RealLit):
            return np.asarray(float(node.value), dtype=np.float64)
        if isinstance(node, ast.Var):
            return self.grid.variable(node.name)
        if isinstance(node, ast.Name):
            if node.name in env:
                thunk = env[node.name]
                return self.value(thunk.node, thunk.env)
            return self.call(node.name, (), env, bare=True)
        if isinstance(node, ast.Call):
            return self.call(node.fn, node.args, env, bare=False)
        if isinstance(node, ast.Tensor):  # expanded IR: a tensor read
            return self.read_tensor(node.name, [self.value(i, env) for i in node.indices], bare=not node.indices)
        if isinstance(node, ast.Index):
            return self.index(node, env)
        if isinstance(node, ast.Unary):
            if node.op == "~":
                return np.logical_not(self.as_mask(node.operand, env))
            return -self.value(node.operand, env)
        if isinstance(node, ast.Binary):
            if node.op in ("&", "|"):
                return self.binary(node.op, self.as_mask(node.lhs, env), self.as_mask(node.rhs, env))
            return self.binary(node.op, self.value(node.lhs, env), self.value(node.rhs, env))
        raise TypeError(f"cannot evaluate {type(node).__name__}")

    def call(self, name: str, args, env, bare: bool) -> np.ndarray:
        d = self.definition(name, len(args))
        if d is not None:
            return self.value(d.body, self.bind(d, args, env))
        if name in BUILTIN_FUNCTIONS and not bare:
            if len(args) != BUILTIN_FUNCTIONS[name]:
                raise TypeError(f"{name} takes {BUILTIN_FUNCTIONS[name]} arguments, got {len(args)}")
            return self.builtin(name, [self.as_mask(a, env) if name == "where" and i == 0 else self.value(a, env)
                                       for i, a in enumerate(args)])
        if bare and not self.has_definitions_named(name) and name not in BUILTIN_FUNCTIONS:
            return self.read_tensor(name, [], bare=True)
        raise NameError(f"no definition or function {name} with {len(args)} arguments")

    def index(self, node: ast.Index, env) -> np.ndarray:
        base, base_env = self.unfold(node.base, env)
        indices = [self.value(i, env) for i in node.indices]
        if isinstance(base, ast.Name) and base.name not in base_env and not self.has_definitions_named(base.name) \
                and base.name not in BUILTIN_FUNCTIONS:
            return self.read_tensor(base.name, indices, bare=False)
        if isinstance(base, ast.Tensor) and not base.indices:
            return self.read_tensor(base.name, indices, bare=False)
        if isinstance(base, (ast.Index, ast.Tensor)):
            raise TypeError("a tensor is indexed twice")
        # Not a tensor (a literal, or an expression of literals): indexing leaves it as it is.
        return self.value(base, base_env)

    def read_tensor(self, name: str, indices: list, bare: bool) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"tensor '{name}' was not given (tensors: {sorted(self.tensors)})")
        t = np.asarray(self.tensors[name])
        t = t.astype(np.float64) if np.issubdtype(t.dtype, np.floating) else t.astype(np.int64)
        if bare:
            if t.ndim != 0:
                raise ValueError(f"tensor '{name}' is used as a scalar but has shape {t.shape}")
            return t
        if len(indices) < t.ndim:
            raise ValueError(f"tensor '{name}' has rank {t.ndim} but is indexed with {len(indices)} indices")
        used = indices[len(indices) - t.ndim:] if t.ndim else []
        if t.ndim == 0:
            return t
        clipped = tuple(np.clip(np.asarray(i).astype(np.int64), 0, dim - 1) for i, dim in zip(used, t.shape))
        return t[clipped]

    @staticmethod
    def binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if op in ("&", "+") and a.dtype == bool and b.dtype == bool:
            return np.logical_and(a, b)
        if op == "|":
            return np.logical_or(a, b)
        if op == "&":
            raise TypeError("'&' of numbers")
        if op in ("<", "<=", ">", ">=", "==", "!="):
            return {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
                    "==": np.equal, "!=": np.not_equal}[op](a, b)
        if a.dtype == bool or b.dtype == bool:
            raise TypeError(f"'{op}' of a mask")
        with np.errstate(all="ignore"):
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            if op == "/":
                return np.true_divide(a.astype(np.float64), b)
            if op == "**":
                return np.power(a.astype(np.float64), b.astype(np.float64))
            if op in ("//", "%"):
                if _is_int(a) and _is_int(b):
                    if np.any(b == 0):
                        raise ZeroDivisionError(f"integer '{op}' by zero")
                    return np.floor_divide(a, b) if op == "//" else np.mod(a, b)
                floor = np.floor(a / b)
                return floor if op == "//" else a - floor * b
        raise ValueError(f"unknown operator {op}")

    @staticmethod
    def builtin(fn: str, args: list[np.ndarray]) -> np.ndarray:
        with np.errstate(all="ignore"):
            x = args[0]
            if fn == "where":
                return np.where(args[0], args[1], args[2])
            if fn == "abs":
                return np.abs(x)
            if fn == "min":
                return np.minimum(args[0], args[1])
            if fn == "max":
                return np.maximum(args[0], args[1])
            if fn == "clip":
                return np.minimum(np.maximum(args[0], args[1]), args[2])
            if fn == "sign":
                return np.sign(x)
            if fn in ("floor", "ceil"):
                if _is_int(x):
                    return x
                y = np.floor(x) if fn == "floor" else np.ceil(x)
                return y.astype(np.int64) if np.all(np.isfinite(y)) else y
            x = x.astype(np.float64)
            if fn == "exp":
                return np.exp(x)
            if fn == "exp2":
                return np.exp2(x)
            if fn == "log":
                return np.log(x)
            if fn == "log2":
                return np.log2(x)
            if fn == "sqrt":
                return np.sqrt(x)
            if fn == "tanh":
                return np.tanh(x)
            if fn == "sigmoid":
                return 1.0 / (1.0 + np.exp(-x))
            if fn == "sin":
                return np.sin(x)
            if fn == "cos":
                return np.cos(x)
        raise ValueError(f"unknown function {fn}")


def _is_int(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.integer)


def _as_bias(x: np.ndarray) -> np.ndarray:
    """A mask as a bias (0 where it holds, -inf elsewhere); numbers as float64."""
    if x.dtype == bool:
        return np.where(x, 0.0, -np.inf)
    return x.astype(np.float64)


def _parse(source):
    """(definitions, expression) of a source string, a parsed Source, an AST node or a Mod."""
    if isinstance(source, ast.Source):
        return source.definitions, source.expr
    if isinstance(source, ast.Node):
        return (), source
    src = parse_source(str(source))
    return src.definitions, src.expr


def _broadcast(x: np.ndarray, shape) -> np.ndarray:
    return np.array(np.broadcast_to(x, shape))


def evaluate_logits(source, *, scores: np.ndarray, q_offset=0, kv_offset=0,
                    tensors: Mapping[str, Any] | None = None) -> np.ndarray:
    """The new logits ``float64[B, N, T, S]`` that ``source`` makes of ``scores`` (docs/language.md §1 Meaning).

    Args:
      source: a source string (or a ``Mod``, a parsed ``Source``, or an AST/IR node).
      scores: float64[B, N, T, S], the raw logits ``scale * <q, k>``.
      q_offset, kv_offset: int or int[B]; ``q = q_offset + row``, ``kv = kv_offset + column``.
      tensors: the tensor parameters by name (arrays or Python numbers).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 4:
        raise ValueError(f"scores must be [B, N, T, S], got shape {scores.shape}")
    definitions, expr = _parse(source)
    grid = Grid(*scores.shape, q_offset=q_offset, kv_offset=kv_offset, scores=scores)
    ev = _Evaluator(grid, tensors, definitions)
    value = ev.top(expr, {})
    if value.dtype == bool:
        logits = np.where(value, scores, -np.inf)
    elif mentions_score(ast.Source(tuple(definitions), expr)):
        logits = value.astype(np.float64)
    else:
        logits = scores + value.astype(np.float64)
    return _broadcast(logits, grid.shape).astype(np.float64)


def evaluate_mask(source, B: int, N: int, T: int, S: int, *, q_offset=0, kv_offset=0,
                  tensors: Mapping[str, Any] | None = None, scores: np.ndarray | None = None) -> np.ndarray:
    """``bool[B, N, T, S]``: where the logit is above ``-inf`` (for ``scores``, zeros by default)."""
    if scores is None:
        scores = np.zeros((B, N, T, S))
    logits = evaluate_logits(source, scores=scores, q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    return logits > -np.inf


def evaluate_expr(source, B: int, N: int, T: int, S: int, *, q_offset=0, kv_offset=0,
                  tensors: Mapping[str, Any] | None = None, scores: np.ndarray | None = None,
                  top_level: bool = False) -> np.ndarray:
    """The value of an expression on the grid, broadcast to ``[B, N, T, S]``.

    bool for masks, int64 for ints, float64 for reals. With ``top_level=True`` the
    expression is read as a top-level chain (masks next to reals read as 0 / -inf);
    otherwise as an inner expression. ``source`` may also be an AST or IR node (e.g. a
    node of ``mod.canonical``), which is how rewrite rules are checked.
    """
    definitions, expr = _parse(source)
    grid = Grid(B, N, T, S, q_offset=q_offset, kv_offset=kv_offset, scores=scores)
    ev = _Evaluator(grid, tensors, definitions)
    value = ev.top(expr, {}) if top_level else ev.value(expr, {})
    return _broadcast(value, grid.shape)


def mentions_score(source) -> bool:
    """Whether ``source`` mentions ``score`` once definitions are expanded (call by name: an
    argument a definition never uses does not count). A real source that does is a transform."""
    definitions, expr = _parse(source)
    ev = _Evaluator(Grid(1, 1, 1, 1), None, definitions)
    stack = [(expr, {})]
    while stack:
        node, env = stack.pop()
        if isinstance(node, ast.Var):
            if node.name == "score":
                return True
        elif isinstance(node, ast.Name) and node.name in env:
            stack.append((env[node.name].node, env[node.name].env))
        elif isinstance(node, (ast.Name, ast.Call)):
            name = node.name if isinstance(node, ast.Name) else node.fn
            args = () if isinstance(node, ast.Name) else node.args
            d = ev.definition(name, len(args))
            if d is not None:
                stack.append((d.body, ev.bind(d, args, env)))
            else:
                stack.extend((a, env) for a in args)
        else:
            stack.extend((c, env) for c in node.children())
    return False


def attention_reference(q, k, v, source=None, *, scale: float | None = None, q_offset=0, kv_offset=0,
                        tensors: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Attention with ``source`` applied to the logits, in float64.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 (query head h reads kv head
        h // (N // K)).
      source: a source string or Mod; None means no mod.
      scale: multiplies <q, k>; default 1 / sqrt(H).
    Returns:
      (out float64[B, T, N, H], lse float64[B, N, T]). A row with no allowed key has
      output 0 and lse -inf.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if k.shape != (B, S, K, H) or v.shape[:3] != (B, S, K):
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} do not fit together")
    if N % K:
        raise ValueError(f"{N=} query heads is not a multiple of {K=} kv heads")
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    group = N // K
    k_per_head = np.repeat(k, group, axis=2)  # [B, S, N, H]
    v_per_head = np.repeat(v, group, axis=2)
    scores = scale * np.einsum("btnh,bsnh->bnts", q, k_per_head)
    logits = scores if source is None else evaluate_logits(
        source, scores=scores, q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    row_max = logits.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(row_max) & (row_max < 0)  # every logit of the row is -inf
    safe_max = np.where(empty, 0.0, row_max)
    with np.errstate(under="ignore"):
        p = np.exp(logits - safe_max)
    p = np.where(empty, 0.0, p)
    denom = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p / np.where(empty, 1.0, denom), v_per_head)
    with np.errstate(divide="ignore"):
        lse = np.where(empty[..., 0], -np.inf, (safe_max + np.log(np.where(empty, 1.0, denom)))[..., 0])
    return out, lse
