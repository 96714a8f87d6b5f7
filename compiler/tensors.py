"""Tensor parameters: ``check_tensors`` (missing, extra, ill-shaped tensors ->
``ScoreModTensorError``) and ``check_missing_tensors``, the one check for a missing tensor
(and for a float tensor the source reads as a mask by itself, ``check_mask_read_dtypes``).

How a read's indices map onto the tensor's axes (right alignment, axis roles) is
``compiler/axes.py``. The runtime and ``explain`` call ``check_tensors`` before anything
runs; ``build_plan`` and the ``Mod.score_mod``/``mask_mod`` closures call
``check_missing_tensors``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from scoremod.errors import ScoreModTensorError
from scoremod.dsl.ast import Binary, Call, IntLit, Node, Tensor, Unary, Var, walk
from scoremod.dsl.definitions import closest_name, global_definitions, prelude
from scoremod.dsl.typecheck import INT32_MAX, INT32_MIN
from scoremod.compiler.axes import axis_roles, used_indices
from scoremod.compiler.intervals import BlockGrid, PositionBlocks, value_interval

__all__ = ["tensor_reads", "check_tensors", "check_missing_tensors", "check_mask_read_dtypes", "expected_shape",
           "mask_of", "read_tensors", "concrete", "int32_range_error"]

_SHAPE_HINT = "leading axes may be left out; an axis indexed by b, h, q or kv may have size 1 (broadcast)"


def tensor_reads(node: Node) -> dict[str, list[Tensor]]:
    """Every read of every tensor in ``node``, by name (in order of first use)."""
    reads: dict[str, list[Tensor]] = {}
    for n in walk(node):
        if isinstance(n, Tensor):
            reads.setdefault(n.name, []).append(n)
    return reads


def mask_of(mod_or_canonical) -> Node:
    """The mask IR of a ``Mod``, a ``Canonical`` or a bare mask node."""
    canonical = getattr(mod_or_canonical, "canonical", mod_or_canonical)
    return getattr(canonical, "mask", canonical)


def _parts(mod_or_canonical) -> list[Node]:
    canonical = getattr(mod_or_canonical, "canonical", mod_or_canonical)
    if hasattr(canonical, "mask"):
        return [p for p in (canonical.mask, canonical.transform, canonical.bias) if p is not None]
    return [canonical]


def _reads_of(mod_or_canonical) -> dict[str, list[Tensor]]:
    """Every tensor read of the mask, transform and bias, by name (in order of first use)."""
    reads: dict[str, list[Tensor]] = {}
    for part in _parts(mod_or_canonical):
        for name, rs in tensor_reads(part).items():
            reads.setdefault(name, []).extend(rs)
    return reads


def _offset_end(offset, length: int) -> int | None:
    """Largest absolute position + 1 read along an axis; None when the offset is traced."""
    try:
        off = np.asarray(offset)
    except Exception:  # a jax tracer: not known before running
        return None
    if off.dtype == object:
        return None
    return int(off.max()) + length if off.size else length


def _shape_sizes(batch: int, heads: int, q_len: int, kv_len: int, q_offset, kv_offset) -> dict:
    """The sizes messages show expected shapes with: B, N and the positions read along q and kv
    (offset included; T and S when the offsets are traced)."""
    q_end = _offset_end(q_offset, q_len)
    kv_end = _offset_end(kv_offset, kv_len)
    return dict(batch=batch, heads=heads, q_end=q_end if q_end is not None else q_len,
                kv_end=kv_end if kv_end is not None else kv_len)


def expected_shape(read: Tensor, *, batch: int, heads: int, q_end: int | None, kv_end: int | None,
                   sizes: Mapping[int, int] | None = None) -> str:
    """Human-readable expected shape of the tensor of ``read``, e.g. ``[2, >=8192]``."""
    if not read.indices:
        return "a scalar (a Python number or a 0-d array)"
    dims = []
    for axis, role in enumerate(axis_roles(read.indices)):
        if role == "b":
            dims.append(str(batch))
        elif role == "h":
            dims.append(str(heads))
        elif role == "q":
            dims.append(f">={q_end}" if q_end is not None else "T")
        elif role == "kv":
            dims.append(f">={kv_end}" if kv_end is not None else "S")
        elif isinstance(role, int):
            dims.append(f">{role}")
        else:
            known = (sizes or {}).get(axis)
            dims.append(str(known) if known is not None else "*")
    return f"[{', '.join(dims)}] ({_SHAPE_HINT})"


def _shape_and_dtype(name: str, value) -> tuple[tuple[int, ...], np.dtype]:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        if isinstance(value, (bool, int, float, np.number)):
            arr = np.asarray(value)
            return arr.shape, arr.dtype
        try:
            arr = np.asarray(value)
        except Exception:
            arr = None
        if arr is None or arr.dtype == object:
            raise ScoreModTensorError(
                f"tensor '{name}' must be an array or a number, got {type(value).__name__}")
        return arr.shape, arr.dtype
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _index_range(index: Node, *, batch: int, heads: int, q_len: int, kv_len: int, q_offset, kv_offset):
    """Exact [lo, hi] of an index over every position, or None when not exact or not known.

    Exact when the index is built from position variables each used at most once, integer
    literals, + - * // % unary minus, abs, min, max, clip (interval arithmetic then attains
    both ends); otherwise None (the kernels clip such indices).
    """
    counts: dict[str, int] = {}
    for n in walk(index):
        if isinstance(n, Var):
            if n.name == "score":
                return None
            counts[n.name] = counts.get(n.name, 0) + 1
        elif isinstance(n, Binary):
            if n.op not in ("+", "-", "*", "//", "%"):
                return None
        elif isinstance(n, Unary):
            if n.op != "-":
                return None
        elif isinstance(n, Call):
            if n.fn not in ("abs", "min", "max", "clip"):
                return None
        elif not isinstance(n, IntLit):
            return None
    if any(c > 1 for c in counts.values()):
        return None
    if _offset_end(q_offset, q_len) is None or _offset_end(kv_offset, kv_len) is None:
        return None
    grid = BlockGrid(batch=batch, heads=heads,
                     q=PositionBlocks(q_len, q_len, np.asarray(q_offset)),
                     kv=PositionBlocks(kv_len, kv_len, np.asarray(kv_offset)))
    iv = value_interval(index, grid, {}, np)
    if np.any(iv.unknown):
        return None
    return int(np.min(iv.lo)), int(np.max(iv.hi))


def expected_shape_of_reads(reads: list[Tensor], *, batch: int, heads: int, q_end: int | None,
                            kv_end: int | None) -> str:
    """Expected shape of a tensor read several ways (``ids[b, q]`` and ``ids[b, kv]``): each
    axis (aligned right) must satisfy every read, e.g. ``[2, >=max(T, S)]``."""
    if len(reads) == 1:
        return expected_shape(reads[0], batch=batch, heads=heads, q_end=q_end, kv_end=kv_end)
    rank = min(len(r.indices) for r in reads)
    if rank == 0:
        return expected_shape(reads[0], batch=batch, heads=heads, q_end=q_end, kv_end=kv_end)
    dims = []
    for axis in range(rank):
        roles = {axis_roles(used_indices(r.indices, rank))[axis] for r in reads}
        ends = [e for role, e in (("q", q_end), ("kv", kv_end)) if role in roles]
        if ends and all(e is not None for e in ends):
            dims.append(f">={max(ends)}")
        elif ends:
            dims.append("T" if roles == {"q"} else "S" if roles == {"kv"} else "max(T, S)")
        elif roles == {"b"}:
            dims.append(str(batch))
        elif roles == {"h"}:
            dims.append(str(heads))
        else:
            dims.append("*")
    return f"[{', '.join(dims)}] ({_SHAPE_HINT})"


def read_tensors(mod_or_canonical, tensors: Mapping[str, Any]) -> dict:
    """``tensors`` restricted to the ones the canonical form reads (after ``check_tensors``)."""
    canonical = getattr(mod_or_canonical, "canonical", mod_or_canonical)
    names = canonical.tensors if hasattr(canonical, "tensors") else tuple(tensor_reads(canonical))
    return {name: value for name, value in tensors.items() if name in names}


def check_missing_tensors(mod_or_canonical, tensors: Mapping[str, Any], *, batch: int | None = None,
                          heads: int | None = None, q_len: int | None = None, kv_len: int | None = None,
                          q_offset=0, kv_offset=0) -> None:
    """Raise ``ScoreModTensorError`` for the first tensor ``mod_or_canonical`` reads that is not
    in ``tensors``: the one check for a missing tensor, called by every entry point. Then
    ``check_mask_read_dtypes``: a float tensor that a ``Mod``'s source reads as a mask.

    Args:
      mod_or_canonical: a ``Mod``, a ``Canonical`` or a mask node; every tensor its mask,
        transform and bias read must be in ``tensors`` (only the names of ``tensors`` matter).
      batch, heads, q_len, kv_len, q_offset, kv_offset: the sizes, as ``check_tensors`` takes
        them (all or none). With them the message shows the read and the expected shape of the
        tensor; without them (the ``Mod.score_mod``/``mask_mod`` closures, which see no sizes)
        it names the mod.
    """
    for name, reads in _reads_of(mod_or_canonical).items():
        if name in tensors:
            continue
        if batch is None:
            raise ScoreModTensorError(f"missing tensor parameter '{name}' for {mod_or_canonical}",
                                      hint=f"pass it by keyword: {name}=...")
        expected = expected_shape_of_reads(
            reads, **_shape_sizes(batch, heads, q_len, kv_len, q_offset, kv_offset))
        raise ScoreModTensorError(f"missing tensor '{name}': the mod reads {reads[0]}; expected shape {expected}",
                                  hint=_missing_tensor_hint(name, reads, tensors))
    check_mask_read_dtypes(mod_or_canonical, tensors)


def check_mask_read_dtypes(mod, tensors: Mapping[str, Any]) -> None:
    """Raise ``ScoreModTensorError`` when a tensor the source reads as a mask by itself
    (``causal & m[b, q, kv]`` means ``m[b, q, kv] != 0``: ``Mod.mask_reads``) holds floats.

    A mask tensor is bool or int (0/1). A float one is refused rather than compared with
    0: ``causal & bias(t)`` with a float table ``t`` reads ``t`` as a mask, which is not
    what a bias under a mask means (that is ``causal + bias(t)``). Only a ``Mod`` knows
    which reads those are; a ``Canonical`` or a mask node is not checked.
    """
    names = getattr(mod, "mask_reads", ())
    if not names:
        return
    reads = _reads_of(mod)
    for name in names:
        if name not in tensors or name not in reads:   # not passed, or simplified away
            continue
        _, dtype = _shape_and_dtype(name, tensors[name])
        if not _is_float(dtype):
            continue
        read, span = _mask_read(mod, name)
        raise ScoreModTensorError(
            f"tensor '{name}' has dtype {dtype}, but the mod reads it as a mask (a tensor read under '&', '|', "
            f"'~' or as where's condition is a mask: {read} means {read} != 0); a mask tensor must be bool or int",
            source=mod.source or None, span=span,
            hint=f"to add {name} as a bias write '+' (e.g. causal + bias({name})); to compare a float tensor "
                 f"write it out, e.g. {read} != 0 or {read} > 0.5")


def _mask_read(mod, name: str) -> tuple[Tensor | str, tuple[int, int] | None]:
    """A read of ``name`` that the source uses as a mask, and its span in the source (where
    ``read_masks`` wrote ``read != 0``: a comparison with the read's own span)."""
    expr = getattr(mod, "expr", None)
    for n in walk(expr) if expr is not None else ():
        if (isinstance(n, Binary) and n.op == "!=" and isinstance(n.lhs, Tensor) and n.lhs.name == name
                and isinstance(n.rhs, IntLit) and n.rhs.value == 0 and n.span == n.lhs.span):
            return n.lhs, n.span
    return _reads_of(mod)[name][0], None


def _missing_tensor_hint(name: str, reads: list[Tensor], tensors: Mapping[str, Any]) -> str:
    """A likely cause: a misspelled definition (a bare name that is no definition is a tensor
    parameter: ``causl``), or a tensor passed under a misspelled keyword (``id=`` for ``ids``)."""
    passed = closest_name(name, list(tensors))
    if passed:
        return f"you passed '{passed}': did you mean {name}={passed}?"
    if all(not r.indices for r in reads):
        definitions = set(prelude().names()) | set(global_definitions().names())
        guess = closest_name(name, definitions)
        if guess:
            return (f"did you mean '{guess}'? A name that is not a definition is a tensor parameter "
                    f"(dslc list shows the definitions)")
    return f"pass it by keyword, e.g. {name}=array"


# What users of jax.nn.dot_product_attention or FlexAttention pass, and the mod that says it.
_KEYWORD_HINTS = {
    "is_causal": 'attention(..., mod="causal") instead of is_causal=True',
    "causal": 'attention(..., mod="causal") instead of causal=True',
    "mask": 'a tensor read in the mod, e.g. mod="m[b, h, q, kv] != 0", m=mask',
    "bias": 'mod="bias(t)", t=bias (t: [B, N, T, S], broadcastable)',
    "segment_ids": 'mod="causal & doc(ids)", ids=segment_ids',
    "local_window_size": 'mod="causal & window(w)" for a sliding window of w keys',
}


def int32_range_error(name: str, values) -> str | None:
    """Why the integers ``values`` do not fit in int32 (what kernels compute in), or None."""
    values = np.asarray(values)
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        return None
    lo, hi = int(values.min()), int(values.max())
    if lo < INT32_MIN or hi > INT32_MAX:
        bad = lo if lo < INT32_MIN else hi
        return (f"{name} holds {bad}, outside int32 [{INT32_MIN}, {INT32_MAX}]: positions, ids and "
                "integer tensors are int32 in every implementation")
    return None


INT32_HINT = "ids only need to be distinct per document: renumber them, e.g. with np.unique(ids, return_inverse=True)"


def concrete(x):
    """``x`` as a NumPy array, or None when it is traced (inside jit/vmap): the values a
    check can look at. jax is imported only for a value that is no NumPy array (a jax
    value: jax is loaded already)."""
    if isinstance(x, np.ndarray):
        return x
    import jax
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _is_float(dtype) -> bool:
    """Floating point, bfloat16 included (NumPy gives ml_dtypes' bfloat16 the kind "V")."""
    if dtype.kind != "V":
        return dtype.kind == "f"
    import jax.numpy as jnp   # only here: `dslc explain` of a mod without tensors never loads jax
    return bool(jnp.issubdtype(dtype, jnp.floating))


def check_tensors(mod_or_canonical, tensors: Mapping[str, Any], batch: int, heads: int, q_len: int,
                  kv_len: int, *, q_offset=0, kv_offset=0) -> None:
    """Check the tensor parameters of a mod before running it.

    Args:
      mod_or_canonical: a ``Mod``, a ``Canonical`` or a mask node; every tensor its mask,
        transform and bias read must be in ``tensors`` and nothing else.
      tensors: name -> array (numpy, jax, also traced) or Python number.
      batch, heads, q_len, kv_len: B, N (query heads), T, S.
      q_offset, kv_offset: int or int[B]; positions read are ``offset + row`` (traced offsets:
        lengths are then checked against T / S only).

    Raises ``ScoreModTensorError`` naming the parameter and the expected shape when a tensor
    is missing, extra, of a non-numeric dtype, of too high a rank, of a wrong size along an
    axis (B, N, 1), too short for the positions read, or read at a literal / exactly known
    index range outside the axis.
    """
    check_missing_tensors(mod_or_canonical, tensors, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                          q_offset=q_offset, kv_offset=kv_offset)
    reads = _reads_of(mod_or_canonical)
    fmt = _shape_sizes(batch, heads, q_len, kv_len, q_offset, kv_offset)
    # Names the source wrote but simplification removed may still be passed (and are ignored).
    allowed = set(reads) | set(getattr(mod_or_canonical, "source_tensors", ()))
    extra = [n for n in tensors if n not in allowed]
    if extra:
        guess = closest_name(extra[0], list(reads))
        known = ", ".join(f"'{n}'" for n in reads) if reads else "no tensors"
        hint = (f"did you mean '{guess}'?" if guess else
                f"use {_KEYWORD_HINTS[extra[0]]}" if extra[0] in _KEYWORD_HINTS else "remove it, or use it in the mod")
        raise ScoreModTensorError(f"unexpected tensor '{extra[0]}': the mod reads {known}", hint=hint)

    for name, rs in reads.items():
        shape, dtype = _shape_and_dtype(name, tensors[name])
        if dtype.kind not in "biu" and not _is_float(dtype):
            raise ScoreModTensorError(
                f"tensor '{name}' has dtype {dtype}; expected int, float or bool values, shape "
                f"{expected_shape_of_reads(rs, **fmt)}")
        if dtype.kind in "iu":   # kernels and plans compute in int32 (a wider value would wrap)
            value = tensors[name]
            values = np.asarray(value) if isinstance(value, (int, np.integer, np.ndarray)) else concrete(value)
            why = int32_range_error(f"tensor parameter '{name}'", values) if values is not None else None
            if why:
                raise ScoreModTensorError(why, hint=INT32_HINT)
        if 0 in shape:
            raise ScoreModTensorError(
                f"tensor '{name}' is empty (shape {list(shape)}); expected shape {expected_shape_of_reads(rs, **fmt)}")
        for read in rs:
            _check_read(name, read, shape, **fmt, q_len=q_len, kv_len=kv_len,
                        q_offset=q_offset, kv_offset=kv_offset, all_reads=rs)


def _check_read(name, read: Tensor, shape, *, batch, heads, q_end, kv_end, q_len, kv_len, q_offset, kv_offset,
                all_reads):
    rank = len(shape)
    expected = expected_shape_of_reads(all_reads, batch=batch, heads=heads, q_end=q_end, kv_end=kv_end)
    if rank > len(read.indices):
        raise ScoreModTensorError(
            f"tensor '{name}' has rank {rank} (shape {list(shape)}) but is read as {read} with "
            f"{len(read.indices)} ind{'ex' if len(read.indices) == 1 else 'ices'}; expected shape {expected}")
    used = used_indices(read.indices, rank)
    roles = axis_roles(used)
    for axis, (role, index, size) in enumerate(zip(roles, used, shape)):
        problem = None
        if role == "b" and size not in (1, batch):
            problem = f"axis {axis} (indexed by b) has size {size}, expected {batch} (the batch) or 1"
        elif role == "h" and size not in (1, heads):
            problem = f"axis {axis} (indexed by h) has size {size}, expected {heads} (the query heads) or 1"
        elif role == "q" and size != 1 and size < q_end:
            problem = (f"axis {axis} (indexed by q) has size {size}, too short for query positions up to "
                       f"{q_end - 1}")
        elif role == "kv" and size != 1 and size < kv_end:
            problem = (f"axis {axis} (indexed by kv) has size {size}, too short for key positions up to "
                       f"{kv_end - 1}")
        elif isinstance(role, int) and not 0 <= role < size:
            problem = f"index {role} is out of range for axis {axis} of size {size}"
        elif role is None:
            rng = _index_range(index, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                               q_offset=q_offset, kv_offset=kv_offset)
            if rng is not None and rng[0] < 0:
                raise ScoreModTensorError(
                    f"tensor '{name}' of shape {list(shape)} does not fit {read}: index {index} ranges over "
                    f"[{rng[0]}, {rng[1]}] at the call's positions (whatever the mask allows) and goes below 0, "
                    f"which no size of axis {axis} holds; bound it, e.g. max({index}, 0) or "
                    f"clip({index}, 0, {size - 1})")
            if rng is not None and rng[1] >= size:
                expected = expected_shape(read, batch=batch, heads=heads, q_end=q_end, kv_end=kv_end,
                                          sizes={axis: rng[1] + 1})
                problem = (f"index {index} ranges over [{rng[0]}, {rng[1]}] but axis {axis} has size {size}")
        if problem:
            raise ScoreModTensorError(
                f"tensor '{name}' of shape {list(shape)} does not fit {read}: {problem}; expected shape {expected}")
