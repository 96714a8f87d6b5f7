"""``Mod.explain`` and ``dslc explain`` (to be written: see issue 3)."""

from __future__ import annotations


def configure_explain_parser(parser) -> None:
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("--seq", type=int, required=True)


def run_explain_command(args) -> int:
    raise NotImplementedError("dslc explain is not written yet")
