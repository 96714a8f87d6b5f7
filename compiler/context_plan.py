"""Context parallelism, the compiler's half: which sequence chunks each device holds (a
``ContextLayout``) and which (q-chunk, kv-chunk) pairs may hold an allowed logit (a
``PairPlan``). The runtime (``runtime/context_parallel.py``) runs a ring over devices
from these and never re-derives them.

A sequence of length L is cut into C equal chunks; a layout gives each of P devices
C / P of them. ``contiguous``: device d holds chunk d (C = P). ``zigzag``: C = 2P and
device d holds chunks d and 2P - 1 - d, so under a causal mask every device gets one
early and one late chunk and the same work.

The pair plan comes from the ordinary block plan (``compiler.plan.build_plan``) at a
block size that divides the chunks, summed per chunk pair: ``blocks[b, h, i, j]`` is the
number of non-empty blocks where q-chunk i meets kv-chunk j. Static masks give NumPy
(known at trace time: ring steps whose pairs are all empty are never run or sent);
masks that read tensors give a jax array computed from their values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from scoremod.errors import ScoreModShapeError
from scoremod.compiler.plan import EMPTY, MAX_GRID_CELLS, build_plan

__all__ = ["ContextLayout", "PairPlan", "contiguous_layout", "zigzag_layout", "layout_named", "pair_plan",
           "device_work", "RingSchedule", "ring_schedule"]

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class ContextLayout:
    """Which chunks of the sequence each device holds.

    Attributes:
      name: "contiguous", "zigzag" (or a user's own name).
      chunks: ``chunks[d]`` is the tuple of chunk indices device d holds, in the order
        they sit in its local shard; every chunk exactly once, the same count per device.

    Example (a layout of one's own: 4 devices, 8 chunks)::

        >>> layout = ContextLayout("pairs", ((0, 4), (1, 5), (2, 6), (3, 7)))
        >>> layout.order(16).tolist()[:4]        # device 0 holds positions 0-1 and 8-9
        [0, 1, 8, 9]
        >>> scoremod.attention(q, k, v, mod="causal", mesh=mesh, context_axis="sp", context_layout=layout)
    """
    name: str
    chunks: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        per = {len(c) for c in self.chunks}
        flat = sorted(i for c in self.chunks for i in c)
        if len(per) != 1 or flat != list(range(len(flat))):
            raise ScoreModShapeError(f"layout {self.name!r}: every device must hold the same number of chunks and "
                                     f"every chunk must be held once; got {self.chunks}")

    @property
    def devices(self) -> int:
        return len(self.chunks)

    @property
    def num_chunks(self) -> int:
        return self.devices * self.chunks_per_device

    @property
    def chunks_per_device(self) -> int:
        return len(self.chunks[0])

    def check_length(self, name: str, length: int) -> int:
        """The chunk size of a sequence of ``length``; a ScoreModShapeError if it does not divide."""
        if length % self.num_chunks:
            raise ScoreModShapeError(
                f"{name}={length} must be a multiple of {self.num_chunks}: the {self.name} layout cuts it into "
                f"{self.num_chunks} equal chunks over {self.devices} devices",
                hint="pad the sequence (and mask the padding) or use layout='contiguous'")
        return length // self.num_chunks

    def order(self, length: int) -> np.ndarray:
        """int32[length]: the laid-out sequence's position ``i`` holds the original position
        ``order[i]`` (device 0's chunks first). Permute with ``x[:, order]``, undo with
        ``x[:, inverse(order)]``."""
        size = self.check_length("length", length)
        starts = [c * size for dev in self.chunks for c in dev]
        return np.concatenate([np.arange(s, s + size, dtype=np.int32) for s in starts])


def contiguous_layout(devices: int) -> ContextLayout:
    """Device d holds chunk d."""
    return ContextLayout("contiguous", tuple((d,) for d in range(devices)))


def zigzag_layout(devices: int) -> ContextLayout:
    """2P chunks; device d holds chunks d and 2P - 1 - d (balances causal masks)."""
    return ContextLayout("zigzag", tuple((d, 2 * devices - 1 - d) for d in range(devices)))


def layout_named(name: str, devices: int) -> ContextLayout:
    if name == "contiguous":
        return contiguous_layout(devices)
    if name == "zigzag":
        return zigzag_layout(devices)
    raise ScoreModShapeError(f"context layout {name!r} is not one of {', '.join(LAYOUTS)}")


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


def device_work(plan: PairPlan, layout: ContextLayout) -> np.ndarray:
    """int64 ``[P]``: the (query, key) positions each device computes, counted as the area
    of the non-empty blocks of its pairs (static plans; summed over the batch elements and
    heads the plan distinguishes, broadcast ones counted once). Comparable across layouts
    whatever block size each plan used."""
    blocks = np.asarray(plan.blocks, np.int64).sum(axis=(0, 1)) * (plan.block_q * plan.block_kv)
    return np.array([sum(blocks[i, j] for i in layout.chunks[d] for dd in range(layout.devices)
                         for j in layout.chunks[dd]) for d in range(layout.devices)], np.int64)
