"""``dslc explain --devices P``: the shard-level plan of context parallelism for a mod, per
layout, from the pair plan alone (nothing runs).

    >>> report = explain_context("causal", 4, 1024, default_layout="zigzag")
    >>> print(report)
    context parallel: 4 devices; q 1024, kv 1024; batch 1, heads 1
      layout      chunks  plan block  busiest work  balance  pairs run  ring steps  K/V received
      contiguous  4 x 1   256         256 Ki        1.60     10 / 16    4 / 4       384 KiB
      zigzag      4 x 2   128         144 Ki        1.00     36 / 64    4 / 4       384 KiB
      balanced    4 x 4   64          136 Ki        1.00     136 / 256  4 / 4       384 KiB
    ...

For each layout of ``compiler/context_plan.py`` (``contiguous``; ``zigzag`` when T and S
are multiples of 2P; ``balanced`` with ``balanced_chunks`` chunks per device when they are
multiples of that times P) it gives what ``benchmarks/context_plan.py`` measures:

* work per device: the (q, kv) positions in the non-empty pair-plan blocks of the device's
  pairs (``device_work``), the busiest device's and the mean, and balance = busiest / mean;
* pairs run: (q-chunk, kv-chunk) pairs with an allowed logit, of all P x P x chunks² pairs
  of a full ring (``RingSchedule.pairs_run``);
* ring steps run, of P (``ring_schedule``: a shift with no work on any device is neither
  computed nor sent);
* K/V bytes each device receives: one K and one V shard ``[B, S/P, K, H]`` per ring step
  other than shift 0, against a plain ring's P - 1 shards.

Masks whose plan comes from tensor values (``doc(ids)``) or per-batch offsets are planned
here from the given values as if static. At run time such a mask keeps every ring step in
the program, and a step no device needs skips its transfer and its pairs under
``lax.cond`` on the plan computed there: the run time moves what the plan shows.

The layout ``attention(..., context_layout=None)`` would take is the runtime's decision
(``runtime.context_parallel.choose_layout``); the compiler does not import the runtime, so
the caller passes its name as ``default_layout`` (``dslc explain`` does).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoremod.errors import ScoreModError, ScoreModShapeError
from scoremod.dsl.ast import tensor_names
from scoremod.compiler.context_plan import (ContextLayout, PairPlan, balanced_layout, device_work, layout_named,
                                            pair_plan, ring_schedule)
from scoremod.compiler.mod import compile_mod
from scoremod.compiler.plan import check_offset, check_tensors, validate_plan_sizes

__all__ = ["ContextExplanation", "LayoutFigures", "explain_context"]

# The default layout's balance must be this much above the balanced layout's before the
# report suggests context_layout="balanced".
_HINT_RATIO = 1.1


@dataclass(frozen=True)
class LayoutFigures:
    """One layout's figures (see the module docstring for what each means).

    Attributes:
      name: "contiguous", "zigzag" or "balanced".
      chunks: ``chunks[d]``: the chunk indices device d holds.
      block: the pair plan's block size (work counts whole blocks of block x block).
      work: per device, (q, kv) positions in the non-empty blocks of its pairs.
      pairs_run, pairs: pairs with an allowed logit; all pairs of a full ring.
      shifts: the ring shifts the plan needs.
      steps: ring steps at run time (``len(shifts)``, or P for plans from tensor values).
      received_bytes: K/V bytes each device receives at run time.
    """
    name: str
    chunks: tuple[tuple[int, ...], ...]
    block: int
    work: tuple[int, ...]
    pairs_run: int
    pairs: int
    shifts: tuple[int, ...]
    steps: int
    received_bytes: int

    @property
    def busiest(self) -> int:
        return max(self.work)

    @property
    def mean(self) -> float:
        return sum(self.work) / len(self.work)

    @property
    def balance(self) -> float | None:
        """Busiest / mean (1.0: even); None when no device has work."""
        return self.busiest / self.mean if self.mean else None

    def to_dict(self) -> dict:
        return {
            "layout": self.name,
            "chunks_per_device": len(self.chunks[0]),
            "chunks": [list(c) for c in self.chunks],
            "block": self.block,
            "work": list(self.work),
            "busiest_work": self.busiest,
            "mean_work": self.mean,
            "balance": None if self.balance is None else round(self.balance, 6),
            "pairs_run": self.pairs_run,
            "pairs": self.pairs,
            "shifts": list(self.shifts),
            "ring_steps": self.steps,
            "kv_bytes_received": self.received_bytes,
        }


@dataclass(frozen=True, eq=False)
class ContextExplanation:
    """The shard-level plan of context parallelism for a mod; ``str()`` is the text report.

    Attributes:
      mod: the compiled ``Mod``.
      devices: P.
      q_len, kv_len, batch, heads, kv_heads, head_dim, itemsize: the sizes (K/V bytes
        assume ``kv_heads`` heads of ``head_dim`` elements of ``itemsize`` bytes).
      q_offset, kv_offset: as given.
      from_values: the pair plan comes from tensor values (or per-batch offsets): at run
        time it is computed in the program, each ring step under a cond on it.
      layouts: the figures of each layout that fits.
      omitted: ``(layout name, reason)`` for each layout left out.
      default_layout: the layout ``attention(..., context_layout=None)`` takes, or None
        (not known: the report leaves it out).
    """
    mod: Any
    devices: int
    q_len: int
    kv_len: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    q_offset: Any
    kv_offset: Any
    from_values: bool
    layouts: tuple[LayoutFigures, ...]
    omitted: tuple[tuple[str, str], ...]
    default_layout: str | None = None

    @property
    def shard_bytes(self) -> int:
        """Bytes of one device's K and V shards, ``2 x [B, S/P, K, H]``: what one ring step sends it."""
        return 2 * self.batch * (self.kv_len // self.devices) * self.kv_heads * self.head_dim * self.itemsize

    @property
    def plain_ring_bytes(self) -> int:
        """K/V bytes a device receives in a plain ring (P - 1 shards)."""
        return (self.devices - 1) * self.shard_bytes

    def layout(self, name: str) -> LayoutFigures | None:
        """The figures of layout ``name``, or None when it was omitted."""
        return next((f for f in self.layouts if f.name == name), None)

    # -- output --
    def to_dict(self) -> dict:
        return {
            "devices": self.devices,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "itemsize": self.itemsize,
            "q_offset": np.asarray(self.q_offset).tolist(),
            "kv_offset": np.asarray(self.kv_offset).tolist(),
            "plan_from_values": self.from_values,
            "shard_bytes": self.shard_bytes,
            "plain_ring_bytes": self.plain_ring_bytes,
            "default_layout": self.default_layout,
            "layouts": [f.to_dict() for f in self.layouts],
            "omitted": [{"layout": name, "reason": reason} for name, reason in self.omitted],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def render(self) -> str:
        """The text report: a header, one table row per layout, work per device, the default
        layout, and what the columns mean."""
        P = self.devices
        offsets = ""
        if np.any(np.asarray(self.q_offset)) or np.any(np.asarray(self.kv_offset)):
            offsets = (f"; q_offset {np.asarray(self.q_offset).tolist()}, "
                       f"kv_offset {np.asarray(self.kv_offset).tolist()}")
        lines = [f"context parallel: {P} device{'s' if P != 1 else ''}; q {self.q_len}, kv {self.kv_len}; "
                 f"batch {self.batch}, heads {self.heads}{offsets}"]
        rows = [("layout", "chunks", "plan block", "busiest work", "balance", "pairs run", "ring steps",
                 "K/V received")]
        for f in self.layouts:
            steps = f"{f.steps} / {P}"
            received = _bytes(f.received_bytes)
            rows.append((f.name, f"{P} x {len(f.chunks[0])}", str(f.block), _count(f.busiest),
                         "-" if f.balance is None else f"{f.balance:.2f}", f"{f.pairs_run} / {f.pairs}", steps,
                         received))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        name_w = max(len(n) for n in ["contiguous"] + [n for n, _ in self.omitted])
        lines += [f"  {name.ljust(name_w)}  omitted: {reason}" for name, reason in self.omitted]
        lines.append("  work per device ((q, kv) positions):")
        for f in self.layouts:
            values = _work_list(f.work)
            lines += textwrap.wrap(values, 100, initial_indent=f"    {f.name.ljust(name_w)}  ",
                                   subsequent_indent=" " * (name_w + 6))
        lines += self._default_lines()
        if self.from_values:
            mask_tensors = [n for n in self.mod.tensors if n in tensor_names(self.mod.canonical.mask)]
            why = (f"the mask reads tensors ({', '.join(mask_tensors)})" if mask_tensors
                   else "the offsets are per batch element")
            lines += _wrap(f"note: {why}, so its plan comes from values: planned here from the given ones. At run "
                           f"time the program holds every ring step and skips, under lax.cond on the plan it "
                           f"computes, the transfers and pairs no device needs: it moves what is shown here.")
        heads = f"{self.kv_heads} kv head{'s' if self.kv_heads != 1 else ''}"
        dtype = ", bf16" if self.itemsize == 2 else ""
        lines += _wrap(f"K/V received: per device, one K and one V shard [B, S/P, K, H] = "
                       f"{_bytes(self.shard_bytes)} per ring step after shift 0 (assumed: {heads} x "
                       f"{self.head_dim} dims x {self.itemsize} bytes{dtype}); a plain ring receives P - 1 = "
                       f"{_bytes(self.plain_ring_bytes)}.")
        lines += _wrap("work: (q, kv) positions in the non-empty blocks of a device's pairs (device_work; whole "
                       "blocks of the plan block, one block size for every layout so the rows compare); balance: busiest / mean; pairs run: pairs with an allowed logit, of P "
                       "devices x P steps x chunks per device²; ring steps: shifts with work on some device, of P.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def _default_lines(self) -> list[str]:
        if self.default_layout is None:
            return []
        if self.from_values:
            why = "a mask whose plan comes from values takes contiguous: its balance depends on them"
        elif self.layout("zigzag") is None:
            why = "zigzag does not fit these lengths"
        else:
            why = "of contiguous and zigzag, the one whose busiest device has less work; contiguous on a tie"
        lines = _wrap(f"default: attention(context_layout=None) takes {self.default_layout} ({why})")
        chosen, balanced = self.layout(self.default_layout), self.layout("balanced")
        if (chosen is not None and balanced is not None and chosen is not balanced and balanced.balance
                and chosen.balance >= _HINT_RATIO * balanced.balance):
            lines += _wrap(f"hint: context_layout=\"balanced\" brings the balance from {chosen.balance:.2f} to "
                           f"{balanced.balance:.2f}, running {len(balanced.chunks[0]) ** 2} pairs per device and "
                           f"ring step instead of {len(chosen.chunks[0]) ** 2}")
        return lines


def _work_list(work, most: int = 16) -> str:
    """Work per device, runs of equal values as ``v x n``, at most ``most`` entries.

        >>> _work_list([4096, 4096, 4096, 8192])
        '4096 x 3, 8192'
    """
    runs: list[list] = []
    for w in work:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    shown = [_count(w) + (f" x {n}" if n > 1 else "") for w, n in runs[:most]]
    left = sum(n for _, n in runs[most:])
    return ", ".join(shown) + (f", ... ({left} more devices; the JSON lists all)" if left else "")


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, 100, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)


def _count(n: int) -> str:
    """A count of positions: exact below 10,000, else 3 significant digits in units of 2^10.

        >>> _count(4096), _count(262144), _count(1835008)
        ('4096', '256 Ki', '1.75 Mi')
    """
    if n < 10_000:
        return str(int(n))
    for unit, suffix in ((2**40, "Ti"), (2**30, "Gi"), (2**20, "Mi"), (2**10, "Ki")):
        if n >= unit:
            return f"{_sig3(n / unit)} {suffix}"
    return str(int(n))


def _bytes(n: int) -> str:
    """Bytes in B / KiB / MiB / GiB, 3 significant digits: ``_bytes(393216) == '384 KiB'``."""
    for unit, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{_sig3(n / unit)} {suffix}"
    return f"{int(n)} B"


def _sig3(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{2 if x < 10 else 1}f}".rstrip("0").rstrip(".")


def _positive(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ScoreModShapeError(f"{name}={value!r} must be a positive int")
    return int(value)


def _static(plan: PairPlan) -> PairPlan:
    """A plan from tensor values as a NumPy (static) plan: the values are known here."""
    if plan.is_static:
        return plan
    return PairPlan(blocks=np.asarray(plan.blocks), block_q=plan.block_q, block_kv=plan.block_kv,
                    q_chunk=plan.q_chunk, kv_chunk=plan.kv_chunk)


def explain_context(mod, devices: int, q_len: int, kv_len: int | None = None, *, batch: int = 1, heads: int = 1,
                    q_offset=0, kv_offset=0, kv_heads: int | None = None, head_dim: int = 128, itemsize: int = 2,
                    balanced_chunks: int = 4, default_layout: str | None = None,
                    **tensors) -> ContextExplanation:
    """The shard-level plan of ``mod`` (a ``Mod`` or source) over ``devices`` devices.

    Args:
      devices: P, the size of the mesh axis the sequence is split over.
      q_len, kv_len: T and S (kv_len defaults to q_len); multiples of P.
      batch, heads, q_offset, kv_offset, **tensors: as for ``attention()``.
      kv_heads, head_dim, itemsize: K/V shape for the bytes moved (K defaults to heads;
        H 128; 2 bytes, bf16).
      balanced_chunks: chunks per device of the ``balanced`` row (the runtime's
        ``BALANCED_CHUNKS_PER_DEVICE`` is 4).
      default_layout: the name ``attention(..., context_layout=None)`` would take
        (``runtime.context_parallel.choose_layout``), shown in the report; None leaves it out.

    Raises ``ScoreModShapeError`` for bad sizes or when T or S is not a multiple of P (no
    layout fits); a layout that does not fit (zigzag, balanced) is listed in ``omitted``
    with the reason.

    Example::

        >>> r = explain_context("causal & window(100)", 4, 1024)
        >>> r.layout("contiguous").shifts, round(r.layout("zigzag").balance, 2)
        ((0, 1), 1.07)
        >>> ids = np.repeat(np.arange(6), [2048, 512, 512, 512, 256, 256])
        >>> r = explain_context("causal & doc(ids)", 4, 4096, ids=ids)
        >>> r.layout("contiguous").balance, round(r.layout("balanced").balance, 2)
        (2.0, 1.02)
    """
    mod = compile_mod(mod)
    kv_len = q_len if kv_len is None else kv_len
    devices = _positive("devices", devices)
    validate_plan_sizes(q_len=q_len, kv_len=kv_len, block_q=1, block_kv=1, batch=batch, heads=heads)
    kv_heads = heads if kv_heads is None else kv_heads
    for name, value in (("kv_heads", kv_heads), ("head_dim", head_dim), ("itemsize", itemsize),
                        ("balanced_chunks", balanced_chunks)):
        _positive(name, value)
    if heads % kv_heads:
        raise ScoreModShapeError(f"query heads N={heads} must be a multiple of key/value heads K={kv_heads} "
                                 f"(GQA: query head h reads kv head h // (N // K))")
    if default_layout is not None and default_layout not in ("contiguous", "zigzag", "balanced"):
        raise ScoreModShapeError(f"default_layout={default_layout!r} must be contiguous, zigzag or balanced")
    q_offset = check_offset("q_offset", q_offset, batch, q_len)
    kv_offset = check_offset("kv_offset", kv_offset, batch, kv_len)
    check_tensors(mod, tensors, batch, heads, q_len, kv_len, q_offset=q_offset, kv_offset=kv_offset)
    P = devices
    for name, length in (("q_len", q_len), ("kv_len", kv_len)):
        if length % P:
            raise ScoreModShapeError(
                f"context parallelism over {P} devices cuts the sequence into {P} equal chunks: {name}={length} "
                f"is not a multiple of {P}", hint=f"pad the sequence to a multiple of {P} (and mask the padding)")

    # One block size for every layout (the finest layout's): work counted in coarser blocks
    # overcounts the partial ones, so rows in different blocks would not compare.
    finest = max(P * c for c in (1, 2, balanced_chunks) if q_len % (P * c) == 0 and kv_len % (P * c) == 0)
    common = int(np.gcd(q_len // finest, kv_len // finest))
    block = 1
    while common % (2 * block) == 0 and 2 * block <= 512:
        block *= 2
    kw = dict(q_len=q_len, kv_len=kv_len, batch=batch, heads=heads, q_offset=q_offset, kv_offset=kv_offset,
              tensors=tensors, max_block=block)
    shard = 2 * batch * (kv_len // P) * kv_heads * head_dim * itemsize
    figures, omitted, from_values = [], [], False
    for name, chunks in (("contiguous", 1), ("zigzag", 2), ("balanced", balanced_chunks)):
        C = P * chunks
        if q_len % C or kv_len % C:
            omitted.append((name, f"q {q_len} and kv {kv_len} must be multiples of {C} "
                                  f"({P} devices x {chunks} chunks)"))
            continue
        try:
            if name == "balanced":
                layout, plan = balanced_layout(mod, P, chunks, **kw)
                # From tensor values the chunk table is a jax array: the values are known here.
                layout = ContextLayout("balanced", tuple(tuple(int(c) for c in row)
                                                         for row in np.asarray(layout.table()).tolist()))
            else:
                layout = layout_named(name, P)
                plan = pair_plan(mod, layout, **kw)
        except ScoreModError as exc:   # e.g. chunk sizes that need a plan grid above the limit
            if name == "contiguous":
                raise
            omitted.append((name, exc.message))
            continue
        from_values = from_values or not plan.is_static
        plan = _static(plan)
        schedule = ring_schedule(plan, layout)
        sent = sum(1 for s in schedule.shifts if s)
        figures.append(LayoutFigures(
            name=name, chunks=layout.chunks, block=plan.block_q,
            work=tuple(int(w) for w in device_work(plan, layout)),
            pairs_run=schedule.pairs_run(), pairs=P * P * chunks * chunks, shifts=schedule.shifts,
            steps=len(schedule.shifts), received_bytes=sent * shard))
    return ContextExplanation(mod, P, int(q_len), int(kv_len), int(batch), int(heads), int(kv_heads),
                              int(head_dim), int(itemsize), q_offset, kv_offset, from_values, tuple(figures),
                              tuple(omitted), default_layout)
