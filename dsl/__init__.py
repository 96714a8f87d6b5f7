"""Text -> AST -> expanded, typed IR. Knows nothing of arrays (no jax here)."""

from scoremod.dsl.ast import (
    Binary, BoolLit, Call, Definition, Index, IntLit, Name, Node, RealLit, Source, Tensor, Unary, Var,
    walk, mentions, tensor_names,
)
from scoremod.dsl.parser import parse_source, parse_definitions
from scoremod.dsl.definitions import define, undefine, expand, prelude, global_definitions
from scoremod.dsl.typecheck import check, type_of, top_level_parts, read_masks, BOOL, INT, REAL, NUM
from scoremod.dsl.printer import to_source

__all__ = [
    "Binary", "BoolLit", "Call", "Definition", "Index", "IntLit", "Name", "Node", "RealLit", "Source", "Tensor",
    "Unary", "Var", "walk", "mentions", "tensor_names",
    "parse_source", "parse_definitions",
    "define", "undefine", "expand", "prelude", "global_definitions",
    "check", "type_of", "top_level_parts", "read_masks", "BOOL", "INT", "REAL", "NUM",
    "to_source",
]
