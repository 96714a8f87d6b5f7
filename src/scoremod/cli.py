"""``dslc``: check, list, show and explain scoremod sources.

    dslc check "causal & window(1024)"
    dslc list
    dslc show window
    dslc explain "causal & doc(ids)" --seq 8192 --tensor ids=segments:4096,4096
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_check(args) -> int:
    from scoremod.compiler.mod import compile_mod
    from scoremod.dsl.ast import BoolLit
    from scoremod.errors import ScoreModError

    source = sys.stdin.read() if args.source == "-" else args.source
    try:
        mod = compile_mod(source)
    except ScoreModError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"ok: {mod.kind}")
    print(f"canonical: {mod}")
    if mod.tensors:
        print(f"tensors: {', '.join(mod.tensors)}")
    if mod.canonical.mask == BoolLit(False):
        print("warning: the mask is false everywhere: every logit is -inf and every row's output is 0",
              file=sys.stderr)
    return 0


def _cmd_list(args) -> int:
    from scoremod.dsl.definitions import BUILTIN_DOCS, BUILTIN_SIGNATURES, global_definitions, prelude

    rows = []
    for table in (prelude(), global_definitions()):
        for d in table:
            rows.append((d.signature, _definition_kind(d), d.doc or str(d.body), d.origin))
    for name, sig in BUILTIN_SIGNATURES.items():
        rows.append((sig, "function", BUILTIN_DOCS[name], "built-in"))
    width = max(len(r[0]) for r in rows)
    for sig, kind, doc, origin in rows:
        print(f"{sig:<{width}}  {kind:<9}  {doc}" + (f"  [{origin}]" if origin == "global" else ""))
    return 0


def _definition_kind(d) -> str:
    """mask / bias / transform for a definition, typing its body with opaque arguments."""
    from scoremod.dsl.ast import Call, Name, Source, mentions
    from scoremod.dsl.definitions import expand
    from scoremod.dsl.typecheck import BOOL, check
    from scoremod.errors import ScoreModError

    try:
        call = Call(d.name, tuple(Name(f"arg{i}_") for i in range(d.arity))) if d.arity else Name(d.name)
        expr = expand(Source((), call, text=""), text=d.signature)
        t = check(expr)
    except ScoreModError:  # a definition whose kind depends on its arguments
        return "macro"
    if t == BOOL:
        return "mask"
    return "transform" if mentions(expr, "score") else "bias"


def _cmd_show(args) -> int:
    from scoremod.dsl.definitions import BUILTIN_DOCS, BUILTIN_SIGNATURES, global_definitions, prelude, closest_name

    found = [d for t in (global_definitions(), prelude()) for d in t.overloads(args.name)]
    if not found and args.name in BUILTIN_SIGNATURES:
        print(f"{BUILTIN_SIGNATURES[args.name]}  (built-in function)")
        print(f"  {BUILTIN_DOCS[args.name]}")
        return 0
    if not found:
        names = list(prelude().names()) + list(global_definitions().names()) + list(BUILTIN_SIGNATURES)
        guess = closest_name(args.name, names)
        msg = f"error: unknown name '{args.name}'" + (f" — did you mean '{guess}'?" if guess else "")
        print(msg, file=sys.stderr)
        print("hint: `dslc list` shows every name", file=sys.stderr)
        return 1
    for d in found:
        print(f"{d.signature} = {d.body}")
        print(f"  kind: {_definition_kind(d)}   from: {d.origin}")
        if d.doc:
            print(f"  {d.doc}")
    return 0


def _cmd_explain(args) -> int:
    from scoremod.compiler.explain import run_explain_command
    return run_explain_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dslc", description="The scoremod compiler: check, list, show and explain attention mods.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", help="parse and type a source; exit 1 with the error if it is wrong",
                       description="Parse, expand and type SOURCE. Prints its kind and canonical form; "
                                   "on a mistake prints the error with a caret and exits 1.")
    p.add_argument("source", metavar="SOURCE",
                   help='a source, e.g. "causal & window(1024)"; - reads it from standard input')
    p.set_defaults(run=_cmd_check)

    p = sub.add_parser("list", help="every prelude, global and built-in name with its kind and doc",
                       description="List every name a source can use: prelude definitions, "
                                   "global definitions, and built-in functions.")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("show", help="a name's definition and doc",
                       description="Show the definition(s) of NAME (every overload) and its documentation.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=_cmd_show)

    p = sub.add_parser("explain", help="canonical form, lowering and the block-sparsity grid",
                       description="Explain what would run for SOURCE: canonical form, kind, lowering, "
                                   "block counts, density, FLOPs saved and a grid of full/partial/empty blocks.")
    from scoremod.compiler.explain import configure_explain_parser
    configure_explain_parser(p)
    p.set_defaults(run=_cmd_explain)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `dslc list | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
