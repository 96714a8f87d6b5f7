"""Where the time of a paged decode call goes, and which kernel settings fill the GPU.

    python benchmarks/paged_profile.py                  # all three parts (GPU)
    python benchmarks/paged_profile.py --parts sweep    # one part
    python benchmarks/paged_profile.py --quick          # tiny shapes, any backend

Parts:
  sweep      the whole call (``paged_attention``, causal) for a list of
             ``PagedBlockSizes`` at a few (batch, context) points;
  breakdown  the pieces of one call timed alone: walk (which pages), kernel (the
             partials), combine (merging the splits), and the whole call;
  splits     the whole call with explicit split counts (a pool as large as paged_bench's);
  layout     the same bytes and the same number of (sequence, KV head) programs with
             K = 8 (a page of one head is page_size rows of 256 B at a 2 KB stride) and
             K = 1 (one contiguous run per page): does the pool layout cost bandwidth?

Same timing protocol as paged_bench.py (jitted loops whose inputs depend on the
previous output; median of reps). bf16, H = 128, T = 1, pages of 16, random page
permutations. Prints Markdown tables; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

from paged_bench import copy_bandwidth, iterations, time_call

from scoremod.compiler.mod import compile_mod
from scoremod.runtime import _paged_kernel as kern
from scoremod.compiler.page_walk import walk_pages
from scoremod.runtime.paged import PagedBlockSizes, paged_attention, _num_splits, _program

# The settings of the 2026-11-22 sweep (RESULTS.md), less the "prefetch the next page ids"
# kernel variant it also tried (not kept: slower at B = 1, faster at B = 8).
SWEEP = (
    PagedBlockSizes(64, None, 4, 4, 8),
    PagedBlockSizes(64, None, 4, 4, 4),
    PagedBlockSizes(64, None, 4, 3, 4),
    PagedBlockSizes(128, None, 8, 3, 4),
    PagedBlockSizes(128, None, 8, 3, 8),
    PagedBlockSizes(32, None, 4, 4, 8),
)


def make_inputs(B, ctx, N, K, H, ps, seed=0):
    max_pages = ctx // ps
    pool = B * max_pages + 8
    key = jax.random.PRNGKey(seed)
    kk, kv, kq = jax.random.split(key, 3)
    k_pool = jax.random.normal(kk, (pool, ps, K, H), jnp.bfloat16)
    v_pool = jax.random.normal(kv, (pool, ps, K, H), jnp.bfloat16)
    rng = np.random.default_rng(seed)
    tables = jnp.asarray(rng.permutation(pool)[:B * max_pages].reshape(B, max_pages).astype(np.int32))
    lengths = jnp.full((B,), ctx, jnp.int32)
    q = jax.random.normal(kq, (B, 1, N, H), jnp.bfloat16)
    return q, k_pool, v_pool, tables, lengths


def whole_call(mod, bs, interpret):
    def fn(q, lengths, kp, vp, tables):
        return paged_attention(q, kp, vp, tables, lengths, mod=mod, implementation="pallas", block_sizes=bs,
                               interpret=interpret)
    return fn


def kv_bytes(B, keys, K, H):
    return B * keys * K * H * 2 * 2


def sweep(points, N, K, H, ps, args, out):
    """points: (mask, B, context, keys the mask needs)."""
    rows = []
    print("\n| block_kv | warps | stages | programs/SM | "
          + " | ".join(f"{'window' if 'window' in m else m} B={B}, {ctx // 1024}k" for m, B, ctx, _ in points)
          + " |\n|---|---|---|---|" + "---|" * len(points), flush=True)
    inputs = {}
    for _, B, ctx, _ in points:
        if (B, ctx) not in inputs:
            inputs[(B, ctx)] = make_inputs(B, ctx, N, K, H, ps)
    for bs in SWEEP if not args.quick else SWEEP[:3]:
        cells = []
        for (mod, B, ctx, keys) in points:
            q, kp, vp, tables, lengths = inputs[(B, ctx)]
            nbytes = kv_bytes(B, keys, K, H)
            try:
                t = time_call(whole_call(mod, bs, args.interpret), q, lengths, (kp, vp, tables),
                              iters=args.iters or iterations(nbytes, args.target_s), reps=args.reps)
                cells.append(f"{t * 1e6:.0f} µs {nbytes / t / 1e12:.2f}")
                rows.append({"block_sizes": dict(bs.__dict__), "mask": mod, "B": B, "context": ctx,
                             "time_us": t * 1e6, "TBps": nbytes / t / 1e12})
            except Exception as exc:  # noqa: BLE001 - a setting that does not fit is reported
                cells.append(f"fails: {type(exc).__name__}")
                rows.append({"block_sizes": dict(bs.__dict__), "mask": mod, "B": B, "context": ctx,
                             "error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})
        print(f"| {bs.block_kv} | {bs.num_warps} | {bs.num_stages} | {bs.programs_per_core} | "
              + " | ".join(cells) + " |", flush=True)
    out["sweep"] = rows


def splits(points, N, K, H, ps, args, out, pool_tokens):
    """The whole call (causal, default tiling) with explicit split counts, on a pool of
    ``pool_tokens`` tokens (random pages spread over all of it, as in paged_bench.py)."""
    rows = []
    base = PagedBlockSizes.get_default()
    print(f"\n{base}, pool of {pool_tokens} tokens\n\n| B | context | splits | programs | time | TB/s |"
          "\n|---|---|---|---|---|---|", flush=True)
    pool = pool_tokens // ps
    key = jax.random.PRNGKey(3)
    kp = jax.random.normal(key, (pool, ps, K, H), jnp.bfloat16)
    vp = jax.random.normal(jax.random.fold_in(key, 1), (pool, ps, K, H), jnp.bfloat16)
    for B, ctx, counts in points:
      for seed in args.table_seeds or [B + ctx]:
        rng = np.random.default_rng(seed)
        max_pages = ctx // ps
        tables = jnp.asarray(rng.permutation(pool)[:B * max_pages].reshape(B, max_pages).astype(np.int32))
        lengths = jnp.full((B,), ctx, jnp.int32)
        q = jax.random.normal(jax.random.fold_in(key, B * ctx), (B, 1, N, H), jnp.bfloat16)
        nbytes = kv_bytes(B, ctx, K, H)
        for n in counts:
            bs = PagedBlockSizes(base.block_kv, n, base.num_warps, base.num_stages, base.programs_per_core)
            t = time_call(whole_call("causal", bs, args.interpret), q, lengths, (kp, vp, tables),
                          iters=args.iters or iterations(nbytes, args.target_s), reps=args.reps)
            rows.append({"B": B, "context": ctx, "splits": n, "seed": seed, "time_us": t * 1e6,
                         "TBps": nbytes / t / 1e12})
            print(f"| {B} | {ctx // 1024}k | {n} | {B * K * n} | {t * 1e6:.1f} µs | {nbytes / t / 1e12:.2f} | "
                  f"seed {seed}", flush=True)
    out.setdefault("splits", []).extend(rows)


def breakdown(cases, N, K, H, ps, bs, args, out):
    """Time walk, kernel and combine alone, and the whole call."""
    rows = []
    print(f"\n{bs}\n\n| mask | B | context | splits | walk | kernel | combine | whole call | kernel TB/s | whole TB/s |"
          "\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for mod_src, B, ctx, keys in cases:
        q, kp, vp, tables, lengths = make_inputs(B, ctx, N, K, H, ps)
        mod = compile_mod(mod_src)
        G = N // K
        P = kp.shape[0]
        pps = max(1, bs.block_kv // ps)
        program = _program(mod, {})

        def walk(qq, ll, tb):
            logical, physical, counts = walk_pages(mod, ll, tb, {}, num_tokens=1, page_size=ps, heads=N,
                                                   num_pool_pages=P, multiple_of=pps)
            return logical + physical + counts[:, None]

        logical, physical, counts = walk_pages(mod, lengths, tables, {}, num_tokens=1, page_size=ps, heads=N,
                                               num_pool_pages=P, multiple_of=pps)
        splits = _num_splits(bs, B * K, logical.shape[-1] // pps)
        rows_ = max(16, kern.next_power_of_2(G))
        q_rows = jnp.pad(q.reshape(B, K, 1, G, H), ((0, 0), (0, 0), (0, 0), (0, rows_ - G), (0, 0)))
        logical, physical, counts = logical[:, None], physical[:, None], counts[:, None]   # one chunk

        def kernel(qq, ll, kp_, vp_, lg, ph, ct, qr):
            o, lse = kern.paged_decode_partials(
                qr + qq.reshape(-1)[0] * 0, kp_, vp_, lg, ph, ct, ll, [], program=program, layouts=(),
                num_tokens=1, chunk_tokens=1, group=G, scale=H ** -0.5, pages_per_step=pps, num_splits=splits,
                num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=args.interpret)
            return o[..., 0, 0, 0] + lse[..., 0, 0]

        o, lse = kern.paged_decode_partials(
            q_rows, kp, vp, logical, physical, counts, lengths, [], program=program, layouts=(), num_tokens=1,
            chunk_tokens=1, group=G, scale=H ** -0.5, pages_per_step=pps, num_splits=splits, num_warps=bs.num_warps,
            num_stages=bs.num_stages, interpret=args.interpret)

        def combine(qq, ll, o_, lse_):
            out_, _ = kern.combine_splits(o_ + qq.reshape(-1)[0].astype(jnp.float32) * 0, lse_)
            return out_

        nbytes = kv_bytes(B, keys, K, H)
        it = args.iters or iterations(nbytes, args.target_s)
        t_walk = time_call(walk, q, lengths, (tables,), iters=it, reps=args.reps)
        t_kernel = time_call(kernel, q, lengths, (kp, vp, logical, physical, counts, q_rows), iters=it, reps=args.reps)
        t_combine = time_call(combine, q, lengths, (o, lse), iters=it, reps=args.reps) if splits > 1 else 0.0
        t_whole = time_call(whole_call(mod_src, bs, args.interpret), q, lengths, (kp, vp, tables), iters=it,
                            reps=args.reps)
        row = {"mask": mod_src, "B": B, "context": ctx, "splits": splits, "walk_us": t_walk * 1e6,
               "kernel_us": t_kernel * 1e6, "combine_us": t_combine * 1e6, "whole_us": t_whole * 1e6,
               "kernel_TBps": nbytes / t_kernel / 1e12, "whole_TBps": nbytes / t_whole / 1e12}
        rows.append(row)
        print(f"| {mod_src} | {B} | {ctx // 1024}k | {splits} | {row['walk_us']:.1f} | {row['kernel_us']:.1f} | "
              f"{row['combine_us']:.1f} | {row['whole_us']:.1f} | {row['kernel_TBps']:.2f} | {row['whole_TBps']:.2f} |",
              flush=True)
        del kp, vp
    out.setdefault("breakdown", []).extend(rows)


def layout(pairs, H, ps, bs, args, out):
    rows = []
    print("\n| B | N | K | context | time | TB/s |\n|---|---|---|---|---|---|", flush=True)
    for B, N, K, ctx in pairs:
        q, kp, vp, tables, lengths = make_inputs(B, ctx, N, K, H, ps)
        nbytes = kv_bytes(B, ctx, K, H)
        t = time_call(whole_call("causal", bs, args.interpret), q, lengths, (kp, vp, tables),
                      iters=args.iters or iterations(nbytes, args.target_s), reps=args.reps)
        rows.append({"B": B, "N": N, "K": K, "context": ctx, "time_us": t * 1e6, "TBps": nbytes / t / 1e12})
        print(f"| {B} | {N} | {K} | {ctx // 1024}k | {t * 1e6:.0f} µs | {nbytes / t / 1e12:.2f} |", flush=True)
        del kp, vp
    out["layout"] = rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="sweep,breakdown,layout")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--target-s", type=float, default=0.02)
    ap.add_argument("--iters", type=int, default=None, help="calls per timed loop (default: about --target-s)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--extra-gb", type=float, default=0.0, help="splits: hold this much other device memory")
    ap.add_argument("--table-seeds", type=lambda x: [int(v) for v in x.split(",")], default=None,
                    help="splits: block-table permutations to try (default: one per point)")
    ap.add_argument("--repeat", type=int, default=1, help="splits: run the list this many times")
    ap.add_argument("--split-points", default=None, help="splits: B:context:s1/s2/...,... (default: a fixed list)")
    args = ap.parse_args(argv)
    args.interpret = jax.default_backend() == "cpu"
    if args.quick and args.iters is None:
        args.iters = 2
    device = jax.devices()[0]
    print(f"# {getattr(device, 'device_kind', device)}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    out = {"device": str(getattr(device, "device_kind", device)), "jax": jax.__version__}
    if not args.interpret:
        out["copy_TBps"] = copy_bandwidth(2 << 30) / 1e12
        print(f"# copy bandwidth {out['copy_TBps']:.2f} TB/s")
    parts = args.parts.split(",")
    H, ps = (32, 16) if args.quick else (128, 16)
    N, K = (4, 2) if args.quick else (32, 8)
    scale = 1 if args.quick else 64
    start = time.perf_counter()
    if "sweep" in parts:
        w = 64 * scale
        points = [("causal", 1, 2048 * scale, 2048 * scale), ("causal", 8, 2048 * scale, 2048 * scale),
                  ("causal", 8, 512 * scale, 512 * scale), ("causal", 1, 512 * scale, 512 * scale),
                  ("causal", 32, 512 * scale, 512 * scale), ("causal", 2, 128 * scale, 128 * scale),
                  (f"causal & window({w})", 8, 2048 * scale, w), (f"causal & window({w})", 1, 2048 * scale, w)]
        sweep(points if not args.quick else points[:2], N, K, H, ps, args, out)
    if "splits" in parts:
        ballast = None
        if args.extra_gb:
            # Other arrays in device memory (paged_bench also holds the peers' copies of the pool).
            ballast = jnp.ones((int(args.extra_gb * 2**30) // 2,), jnp.bfloat16).block_until_ready()
            print(f"# holding {args.extra_gb} GB of other arrays")
        pts = [(1, 2048 * scale, (16, 33, 66, 132)), (1, 512 * scale, (8, 16, 33, 66)),
               (8, 2048 * scale, (2, 4, 8, 17, 33)), (8, 512 * scale, (2, 4, 8, 17, 33)),
               (8, 128 * scale, (2, 4, 8, 17)), (2, 512 * scale, (8, 16, 33, 66))]
        if args.quick:
            pts = [(1, 2048 * scale, (1, 2))]
        if args.split_points:
            pts = [tuple(int(x) for x in p.split(":")[:2]) + (tuple(int(x) for x in p.split(":")[2].split("/")),)
                   for p in args.split_points.split(",")]
        for _ in range(args.repeat):
            splits(pts, N, K, H, ps, args, out, pool_tokens=2048 * 1024 if not args.quick else 4096)
        del ballast
    if "breakdown" in parts:
        w = 64 * scale
        cases = [("causal", 1, 2048 * scale, 2048 * scale), ("causal", 8, 2048 * scale, 2048 * scale),
                 ("causal", 1, 128 * scale, 128 * scale), (f"causal & window({w})", 1, 2048 * scale, w),
                 (f"causal & window({w})", 8, 2048 * scale, w), (f"causal & window({w})", 8, 128 * scale, w)]
        breakdown(cases, N, K, H, ps, PagedBlockSizes.get_default(), args, out)
    if "layout" in parts:
        pairs = [(1, N, K, 2048 * scale), (8, N // K, 1, 2048 * scale), (8, N, K, 512 * scale),
                 (64, N // K, 1, 512 * scale)]
        layout(pairs, H, ps, PagedBlockSizes.get_default(), args, out)
    print(f"# {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
