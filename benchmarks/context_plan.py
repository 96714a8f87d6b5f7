"""Context parallelism from the plan alone (no GPU): per-device work, balance, pairs and
ring steps skipped, and K/V bytes each device receives, for the contiguous, zigzag and
balanced (4 chunks per device, dealt from the plan) layouts (docs/context_parallel.md).

    python benchmarks/context_plan.py [--devices 8] [--seqs 131072,524288,1048576]

Shapes: B=1, K=8 kv heads, H=128, bf16 (K/V bytes per position: 2 * K * H * 2). Masks:
causal, causal & window(4096), causal & doc(ids) with 64 random-length documents. Work is
the area of the non-empty 512 x 512 blocks each device computes (``device_work``);
balance is busiest / mean; a plain ring runs P steps and receives P - 1 K/V shards.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import scoremod
from scoremod.compiler.context_plan import (ContextLayout, PairPlan, contiguous_layout, device_work, pair_plan,
                                            ring_schedule, zigzag_layout)

KV_HEADS, HEAD_DIM, ITEMSIZE = 8, 128, 2


def documents(T: int, n: int, rng) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, T), n - 1, replace=False))
    return np.searchsorted(cuts, np.arange(T), side="right").astype(np.int32)[None]


def row(mod_text, tensors, layout, T):
    t0 = time.perf_counter()
    plan = pair_plan(scoremod.compile(mod_text), layout, q_len=T, kv_len=T, tensors=tensors)
    if not plan.is_static:   # the values are known here: plan as if static, to see what they allow
        plan = PairPlan(blocks=np.asarray(plan.blocks), block_q=plan.block_q, block_kv=plan.block_kv,
                        q_chunk=plan.q_chunk, kv_chunk=plan.kv_chunk)
    ms = (time.perf_counter() - t0) * 1e3
    schedule = ring_schedule(plan, layout)
    work = device_work(plan, layout)
    P = layout.devices
    pairs = P * layout.chunks_per_device ** 2 * P
    shard_bytes = T // P * 2 * KV_HEADS * HEAD_DIM * ITEMSIZE
    received = sum(1 for s in schedule.shifts if s) * shard_bytes
    return dict(work_max=work.max(), balance=work.max() / work.mean(), pairs=pairs, run=schedule.pairs_run(),
                steps=len(schedule.shifts), received=received, plain=(P - 1) * shard_bytes, plan_ms=ms)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--seqs", default="131072,524288,1048576")
    args = p.parse_args()
    P = args.devices
    rng = np.random.default_rng(0)
    print(f"{P} devices; work in 2^30 (q, kv) positions on the busiest device; K/V received per device in MiB")
    print("| T | mask | layout | busiest work | balance | pairs run / all | ring steps | K/V received (plain ring) |")
    print("|---|---|---|---|---|---|---|---|")
    for T in (int(x) for x in args.seqs.split(",")):
        masks = [("causal", {}), ("causal & window(4096)", {}), ("causal & doc(ids)", {"ids": documents(T, 64, rng)})]
        for text, tensors in masks:
            balanced = scoremod.context_layout(text, P, T, **tensors)
            balanced = ContextLayout("balanced", tuple(map(tuple, np.asarray(balanced.table()).tolist())))
            for layout in (contiguous_layout(P), zigzag_layout(P), balanced):
                r = row(text, tensors, layout, T)
                print(f"| {T} | {text} | {layout.name} | {r['work_max'] / 2**30:.2f} | {r['balance']:.2f} | "
                      f"{r['run']} / {r['pairs']} | {r['steps']} / {P} | {r['received'] / 2**20:.0f} "
                      f"({r['plain'] / 2**20:.0f}) |", flush=True)


if __name__ == "__main__":
    main()
