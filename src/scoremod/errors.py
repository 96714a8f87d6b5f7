"""The error hierarchy. Every mistake a user can make raises a ``ScoreModError``.

Messages follow one shape: what is wrong, the source with a caret under the span,
and a fix when one exists::

    error: unknown name 'windw' — did you mean 'window'?
      causal & windw(128)
               ^^^^^
"""

from __future__ import annotations

__all__ = [
    "ScoreModError",
    "ScoreModSyntaxError",
    "ScoreModNameError",
    "ScoreModTypeError",
    "ScoreModDefinitionError",
    "ScoreModTensorError",
    "ScoreModShapeError",
]


class ScoreModError(ValueError):
    """Base of every scoremod error (a ``ValueError``).

    Attributes:
      message: what is wrong, one line.
      source: the source text the error is about, or None.
      span: ``(start, end)`` character offsets into ``source``, or None.
      hint: how to fix it, or None.
    """

    def __init__(self, message: str, *, source: str | None = None,
                 span: tuple[int, int] | None = None, hint: str | None = None):
        self.message = message
        self.source = source
        self.span = span
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [f"error: {self.message}"]
        if self.source is not None:
            lines.extend(render_caret(self.source, self.span))
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


def render_caret(source: str, span: tuple[int, int] | None) -> list[str]:
    """The source line(s) with a caret under ``span``, indented by two spaces."""
    if span is None:
        first = source.splitlines()[0] if source.strip() else source
        return [f"  {_clip(first)}"] if first.strip() else []
    start, end = span
    start = max(0, min(start, len(source)))
    end = max(start + 1, min(end, len(source)))
    line_start = source.rfind("\n", 0, start) + 1
    line_end = source.find("\n", start)
    if line_end == -1:
        line_end = len(source)
    line = source[line_start:line_end]
    col = start - line_start
    width = max(1, min(end, line_end) - start)
    # Long lines (100 kB sources) are clipped around the caret.
    if len(line) > 120:
        lo = max(0, col - 40)
        hi = min(len(line), lo + 120)
        prefix = "..." if lo > 0 else ""
        line = prefix + line[lo:hi] + ("..." if hi < len(source[line_start:line_end]) else "")
        col = col - lo + len(prefix)
        width = min(width, 120 - (col - len(prefix)))
    lineno = source.count("\n", 0, start) + 1
    out = []
    if "\n" in source.strip("\n"):
        out.append(f"  (line {lineno})")
    out.append(f"  {line}")
    out.append("  " + " " * col + "^" * max(1, width))
    return out


def _clip(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


class ScoreModSyntaxError(ScoreModError):
    """The text does not parse (or a literal is out of range)."""


class ScoreModNameError(ScoreModError):
    """An unknown function, a wrong number of arguments, or a reserved name."""


class ScoreModTypeError(ScoreModError):
    """A well-formed expression whose types do not fit (docs/language.md §3 Types)."""


class ScoreModDefinitionError(ScoreModError):
    """A bad definition: shadowing, recursion, bad parameters."""


class ScoreModTensorError(ScoreModError):
    """A tensor parameter is missing, extra, or has the wrong shape or dtype."""


class ScoreModShapeError(ScoreModError):
    """query/key/value, sizes or options do not fit together."""
