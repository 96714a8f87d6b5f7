"""``dslc``: check, list, show, explain and export scoremod sources.

    dslc check "causal & window(1024)"
    dslc list
    dslc show window
    dslc explain "causal & doc(ids)" --seq 8192 --tensor ids=segments:4096,4096
    dslc explain "causal & window(1024)" --seq 8192 --svg window.svg
    dslc explain "causal & doc(ids)" --seq 8192 --tensor ids=segments:4096,2048,2048 --devices 4
    dslc export "causal & doc(ids)" --to flex -o doc_mask.py
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "parse_tensor_value"]

# Every command imports what it needs inside its function: `dslc check`, `list` and `show`
# never load jax, nor numpy unless a rewrite rule asks the interval analysis (an int
# quotient such as alibi's: compiler/rewrite.py); `explain` loads numpy, and jax only for a
# mod that reads tensors or a mask that reads score (to ask the tile program what the
# kernels decline) or with --devices (context parallelism's plans).

# segments:L1,L2,... makes an int32 array of sum(L) entries: 256 MiB at most.
MAX_SEGMENT_POSITIONS = 1 << 26


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


# ---- dslc explain ----------------------------------------------------------------------------

def parse_tensor_value(name: str, text: str):
    """A ``--tensor NAME=VALUE`` value: a number, a ``.npy`` path, or ``segments:L1,L2,...``
    (sorted segment ids: L1 zeros, then L2 ones, ...)."""
    import numpy as np
    from scoremod.errors import ScoreModTensorError
    if text.startswith("segments:"):
        try:
            lengths = [int(x) for x in text[len("segments:"):].split(",") if x.strip()]
        except ValueError:
            lengths = []
        if not lengths or any(n <= 0 for n in lengths):
            raise ScoreModTensorError(f"tensor '{name}': segments needs positive lengths, got {text!r}",
                                      hint="for example segments:4096,2048,2048")
        if sum(lengths) > MAX_SEGMENT_POSITIONS:
            raise ScoreModTensorError(f"tensor '{name}': segments cover {sum(lengths):,} positions; explain takes "
                                      f"at most {MAX_SEGMENT_POSITIONS:,}")
        return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    if text.endswith(".npy"):
        try:
            return np.load(text, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:   # missing, empty, truncated or lying files
            raise ScoreModTensorError(f"tensor '{name}': cannot read {text!r}: {exc}") from None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    raise ScoreModTensorError(f"tensor '{name}': {text!r} is not a number, a .npy file or segments:L1,L2,...",
                              hint=f"for example --tensor {name}=4096 or --tensor {name}=segments:512,512")


def _block_arg(text: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected BQ or BQ,BKV (e.g. 128 or 128,64), got {text!r}")
    return (parts[0], parts[-1])


def _configure_explain_parser(parser) -> None:
    parser.add_argument("source", metavar="SOURCE", help='a source, e.g. "causal & window(1024)"; - reads stdin')
    parser.add_argument("--seq", type=int, required=True, metavar="T", help="query length T")
    parser.add_argument("--kv-seq", type=int, default=None, metavar="S", help="key length S (default: T)")
    parser.add_argument("--block", type=_block_arg, default=(128, 128), metavar="BQ[,BKV]",
                        help="block sizes, powers of two (default: 128)")
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default: 1)")
    parser.add_argument("--heads", type=int, default=1, metavar="N", help="query heads (default: 1)")
    parser.add_argument("--q-offset", type=int, default=0, metavar="N", help="q = q_offset + row (default: 0)")
    parser.add_argument("--kv-offset", type=int, default=0, metavar="N", help="kv = kv_offset + column (default: 0)")
    parser.add_argument("--tensor", action="append", default=[], metavar="NAME=VALUE",
                        help="a tensor parameter: a number, a .npy file, or segments:L1,L2,... (sorted ids)")
    parser.add_argument("--width", type=int, default=None, metavar="COLS",
                        help="grid width in characters (default: the terminal's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    parser.add_argument("--svg", metavar="FILE", default=None,
                        help="also write the report and block grid as an SVG picture to FILE "
                             "(the text or JSON report still prints)")
    parser.add_argument("--devices", type=int, default=None, metavar="P",
                        help="also show the shard-level plan of context parallelism over P devices for the "
                             "contiguous, zigzag and balanced layouts: work per device, balance, pairs and ring "
                             "steps run, K/V bytes received (JSON: under \"context_parallel\")")
    parser.add_argument("--kv-heads", type=int, default=None, metavar="K",
                        help="with --devices: key/value heads for the bytes moved (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=None, metavar="H",
                        help="with --devices: head dimension for the bytes moved (default: 128; bf16 assumed)")


def _cmd_explain(args) -> int:
    from scoremod.compiler.explain import explain
    from scoremod.compiler.mod import compile_mod
    from scoremod.errors import ScoreModError, ScoreModTensorError
    from scoremod.runtime._dispatch_order import dispatch_summary   # (no jax: a static mask never loads it)
    try:
        source = sys.stdin.read() if args.source == "-" else args.source
        mod = compile_mod(source)
        tensors = {}
        for item in args.tensor:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise ScoreModTensorError(f"--tensor expects NAME=VALUE, got {item!r}",
                                          hint="for example --tensor ids=segments:4096,4096")
            if name.strip() in tensors:
                raise ScoreModTensorError(f"--tensor {name.strip()} is given twice", hint="give each tensor once")
            tensors[name.strip()] = parse_tensor_value(name.strip(), value.strip())
        result = explain(mod, args.seq, args.kv_seq, block=args.block, batch=args.batch, heads=args.heads,
                         q_offset=args.q_offset, kv_offset=args.kv_offset, width=args.width,
                         lowering=dispatch_summary(mod), **tensors)
        shards = _context_explanation(mod, args, tensors)
    except ScoreModError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.svg is not None:
        try:
            with open(args.svg, "w", encoding="utf-8") as f:
                f.write(result.to_svg())
        except OSError as exc:
            print(f"error: cannot write {args.svg!r}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if args.json:
        import json
        print(json.dumps({**result.to_dict(), **({"context_parallel": shards.to_dict()} if shards else {})}))
    else:
        print(result.render() + (f"\n\n{shards.render()}" if shards else ""))
    return 0


def _context_explanation(mod, args, tensors):
    """``--devices P``: the shard-level plan (``compiler/context_explain.py``), with the layout
    ``attention(..., context_layout=None)`` takes asked of the runtime (``choose_layout``)."""
    import dataclasses
    from scoremod.errors import ScoreModShapeError
    if args.devices is None:
        for flag, value in (("--kv-heads", args.kv_heads), ("--head-dim", args.head_dim)):
            if value is not None:
                raise ScoreModShapeError(f"{flag} sets the K/V bytes of context parallelism: it needs --devices P")
        return None
    for flag, value in (("--devices", args.devices), ("--kv-heads", args.kv_heads), ("--head-dim", args.head_dim)):
        if value is not None and value < 1:
            raise ScoreModShapeError(f"{flag} {value}: must be a positive int",
                                     hint="for example --devices 8" if flag == "--devices" else None)
    from scoremod.compiler.context_explain import explain_context   # (imports jax)
    from scoremod.runtime.context_parallel import BALANCED_CHUNKS_PER_DEVICE, choose_layout
    kv_len = args.seq if args.kv_seq is None else args.kv_seq
    head_dim = 128 if args.head_dim is None else args.head_dim
    report = explain_context(mod, args.devices, args.seq, kv_len, batch=args.batch, heads=args.heads,
                             q_offset=args.q_offset, kv_offset=args.kv_offset, kv_heads=args.kv_heads,
                             head_dim=head_dim, balanced_chunks=BALANCED_CHUNKS_PER_DEVICE, **tensors)
    chosen, _ = choose_layout(mod, args.devices, q_len=args.seq, kv_len=kv_len, batch=args.batch, heads=args.heads,
                              q_offset=args.q_offset, kv_offset=args.kv_offset, tensors=tensors)
    return dataclasses.replace(report, default_layout=chosen.name)


# ---- dslc export -----------------------------------------------------------------------------

EXPORT_TARGETS = ("flex",)


def _cmd_export(args) -> int:
    from scoremod.compiler.mod import compile_mod
    from scoremod.errors import ScoreModError
    try:
        source = sys.stdin.read() if args.source == "-" else args.source
        text = compile_mod(source).to_flex()
    except ScoreModError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        print(f"error: cannot write {args.output!r}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dslc", description="The scoremod compiler: check, list, show, explain and export attention mods.")
    from scoremod import __version__
    parser.add_argument("--version", action="version", version=f"dslc (scoremod) {__version__}")
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
                                   "block counts, density, FLOPs saved and a grid of full/partial/empty blocks. "
                                   "--svg FILE also draws them as an SVG picture; --devices P adds the shard-level "
                                   "plan of context parallelism over P devices.")
    _configure_explain_parser(p)
    p.set_defaults(run=_cmd_explain)

    p = sub.add_parser("export", help="write SOURCE as a Python module for another framework (--to flex)",
                       description="Export SOURCE as the source of a self-contained Python module. --to flex: "
                                   "PyTorch FlexAttention score_mod / mask_mod and a block_mask helper "
                                   "(docs/export.md). Exit 1 with the error when it cannot be expressed.")
    p.add_argument("source", metavar="SOURCE",
                   help='a source, e.g. "causal & doc(ids)"; - reads it from standard input')
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS, help="the target: flex (PyTorch FlexAttention)")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="write the module to FILE (default: standard output)")
    p.set_defaults(run=_cmd_export)
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
