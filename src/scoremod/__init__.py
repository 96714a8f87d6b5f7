"""scoremod: attention masks and biases as short strings, compiled to block-sparse kernels.

    >>> import scoremod
    >>> mod = scoremod.compile("causal & window(1024) + alibi(8)")
    >>> mod.kind
    'bias'
"""

from scoremod.errors import (
    ScoreModError, ScoreModSyntaxError, ScoreModNameError, ScoreModTypeError,
    ScoreModDefinitionError, ScoreModTensorError, ScoreModShapeError,
)
from scoremod.compiler.mod import Mod, compile_mod as compile
from scoremod.dsl.definitions import define, undefine

__version__ = "0.1.0"

__all__ = [
    "compile", "define", "undefine", "Mod",
    "ScoreModError", "ScoreModSyntaxError", "ScoreModNameError", "ScoreModTypeError",
    "ScoreModDefinitionError", "ScoreModTensorError", "ScoreModShapeError",
]
