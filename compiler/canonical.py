"""The canonical form ``logit = where(M, T(score) + B, -inf)`` (docs/language.md, "1. Meaning").

``M`` is the conjunction of every top-level mask part, ``T`` the sum of the parts that
mention ``score`` (None: identity, ``logit = score + B``), ``B`` the sum of the other
real parts (None: zero). Parts are simplified, deduplicated and sorted, so equal
meanings written differently (``causal & window(8)`` / ``window(8) & causal``) compare
equal. Only ``M`` decides block sparsity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

from scoremod.dsl.ast import Binary, BoolLit, Call, IntLit, Node, RealLit, Tensor, Unary, mentions, tensor_names
from scoremod.dsl.printer import to_source
from scoremod.dsl.typecheck import BOOL, top_level_parts, type_of
from scoremod.compiler.rewrite import conjunction, simplify

__all__ = ["Canonical", "canonicalize", "conjuncts"]


@dataclass(frozen=True)
class Canonical:
    """``where(mask, transform(score) + bias, -inf)``; hashable, compared by value."""
    mask: Node                 # bool; BoolLit(True) when nothing is masked
    transform: Node | None     # real, mentions score; None = identity
    bias: Node | None          # real, free of score; None = 0

    @property
    def kind(self) -> str:
        if self.transform is not None:
            return "transform"
        if self.bias is not None:
            return "bias"
        return "mask"

    @property
    def tensors(self) -> tuple[str, ...]:
        names: dict[str, None] = {}
        for part in (self.mask, self.transform, self.bias):
            if part is not None:
                for n in tensor_names(part):
                    names.setdefault(n)
        return tuple(names)

    @property
    def has_mask(self) -> bool:
        return self.mask != BoolLit(True)

    def as_node(self) -> Node:
        """One expression with this meaning (what ``str()`` prints)."""
        transform = self.transform
        if transform == IntLit(0) and self.bias is not None:
            # T(score) = 0 (score only in the mask): 0 + B is B, and reads back with T = 0.
            transform = None
        value = _sum([t for t in (transform, self.bias) if t is not None])
        if value is None:
            return self.mask
        if not self.has_mask:
            return value
        if isinstance(value, Tensor):
            # Under '&' a tensor read would be a mask (read != 0): a read as the value is added.
            return Binary("+", self.mask, value)
        return Binary("&", self.mask, value)

    def __str__(self) -> str:
        return to_source(self.as_node())


def conjuncts(mask: Node) -> list[Node]:
    """The parts of a conjunction (``a & b & c`` -> [a, b, c])."""
    return [p for p in top_level_parts(mask)] if isinstance(mask, Binary) and mask.op in ("&", "+") else [mask]


def _sum(terms):
    return reduce(lambda a, b: Binary("+", a, b), terms) if terms else None


def _and(terms):
    return reduce(lambda a, b: Binary("&", a, b), terms) if terms else BoolLit(True)


def _as_mask(part: Node) -> tuple[Node, Node | None] | None:
    """``where(c, x, -inf)`` -> (c, x); ``-inf`` -> (false, None); else None."""
    if isinstance(part, Call) and part.fn == "where" and _is_minus_inf(part.args[2]):
        return part.args[0], part.args[1]
    if isinstance(part, Call) and part.fn == "where" and _is_minus_inf(part.args[1]):
        return Unary("~", part.args[0]), part.args[2]
    if _is_minus_inf(part):
        return BoolLit(False), None
    return None


def _is_minus_inf(node: Node) -> bool:
    if isinstance(node, RealLit) and node.value == -math.inf:
        return True
    return isinstance(node, Unary) and node.op == "-" and isinstance(node.operand, RealLit) and node.operand.value == math.inf


def canonicalize(expr: Node) -> Canonical:
    """Split a checked top-level expression into its canonical form."""
    masks: list[Node] = []
    transforms: list[Node] = []
    biases: list[Node] = []
    pending = list(top_level_parts(expr))
    is_real = any(type_of_part(p) != BOOL for p in pending)
    while pending:
        part = pending.pop(0)
        if type_of_part(part) == BOOL:
            masks.append(part)
            continue
        as_mask = _as_mask(simplify(part))
        if as_mask is not None:
            masks.append(as_mask[0])
            if as_mask[1] is not None:
                pending.extend(top_level_parts(as_mask[1]))
            continue
        (transforms if mentions(part, "score") else biases).append(part)

    mask_parts: list[Node] = []
    for m in masks:
        for c in conjuncts(simplify(m)):
            mask_parts.extend(conjuncts(c))
    mask = simplify(conjunction(_sorted_unique(mask_parts)))   # merged in one pass: long chains
    if BoolLit(False) in conjuncts(mask):
        mask = BoolLit(False)
    mask = _and(_sorted_unique(conjuncts(mask))) if mask != BoolLit(True) else mask

    transform = _simplified_sum(transforms)
    bias = _simplified_sum(biases)
    if bias is not None and isinstance(bias, (IntLit, RealLit)) and bias.value == 0:
        bias = None
    if transform is None and is_real and mentions(mask, "score"):
        # A real expression that mentions score only in a mask is still a transform
        # (docs/language.md, "1. Meaning": logit = E), so the score is not added: T(score) = 0.
        transform = IntLit(0)
    return Canonical(mask, transform, bias)


def type_of_part(part: Node) -> str:
    return type_of(part)


def _simplified_sum(terms: list[Node]) -> Node | None:
    if not terms:
        return None
    flat: list[Node] = []
    for t in terms:
        flat.extend(top_level_parts(simplify(t)))
    return simplify(_sum(sorted(flat, key=to_source)))


def _sorted_unique(parts: list[Node]) -> list[Node]:
    unique = list(dict.fromkeys(p for p in parts if p != BoolLit(True)))
    return sorted(unique, key=to_source)
