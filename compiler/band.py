"""The diagonal band of a mask: static bounds on ``d = q - kv`` over the pairs it allows.

    diagonal_band(mask) -> Band(lo, hi, exact)

Sound for every mask: wherever the mask is true, ``lo <= q - kv <= hi`` (``None``: no
bound on that side). ``exact`` says more: the mask is *equal* to ``lo <= q - kv <= hi``
(it depends on nothing but the diagonal), so the keys a query may attend are one
contiguous run. A mask that is never true has the empty band (``lo > hi``), exact.

    causal                  -> Band(0, None, exact)
    causal & window(4096)   -> Band(0, 4095, exact)
    window(3, 5)            -> Band(-5, 3, exact)
    causal & chunk(64)      -> Band(0, 63, not exact)
    causal & doc(ids)       -> Band(0, None, not exact)   (doc narrows it further)
    causal & (sink(4) | window(8))  -> Band(0, None, not exact)

What it is for: the paged kernel (``runtime/paged.py``) lists candidate pages from the
band without looking at every page of the context. With a finite ``hi`` only the last
``(hi - lo + T) / page_size`` pages of a sequence can hold allowed keys, whatever its
length; an exact band needs no per-page classification at all.

The rules (a structural walk; anything not listed is the unbounded, inexact band):
  * ``true`` / ``false``;
  * a comparison whose linear form is ``kv - q`` (``q >= kv``, ``kv <= q + 5``, ``q == kv``);
  * a comparison bounding ``abs(q - kv + c)`` (or ``abs(kv - q + c)``) from above
    (``window(w)``); a lower bound on it is not convex: unbounded, inexact;
  * a bound on ``kv // c - q // c`` (``chunk(c)``: ``|q - kv| < c``, inexact);
  * ``a & b``: the intersection (exact when both are);
  * ``a | b``: the hull (exact when both are and the two bands overlap or touch);
  * ``~a``: exact one-sided bands flip to the other side, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from scoremod.dsl.ast import Binary, BoolLit, Call, IntLit, Node, Unary, Var
from scoremod.compiler.rewrite import linear_bound, linear_form
from scoremod.compiler.tensors import mask_of

__all__ = ["Band", "diagonal_band"]


@dataclass(frozen=True)
class Band:
    """``lo <= q - kv <= hi`` wherever the mask is true (``None``: unbounded)."""
    lo: int | None
    hi: int | None
    exact: bool

    @property
    def empty(self) -> bool:
        return self.lo is not None and self.hi is not None and self.lo > self.hi


_ALL = Band(None, None, True)        # `true`: every diagonal, exactly
_UNKNOWN = Band(None, None, False)   # no bound known
_NONE = Band(1, 0, True)             # `false`


# Bands kept per mask (a Band is three numbers).
BAND_CACHE = 1024


@lru_cache(maxsize=BAND_CACHE)
def diagonal_band(mask) -> Band:
    """Bounds on ``q - kv`` implied by ``mask`` (see the module doc): a bool expression, or a
    ``Mod`` / ``Canonical`` (its mask)."""
    return _band(mask_of(mask))


def _band(mask: Node) -> Band:
    if isinstance(mask, BoolLit):
        return _ALL if mask.value else _NONE
    if isinstance(mask, Binary) and mask.op == "&":
        return _intersect(_band(mask.lhs), _band(mask.rhs))
    if isinstance(mask, Binary) and mask.op == "|":
        return _hull(_band(mask.lhs), _band(mask.rhs))
    if isinstance(mask, Unary) and mask.op == "~":
        return _complement(_band(mask.operand))
    return _comparison(mask)


def _intersect(a: Band, b: Band) -> Band:
    if a.empty or b.empty:
        return _NONE
    lo = b.lo if a.lo is None else a.lo if b.lo is None else max(a.lo, b.lo)
    hi = b.hi if a.hi is None else a.hi if b.hi is None else min(a.hi, b.hi)
    return _normal(Band(lo, hi, a.exact and b.exact))


def _hull(a: Band, b: Band) -> Band:
    if a.empty:
        return b
    if b.empty:
        return a
    lo = None if a.lo is None or b.lo is None else min(a.lo, b.lo)
    hi = None if a.hi is None or b.hi is None else max(a.hi, b.hi)
    # The union is the hull only when the bands overlap or touch.
    touching = not ((a.hi is not None and b.lo is not None and a.hi + 1 < b.lo) or
                    (b.hi is not None and a.lo is not None and b.hi + 1 < a.lo))
    return Band(lo, hi, a.exact and b.exact and touching)


def _complement(a: Band) -> Band:
    if not a.exact:
        return _UNKNOWN
    if a.empty:
        return _ALL
    if a.lo is None and a.hi is None:
        return _NONE
    if a.lo is None:
        return Band(a.hi + 1, None, True)
    if a.hi is None:
        return Band(None, a.lo - 1, True)
    return _UNKNOWN  # outside a two-sided band: two runs


def _normal(band: Band) -> Band:
    # A mask inside an empty band is never true, so it *is* the empty band.
    return _NONE if band.empty else band


def _diagonal_sign(form) -> int | None:
    """+1 when the linear form (pairs of atom and coefficient) is ``q - kv``, -1 for
    ``kv - q``, None otherwise."""
    coeffs = dict(form)
    if len(coeffs) != 2:
        return None
    q = next((c for a, c in coeffs.items() if isinstance(a, Var) and a.name == "q"), None)
    kv = next((c for a, c in coeffs.items() if isinstance(a, Var) and a.name == "kv"), None)
    if q is None or kv is None or q != -kv or abs(q) != 1:
        return None
    return q


def _chunk_quotients(form) -> tuple[int, int] | None:
    """``(c, +1)`` when the linear form is ``q // c - kv // c`` (c > 0), ``(c, -1)`` for
    ``kv // c - q // c``, None otherwise."""
    coeffs = dict(form)
    if len(coeffs) != 2:
        return None
    found = {}
    for atom, coeff in coeffs.items():
        if not (isinstance(atom, Binary) and atom.op == "//" and isinstance(atom.lhs, Var)
                and isinstance(atom.rhs, IntLit) and atom.rhs.value > 0 and atom.lhs.name in ("q", "kv")):
            return None
        found[atom.lhs.name] = (atom.rhs.value, coeff)
    if set(found) != {"q", "kv"} or found["q"][0] != found["kv"][0]:
        return None
    (c, cq), (_, ckv) = found["q"], found["kv"]
    if cq != -ckv or abs(cq) != 1:
        return None
    return c, cq


def _comparison(node: Node) -> Band:
    bound = linear_bound(node)
    if bound is None:
        return _UNKNOWN
    form, lo, hi = bound
    if lo is not None and hi is not None and lo > hi:
        return _NONE
    sign = _diagonal_sign(form)
    if sign is not None:
        # sign * d in [lo, hi]
        if sign > 0:
            return _normal(Band(lo, hi, True))
        return _normal(Band(None if hi is None else -hi, None if lo is None else -lo, True))
    chunk = _chunk_quotients(form)
    if chunk is not None:
        # sign * (q // c - kv // c) in [lo, hi], and q // c - kv // c = m  gives  |d - m c| < c.
        c, sign = chunk
        mlo, mhi = (lo, hi) if sign > 0 else (None if hi is None else -hi, None if lo is None else -lo)
        return Band(None if mlo is None else mlo * c - (c - 1), None if mhi is None else mhi * c + (c - 1), False)
    if len(form) == 1 and form[0][1] == 1:
        atom = form[0][0]
        if isinstance(atom, Call) and atom.fn == "abs" and len(atom.args) == 1:
            inner = linear_form(atom.args[0])
            if inner is not None:
                terms, c = inner
                s = _diagonal_sign(tuple(terms.items()))
                if s is not None:
                    if lo is not None and lo > 0:
                        return _UNKNOWN   # |x| >= lo: two runs
                    if hi is None:
                        return _ALL
                    if hi < 0:
                        return _NONE
                    # -hi <= s * d + c <= hi
                    a, b = -hi - c, hi - c
                    return Band(a, b, True) if s > 0 else Band(-b, -a, True)
    return _UNKNOWN
