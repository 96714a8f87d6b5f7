"""Hardware counters of the Mosaic forward kernel per mask, read with Nsight Compute: where
the time goes on causal, sliding-window and document masks (bf16, B=2, N=16, T=S=8192,
H=128; attention_bench's shapes and document ids).

    python benchmarks/mosaic_counters.py                     # on an H100/H200 with ncu
    python benchmarks/mosaic_counters.py --masks doc --impl pallas

The script runs itself under ``ncu --clock-control none --profile-from-start off`` (the
device notes: leave the clocks alone); the child compiles and warms each call up, then
profiles one call per mask between ``cuProfilerStart``/``cuProfilerStop``, so only that
call's kernels are read. Prints, per kernel over 100 µs, its duration, SM and DRAM
throughput, tensor-pipe activity, issue activity, and the stall reasons (average warps
stalled per issued instruction), largest first.
"""
import argparse
import csv
import io
import os
import subprocess
import sys

METRICS = ",".join([
    "gpu__time_duration.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__warps_active.avg.per_cycle_active",
    "lts__t_sector_hit_rate.pct",
    "regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio",
])
MASKS = {"causal": "causal", "swa": "causal & window(1024)", "doc": "causal & doc(ids)"}


def child(masks, impl):
    """Compile and warm up each mask's call, then profile one call of each."""
    import ctypes
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    import jax.numpy as jnp
    from attention_bench import _doc_ids
    import scoremod
    driver = ctypes.CDLL("libcuda.so.1")
    B, N, T, H = 2, 16, 8192, 128
    q, k, v = (jax.random.normal(key, (B, T, N, H), jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 3))
    ids = jnp.asarray(_doc_ids(B, T))
    for name in masks:
        mod = MASKS[name]
        tensors = {"ids": ids} if "ids" in mod else {}
        call = jax.jit(lambda q, k, v, t, mod=mod: scoremod.attention(q, k, v, mod=mod, implementation=impl, **t))
        for _ in range(2):
            call(q, k, v, tensors).block_until_ready()
        driver.cuProfilerStart()
        call(q, k, v, tensors).block_until_ready()
        driver.cuProfilerStop()
        print(f"# profiled {name}: {mod} ({impl})", flush=True)


def report(text, min_us=100.0):
    """The kernels of ncu's ``--csv --page raw`` output that ran at least ``min_us``, as
    lines of text, in launch order."""
    rows = list(csv.reader(io.StringIO("\n".join(line for line in text.splitlines() if line.startswith('"')))))
    if len(rows) < 3:
        return ["no kernels profiled"]
    head, units, data = rows[0], rows[1], rows[2:]
    at = head.index("gpu__time_duration.sum")
    to_us = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}.get(units[at], 1.0)
    lines = []
    for row in data:
        us = float(row[at].replace(",", "") or 0) * to_us
        if us < min_us:
            continue
        lines.append(f"## {row[head.index('Kernel Name')][:60]}: {us:.1f} us")
        values = {h: v for h, v in zip(head, row) if "__" in h}
        lines += [f"  {h} = {v}" for h, v in values.items() if "issue_stalled" not in h and h != head[at]]
        stalls = sorted(((float(v.replace(",", "") or 0), h) for h, v in values.items() if "issue_stalled" in h),
                        reverse=True)
        short = lambda h: h.replace("smsp__average_warps_issue_stalled_", "").replace("_per_issue_active.ratio", "")  # noqa: E731
        lines.append("  stalls per issue: " + ", ".join(f"{short(h)} {x:.2f}" for x, h in stalls[:10]))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masks", default="causal,swa,doc", help=f"comma-separated, of {', '.join(MASKS)}")
    ap.add_argument("--impl", default="mosaic", help="the attention implementation to profile")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    masks = args.masks.split(",")
    if args.child:
        child(masks, args.impl)
        return
    cmd = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "raw",
           "--metrics", METRICS, sys.executable, os.path.abspath(__file__), "--child", "--masks", args.masks,
           "--impl", args.impl]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith("# profiled")))
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        sys.exit(done.returncode)
    print("\n".join(report(done.stdout)))


if __name__ == "__main__":
    main()
