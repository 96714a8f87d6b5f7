"""``Mod``: a compiled score modification, and ``compile_mod`` (text -> Mod, cached)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from scoremod.errors import ScoreModError, ScoreModTensorError
from scoremod.dsl.ast import Node, deep_recursion, mentions, tensor_names
from scoremod.dsl.definitions import expand, globals_version
from scoremod.dsl.parser import normalize_newlines, parse_source
from scoremod.dsl.typecheck import check, read_masks
from scoremod.compiler.canonical import Canonical, canonicalize

__all__ = ["Mod", "compile_mod"]


@dataclass(frozen=True, eq=False)
class Mod:
    """A compiled mod: the canonical form ``where(M, T(score) + B, -inf)``.

    Equal (and equally hashed) when the canonical forms are equal, whatever the
    source text was. ``str(mod)`` is canonical source that compiles to an equal Mod.

    Attributes:
      canonical: the ``Canonical`` IR (mask, transform, bias).
      source: the text it was compiled from.
      kind: "mask", "bias" or "transform".
      tensors: names of the tensor parameters it reads, in order of first use.
      mask_reads: names of the tensors the source reads as masks by themselves (a read
        under ``&``, ``|``, ``~`` or as ``where``'s condition means ``read != 0``); their
        values must be bool or int (``compiler.tensors.check_mask_read_dtypes``).

    Example::

        >>> m = scoremod.compile("causal & window(1024)")
        >>> m.kind, m.tensors
        ('mask', ())
    """
    canonical: Canonical
    source: str = field(default="", repr=False)
    expr: Node | None = field(default=None, repr=False)  # expanded, checked, before canonicalization
    mask_reads: tuple[str, ...] = field(default=(), repr=False)

    @property
    def kind(self) -> str:
        return self.canonical.kind

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.canonical.tensors

    @property
    def source_tensors(self) -> tuple[str, ...]:
        """Every tensor parameter the source names, also those simplification removed
        (``where(true, alibi(8), bias(t))`` reads no tensor but names ``t``). Passing
        them is allowed; they are ignored."""
        names = dict.fromkeys(self.tensors)
        names.update(dict.fromkeys(tensor_names(self.expr) if self.expr is not None else ()))
        return tuple(names)

    def __eq__(self, other):
        with deep_recursion():   # dataclass equality recurses once per level of the IR
            return isinstance(other, Mod) and self.canonical == other.canonical

    def __hash__(self):
        with deep_recursion():
            return hash(self.canonical)

    def __str__(self) -> str:
        return str(self.canonical)

    def score_mod(self, **tensors):
        """A jnp ``score_mod(scores, b_idx, h_idx, q_idx, kv_idx) -> logits`` closure.

        The FlexAttention protocol: index arrays broadcast as ``[B,1,1,1]``, ``[1,N,1,1]``,
        ``[1,1,T,1]``, ``[1,1,1,S]``; ``q_idx``/``kv_idx`` are absolute positions. Returns
        ``where(M, T(score) + B, -inf)`` in float32. Tensors by keyword, like ``attention``.
        Head indices below 65,536, as every call's (``intervals.MAX_HEADS``: the canonical
        form relies on it).

            >>> sm = scoremod.compile("causal + alibi(8)").score_mod()
            >>> sm(scores, b, h, q, kv).shape == scores.shape
        """
        # Deferred: lowering imports jax, and `import scoremod` stays light.
        from scoremod.compiler.lowering import score_mod_fn
        return score_mod_fn(self.canonical, self._checked_tensors(tensors))

    def mask_mod(self, **tensors):
        """A jnp ``mask_mod(b_idx, h_idx, q_idx, kv_idx) -> bool`` closure for the mask M."""
        # Deferred: lowering imports jax, and `import scoremod` stays light.
        from scoremod.compiler.lowering import mask_mod_fn
        if mentions(self.canonical.mask, "score"):
            raise ScoreModError(f"the mask of {self} reads score, which a mask_mod(b, h, q, kv) does not see",
                                hint="use score_mod(), which applies the whole mod to the scores")
        return mask_mod_fn(self.canonical, self._checked_tensors(tensors))

    def to_flex(self) -> str:
        """The source of a self-contained Python module with PyTorch FlexAttention mods that
        mean what this mod means (docs/export.md). It defines ``make_mods(*, q_offset=0,
        kv_offset=0, **tensors)`` -> ``{"score_mod": fn or None, "mask_mod": fn or None}`` and
        ``block_mask(B, H, Q_LEN, KV_LEN, *, device="cpu", BLOCK_SIZE=128, ..., **tensors)``.
        What it cannot express raises ``ScoreModError``.

            >>> src = scoremod.compile("causal & doc(ids)").to_flex()
            >>> ns = {}; exec(src, ns)
            >>> out = flex_attention(q, k, v, block_mask=ns["block_mask"](B, N, T, S, device="cuda", ids=ids))
        """
        # Deferred like the other products: flex_export imports this module.
        from scoremod.compiler.flex_export import flex_module_source
        return flex_module_source(self)

    def _checked_tensors(self, tensors: dict) -> dict:
        # Deferred: tensors imports numpy, and `import scoremod` stays light.
        from scoremod.compiler.tensors import check_missing_tensors
        check_missing_tensors(self, tensors)
        extra = [n for n in tensors if n not in self.source_tensors]
        if extra:
            raise ScoreModTensorError(f"unexpected tensor parameter '{extra[0]}'; this mod reads "
                                      f"{', '.join(self.tensors) or 'no tensors'}")
        return {name: value for name, value in tensors.items() if name in self.tensors}

    def explain(self, q_len: int, kv_len: int | None = None, block=(128, 128), batch: int = 1,
                heads: int = 1, *, q_offset=0, kv_offset=0, width: int | None = None, **tensors):
        """What would run for these sizes: canonical form, lowering, block counts, density
        and the block grid. ``str()`` of the result is the text report; ``.to_dict()`` /
        ``.to_json()`` the machine-readable one; ``.to_svg()`` a picture of the grid (see
        ``scoremod.compiler.explain``).

            >>> print(scoremod.compile("causal & window(1024)").explain(8192))
        """
        # Deferred: explain imports numpy (`import scoremod` stays light) and imports this
        # module itself (compile_mod): a cycle.
        from scoremod.compiler.explain import explain
        return explain(self, q_len, kv_len, block=block, batch=batch, heads=heads,
                       q_offset=q_offset, kv_offset=kv_offset, width=width, **tensors)

    def __repr__(self) -> str:
        return f"Mod({str(self)!r}, kind={self.kind!r}, tensors={self.tensors!r})"


# Sources up to CACHED_SOURCE_CHARS long are cached (4096 of them: at most 32 MiB of
# text); longer ones, which real mods never are, compile every time.
CACHED_SOURCE_CHARS = 8192


# Compiled sources kept (each at most CACHED_SOURCE_CHARS of text and its IR).
COMPILE_CACHE = 4096


@lru_cache(maxsize=COMPILE_CACHE)
def _compile_cached(text: str, version: int) -> Mod:
    return _compile(text)


def _compile(text: str) -> Mod:
    text = normalize_newlines(text) if isinstance(text, str) else text
    with deep_recursion():
        src = parse_source(text)
        expr = expand(src)
        check(expr, text)
        expr, mask_reads = read_masks(expr)   # a tensor read used as a mask is read != 0
        try:
            canonical = canonicalize(expr)
        except ScoreModError as exc:
            raise type(exc)(exc.message, source=text, span=exc.span, hint=exc.hint) from None
    return Mod(canonical, text, expr, mask_reads)


def compile_mod(source: "str | Mod") -> Mod:
    """Parse, expand, type and canonicalize ``source``; cached on the text.

    Raises ``ScoreModError`` (with the source and a caret) on any mistake.
    """
    if isinstance(source, Mod):
        return source
    if not isinstance(source, str):
        raise ScoreModError(f"mod must be a source string or a compiled Mod, got {type(source).__name__}",
                            hint='for example mod="causal & window(1024)"')
    if len(source) > CACHED_SOURCE_CHARS:
        return _compile(source)
    return _compile_cached(source, globals_version())
