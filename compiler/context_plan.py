"""Context parallelism, the compiler's half: which sequence chunks each device holds (a
``ContextLayout``) and which (q-chunk, kv-chunk) pairs may hold an allowed logit (a
``PairPlan``). The runtime (``runtime/context_parallel.py``) runs a ring over devices
from these and never re-derives them.

A sequence of length L is cut into C equal chunks; a layout gives each of P devices
C / P of them. ``contiguous``: device d holds chunk d (C = P). ``zigzag``: C = 2P and
device d holds chunks d and 2P - 1 - d, so under a causal mask every device gets one
early and one late chunk and the same work. ``balanced``: C = P x chunks_per_device
chunks dealt out from the pair plan's work per q-chunk (``balance_chunks``: largest
first to the least loaded device, then improving swaps), for any mask, documents
included; from tensor values the layout is computed on the device (a jax array of chunk
indices: new values never recompile).

The pair plan comes from the ordinary block plan (``compiler.plan.build_plan``) at a
block size that divides the chunks, summed per chunk pair: ``blocks[b, h, i, j]`` is the
number of non-empty blocks where q-chunk i meets kv-chunk j. Static masks give NumPy
(known at trace time: ring steps whose pairs are all empty are never run or sent);
masks that read tensors give a jax array computed from their values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from scoremod.errors import ScoreModShapeError
from scoremod.compiler.plan import EMPTY, MAX_GRID_CELLS, build_plan
from scoremod.compiler.tensors import concrete

__all__ = ["ContextLayout", "PairPlan", "contiguous_layout", "zigzag_layout", "layout_named", "pair_plan",
           "device_work", "RingSchedule", "ring_schedule", "balance_chunks", "balanced_layout", "shifts_needed"]

LAYOUTS = ("contiguous", "zigzag", "balanced")


def _chunk_index(value) -> int:
    """A chunk index as a Python int (an int or a NumPy integer; a bool or anything else is
    a TypeError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(value)
    return int(value)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class ContextLayout:
    """Which chunks of the sequence each device holds.

    Attributes:
      name: "contiguous", "zigzag", "balanced" (or a user's own name).
      chunks: ``chunks[d]`` lists the chunk indices device d holds, in the order they sit
        in its local shard; every chunk exactly once, the same count per device. A tuple
        of tuples (known when the program is traced), or an int32 array ``[P, C / P]``
        computed from tensor values (``balanced`` layouts of masks that read tensors;
        then the layout is a pytree leaf and may be traced). Checked when built: tuples
        and concrete arrays (NumPy, jax) must hold every chunk exactly once (else a
        ``ScoreModShapeError``); a traced array (a layout built inside ``jit``) cannot be
        looked at and is taken as it is: a wrong one gives wrong attention output.
      inputs_permuted: False: ``attention`` permutes q, k, v into this layout and the
        output back. True (``with_inputs_permuted()``): the caller's q, k, v are already
        in layout order (``x[:, layout.order(T)]``) and the output stays in it; tensors
        the mod reads stay in the original order (they are indexed by position).

    Example (a layout of one's own: 4 devices, 8 chunks)::

        >>> layout = ContextLayout("pairs", ((0, 4), (1, 5), (2, 6), (3, 7)))
        >>> layout.order(16).tolist()[:4]        # device 0 holds positions 0-1 and 8-9
        [0, 1, 8, 9]
        >>> scoremod.attention(q, k, v, mod="causal", mesh=mesh, context_axis="sp", context_layout=layout)
    """
    name: str
    chunks: Any
    inputs_permuted: bool = False

    def __post_init__(self):
        if not self.is_static:
            shape = getattr(self.chunks, "shape", ())
            if len(shape) != 2 or not jnp.issubdtype(self.chunks.dtype, jnp.integer):
                raise ScoreModShapeError(f"layout {self.name!r}: chunks must be tuples of chunk indices or an int "
                                         f"array [devices, chunks per device]; got {getattr(self.chunks, 'dtype', '')}"
                                         f"{list(shape)}")
            table = concrete(self.chunks)
            if table is not None:   # a traced table (computed inside jit) is taken as it comes
                self._check_permutation(table.tolist())
            return
        # Rows as tuples of Python ints (lists or NumPy rows would reach jit as unhashable
        # static arguments); anything else in them is refused here.
        try:
            rows = tuple(tuple(_chunk_index(i) for i in row) for row in self.chunks)
        except (TypeError, ValueError):
            raise ScoreModShapeError(f"layout {self.name!r}: chunks must be tuples of int chunk indices, one per "
                                     f"device; got {self.chunks!r}") from None
        object.__setattr__(self, "chunks", rows)
        if len({len(c) for c in self.chunks}) != 1:
            raise ScoreModShapeError(f"layout {self.name!r}: every device must hold the same number of chunks; "
                                     f"got {self.chunks}")
        self._check_permutation([list(c) for c in self.chunks])

    def _check_permutation(self, rows: list[list[int]]) -> None:
        """Every chunk ``0 .. C - 1`` held exactly once (else attention would silently mix up
        positions): a ``ScoreModShapeError`` naming the first chunk that is not."""
        flat = [i for row in rows for i in row]
        shown = f"; got {rows}" if len(flat) <= 32 else ""
        if not flat:
            raise ScoreModShapeError(f"layout {self.name!r}: the devices hold no chunk{shown}")
        held: dict[int, int] = {}
        for device, row in enumerate(rows):
            for chunk in row:
                if not 0 <= chunk < len(flat):
                    raise ScoreModShapeError(
                        f"layout {self.name!r}: device {device} holds chunk {chunk}, outside 0..{len(flat) - 1} "
                        f"({len(flat)} chunks): every chunk must be held exactly once{shown}")
                if chunk in held:
                    raise ScoreModShapeError(
                        f"layout {self.name!r}: chunk {chunk} is held twice (devices {held[chunk]} and {device}): "
                        f"every chunk must be held exactly once{shown}")
                held[chunk] = device

    @property
    def is_static(self) -> bool:
        """True when the chunks are known while tracing (tuples), False for an array."""
        return isinstance(self.chunks, tuple)

    @property
    def devices(self) -> int:
        return len(self.chunks) if self.is_static else int(self.chunks.shape[0])

    @property
    def num_chunks(self) -> int:
        return self.devices * self.chunks_per_device

    @property
    def chunks_per_device(self) -> int:
        return len(self.chunks[0]) if self.is_static else int(self.chunks.shape[1])

    def table(self):
        """int32 ``[P, C / P]``: the chunks as an array (NumPy when static)."""
        return np.array(self.chunks, np.int32) if self.is_static else jnp.asarray(self.chunks, jnp.int32)

    def with_inputs_permuted(self) -> "ContextLayout":
        """This layout for arrays the caller already keeps in layout order (see the class)."""
        return replace(self, inputs_permuted=True)

    def check_length(self, name: str, length: int) -> int:
        """The chunk size of a sequence of ``length``; a ScoreModShapeError if it does not divide."""
        if length % self.num_chunks:
            raise ScoreModShapeError(
                f"{name}={length} must be a multiple of {self.num_chunks}: the {self.name} layout cuts it into "
                f"{self.num_chunks} equal chunks over {self.devices} devices",
                hint="pad the sequence (and mask the padding) or use layout='contiguous'")
        return length // self.num_chunks

    def order(self, length: int):
        """int32[length]: the laid-out sequence's position ``i`` holds the original position
        ``order[i]`` (device 0's chunks first). Permute with ``x[:, order]``, undo with
        ``x[:, inverse_order(length)]``. NumPy for static layouts, jax otherwise."""
        size = self.check_length("length", length)
        xp = np if self.is_static else jnp
        starts = self.table().reshape(-1) * size
        return (starts[:, None] + xp.arange(size, dtype=np.int32)[None, :]).reshape(-1).astype(np.int32)

    def inverse_order(self, length: int):
        """int32[length]: where each original position sits in the laid-out sequence."""
        order = self.order(length)
        if self.is_static:
            return np.argsort(order).astype(np.int32)
        return jnp.zeros(length, jnp.int32).at[order].set(jnp.arange(length, dtype=jnp.int32))

    def tree_flatten(self):
        if self.is_static:
            return (), (self.name, self.chunks, self.inputs_permuted)
        return (self.chunks,), (self.name, None, self.inputs_permuted)

    @classmethod
    def tree_unflatten(cls, aux, children):
        name, chunks, inputs_permuted = aux
        layout = object.__new__(cls)   # no validation: the leaves may be tracers or placeholders
        for field_name, value in (("name", name), ("chunks", chunks if children == () else children[0]),
                                  ("inputs_permuted", inputs_permuted)):
            object.__setattr__(layout, field_name, value)
        return layout


def contiguous_layout(devices: int) -> ContextLayout:
    """Device d holds chunk d."""
    return ContextLayout("contiguous", tuple((d,) for d in range(devices)))


def zigzag_layout(devices: int) -> ContextLayout:
    """2P chunks; device d holds chunks d and 2P - 1 - d (balances causal masks)."""
    return ContextLayout("zigzag", tuple((d, 2 * devices - 1 - d) for d in range(devices)))


def layout_named(name: str, devices: int) -> ContextLayout:
    """The contiguous or zigzag layout (``balanced`` needs the mask: ``balanced_layout``)."""
    if name == "contiguous":
        return contiguous_layout(devices)
    if name == "zigzag":
        return zigzag_layout(devices)
    raise ScoreModShapeError(f"context layout {name!r} is not one of {', '.join(LAYOUTS)}")


def _split_layout(devices: int, chunks_per_device: int) -> ContextLayout:
    """Device d holds chunks d * c .. d * c + c - 1 (the plan's chunking before balancing)."""
    c = chunks_per_device
    return ContextLayout("contiguous", tuple(tuple(range(d * c, (d + 1) * c)) for d in range(devices)))


@dataclass(frozen=True)
class PairPlan:
    """Non-empty blocks per (q-chunk, kv-chunk) pair.

    Attributes:
      blocks: int32 ``[B', H', C, C]`` (B', H' are 1 where the mask does not depend on the
        batch element / head): NumPy for static masks, a jax array otherwise.
      block_q, block_kv: the block size the counts are in.
      q_chunk, kv_chunk: chunk sizes.
    """
    blocks: Any
    block_q: int
    block_kv: int
    q_chunk: int
    kv_chunk: int

    @property
    def is_static(self) -> bool:
        return isinstance(self.blocks, np.ndarray)

    @property
    def nonempty(self) -> np.ndarray:
        """bool ``[C, C]`` of a static plan: pairs with an allowed logit for some batch
        element or head."""
        return self.blocks.any(axis=(0, 1))


def _pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while n % (2 * d) == 0 and 2 * d <= cap:
        d *= 2
    return d


def pair_plan(mod, layout: ContextLayout, *, q_len: int, kv_len: int, batch: int = 1, heads: int = 1,
              q_offset=0, kv_offset=0, tensors: Mapping[str, Any] | None = None, max_block: int = 512) -> PairPlan:
    """The pair plan of ``mod`` (a Mod, Canonical or mask IR) for sequences cut by ``layout``.

    The blocks are the largest power of two up to ``max_block`` dividing both chunk
    sizes; a ScoreModShapeError when chunk sizes with a small power-of-two factor would
    make that grid larger than the plan's cell limit."""
    q_chunk = layout.check_length("q_len", q_len)
    kv_chunk = layout.check_length("kv_len", kv_len)
    block = _pow2_divisor(np.gcd(q_chunk, kv_chunk), max_block)
    if (q_len // block) * (kv_len // block) * batch * heads > MAX_GRID_CELLS:
        raise ScoreModShapeError(
            f"chunks of {q_chunk} x {kv_chunk} positions are planned in blocks of {block}, a grid larger than the "
            f"plan's limit", hint=f"make the chunk sizes multiples of {max_block}")
    plan = build_plan(mod, q_len=q_len, kv_len=kv_len, block_q=block, block_kv=block, batch=batch, heads=heads,
                      q_offset=q_offset, kv_offset=kv_offset, tensors=tensors)
    C = layout.num_chunks
    bq, bk = q_chunk // block, kv_chunk // block
    classes = plan.classes                    # NumPy (static) or a jax array: the same ops
    b_, h_ = classes.shape[:2]
    blocks = (classes != EMPTY).reshape(b_, h_, C, bq, C, bk).sum(axis=(3, 5)).astype(np.int32)
    return PairPlan(blocks=blocks, block_q=block, block_kv=block, q_chunk=q_chunk, kv_chunk=kv_chunk)


@dataclass(frozen=True)
class RingSchedule:
    """What each device runs at each ring step (hashable: part of the compiled program).

    Attributes:
      shifts: the ring steps that run; at shift s device d works on the kv shard of
        device ``(d - s) % P``, which one ``ppermute`` brings from its home. Shifts where
        no device has a non-empty pair are left out: neither computed nor sent.
      runs: static plans: ``runs[k][d][a][b]`` says whether device d, at ``shifts[k]``,
        runs its a-th q-chunk against the source device's b-th kv-chunk. None for plans
        from tensor values: every shift is kept and each pair asks the plan at run time.
    """
    shifts: tuple[int, ...]
    runs: tuple | None

    def pairs_run(self) -> int | None:
        """How many (device, q-chunk, kv-chunk) pairs run in all (static schedules)."""
        if self.runs is None:
            return None
        return int(np.sum(np.array(self.runs, bool)))


def ring_schedule(plan: PairPlan, layout: ContextLayout) -> RingSchedule:
    """The ring steps and, for static plans, which pairs each device runs at each."""
    P = layout.devices
    if not plan.is_static:
        return RingSchedule(shifts=tuple(range(P)), runs=None)
    ne = plan.nonempty
    shifts, runs = [], []
    for s in range(P):
        step = tuple(tuple(tuple(bool(ne[i, j]) for j in layout.chunks[(d - s) % P]) for i in layout.chunks[d])
                     for d in range(P))
        if any(np.array(step, bool).ravel()):
            shifts.append(s)
            runs.append(step)
    return RingSchedule(shifts=tuple(shifts), runs=tuple(runs))


def shifts_needed(blocks, chunk_table):
    """bool ``[P]``: whether any device has a non-empty pair at ring shift s (device d with
    the kv chunks of device ``(d - s) % P``). ``blocks [B', H', C, C]`` a pair plan's counts,
    ``chunk_table int32 [P, C / P]`` a layout's chunks. NumPy in, NumPy out (what
    ``ring_schedule`` keeps); jax in, jax out: the same answer at run time for plans from
    tensor values, equal on every device (the inputs are replicated), so every device takes
    the same branch around a step's transfer.

        >>> shifts_needed(np.tril(np.ones((4, 4), np.int32))[None, None], np.arange(4)[:, None]).tolist()
        [True, True, True, True]
    """
    xp = np if isinstance(blocks, np.ndarray) and isinstance(chunk_table, np.ndarray) else jnp
    nonempty = (xp.asarray(blocks) > 0).any(axis=(0, 1))                      # [C, C]
    P = chunk_table.shape[0]
    # pair[s, d, a, b] = nonempty[chunk_table[d, a], chunk_table[(d - s) % P, b]]
    source = (xp.arange(P)[None, :] - xp.arange(P)[:, None]) % P             # [s, d]
    q_chunks = chunk_table[None, :, :, None]                                  # [1, P, per, 1]
    kv_chunks = chunk_table[source][:, :, None, :]                            # [P, P, 1, per]
    return nonempty[q_chunks, kv_chunks].any(axis=(1, 2, 3))


def device_work(plan: PairPlan, layout: ContextLayout) -> np.ndarray:
    """int64 ``[P]``: the (query, key) positions each device computes, counted as the area
    of the non-empty blocks of its pairs (static plans; summed over the batch elements and
    heads the plan distinguishes, broadcast ones counted once). Comparable across layouts
    whatever block size each plan used."""
    blocks = np.asarray(plan.blocks, np.int64).sum(axis=(0, 1)) * (plan.block_q * plan.block_kv)
    return np.array([sum(blocks[i, j] for i in layout.chunks[d] for dd in range(layout.devices)
                         for j in layout.chunks[dd]) for d in range(layout.devices)], np.int64)


# ---- balancing ---------------------------------------------------------------------------------

def balance_chunks(weights, devices: int):
    """int32 ``[devices, C / devices]``: chunk indices per device (each row increasing), with
    every device holding C / devices chunks and the largest sum of ``weights`` over a
    device's chunks made small.

    ``weights`` int ``[C]`` (a q-chunk's non-empty blocks). Largest weight first (ties: the
    lower index) to the least loaded device with room (ties: the lower device), then up
    to C improving swaps between the busiest device and another (each the swap that
    leaves the pair's larger load smallest; ties: the first in (chunk, chunk) order).
    NumPy in, NumPy out (Python loops, stopping when no swap improves); jax in, jax out
    (``lax.fori_loop``, traceable: the same decisions, so the same result).

        >>> balance_chunks(np.array([5, 1, 4, 2]), 2).tolist()
        [[0, 1], [2, 3]]
    """
    xp = np if isinstance(weights, np.ndarray) else jnp
    w = xp.asarray(weights).astype(np.int64 if xp is np else jnp.int32)
    C = w.shape[0]
    if C % devices:
        raise ScoreModShapeError(f"{C} chunks cannot be dealt equally to {devices} devices")
    per = C // devices
    big = np.iinfo(np.int32).max
    order = xp.argsort(-w, stable=True) if xp is jnp else np.argsort(-w, kind="stable")
    load = xp.zeros(devices, w.dtype)
    count = xp.zeros(devices, np.int32)
    assign = xp.zeros(C, np.int32)

    def deal(k, state):
        load, count, assign = state
        i = order[k]
        d = xp.argmin(xp.where(count < per, load, big)).astype(np.int32)
        return _set(load, d, load[d] + w[i]), _set(count, d, count[d] + 1), _set(assign, i, d)

    def swap(state):
        load, assign = state
        hi = xp.argmax(load).astype(np.int32)
        in_hi = assign == hi
        delta = w[:, None] - w[None, :]                              # chunk a (on hi) for chunk b
        new_max = xp.maximum(load[hi] - delta, load[assign][None, :] + delta)
        ok = in_hi[:, None] & ~in_hi[None, :] & (delta > 0) & (new_max < load[hi])
        best = xp.argmin(xp.where(ok, new_max, big).reshape(-1))
        a, b = best // C, best % C
        found = ok.reshape(-1)[best]
        moved = xp.where(found, delta[a, b], 0)
        other = assign[b]
        load = _set(_set(load, hi, load[hi] - moved), other, load[other] + moved)
        assign = _set(_set(assign, a, xp.where(found, other, hi)), b, xp.where(found, hi, other))
        return (load, assign), found

    if xp is np:
        state = (load, count, assign)
        for k in range(C):
            state = deal(k, state)
        load, _, assign = state
        for _ in range(C):
            (load, assign), found = swap((load, assign))
            if not found:
                break
    else:
        load, _, assign = jax.lax.fori_loop(0, C, deal, (load, count, assign))
        load, assign = jax.lax.fori_loop(0, C, lambda _, st: swap(st)[0], (load, assign))
    # Each device's chunks in increasing order: sort by (device, chunk).
    key = assign.astype(np.int32) * C + xp.arange(C, dtype=np.int32)
    return (xp.argsort(key) if xp is jnp else np.argsort(key, kind="stable")).astype(np.int32).reshape(devices, per)


def _set(array, index, value):
    """``array`` with ``array[index] = value`` (a copy for NumPy; ``.at[].set`` for jax)."""
    if isinstance(array, np.ndarray):
        out = array.copy()
        out[index] = value
        return out
    return array.at[index].set(value)


def balanced_layout(mod, devices: int, chunks_per_device: int, *, q_len: int, kv_len: int, batch: int = 1,
                    heads: int = 1, q_offset=0, kv_offset=0, tensors: Mapping[str, Any] | None = None,
                    max_block: int = 512) -> tuple[ContextLayout, PairPlan]:
    """The ``balanced`` layout of ``mod`` and its pair plan: ``devices x chunks_per_device``
    chunks dealt by ``balance_chunks`` from each q-chunk's non-empty blocks (summed over
    kv-chunks, batch elements and heads). Static masks: NumPy, a layout of tuples; masks
    that read tensors: computed from their values, an array layout (traceable)."""
    if isinstance(chunks_per_device, bool) or not isinstance(chunks_per_device, (int, np.integer)) \
            or chunks_per_device < 1:
        raise ScoreModShapeError(f"chunks_per_device must be a positive int; got {chunks_per_device!r}")
    split = _split_layout(devices, int(chunks_per_device))
    plan = pair_plan(mod, split, q_len=q_len, kv_len=kv_len, batch=batch, heads=heads, q_offset=q_offset,
                     kv_offset=kv_offset, tensors=tensors, max_block=max_block)
    weights = plan.blocks.sum(axis=(0, 1, 3))
    table = balance_chunks(weights, devices)
    if plan.is_static:
        return ContextLayout("balanced", tuple(tuple(int(c) for c in row) for row in table)), plan
    return ContextLayout("balanced", table), plan
