"""The language's files: the Lark grammar and the prelude (a source in the language)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

__all__ = ["grammar_text", "prelude_text"]


@lru_cache(maxsize=None)
def grammar_text() -> str:
    return resources.files(__name__).joinpath("scoremod.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def prelude_text() -> str:
    return resources.files(__name__).joinpath("prelude.sm").read_text(encoding="utf-8")
