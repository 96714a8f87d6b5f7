"""scoremod: attention masks and biases as short strings, compiled to block-sparse kernels.

    >>> import scoremod
    >>> mod = scoremod.compile("causal & window(1024) + alibi(8)")
    >>> mod.kind
    'bias'
    >>> out = scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=segment_ids)

``attention``, ``dispatch``, ``plan``, ``paged_attention`` and ``as_attention_fn`` import jax on first use, so ``import scoremod``
(and the ``dslc`` CLI) stays light.
"""

from scoremod.errors import (
    ScoreModError, ScoreModSyntaxError, ScoreModNameError, ScoreModTypeError,
    ScoreModDefinitionError, ScoreModTensorError, ScoreModShapeError,
)
from scoremod.compiler.mod import Mod, compile_mod as compile
from scoremod.dsl.definitions import define, undefine

try:  # the one version number is pyproject.toml's
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("scoremod")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "unknown"

__all__ = [
    "attention", "dispatch", "plan", "AttentionPlan", "as_attention_fn", "paged_attention", "PagedBlockSizes",
    "ContextLayout", "context_layout", "compile", "define", "undefine", "Mod",
    "ScoreModError", "ScoreModSyntaxError", "ScoreModNameError", "ScoreModTypeError",
    "ScoreModDefinitionError", "ScoreModTensorError", "ScoreModShapeError",
]


def __getattr__(name):
    if name in ("attention", "dispatch", "plan", "context_layout"):
        from scoremod.runtime import attention as attention_module
        return getattr(attention_module, name)
    if name == "AttentionPlan":
        from scoremod.runtime.attention_plan import AttentionPlan
        return AttentionPlan
    if name in ("paged_attention", "PagedBlockSizes"):
        from scoremod.runtime import paged
        return getattr(paged, name)
    if name == "ContextLayout":
        from scoremod.compiler.context_plan import ContextLayout
        return ContextLayout
    if name == "as_attention_fn":
        from scoremod.runtime.flax_adapter import as_attention_fn
        return as_attention_fn
    raise AttributeError(f"module 'scoremod' has no attribute {name!r}")
