"""``Mod.explain`` and ``dslc explain``: what would run for a mod at given sizes.

    >>> print(scoremod.compile("causal & window(256)").explain(1024, block=(128, 128)))
    canonical: abs(q - kv) < 256 & q >= kv
    kind:      mask
    ...
    grid [1, 1, 8, 8] (1 char = 1 x 1 blocks of 128 x 128 positions; █ full, ░ partial, · empty)
      ░·······
      ░░······
      ...

The report: canonical form, kind, what the runtime would run (``lowering``: ``dslc explain``
fills it in from the runtime's dispatch, ``runtime/_dispatch.dispatch_summary``), block counts,
density (the fraction of blocks a kernel visits), FLOPs saved against dense attention,
the bytes of plan metadata kernels read, and the block grid (FlexAttention's
``BlockMask.__str__`` style), downsampled to the terminal width, one grid per distinct
(batch, head) plane. Warnings: everything masked, query rows with no key.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoremod.errors import ScoreModShapeError
from scoremod.dsl.ast import tensor_names
from scoremod.compiler.intervals import EMPTY, FULL, PARTIAL, BlockGrid, PositionBlocks, classify_blocks
from scoremod.compiler.mod import compile_mod
from scoremod.compiler.plan import build_plan, check_offset, check_tensors, plan_grid_shape, validate_plan_sizes
from scoremod.compiler.rewrite import simplify

__all__ = ["Explanation", "explain", "GRID_JSON_LIMIT"]

# Largest grid explain classifies (about 16 MB of classes; a kernel's plan may be larger).
EXPLAIN_MAX_GRID_CELLS = 2**24
# JSON output leaves the grid out above this many cells.
GRID_JSON_LIMIT = 1_000_000
_CHARS = {FULL: "█", PARTIAL: "░", EMPTY: "·"}
_MAX_GRID_ROWS = 64
_MAX_GRIDS_SHOWN = 4


@dataclass(frozen=True, eq=False)
class Explanation:
    """What would run for a mod at given sizes; ``str()`` is the text report.

    Attributes:
      mod: the compiled ``Mod``.
      classes: int8 [B', H', nq, nk], 0 EMPTY, 1 PARTIAL, 2 FULL.
      q_len, kv_len, block_q, block_kv, batch, heads, q_offset, kv_offset: the sizes.
    """
    mod: Any
    classes: np.ndarray
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    batch: int
    heads: int
    q_offset: Any = 0
    kv_offset: Any = 0
    width: int | None = field(default=None, compare=False)
    lowering: str | None = None   # what the runtime would run (``dslc explain`` asks the runtime)

    # -- numbers --
    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.classes.shape)

    @property
    def counts(self) -> dict[str, int]:
        counts = np.bincount(self.classes.reshape(-1), minlength=3)
        return {"full": int(counts[FULL]), "partial": int(counts[PARTIAL]), "empty": int(counts[EMPTY])}

    @property
    def density(self) -> float:
        """Fraction of blocks a kernel visits (FULL or PARTIAL)."""
        c = self.counts
        total = c["full"] + c["partial"] + c["empty"]
        return (c["full"] + c["partial"]) / total if total else 0.0

    @property
    def flops_saved(self) -> float:
        """Fraction of dense attention's (q, kv) pairs in blocks a kernel skips (ragged blocks by area)."""
        nonempty = self.classes != EMPTY
        bq, bk = self.block_q, self.block_kv
        dr = bq * nonempty.shape[2] - self.q_len   # missing rows of the last q-block
        dc = bk * nonempty.shape[3] - self.kv_len
        visited = (bq * bk * int(nonempty.sum()) - dr * bk * int(nonempty[:, :, -1, :].sum())
                   - bq * dc * int(nonempty[:, :, :, -1].sum()) + dr * dc * int(nonempty[:, :, -1, -1].sum()))
        planes = nonempty.shape[0] * nonempty.shape[1]
        return 1.0 - visited / (planes * self.q_len * self.kv_len)

    @property
    def plan_bytes(self) -> int:
        """Bytes of the BlockPlan arrays kernels read (counts, indices, full flags, and the transpose)."""
        B, H, nq, nk = self.grid_shape
        return B * H * (4 * nq + 5 * nq * nk + 4 * nk + 5 * nk * nq)

    @property
    def warnings(self) -> list[str]:
        out = []
        nonempty = self.classes != EMPTY
        if not nonempty.any():
            out.append("everything is masked: no query attends any key, so every output row is 0 "
                       "(log-sum-exp -inf)")
            return out
        keyless = ~nonempty.any(axis=3)                       # [B', H', nq]
        if keyless.any():
            blocks = np.flatnonzero(keyless.any(axis=(0, 1)))
            rows = sum(min(self.block_q, self.q_len - i * self.block_q) for i in blocks)
            where = "" if keyless.all(axis=(0, 1))[blocks].all() else " in some batches/heads"
            out.append(f"at least {rows} query row{'s' if rows != 1 else ''} "
                       f"({_ranges(blocks, self.block_q, self.q_len)}) have no key{where}: "
                       f"they output 0 (log-sum-exp -inf)")
        return out

    # -- output --
    def to_dict(self, grid_limit: int = GRID_JSON_LIMIT) -> dict:
        out = {
            "canonical": str(self.mod),
            "kind": self.mod.kind,
            "tensors": list(self.mod.tensors),
            **({"lowering": self.lowering} if self.lowering else {}),
            "batch": self.batch,
            "heads": self.heads,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "q_offset": np.asarray(self.q_offset).tolist(),
            "kv_offset": np.asarray(self.kv_offset).tolist(),
            "block": [self.block_q, self.block_kv],
            "grid_shape": list(self.grid_shape),
            "counts": self.counts,
            "density": round(self.density, 6),
            "flops_saved": round(self.flops_saved, 6),
            "plan_bytes": self.plan_bytes,
            "warnings": self.warnings,
        }
        if self.classes.size > grid_limit:
            out["grid_omitted"] = True
        else:
            out["grid"] = self.classes.tolist()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def render(self, width: int | None = None) -> str:
        """The text report, with grids at most ``width`` characters wide (default: the terminal)."""
        width = width or self.width or shutil.get_terminal_size((80, 24)).columns
        c = self.counts
        total = sum(c.values())
        B, H, nq, nk = self.grid_shape
        offsets = ""
        if np.any(np.asarray(self.q_offset)) or np.any(np.asarray(self.kv_offset)):
            offsets = f", q_offset {_fmt_offset(self.q_offset)}, kv_offset {_fmt_offset(self.kv_offset)}"
        lines = [
            f"canonical: {self.mod}",
            f"kind:      {self.mod.kind}" + (f" (tensors: {', '.join(self.mod.tensors)})" if self.mod.tensors else ""),
            *([f"lowering:  {self.lowering}"] if self.lowering else []),
            f"sizes:     batch {self.batch}, heads {self.heads}, q {self.q_len}, kv {self.kv_len}{offsets}; "
            f"blocks {self.block_q} x {self.block_kv}",
            f"blocks:    {total:,} in a [{B}, {H}, {nq}, {nk}] grid: {c['full']:,} full, {c['partial']:,} partial, "
            f"{c['empty']:,} empty{self._sharing()}",
            f"density:   {100 * self.density:.1f}% of blocks visited; FLOPs saved vs dense: "
            f"{100 * self.flops_saved:.1f}%",
            f"plan:      {self.plan_bytes:,} bytes of block metadata (kv lists + transpose)",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += self._grids(width)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def _sharing(self) -> str:
        B, H = self.grid_shape[:2]
        shared = [what for what, n, planes in (("batches", self.batch, B), ("heads", self.heads, H))
                  if n > 1 and planes == 1]
        return f" (one plan for all {' and '.join(shared)})" if shared else ""

    def _grids(self, width: int) -> list[str]:
        B, H, nq, nk = self.grid_shape
        avail = max(8, width - 2)
        # One factor for both axes keeps diagonals diagonal.
        fr = fc = max(-(-nk // avail), -(-nq // _MAX_GRID_ROWS))
        groups: dict[bytes, list[tuple[int, int]]] = {}
        for b in range(B):
            for h in range(H):
                groups.setdefault(self.classes[b, h].tobytes(), []).append((b, h))
        lines = [f"grid [{B}, {H}, {nq}, {nk}] (1 char = {fr} x {fc} blocks of {self.block_q} x {self.block_kv} "
                 f"positions; {_CHARS[FULL]} full, {_CHARS[PARTIAL]} partial, {_CHARS[EMPTY]} empty)"]
        for shown, planes in enumerate(groups.values()):
            if shown == _MAX_GRIDS_SHOWN:
                lines.append(f"... and {len(groups) - shown} more distinct grids")
                break
            if B * H > 1:
                lines.append(f"{_planes(planes, B, H)}:")
            b, h = planes[0]
            lines += ["  " + row for row in _downsample(self.classes[b, h], fr, fc)]
        return lines


def _downsample(grid: np.ndarray, fr: int, fc: int) -> list[str]:
    """Rows of characters for a [nq, nk] grid, each char summarising fr x fc blocks
    (FULL if all are full, EMPTY if all are empty, else PARTIAL)."""
    nq, nk = grid.shape
    rows, cols = -(-nq // fr), -(-nk // fc)
    padded = np.pad(grid, ((0, rows * fr - nq), (0, cols * fc - nk)), mode="edge")
    cells = padded.reshape(rows, fr, cols, fc)
    low, high = cells.min(axis=(1, 3)), cells.max(axis=(1, 3))
    summary = np.where(low == FULL, FULL, np.where(high == EMPTY, EMPTY, PARTIAL))
    chars = np.array([_CHARS[EMPTY], _CHARS[PARTIAL], _CHARS[FULL]])
    return ["".join(row) for row in chars[summary]]


def _ranges(indices, block: int, length: int) -> str:
    """Row ranges of q-blocks, e.g. ``rows 0-127, 512-639``."""
    spans = []
    for i in indices:
        lo, hi = int(i) * block, min((int(i) + 1) * block, length) - 1
        if spans and spans[-1][1] == lo - 1:
            spans[-1][1] = hi
        else:
            spans.append([lo, hi])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans[:4])
    return ("rows " if len(spans) > 1 or spans[0][0] != spans[0][1] else "row ") + text + (
        ", ..." if len(spans) > 4 else "")


def _planes(planes, B: int, H: int) -> str:
    """Which (batch, head) planes share a grid, e.g. ``b=0, h=0-3``."""
    by_batch: dict[int, list[int]] = {}
    for b, h in planes:
        by_batch.setdefault(b, []).append(h)
    parts = []
    for b, hs in by_batch.items():
        if H == 1:
            parts.append(f"b={b}")
        elif B == 1:
            parts.append(f"h={_compact(hs)}")
        else:
            parts.append(f"b={b} h={_compact(hs)}")
    if H == 1 and len(parts) > 1:
        return "b=" + _compact([b for b in by_batch])
    return "; ".join(parts[:6]) + ("; ..." if len(parts) > 6 else "")


def _compact(values) -> str:
    spans = []
    for v in values:
        if spans and spans[-1][1] == v - 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def _fmt_offset(offset) -> str:
    arr = np.asarray(offset)
    return str(arr.tolist()) if arr.ndim else str(int(arr))


def explain(mod, q_len: int, kv_len: int | None = None, block=(128, 128), batch: int = 1, heads: int = 1, *,
            q_offset=0, kv_offset=0, width: int | None = None, lowering: str | None = None,
            **tensors) -> Explanation:
    """Explain ``mod`` (a ``Mod`` or a source string) at these sizes.

    Args:
      q_len, kv_len: T and S (kv_len defaults to q_len).
      block: (block_q, block_kv), or one int for both; powers of two.
      batch, heads: B and N (query heads).
      q_offset, kv_offset: int or int[B] (positions are offset + row / column).
      width: grid width in characters for ``str()`` (default: the terminal's).
      lowering: a paragraph saying what would run (the report leaves it out when None;
        ``dslc explain`` passes the runtime's ``dispatch_summary``).
      **tensors: the tensor parameters the mod reads (arrays or numbers).

    Raises ``ScoreModShapeError`` / ``ScoreModTensorError`` on bad sizes or tensors.
    """

    mod = compile_mod(mod)
    kv_len = q_len if kv_len is None else kv_len
    block_q, block_kv = (block, block) if isinstance(block, (int, np.integer)) else tuple(block)
    validate_plan_sizes(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, batch=batch, heads=heads)
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1):
        raise ScoreModShapeError(f"width={width!r} must be a positive int (characters per grid line)")
    q_offset = check_offset("q_offset", q_offset, batch, q_len)
    kv_offset = check_offset("kv_offset", kv_offset, batch, kv_len)
    check_tensors(mod, tensors, batch, heads, q_len, kv_len, q_offset=q_offset, kv_offset=kv_offset)
    mask = mod.canonical.mask
    reads = {name: np.asarray(tensors[name]) for name in mod.canonical.tensors if name in tensors}
    mask_reads = {name: value for name, value in reads.items() if any(name == n for n in tensor_names(mask))}
    shape = plan_grid_shape(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, batch=batch,
                            heads=heads, q_offset=q_offset, kv_offset=kv_offset, tensors=mask_reads)
    if math.prod(shape) > EXPLAIN_MAX_GRID_CELLS:
        raise ScoreModShapeError(f"the block grid {list(shape)} has {math.prod(shape):,} cells, more than "
                                 f"explain draws ({EXPLAIN_MAX_GRID_CELLS:,})", hint="use larger blocks")
    if not mask_reads and np.ndim(q_offset) == 0 and np.ndim(kv_offset) == 0:
        plan = build_plan(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, batch=batch,
                          heads=heads, q_offset=int(q_offset), kv_offset=int(kv_offset))
        classes = plan.classes
    else:
        grid = BlockGrid(batch, heads, PositionBlocks(q_len, block_q, np.asarray(q_offset)),
                         PositionBlocks(kv_len, block_kv, np.asarray(kv_offset)))
        classes = np.ascontiguousarray(classify_blocks(simplify(mask), grid, mask_reads, np))
    return Explanation(mod, np.asarray(classes), int(q_len), int(kv_len), int(block_q), int(block_kv), int(batch),
                       int(heads), q_offset, kv_offset, width, lowering)


