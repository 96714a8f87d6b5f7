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
``Explanation.to_svg()`` (``dslc explain --svg FILE``) draws the same report as an SVG picture.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from scoremod.errors import ScoreModShapeError
from scoremod.dsl.ast import tensor_names
from scoremod.compiler.intervals import EMPTY, FULL, PARTIAL, BlockGrid, PositionBlocks, classify_blocks
from scoremod.compiler.mod import compile_mod
# plan_layout, not plan: explaining a static mask never imports jax.
from scoremod.compiler.plan_layout import build_static_plan, check_offset, plan_grid_shape, validate_plan_sizes
from scoremod.compiler.rewrite import simplify
from scoremod.compiler.tensors import check_tensors

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
        return "\n".join(self._header_lines() + self._grids(width))

    def __str__(self) -> str:
        return self.render()

    def to_svg(self) -> str:
        """The report as a self-contained SVG picture (text; no dependency): the header lines
        of the text report, a legend, and the block grid with one coloured cell per
        (q-block, kv-block), query blocks down and key blocks across, ticks at block starts.

        Like the text report it draws one grid per distinct (batch, head) plane (the first
        four). Grids of more than ``SVG_MAX_CELLS`` blocks a side are downsampled, each cell
        covering f x f blocks with the text grid's rule (full if all are full, empty if all
        are empty, else partial; the legend says f); f doubles until the grids take at most
        ``SVG_MAX_RECTS`` rectangles (one per horizontal run of equal cells), so the file
        stays under about 400 KB at any size.

            >>> svg = scoremod.compile("causal & window(1024)").explain(8192).to_svg()
            >>> Path("window.svg").write_text(svg)   # or: dslc explain ... --svg window.svg
        """
        return _render_svg(self)

    def _header_lines(self) -> list[str]:
        """The report's lines above the grid: source, kind, sizes, counts, density, plan, warnings."""
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
        return lines + [f"warning: {w}" for w in self.warnings]

    def _sharing(self) -> str:
        B, H = self.grid_shape[:2]
        shared = [what for what, n, planes in (("batches", self.batch, B), ("heads", self.heads, H))
                  if n > 1 and planes == 1]
        return f" (one plan for all {' and '.join(shared)})" if shared else ""

    def _distinct_planes(self) -> list[list[tuple[int, int]]]:
        """The (batch, head) planes grouped by equal grids, in order of first appearance."""
        B, H = self.grid_shape[:2]
        groups: dict[bytes, list[tuple[int, int]]] = {}
        for b in range(B):
            for h in range(H):
                groups.setdefault(self.classes[b, h].tobytes(), []).append((b, h))
        return list(groups.values())

    def _grids(self, width: int) -> list[str]:
        B, H, nq, nk = self.grid_shape
        avail = max(8, width - 2)
        # One factor for both axes keeps diagonals diagonal.
        fr = fc = max(-(-nk // avail), -(-nq // _MAX_GRID_ROWS))
        groups = self._distinct_planes()
        lines = [f"grid [{B}, {H}, {nq}, {nk}] (1 char = {fr} x {fc} blocks of {self.block_q} x {self.block_kv} "
                 f"positions; {_CHARS[FULL]} full, {_CHARS[PARTIAL]} partial, {_CHARS[EMPTY]} empty)"]
        chars = np.array([_CHARS[EMPTY], _CHARS[PARTIAL], _CHARS[FULL]])
        for shown, planes in enumerate(groups):
            if shown == _MAX_GRIDS_SHOWN:
                lines.append(f"... and {len(groups) - shown} more distinct grids")
                break
            if B * H > 1:
                lines.append(f"{_planes(planes, B, H)}:")
            b, h = planes[0]
            lines += ["  " + "".join(row) for row in chars[_summarise(self.classes[b, h], fr, fc)]]
        return lines


def _summarise(grid: np.ndarray, fr: int, fc: int) -> np.ndarray:
    """A [nq, nk] grid of classes downsampled to one class per fr x fc blocks: FULL if all are
    full, EMPTY if all are empty, else PARTIAL (the last row / column of cells may cover fewer).

        >>> _summarise(np.array([[2, 2, 0], [2, 1, 0]]), 2, 2).tolist()
        [[1, 0]]
    """
    nq, nk = grid.shape
    rows, cols = -(-nq // fr), -(-nk // fc)
    padded = np.pad(grid, ((0, rows * fr - nq), (0, cols * fc - nk)), mode="edge")
    cells = padded.reshape(rows, fr, cols, fc)
    low, high = cells.min(axis=(1, 3)), cells.max(axis=(1, 3))
    return np.where(low == FULL, FULL, np.where(high == EMPTY, EMPTY, PARTIAL))


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


# -- SVG picture (Explanation.to_svg) ---------------------------------------------------------

# Drawn cells per grid side before to_svg downsamples.
SVG_MAX_CELLS = 256
# Rectangles (horizontal runs of equal cells) for all drawn grids; about 45 bytes each.
SVG_MAX_RECTS = 8000
_SVG_COLOURS = {FULL: "#08519c", PARTIAL: "#fd8d3c", EMPTY: "#eeeeee"}
_SVG_NAMES = {FULL: "full", PARTIAL: "partial", EMPTY: "empty"}
_SVG_LEGEND = {FULL: "full: every pair attends, no mask evaluated",
               PARTIAL: "partial: the mask is evaluated per element",
               EMPTY: "empty: skipped"}
_FONT_PX = 12
_TITLE_PX = 15
_CHAR_PX = 7.3     # width of a monospace character at _FONT_PX
_LINE_PX = 16
_PAD_PX = 16
_WRAP_CHARS = 110  # header lines wrap here
_CELL_PX_MAX = 32  # the largest drawn cell
_GRID_MIN_H_PX = 24  # the least grid height


def _render_svg(ex: Explanation) -> str:
    """``Explanation.to_svg``: header, legend, then one panel per distinct (batch, head) grid."""
    B, H, nq, nk = ex.grid_shape
    groups = ex._distinct_planes()
    shown = groups[:_MAX_GRIDS_SHOWN]
    grids = [ex.classes[planes[0]] for planes in shown]
    f = _svg_factor(grids)
    rows, cols = -(-nq // f), -(-nk // f)
    cell_px = min(_CELL_PX_MAX, (640 if len(shown) == 1 else 384) / max(rows, cols))
    # Square cells keep diagonals diagonal; only a grid of a few rows (decode) is stretched
    # down to stay visible.
    cell_h = max(cell_px, _GRID_MIN_H_PX / rows)
    grid_w, grid_h = cols * cell_px, rows * cell_h

    title = f"block grid [{B}, {H}, {nq}, {nk}]"
    if B * H > 1:
        title += (f": {len(groups)} distinct grid{'s' if len(groups) > 1 else ''} for the {B * H} "
                  f"(batch, head) planes" + (f", the first {len(shown)} drawn" if len(shown) < len(groups) else ""))
    header = [wrapped for line in ex._header_lines()
              for wrapped in textwrap.wrap(line, _WRAP_CHARS, subsequent_indent=" " * 11, break_on_hyphens=False)]
    blocks = f"{f} x {f} blocks" if f > 1 else "1 x 1 block"
    scale = f"each cell: {blocks} of {ex.block_q} x {ex.block_kv} positions"
    if f > 1:
        scale += " (full if all are full, empty if all are empty, else partial)"
    offsets = np.any(np.asarray(ex.q_offset)) or np.any(np.asarray(ex.kv_offset))
    axes = ("axes: query blocks down, key blocks across; ticks at a block's first "
            + ("row / column (position = q_offset + row, kv_offset + column)" if offsets else "position"))

    out: list[str] = []
    y = _PAD_PX + _FONT_PX
    heading = f"scoremod explain: {title}"
    out.append(_svg_text(_PAD_PX, y + 2, heading, **{"font-size": _TITLE_PX, "font-weight": "bold"}))
    y += _LINE_PX + 6
    # Spaces kept, as in the text report (aligned values, indented continuation lines).
    out.append('<g class="header" xml:space="preserve" style="white-space:pre">')
    for line in header:
        colour = {"fill": "#b30000"} if line.startswith("warning:") else {}
        out.append(_svg_text(_PAD_PX, y, line, **colour))
        y += _LINE_PX
    out.append("</g>")
    y += 6
    out.append('<g class="legend">')
    for cls in (FULL, PARTIAL, EMPTY):
        out.append(f'<rect x="{_PAD_PX}" y="{y - 10}" width="12" height="12" fill="{_SVG_COLOURS[cls]}" '
                   f'stroke="#888"/>')
        out.append(_svg_text(_PAD_PX + 18, y, _SVG_LEGEND[cls]))
        y += _LINE_PX
    for line in (scale, axes):
        out.append(_svg_text(_PAD_PX, y, line))
        y += _LINE_PX
    out.append("</g>")
    text_w = max(max(len(line) for line in header + [scale, axes]) * _CHAR_PX,
                 len(heading) * _CHAR_PX * _TITLE_PX / _FONT_PX)

    ticks_q = _svg_ticks(nq, cell_h / f, 24)
    ticks_kv = _svg_ticks(nk, cell_px / f, (len(str(nk * ex.block_kv)) + 2) * _CHAR_PX)
    labels_w = max(len(str(t * ex.block_q)) for t in ticks_q + [0]) * _CHAR_PX
    gx = _PAD_PX + max(labels_w, 4 * _CHAR_PX) + 8
    for planes in shown:
        y += 8
        label = _planes(planes, B, H) if B * H > 1 else ""
        out.append(f'<g class="plane" data-planes={quoteattr(label)}>')
        if label:
            out.append(_svg_text(_PAD_PX, y, f"{label}:", **{"font-weight": "bold"}))
            y += _LINE_PX
        out.append(_svg_text(_PAD_PX, y + 22, "q ↓"))
        out.append(_svg_text(gx, y, "kv →"))
        gy = y + 30
        for t in ticks_kv:
            x = gx + t * cell_px / f
            out.append(f'<path d="M{_num(x)} {_num(gy - 5)}V{_num(gy)}" stroke="#444"/>')
            out.append(_svg_text(x, gy - 8, str(t * ex.block_kv), **{"text-anchor": "middle" if t else "start"}))
        for t in ticks_q:
            yy = gy + t * cell_h / f
            out.append(f'<path d="M{_num(gx - 5)} {_num(yy)}H{_num(gx)}" stroke="#444"/>')
            out.append(_svg_text(gx - 7, yy + (9 if t == 0 else 4), str(t * ex.block_q), **{"text-anchor": "end"}))
        out.append(_svg_grid(_summarise(ex.classes[planes[0]], f, f), gx, gy, cell_px, cell_h))
        out.append(f'<rect x="{_num(gx)}" y="{_num(gy)}" width="{_num(grid_w)}" height="{_num(grid_h)}" '
                   f'fill="none" stroke="#888"/>')
        out.append("</g>")
        y = gy + grid_h + _LINE_PX
    if len(groups) > len(shown):
        y += 4
        out.append(_svg_text(_PAD_PX, y, f"... and {len(groups) - len(shown)} more distinct grids"))
        y += _LINE_PX
    width = math.ceil(max(2 * _PAD_PX + text_w, gx + grid_w + 2 * _PAD_PX + len(str(nk * ex.block_kv)) * _CHAR_PX))
    height = math.ceil(y + _PAD_PX)
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="{_FONT_PX}">',
        f"<title>{escape(f'scoremod explain: {ex.mod} — {title}')}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        *out,
        "</svg>",
    ]) + "\n"


def _svg_factor(grids: list[np.ndarray]) -> int:
    """Blocks per drawn cell side: at most SVG_MAX_CELLS cells a side, then doubled until the
    grids' horizontal runs of equal cells (one rectangle each) number at most SVG_MAX_RECTS."""
    nq, nk = grids[0].shape
    f = -(-max(nq, nk) // SVG_MAX_CELLS)
    while f < max(nq, nk) and sum(_count_runs(_summarise(g, f, f)) for g in grids) > SVG_MAX_RECTS:
        f *= 2
    return f


def _count_runs(summary: np.ndarray) -> int:
    """Horizontal runs of equal cells in a [rows, cols] grid of classes."""
    return summary.shape[0] + int(np.count_nonzero(np.diff(summary, axis=1)))


def _svg_grid(summary: np.ndarray, gx: float, gy: float, cell_px: float, cell_h: float) -> str:
    """One grid of drawn cells: a ``<g>`` per class holding a rect per horizontal run of equal
    cells, in cell units (x: column, y: row; a run of c cells is c wide, 1 high) under a
    ``scale(cell_px cell_h)`` transform, so each class's rects add up to its number of cells.
    White lines separate the cells when they are at least 8 pixels wide.

    A cell at the ragged edge (fewer than f blocks left) is drawn full size, like the text grid's.
    """
    rects: dict[int, list[str]] = {FULL: [], PARTIAL: [], EMPTY: []}
    for r, row in enumerate(summary):
        starts = np.concatenate(([0], np.flatnonzero(np.diff(row)) + 1))
        stops = np.concatenate((starts[1:], [len(row)]))
        for a, b in zip(starts.tolist(), stops.tolist()):
            rects[int(row[a])].append(f'<rect x="{a}" y="{r}" width="{b - a}" height="1"/>')
    out = [f'<g transform="translate({_num(gx)} {_num(gy)}) scale({_num(cell_px, 4)} {_num(cell_h, 4)})" '
           f'shape-rendering="crispEdges">']
    for cls in (EMPTY, PARTIAL, FULL):
        out.append(f'<g class="{_SVG_NAMES[cls]}" fill="{_SVG_COLOURS[cls]}">')
        out += rects[cls]
        out.append("</g>")
    out.append("</g>")
    rows, cols = summary.shape
    if cell_px >= 8 and rows * cols > 1:
        w, h = cols * cell_px, rows * cell_h
        d = "".join(f"M{_num(gx + c * cell_px)} {_num(gy)}v{_num(h)}" for c in range(1, cols))
        d += "".join(f"M{_num(gx)} {_num(gy + r * cell_h)}h{_num(w)}" for r in range(1, rows))
        out.append(f'<path d="{d}" stroke="#ffffff" stroke-width="1" fill="none"/>')
    return "\n".join(out)


def _svg_ticks(n_blocks: int, block_px: float, min_gap_px: float) -> list[int]:
    """Block indices to tick: multiples of the smallest power of two at least min_gap_px apart."""
    step = 1
    while step * block_px < min_gap_px:
        step *= 2
    return list(range(0, n_blocks, step))


def _svg_text(x: float, y: float, text: str, **attrs) -> str:
    """A ``<text>`` element, its content XML-escaped (sources hold ``&``, ``<`` and ``>``)."""
    extra = "".join(f' {name}="{value}"' for name, value in attrs.items())
    return f'<text x="{_num(x)}" y="{_num(y)}"{extra}>{escape(text)}</text>'


def _num(x: float, digits: int = 2) -> str:
    """A coordinate with at most ``digits`` decimals and no trailing zeros: 12, 2.5."""
    text = f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


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
        classes = build_static_plan(mask, int(q_len), int(kv_len), int(block_q), int(block_kv), int(batch),
                                    int(heads), int(q_offset), int(kv_offset)).classes
    else:
        grid = BlockGrid(batch, heads, PositionBlocks(q_len, block_q, np.asarray(q_offset)),
                         PositionBlocks(kv_len, block_kv, np.asarray(kv_offset)))
        classes = np.ascontiguousarray(classify_blocks(simplify(mask), grid, mask_reads, np))
    return Explanation(mod, np.asarray(classes), int(q_len), int(kv_len), int(block_q), int(block_kv), int(batch),
                       int(heads), q_offset, kv_offset, width, lowering)


