"""How fast is the front end? Parse, expand, type and print NEW (uncached) ~100-character
sources, one stage at a time; then the full ``scoremod.compile`` (which adds the compiler's
canonicalization) on new sources and on cached ones. Prints medians (and 90th percentiles).

    python benchmarks/compile_speed.py            # 400 sources
    python benchmarks/compile_speed.py -n 2000 --profile

Target (the dsl part): parse + expand + type + print under 1 ms for a 100-character source;
every source under the documented limits well under a second per 10 kB (the long sources
at the end).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import scoremod
from scoremod.dsl.definitions import expand
from scoremod.dsl.parser import parse_source
from scoremod.dsl.printer import to_source
from scoremod.dsl.typecheck import check

# ~100-character sources; {i} and {j} make every one new, so no cache helps.
TEMPLATES = [
    "(causal | prefix(n)) & window({i}) & doc(ids) + alibi({j}) + relpos(t, {j}) + 30 * tanh(score / 30)",
    "swa(w) = causal & window(w)\nswa({i}) & doc(ids) + alibi({j}) + where(q - kv < {j}, 0.5, -1.5) + bias(bt)",
    "(causal & (q - kv) % {j} == 0 | sink({j})) & chunk({i}) + softcap({i}) + alibi(16) * 0.{j} & length(n)",
    "window({i}, {j}) & (ids[b, q] != ids[b, kv]) + exp2(-abs(q - kv) / {i}) + sigmoid(score) * {j}.5",
]


def new_sources(n: int) -> list[str]:
    return [TEMPLATES[k % len(TEMPLATES)].format(i=1000 + k, j=1 + k % 9) for k in range(n)]


def timed(fn, items) -> list[float]:
    """Seconds per call of ``fn(item)``."""
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - start)
    return out


def report(name: str, seconds: list[float]) -> None:
    med = statistics.median(seconds) * 1e3
    p90 = sorted(seconds)[int(0.9 * (len(seconds) - 1))] * 1e3
    print(f"  {name:<34} median {med:8.3f} ms   p90 {p90:8.3f} ms")


def balanced(parts: list[str], op: str) -> str:
    """``parts`` joined by ``op`` as a balanced tree: ``((a op b) op (c op d))``."""
    if len(parts) == 1:
        return parts[0]
    middle = len(parts) // 2
    return f"({balanced(parts[:middle], op)} {op} {balanced(parts[middle:], op)})"


# Chains that once took minutes (each part was compared with every other when merging).
LONG_SOURCES = {
    "600 x (q - kv != i) &": " & ".join(f"q - kv != {i}" for i in range(1, 601)),
    "400 x (q - kv == i) |": " | ".join(f"q - kv == {i}" for i in range(1, 401)),
    "dilated(1) & ... & dilated(100)": " & ".join(f"dilated({i})" for i in range(1, 101)),
    "dilated(1) & ... & dilated(989)": " & ".join(f"dilated({i})" for i in range(1, 990)),
    "~(dilated(1) & ... & dilated(989))": "~(" + " & ".join(f"dilated({i})" for i in range(1, 990)) + ")",
    "4000 x (q - kv == i) |, balanced": balanced([f"q - kv == {i}" for i in range(1, 4001)], "|"),
    "495 x alibi(2) +": " + ".join(["alibi(2)"] * 495),
    "2000 one-line definitions": "\n".join(f"f{i}(x) = x + {i}" for i in range(2000)) + "\ncausal & f7(kv) > 0",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=400, help="sources per measurement (default 400)")
    parser.add_argument("--profile", action="store_true", help="cProfile parse+expand+type+print")
    args = parser.parse_args()

    scoremod.compile("causal & window(8)")  # build the parser tables once
    sources = new_sources(args.n)
    lengths = [len(s) for s in sources]
    print(f"{args.n} new sources, {min(lengths)}-{max(lengths)} characters "
          f"(median {statistics.median(lengths):.0f})")

    parsed = [parse_source(s) for s in new_sources(args.n)]  # warm-up pass, also the inputs below
    expanded = [expand(p) for p in parsed]

    print("dsl, one stage at a time (new sources):")
    report("parse", timed(parse_source, sources))
    report("expand", timed(expand, parsed))
    report("type", timed(lambda pair: check(pair[0], pair[1]), list(zip(expanded, sources))))
    report("print", timed(to_source, expanded))

    def front_end(text):
        e = expand(parse_source(text))
        check(e, text)
        to_source(e)

    fresh = [s + " " for s in sources]  # new texts again
    report("parse + expand + type + print", timed(front_end, fresh))

    print("scoremod.compile (adds canonicalization):")
    report("new source", timed(scoremod.compile, [s + "  " for s in sources]))
    report("cached (same text again)", timed(scoremod.compile, [s + "  " for s in sources]))

    print("long sources (scoremod.compile, one each; seconds per 10 kB of source):")
    for name, text in LONG_SOURCES.items():
        t0 = time.perf_counter()
        scoremod.compile(text)
        dt = time.perf_counter() - t0
        print(f"  {name:<36} {len(text):>7,} chars {dt:8.3f} s   {dt / len(text) * 1e4:8.3f} s per 10 kB")

    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for s in sources:
            front_end(s + "   ")
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
