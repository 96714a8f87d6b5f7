"""How long a block plan takes, and how much memory, for ``causal & doc(ids)``.

    python benchmarks/plan_speed.py                      # 1,048,576 tokens, block 128
    python benchmarks/plan_speed.py --tokens 8192 --repeats 20
    python benchmarks/plan_speed.py --json benchmarks/out/plan_speed.json

Two builders, each measured in a fresh subprocess (so peak memory is its own):

  numpy  the NumPy path (``classify_blocks`` + ``plan_from_classes``): what ``explain``
         and static masks use; peak traced by ``tracemalloc`` (NumPy reports its buffers).
  jax    ``build_plan`` with a tensor: the jitted jax builder the runtime calls. First call
         (trace + compile + run), then the median of calls with new ids (never recompiles).
         Peak memory is the growth of the process's peak RSS (XLA's buffers are not seen
         by tracemalloc).

Nothing here is asserted; numbers go to stdout (and ``--json``). A dense S x S bool mask
would take S * S bytes (1 TiB at 1M tokens); a plan takes O(S + (S / block)^2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SOURCE = "causal & doc(ids)"


def _segment_ids(tokens: int, docs: int, seed: int) -> np.ndarray:
    """Sorted segment ids of ``docs`` random-length documents packed into ``tokens``."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, tokens), size=docs - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [tokens]]))
    return np.repeat(np.arange(docs, dtype=np.int32), lengths)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_numpy(tokens: int, block: int, docs: int, repeats: int) -> dict:
    import tracemalloc
    import scoremod
    from scoremod.compiler.intervals import BlockGrid, PositionBlocks, classify_blocks
    from scoremod.compiler.plan import plan_from_classes
    from scoremod.compiler.rewrite import simplify

    mask = simplify(scoremod.compile(SOURCE).canonical.mask)
    grid = BlockGrid(1, 1, PositionBlocks(tokens, block, 0), PositionBlocks(tokens, block, 0))
    times, peak = [], 0
    for r in range(repeats):
        ids = _segment_ids(tokens, docs, seed=r)
        tracemalloc.start()
        start = time.perf_counter()
        classes = classify_blocks(mask, grid, {"ids": ids}, np)
        plan = plan_from_classes(classes, q_len=tokens, kv_len=tokens, block_q=block, block_kv=block)
        times.append(time.perf_counter() - start)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del classes, plan
    return {"builder": "numpy", "seconds_median": float(np.median(times)), "seconds_all": times,
            "peak_bytes": int(peak)}


def run_jax(tokens: int, block: int, docs: int, repeats: int) -> dict:
    import jax
    import scoremod
    from scoremod.compiler import plan as plan_module
    from scoremod.compiler.plan import build_plan

    mod = scoremod.compile(SOURCE)
    kw = dict(q_len=tokens, kv_len=tokens, block_q=block, block_kv=block)
    rss_before = _peak_rss_bytes()
    ids = jax.numpy.asarray(_segment_ids(tokens, docs, seed=0))
    start = time.perf_counter()
    jax.block_until_ready(build_plan(mod, tensors={"ids": ids}, **kw))
    first = time.perf_counter() - start
    traces = plan_module.TRACE_COUNTS["jax_builder"]
    times = []
    for r in range(1, repeats + 1):
        ids = jax.numpy.asarray(_segment_ids(tokens, docs, seed=r))
        jax.block_until_ready(ids)
        start = time.perf_counter()
        jax.block_until_ready(build_plan(mod, tensors={"ids": ids}, **kw))
        times.append(time.perf_counter() - start)
    return {"builder": "jax", "device": str(jax.devices()[0]), "first_call_seconds": first,
            "seconds_median": float(np.median(times)), "seconds_all": times,
            "retraced": plan_module.TRACE_COUNTS["jax_builder"] != traces,
            "peak_rss_growth_bytes": _peak_rss_bytes() - rss_before}


def _in_subprocess(builder: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", builder, "--tokens", str(args.tokens), "--block", str(args.block),
           "--docs", str(args.docs), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--docs", type=int, default=64, help="number of packed documents")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--builders", default="numpy,jax")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run = {"numpy": run_numpy, "jax": run_jax}[args.worker]
        print(json.dumps(run(args.tokens, args.block, args.docs, args.repeats)))
        return 0

    n = -(-args.tokens // args.block)
    print(f"{SOURCE!r}: {args.tokens:,} tokens, block {args.block}, {args.docs} documents -> "
          f"{n:,} x {n:,} = {n * n:,} blocks")
    print(f"a dense bool mask would take {args.tokens ** 2 / 2**30:,.1f} GiB")
    results = []
    for builder in args.builders.split(","):
        r = _in_subprocess(builder, args)
        results.append(r)
        if builder == "numpy":
            print(f"numpy: {r['seconds_median']:.2f} s (median of {args.repeats}), "
                  f"peak {r['peak_bytes'] / 2**20:,.0f} MiB (tracemalloc)")
        else:
            print(f"jax ({r['device']}): first call {r['first_call_seconds']:.2f} s (trace + compile + run), "
                  f"then {r['seconds_median']:.3f} s (median of {args.repeats}, new ids each, "
                  f"retraced: {r['retraced']}), peak RSS growth {r['peak_rss_growth_bytes'] / 2**20:,.0f} MiB")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"source": SOURCE, "tokens": args.tokens, "block": args.block, "docs": args.docs,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
