"""Interval analysis: is a mask EMPTY, FULL or PARTIAL on each block of positions?

For a bool expression and a grid of rectangles of positions (every batch ``b``, head ``h``,
q-block and kv-block at once) answer per rectangle:

  EMPTY    the mask is false at every position of the rectangle,
  FULL     the mask is true at every position,
  PARTIAL  anything else: mixed, or not known.

**Sound** for every expression: EMPTY and FULL are never wrong (when unsure: PARTIAL).
**Exact** (PARTIAL only when the rectangle really is mixed) for each prelude mask on its
own: causal, window(w), window(l, r) after ``simplify``, chunk(c), doc(ids) and
doc(qids, kvids) on sorted ids, prefix(n), sink(n), dilated(d), length(n).

How. Every numeric subexpression gets an ``Interval`` ``[lo, hi]`` per rectangle and every
bool one a ``Truth`` (``may_true``, ``may_false``), as arrays that broadcast to
``[B, H, nq, nk]`` (an axis stays 1 while nothing depends on it, which is how plans
collapse ``b'``/``h'``). Position variables are the block bounds (ragged last blocks: valid
positions only). A tensor read whose index along an axis is exactly a position variable
(``ids[b, q]``, ``n[b]``) takes per-block min/max of the tensor along that axis, computed in
O(size of the tensor); other reads use the min/max over the axis. ``a == b`` between two
different position-aligned tensors (``qids[b, q] == kvids[b, kv]``) also asks whether a
value present in both tensors lies in both blocks' ranges (exact on sorted ids).

The code is generic over the array module ``xp``: NumPy for static masks (int64/float64),
``jax.numpy`` inside ``jit`` for masks with tensors (int32/float32).

Before any shape is known, ``int_range(expr)`` bounds an int expression over every position
a call can have (``q``, ``kv`` anywhere in int32, ``h`` below ``MAX_HEADS``), or says it may
wrap: what the compiler's rewrite rules ask before reordering int arithmetic.

Soundness details:
  * ``Interval.unknown`` marks rectangles where the value may be NaN (float tensors with
    NaN, ``inf - inf``, ``log`` of a negative, division by an interval holding 0) or where
    an int operation may overflow int32; comparisons there answer PARTIAL.
  * Results of real arithmetic are widened outward by ``REAL_EPS`` (relative) so that the
    float32 rounding of kernels stays inside the interval, and by ``REAL_TINY``
    (absolute) so that float32 underflow to 0 does too.
  * Kernels compute reals in float32, where a value past ``F32_SAFE`` may be ``inf``
    (``exp(89)``, ``q * 1e38``) while NumPy's float64 bounds stay finite: every real
    result and literal whose bounds reach past ``F32_SAFE`` is ``unknown`` (PARTIAL).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from scoremod.errors import ScoreModError, ScoreModShapeError, ScoreModTensorError
from scoremod.dsl.ast import Binary, BoolLit, Call, IntLit, Node, RealLit, Tensor, Unary, Var, COMPARE_OPS, walk
from scoremod.dsl.typecheck import INT32_MAX, INT32_MIN
from scoremod.compiler.axes import axis_roles, used_indices

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "num_blocks", "Interval", "Truth", "PositionBlocks", "BlockGrid",
    "mask_truth", "value_interval", "int_range", "classify_blocks", "batch_head_dependence", "NUMPY_CHUNK_CELLS",
    "MAX_HEADS", "check_heads",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

# A float estimate of an int result beyond this may have overflowed int32 (margin for rounding).
INT32_LIMIT = 2.0**31 - 1024
REAL_EPS = 2.0**-20
REAL_TINY = 1e-30
# float32's largest finite value is 3.4028235e38; beyond this a kernel's value may be inf.
F32_SAFE = 3.0e38
# Every call has at most this many query heads (attention, paged attention, plans and explain
# check it), so 0 <= h < MAX_HEADS where no shapes are known yet (``int_range``).
MAX_HEADS = 1 << 16
# Bounds kept per int expression seen by the compiler's rules (a pair of ints per entry).
INT_RANGE_CACHE = 4096
# Every position a call can have: int32 indices, fewer than MAX_HEADS heads (``int_range``).
_ANY_POSITION = {"b": (0, INT32_MAX), "h": (0, MAX_HEADS - 1), "q": (INT32_MIN, INT32_MAX),
                 "kv": (INT32_MIN, INT32_MAX)}

# NumPy work on block grids (classification here, plan compaction in plan_layout.py) goes a
# slice of at most this many cells at a time (bounds peak memory).
NUMPY_CHUNK_CELLS = 1 << 22


def check_heads(heads: int) -> None:
    """Raise ``ScoreModShapeError`` for more than ``MAX_HEADS`` query heads."""
    if heads > MAX_HEADS:
        raise ScoreModShapeError(f"{heads:,} query heads is more than the {MAX_HEADS:,} scoremod handles "
                                 f"(the compiler relies on h < {MAX_HEADS:,})")


@dataclass(frozen=True, eq=False)
class Interval:
    """Bounds of a numeric expression per rectangle: ``lo <= value <= hi`` wherever
    ``unknown`` is false. Arrays broadcast to ``[B, H, nq, nk]``; ``unknown`` may be the
    Python ``False``."""
    lo: Any
    hi: Any
    unknown: Any = False
    is_int: bool = True


@dataclass(frozen=True, eq=False)
class Truth:
    """What a bool expression may be per rectangle (arrays broadcasting to
    ``[B, H, nq, nk]``, or Python bools). EMPTY = not may_true, FULL = not may_false."""
    may_true: Any
    may_false: Any


def num_blocks(length: int, block: int) -> int:
    """Blocks of ``block`` positions covering ``length`` (the last one may be ragged)."""
    return -(-length // block)


@dataclass(frozen=True, eq=False)
class PositionBlocks:
    """Contiguous blocks of positions along q or kv.

    Block ``i`` holds rows ``[i * block, min((i + 1) * block, length))`` at absolute
    positions ``offset + row``; ``offset`` is an int or an int[B] array (numpy or jax).
    """
    length: int
    block: int
    offset: Any = 0

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.length, self.block)

    @property
    def per_batch(self) -> bool:
        return np.ndim(self.offset) == 1


@dataclass(frozen=True, eq=False)
class BlockGrid:
    """Every rectangle analysed at once: ``batch x heads x q.num_blocks x kv.num_blocks``."""
    batch: int
    heads: int
    q: PositionBlocks
    kv: PositionBlocks

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.q.num_blocks, self.kv.num_blocks)


# ---- small helpers that keep Python bools as bools ---------------------------------------

def _and(xp, a, b):
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    return xp.logical_and(a, b)


def _or(xp, a, b):
    if a is True or b is True:
        return True
    if a is False:
        return b
    if b is False:
        return a
    return xp.logical_or(a, b)


def _select(xp, cond, a, b):
    if cond is True:
        return a
    if cond is False:
        return b
    return xp.where(cond, a, b)


def _dtypes(xp):
    if xp is np:
        return np.dtype(np.int64), np.dtype(np.float64)
    return xp.asarray(0).dtype, xp.asarray(0.0).dtype


def _batched_searchsorted(xp, sorted_rows, queries, side: str):
    """``searchsorted`` row by row: sorted_rows [R, L], queries [R, M] -> int [R, M]."""
    if xp is np:
        return np.stack([np.searchsorted(s, v, side=side) for s, v in zip(sorted_rows, queries)])
    import jax  # deferred: jax is slow to import; only the jax path (xp=jax.numpy) needs it
    return jax.vmap(lambda s, v: xp.searchsorted(s, v, side=side, method="sort"))(sorted_rows, queries)


# ---- the analysis -------------------------------------------------------------------------

class _Analyzer:
    def __init__(self, grid: BlockGrid | None, tensors: Mapping[str, Any], xp,
                 positions: Mapping[str, tuple[int, int]] | None = None):
        self.xp = xp
        self.grid = grid
        self.positions = positions  # fixed (lo, hi) of b/h/q/kv instead of the grid's blocks
        self.int_dtype, self.float_dtype = _dtypes(xp)
        self.raw_tensors = tensors
        self.tensors: dict[str, Any] = {}  # converted on first read (unread tensors cost nothing)
        self.read_rows: dict[int, tuple[str, Any]] = {}  # id(Tensor) -> (axis "q"/"kv", values [Db, L])

    # -- inputs --
    def _as_array(self, value):
        xp = self.xp
        arr = xp.asarray(value)
        if arr.dtype == bool:
            return arr.astype(self.int_dtype)
        if np.issubdtype(arr.dtype, np.integer):
            return arr.astype(self.int_dtype)
        return arr.astype(self.float_dtype)

    def _int(self, v):
        return self.xp.asarray(v, dtype=self.int_dtype)

    def _float(self, v):
        return self.xp.asarray(v, dtype=self.float_dtype)

    # -- traversal --
    def run(self, root: Node):
        results: dict[int, Any] = {}
        stack = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if id(node) in results:
                continue
            kids = () if isinstance(node, Tensor) else node.children()
            if not ready and kids:
                stack.append((node, True))
                stack.extend((k, False) for k in kids if id(k) not in results)
                continue
            results[id(node)] = self._eval(node, [results[id(k)] for k in kids])
        return results[id(root)]

    def _eval(self, node: Node, args: list):
        xp = self.xp
        if isinstance(node, BoolLit):
            return Truth(bool(node.value), not node.value)
        if isinstance(node, IntLit):
            c = self._int(node.value)
            return Interval(c, c, False, True)
        if isinstance(node, RealLit):
            c = self._float(node.value)
            if float(np.float32(node.value)) == float(node.value):
                return Interval(c, c, False, False)
            return self._real_result(c, c, False)   # kernels round it to float32
        if isinstance(node, Var):
            return self._var(node.name)
        if isinstance(node, Tensor):
            return self._read(node)
        if isinstance(node, Unary):
            (a,) = args
            if node.op == "~":
                return Truth(a.may_false, a.may_true)
            return self._neg(a)
        if isinstance(node, Binary):
            a, b = args
            op = node.op
            if isinstance(a, Truth) or isinstance(b, Truth):
                if op in ("&", "+"):
                    return Truth(_and(xp, a.may_true, b.may_true), _or(xp, a.may_false, b.may_false))
                if op == "|":
                    return Truth(_or(xp, a.may_true, b.may_true), _and(xp, a.may_false, b.may_false))
                if op in ("==", "!="):
                    same = Truth(_or(xp, _and(xp, a.may_true, b.may_true), _and(xp, a.may_false, b.may_false)),
                                 _or(xp, _and(xp, a.may_true, b.may_false), _and(xp, a.may_false, b.may_true)))
                    return same if op == "==" else Truth(same.may_false, same.may_true)
                raise ScoreModError(f"cannot analyse '{op}' on masks in {node}")
            if op in COMPARE_OPS:
                return self._compare(node, a, b)
            return self._arith(op, a, b, node)
        if isinstance(node, Call):
            return self._call(node, args)
        raise ScoreModError(f"cannot analyse {type(node).__name__} nodes ({node})")

    # -- positions --
    def _var(self, name: str) -> Interval:
        xp, g = self.xp, self.grid
        if self.positions is not None and name in self.positions:
            lo, hi = self.positions[name]
            return Interval(self._int(lo), self._int(hi), False, True)
        if name == "b":
            v = xp.arange(g.batch, dtype=self.int_dtype).reshape(g.batch, 1, 1, 1)
            return Interval(v, v, False, True)
        if name == "h":
            v = xp.arange(g.heads, dtype=self.int_dtype).reshape(1, g.heads, 1, 1)
            return Interval(v, v, False, True)
        if name == "q":
            return self._positions(g.q, axis=2)
        if name == "kv":
            return self._positions(g.kv, axis=3)
        # `score` never occurs in a mask; as a value it is any real (or NaN).
        return Interval(self._float(-np.inf), self._float(np.inf), True, False)

    def _offset(self, blocks: PositionBlocks):
        off = self.xp.asarray(blocks.offset).astype(self.int_dtype)
        return off.reshape(-1, 1, 1, 1) if off.ndim == 1 else off

    def _positions(self, blocks: PositionBlocks, axis: int) -> Interval:
        xp = self.xp
        shape = [1, 1, 1, 1]
        shape[axis] = blocks.num_blocks
        start = xp.arange(blocks.num_blocks, dtype=self.int_dtype) * blocks.block
        end = xp.minimum(start + blocks.block, blocks.length) - 1
        off = self._offset(blocks)
        return Interval(off + start.reshape(shape), off + end.reshape(shape), False, True)

    # -- tensor reads --
    def _read(self, node: Tensor) -> Interval:
        xp = self.xp
        if node.name not in self.tensors:
            self.tensors[node.name] = self._as_array(self.raw_tensors[node.name])
        arr = self.tensors[node.name]
        rank = arr.ndim
        if rank > len(node.indices):
            raise ScoreModTensorError(
                f"tensor '{node.name}' has rank {rank} but is read as {node} with {len(node.indices)} indices")
        roles = axis_roles(used_indices(node.indices, rank))
        is_int = bool(np.issubdtype(arr.dtype, np.integer))
        unknown = False if is_int else xp.any(xp.isnan(arr))

        # Literal indices take one slice; other indices keep the whole axis (min/max over it).
        lo = hi = arr
        for axis, role in enumerate(roles):
            if isinstance(role, int):
                i = min(max(role, 0), arr.shape[axis] - 1)  # kernels clip out-of-range indices
                lo = xp.take(lo, xp.asarray([i]), axis=axis)
                hi = xp.take(hi, xp.asarray([i]), axis=axis)
            elif role is None:
                lo = xp.min(lo, axis=axis, keepdims=True)
                hi = xp.max(hi, axis=axis, keepdims=True)
        # Drop those (now size-1) axes and order the rest as [b, h, q, kv].
        kept = [axis for axis, role in enumerate(roles) if isinstance(role, str)]
        lo = self._to_bhqk(lo, roles, kept)
        hi = self._to_bhqk(hi, roles, kept)

        exact_values = all(role is not None for role in roles)
        if exact_values and roles.count("q") + roles.count("kv") == 1 and lo.shape[1] == 1:
            # One position axis: remember the rows for the `==` refinement (same values as lo/hi).
            axis = "q" if "q" in roles else "kv"
            rows = lo.reshape(lo.shape[0], -1) if lo.shape[2 if axis == "q" else 3] > 1 else None
            if rows is not None:
                self.read_rows[id(node)] = (axis, rows)

        lo = self._block_reduce(lo, 2, self.grid.q, "min")
        hi = self._block_reduce(hi, 2, self.grid.q, "max")
        lo = self._block_reduce(lo, 3, self.grid.kv, "min")
        hi = self._block_reduce(hi, 3, self.grid.kv, "max")
        return Interval(lo, hi, unknown, is_int)

    def _to_bhqk(self, x, roles, kept):
        xp = self.xp
        x = x.reshape([x.shape[a] for a in kept])
        order = [r for r in ("b", "h", "q", "kv") if r in [roles[a] for a in kept]]
        x = xp.transpose(x, [[roles[a] for a in kept].index(r) for r in order]) if order else x
        shape = []
        it = iter(x.shape)
        for r in ("b", "h", "q", "kv"):
            shape.append(next(it) if r in order else 1)
        return x.reshape(shape)

    def _block_reduce(self, x, axis: int, blocks: PositionBlocks, how: str):
        """min or max of ``x`` [Db, Dh, Dq, Dk] over each block of positions along ``axis``."""
        xp = self.xp
        size = x.shape[axis]
        if size == 1:
            return x  # broadcast along this axis
        n, bs = blocks.num_blocks, blocks.block
        rows = xp.arange(n * bs, dtype=self.int_dtype)
        shape = [1, 1, 1, 1]
        shape[axis] = n * bs
        off = self._offset(blocks)
        pos = xp.clip(off + rows.reshape(shape), 0, size - 1)  # kernels clip out-of-range reads
        if pos.shape[0] > 1:
            target = list(x.shape)
            target[0] = max(x.shape[0], pos.shape[0])
            x = xp.broadcast_to(x, target)
            gather_shape = list(target)
            gather_shape[axis] = n * bs
            gathered = xp.take_along_axis(x, xp.broadcast_to(pos, gather_shape), axis=axis)
        else:
            gathered = xp.take(x, pos.reshape(-1), axis=axis)
        if np.issubdtype(gathered.dtype, np.integer):
            info = np.iinfo(gathered.dtype)
            fill = info.max if how == "min" else info.min
        else:
            fill = np.inf if how == "min" else -np.inf
        valid = (rows < blocks.length).reshape(shape)
        gathered = xp.where(valid, gathered, xp.asarray(fill, dtype=gathered.dtype))
        split = list(gathered.shape)
        split[axis:axis + 1] = [n, bs]
        gathered = gathered.reshape(split)
        reduced = xp.min(gathered, axis=axis + 1) if how == "min" else xp.max(gathered, axis=axis + 1)
        return reduced

    # -- numbers --
    def _widen(self, lo, hi):
        xp = self.xp
        lo2 = lo - (xp.abs(lo) * REAL_EPS + REAL_TINY)
        hi2 = hi + (xp.abs(hi) * REAL_EPS + REAL_TINY)
        return xp.where(xp.isfinite(lo), lo2, lo), xp.where(xp.isfinite(hi), hi2, hi)

    def _real_result(self, lo, hi, unknown) -> Interval:
        """A real result: widened for float32 rounding and underflow, and unknown where
        float32 may overflow (see the module docstring)."""
        xp = self.xp
        lo, hi = self._widen(lo, hi)
        finite_lo, finite_hi = xp.isfinite(lo), xp.isfinite(hi)
        overflow = (finite_lo & (xp.abs(lo) > F32_SAFE)) | (finite_hi & (xp.abs(hi) > F32_SAFE))
        return Interval(lo, hi, _or(xp, unknown, overflow), False)

    def _real(self, a: Interval) -> Interval:
        """``a`` as a real (int -> float conversion may round in float32: widened)."""
        if not a.is_int:
            return a
        lo, hi = self._widen(a.lo.astype(self.float_dtype), a.hi.astype(self.float_dtype))
        return Interval(lo, hi, a.unknown, False)

    def _int_result(self, lo, hi, unknown, estimate):
        """An int result, marked unknown where it may have overflowed int32.

        ``estimate()`` returns float (lo, hi) estimates, used when ints are 32-bit."""
        xp = self.xp
        if self.int_dtype.itemsize == 8:
            over = (lo < INT32_MIN) | (hi > INT32_MAX)
        else:
            elo, ehi = estimate()
            over = (elo < -INT32_LIMIT) | (ehi > INT32_LIMIT)
        return Interval(lo, hi, _or(xp, unknown, over), True)

    def _f(self, x):
        return x.astype(self.float_dtype)

    def _neg(self, a: Interval) -> Interval:
        if a.is_int:
            return self._int_result(-a.hi, -a.lo, a.unknown, lambda: (-self._f(a.hi), -self._f(a.lo)))
        return Interval(-a.hi, -a.lo, a.unknown, False)

    def _arith(self, op: str, a: Interval, b: Interval, node: Binary) -> Interval:
        xp = self.xp
        unknown = _or(xp, a.unknown, b.unknown)
        if op in ("/", "**") or not (a.is_int and b.is_int):
            if op == "**":
                return self._power(a, b, node)
            a, b = self._real(a), self._real(b)
            return self._real_arith(op, a, b, unknown)
        f = self._f
        if op == "+":
            return self._int_result(a.lo + b.lo, a.hi + b.hi, unknown,
                                    lambda: (f(a.lo) + f(b.lo), f(a.hi) + f(b.hi)))
        if op == "-":
            return self._int_result(a.lo - b.hi, a.hi - b.lo, unknown,
                                    lambda: (f(a.lo) - f(b.hi), f(a.hi) - f(b.lo)))
        if op == "*":
            corners = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
            lo, hi = _min_all(xp, corners), _max_all(xp, corners)

            def estimate():
                c = [f(a.lo) * f(b.lo), f(a.lo) * f(b.hi), f(a.hi) * f(b.lo), f(a.hi) * f(b.hi)]
                return _min_all(xp, c), _max_all(xp, c)
            return self._int_result(lo, hi, unknown, estimate)
        zero_in_b = (b.lo <= 0) & (b.hi >= 0)
        blo = xp.where(zero_in_b, 1, b.lo)
        bhi = xp.where(zero_in_b, 1, b.hi)
        unknown = _or(xp, unknown, zero_in_b)  # int division by zero: any value
        if op == "//":
            corners = [xp.floor_divide(a.lo, blo), xp.floor_divide(a.lo, bhi),
                       xp.floor_divide(a.hi, blo), xp.floor_divide(a.hi, bhi)]
            lo, hi = _min_all(xp, corners), _max_all(xp, corners)

            def estimate():  # only INT_MIN // -1 overflows
                c = [f(a.lo) / f(blo), f(a.lo) / f(bhi), f(a.hi) / f(blo), f(a.hi) / f(bhi)]
                return _min_all(xp, c), _max_all(xp, c)
            return self._int_result(lo, hi, unknown, estimate)
        if op == "%":
            positive = b.lo > 0
            lo = xp.where(positive, 0, blo + 1)
            hi = xp.where(positive, bhi - 1, 0)
            # One divisor and one period: the residues run monotonically from a.lo % d to a.hi % d.
            one_period = (blo == bhi) & (xp.floor_divide(a.lo, blo) == xp.floor_divide(a.hi, blo))
            lo = xp.where(one_period, xp.mod(a.lo, blo), lo)
            hi = xp.where(one_period, xp.mod(a.hi, blo), hi)
            # 0 <= a < every divisor: a % d == a.
            small = positive & (a.lo >= 0) & (a.hi < blo)
            lo = xp.where(small, a.lo, lo)
            hi = xp.where(small, a.hi, hi)
            return Interval(lo, hi, unknown, True)
        raise ScoreModError(f"cannot analyse operator '{op}'")

    def _real_arith(self, op: str, a: Interval, b: Interval, unknown) -> Interval:
        xp = self.xp
        inf = np.inf
        has_inf_a = (a.lo == -inf) | (a.hi == inf)
        has_inf_b = (b.lo == -inf) | (b.hi == inf)
        if op == "+":
            lo, hi = a.lo + b.lo, a.hi + b.hi
            unknown = _or(xp, unknown, ((a.hi == inf) & (b.lo == -inf)) | ((a.lo == -inf) & (b.hi == inf)))
        elif op == "-":
            lo, hi = a.lo - b.hi, a.hi - b.lo
            unknown = _or(xp, unknown, ((a.hi == inf) & (b.hi == inf)) | ((a.lo == -inf) & (b.lo == -inf)))
        elif op == "*":
            corners = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
            lo, hi = _min_all(xp, corners), _max_all(xp, corners)
            zero_a = (a.lo <= 0) & (a.hi >= 0)
            zero_b = (b.lo <= 0) & (b.hi >= 0)
            unknown = _or(xp, unknown, (zero_a & has_inf_b) | (zero_b & has_inf_a))
        elif op in ("/", "//", "%"):
            zero_b = (b.lo <= 0) & (b.hi >= 0)
            blo = xp.where(zero_b, 1.0, b.lo)
            bhi = xp.where(zero_b, 1.0, b.hi)
            if op == "%":
                # a - floor(a / b) * b lies in [0, b] (b > 0) or [b, 0] (b < 0), up to rounding
                # errors of the size of a's last bits: widen by those.
                positive = b.lo > 0
                slack = xp.maximum(xp.abs(a.lo), xp.abs(a.hi)) * REAL_EPS + REAL_TINY
                lo = xp.where(positive, 0.0, blo) - slack
                hi = xp.where(positive, bhi, 0.0) + slack
                return Interval(lo, hi, _or(xp, unknown, zero_b | has_inf_a | has_inf_b), False)
            corners = [a.lo / blo, a.lo / bhi, a.hi / blo, a.hi / bhi]
            lo, hi = _min_all(xp, corners), _max_all(xp, corners)
            unknown = _or(xp, unknown, zero_b | (has_inf_a & has_inf_b))
            if op == "//":
                r = self._real_result(lo, hi, _or(xp, unknown, has_inf_a | has_inf_b))
                return Interval(xp.floor(r.lo), xp.floor(r.hi), r.unknown, False)
        else:
            raise ScoreModError(f"cannot analyse operator '{op}'")
        return self._real_result(lo, hi, unknown)

    def _power(self, a: Interval, b: Interval, node: Binary) -> Interval:
        xp = self.xp
        exponent = node.rhs
        if isinstance(exponent, (IntLit, RealLit)) and float(exponent.value).is_integer() and exponent.value >= 0:
            n = int(exponent.value)
            a = self._real(a)
            if n == 0:
                one = self._float(1.0)
                return Interval(one, one, a.unknown, False)
            if n % 2:
                lo, hi = a.lo ** n, a.hi ** n
            else:
                m = self._abs(a)
                lo, hi = m.lo ** n, m.hi ** n
            return self._real_result(lo, hi, a.unknown)
        a, b = self._real(a), self._real(b)
        # x ** y is monotone in each argument where x > 0 (or x >= 0 and y > 0): corners.
        ok = (a.lo > 0) | ((a.lo >= 0) & (b.lo > 0))
        base_lo = xp.where(ok, a.lo, 1.0)
        base_hi = xp.where(ok, a.hi, 1.0)
        corners = [xp.power(base_lo, b.lo), xp.power(base_lo, b.hi), xp.power(base_hi, b.lo),
                   xp.power(base_hi, b.hi)]
        r = self._real_result(_min_all(xp, corners), _max_all(xp, corners), _or(xp, a.unknown, b.unknown))
        lo = xp.where(ok, r.lo, -np.inf)
        hi = xp.where(ok, r.hi, np.inf)
        return Interval(lo, hi, _or(xp, r.unknown, ~ok), False)

    def _abs(self, a: Interval) -> Interval:
        xp = self.xp
        lo = xp.where(a.lo >= 0, a.lo, xp.where(a.hi <= 0, -a.hi, 0))
        hi = xp.maximum(xp.abs(a.lo), xp.abs(a.hi))
        if a.is_int:
            f = self._f
            return self._int_result(lo, hi, a.unknown,
                                    lambda: (f(lo), xp.maximum(xp.abs(f(a.lo)), xp.abs(f(a.hi)))))
        return Interval(lo, hi, a.unknown, False)

    def _minmax(self, fn: str, a: Interval, b: Interval) -> Interval:
        xp = self.xp
        if not (a.is_int and b.is_int):
            a, b = self._real(a), self._real(b)
        pick = xp.minimum if fn == "min" else xp.maximum
        return Interval(pick(a.lo, b.lo), pick(a.hi, b.hi), _or(xp, a.unknown, b.unknown), a.is_int)

    def _call(self, node: Call, args: list):
        xp = self.xp
        fn = node.fn
        if fn == "where":
            c, a, b = args
            if isinstance(a, Truth):
                return Truth(_or(xp, _and(xp, c.may_true, a.may_true), _and(xp, c.may_false, b.may_true)),
                             _or(xp, _and(xp, c.may_true, a.may_false), _and(xp, c.may_false, b.may_false)))
            if not (a.is_int and b.is_int):
                a, b = self._real(a), self._real(b)
            both = _and(xp, c.may_true, c.may_false)
            lo = _select(xp, both, xp.minimum(a.lo, b.lo), _select(xp, c.may_true, a.lo, b.lo))
            hi = _select(xp, both, xp.maximum(a.hi, b.hi), _select(xp, c.may_true, a.hi, b.hi))
            unknown = _or(xp, _and(xp, c.may_true, a.unknown), _and(xp, c.may_false, b.unknown))
            return Interval(lo, hi, unknown, a.is_int)
        if fn in ("min", "max"):
            out = args[0]
            for other in args[1:]:
                out = self._minmax(fn, out, other)
            return out
        if fn == "clip":
            x, lo, hi = args
            return self._minmax("min", self._minmax("max", x, lo), hi)
        (a,) = args
        if fn == "abs":
            return self._abs(a)
        if fn == "sign":
            return Interval(xp.sign(a.lo), xp.sign(a.hi), a.unknown, a.is_int)
        if fn in ("floor", "ceil"):
            if a.is_int:
                return a
            rnd = xp.floor if fn == "floor" else xp.ceil
            lo, hi = rnd(a.lo), rnd(a.hi)
            bad = ~(xp.isfinite(lo) & xp.isfinite(hi)) | (lo < -INT32_LIMIT) | (hi > INT32_LIMIT)
            lo = xp.where(bad, 0, lo).astype(self.int_dtype)
            hi = xp.where(bad, 0, hi).astype(self.int_dtype)
            return Interval(lo, hi, _or(xp, a.unknown, bad), True)
        a = self._real(a)
        unknown = a.unknown
        lo, hi = a.lo, a.hi
        if fn in ("sin", "cos"):
            # Not monotone: bounded by [-1, 1] wherever the argument is finite (NaN for an
            # infinite one). _real_result widens the bounds like every real result, which
            # also covers float32 approximations that overshoot 1 by a few ulps.
            one = self._float(1.0)
            nan = xp.logical_not(xp.isfinite(lo) & xp.isfinite(hi))
            return self._real_result(-one, one, _or(xp, unknown, nan))
        if fn in ("log", "log2", "sqrt"):
            unknown = _or(xp, unknown, lo < 0)  # NaN below the domain
            lo, hi = xp.maximum(lo, 0.0), xp.maximum(hi, 0.0)
        monotone = {
            "exp": xp.exp, "exp2": xp.exp2, "log": xp.log, "log2": xp.log2, "sqrt": xp.sqrt,
            "tanh": xp.tanh, "sigmoid": lambda x: 1.0 / (1.0 + xp.exp(-x)),
        }
        if fn not in monotone:
            raise ScoreModError(f"cannot analyse function '{fn}'")
        with np.errstate(over="ignore"):
            return self._real_result(monotone[fn](lo), monotone[fn](hi), unknown)

    # -- comparisons --
    def _compare(self, node: Binary, a: Interval, b: Interval) -> Truth:
        xp = self.xp
        op = node.op
        if not (a.is_int and b.is_int):
            a, b = self._real(a), self._real(b)
        if op == "<":
            never, always = a.lo >= b.hi, a.hi < b.lo
        elif op == "<=":
            never, always = a.lo > b.hi, a.hi <= b.lo
        elif op == ">":
            never, always = a.hi <= b.lo, a.lo > b.hi
        elif op == ">=":
            never, always = a.hi < b.lo, a.lo >= b.hi
        else:
            differ = (a.hi < b.lo) | (b.hi < a.lo)
            differ = self._refine_differ(node, a, b, differ)
            same = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
            never, always = (differ, same) if op == "==" else (same, differ)
        unknown = _or(xp, a.unknown, b.unknown)
        return Truth(_or(xp, xp.logical_not(never), unknown), _or(xp, xp.logical_not(always), unknown))

    def _refine_differ(self, node: Binary, a: Interval, b: Interval, differ):
        """``qids[b, q] == kvids[b, kv]``: also differ where no value present in both tensors
        lies in both blocks' ranges. Sound for any ids; exact for sorted ids."""
        ra = self.read_rows.get(id(node.lhs))
        rb = self.read_rows.get(id(node.rhs))
        if ra is None or rb is None or node.lhs.name == node.rhs.name or ra[0] == rb[0]:
            return differ
        xp = self.xp
        (_, rows_a), (_, rows_b) = ra, rb
        if rows_a.dtype != rows_b.dtype:
            return differ
        n_rows = max(rows_a.shape[0], rows_b.shape[0])
        rows_a = xp.broadcast_to(rows_a, (n_rows, rows_a.shape[1]))
        rows_b = xp.sort(xp.broadcast_to(rows_b, (n_rows, rows_b.shape[1])), axis=-1)
        idx = _batched_searchsorted(xp, rows_b, rows_a, "left")
        found = xp.take_along_axis(rows_b, xp.clip(idx, 0, rows_b.shape[1] - 1), axis=-1)
        present = found == rows_a
        if np.issubdtype(rows_a.dtype, np.integer):
            big = np.iinfo(rows_a.dtype).max
        else:
            big = np.inf
        common = xp.sort(xp.where(present, rows_a, xp.asarray(big, dtype=rows_a.dtype)), axis=-1)
        n_common = xp.sum(present, axis=-1).reshape(n_rows, 1)

        lo = xp.maximum(a.lo, b.lo)
        hi = xp.minimum(a.hi, b.hi)
        shape = xp.broadcast_shapes(lo.shape, hi.shape, (n_rows, 1, 1, 1))
        batch = shape[0]
        if n_rows != batch:
            common = xp.broadcast_to(common, (batch, common.shape[1]))
            n_common = xp.broadcast_to(n_common, (batch, 1))
        lo = xp.broadcast_to(lo, shape).reshape(batch, -1)
        hi = xp.broadcast_to(hi, shape).reshape(batch, -1)
        upto_hi = xp.minimum(_batched_searchsorted(xp, common, hi, "right"), n_common)
        below_lo = xp.minimum(_batched_searchsorted(xp, common, lo, "left"), n_common)
        none_common = (upto_hi - below_lo <= 0).reshape(shape)
        return differ | none_common


def _min_all(xp, xs):
    out = xs[0]
    for x in xs[1:]:
        out = xp.minimum(out, x)
    return out


def _max_all(xp, xs):
    out = xs[0]
    for x in xs[1:]:
        out = xp.maximum(out, x)
    return out


# ---- entry points -------------------------------------------------------------------------

def mask_truth(mask: Node, grid: BlockGrid, tensors: Mapping[str, Any] | None = None, xp=np) -> Truth:
    """``Truth`` of the bool expression ``mask`` on every rectangle of ``grid``.

    tensors: name -> array (numpy, jax or traced), one for every tensor ``mask`` reads (the
    entry points, ``build_plan``, ``explain`` and the runtime, check that first with
    ``compiler.tensors.check_missing_tensors``).
    Returns arrays broadcasting to ``grid.shape`` ``[B, H, nq, nk]`` (or Python bools).
    """
    out = _Analyzer(grid, tensors or {}, xp).run(mask)
    if not isinstance(out, Truth):
        raise ScoreModError(f"expected a mask (a bool expression), got a number: {mask}")
    return out


def value_interval(expr: Node, grid: BlockGrid, tensors: Mapping[str, Any] | None = None, xp=np) -> Interval:
    """``Interval`` of the numeric expression ``expr`` on every rectangle of ``grid``."""
    out = _Analyzer(grid, tensors or {}, xp).run(expr)
    if not isinstance(out, Interval):
        raise ScoreModError(f"expected a number, got a mask: {expr}")
    return out


@lru_cache(maxsize=INT_RANGE_CACHE)
def int_range(expr: Node) -> tuple[int, int] | None:
    """Bounds ``(lo, hi)`` of the int expression ``expr`` over every position a call can have
    (``_ANY_POSITION``: what the compiler knows before shapes are). None when ``expr`` may
    leave int32 there (the kernels' int32 would wrap), is no int, or reads a tensor or ``score``."""
    if any(isinstance(n, Tensor) for n in walk(expr)):
        return None
    try:
        iv = _Analyzer(None, {}, np, positions=_ANY_POSITION).run(expr)
    except ScoreModError:
        return None
    if not isinstance(iv, Interval) or not iv.is_int or np.any(iv.unknown):
        return None
    return int(iv.lo), int(iv.hi)


def batch_head_dependence(mask: Node, tensor_shapes: Mapping[str, tuple[int, ...]], *,
                          q_per_batch: bool = False, kv_per_batch: bool = False) -> tuple[bool, bool]:
    """Whether the analysis of ``mask`` varies with the batch and with the head.

    Mirrors what the analysis evaluates: ``b``/``h`` outside tensor indices, tensor axes
    indexed exactly by ``b``/``h`` (size > 1), and ``q``/``kv`` (outside indices, or as a
    position-aligned tensor axis of size > 1) when the offsets are per-batch arrays.
    Returns (depends_on_batch, depends_on_head): plans then have B' = B / H' = N, else 1.
    """
    dep_b = dep_h = False
    stack = [mask]
    while stack:
        node = stack.pop()
        if isinstance(node, Var):
            dep_b |= node.name == "b" or (node.name == "q" and q_per_batch) or (node.name == "kv" and kv_per_batch)
            dep_h |= node.name == "h"
        elif isinstance(node, Tensor):
            shape = tuple(tensor_shapes.get(node.name, ()))
            rank = len(shape)
            for role, size in zip(axis_roles(used_indices(node.indices, rank)), shape):
                if size == 1:
                    continue
                dep_b |= role == "b" or (role == "q" and q_per_batch) or (role == "kv" and kv_per_batch)
                dep_h |= role == "h"
        else:
            stack.extend(node.children())
    return dep_b, dep_h


def classify_blocks(mask: Node, grid: BlockGrid, tensors: Mapping[str, Any] | None = None, xp=np, *,
                    batch_dim: int | None = None, head_dim: int | None = None):
    """EMPTY / PARTIAL / FULL of every rectangle: int8 ``[B', H', nq, nk]``.

    ``B'``/``H'`` default to what ``batch_head_dependence`` says (B or 1, N or 1). With
    NumPy, large grids are classified a slice of q-blocks at a time (bounded memory).
    """
    tensors = dict(tensors or {})
    if batch_dim is None or head_dim is None:
        dep_b, dep_h = batch_head_dependence(mask, {k: np.shape(v) for k, v in tensors.items()},
                                             q_per_batch=grid.q.per_batch, kv_per_batch=grid.kv.per_batch)
        batch_dim = grid.batch if dep_b else 1
        head_dim = grid.heads if dep_h else 1
    nq, nk = grid.q.num_blocks, grid.kv.num_blocks
    shape = (batch_dim, head_dim, nq, nk)
    if xp is np and batch_dim * head_dim * nq * nk > NUMPY_CHUNK_CELLS and nq > 1:
        out = np.empty(shape, np.int8)
        step = max(1, NUMPY_CHUNK_CELLS // (batch_dim * head_dim * nk))
        off = np.asarray(grid.q.offset)
        for first in range(0, nq, step):
            rows = first * grid.q.block
            sub = BlockGrid(grid.batch, grid.heads,
                            PositionBlocks(min(grid.q.length - rows, step * grid.q.block), grid.q.block, off + rows),
                            grid.kv)
            out[:, :, first:first + step] = _classes(mask, sub, tensors, np, (batch_dim, head_dim))
        return out
    return _classes(mask, grid, tensors, xp, (batch_dim, head_dim))


def _classes(mask, grid, tensors, xp, bh):
    truth = mask_truth(mask, grid, tensors, xp)
    shape = bh + (grid.q.num_blocks, grid.kv.num_blocks)
    mt, mf = truth.may_true, truth.may_false
    if isinstance(mt, bool) and isinstance(mf, bool):
        value = EMPTY if not mt else (FULL if not mf else PARTIAL)
        return xp.full(shape, value, dtype=xp.int8)
    classes = xp.where(xp.logical_not(mt), EMPTY, xp.where(xp.logical_not(mf), FULL, PARTIAL)).astype(xp.int8)
    return xp.broadcast_to(classes, shape)
