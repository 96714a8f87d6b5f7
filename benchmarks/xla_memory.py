"""Memory and time of the "xla" implementation against "reference" (dense scores).

    python benchmarks/xla_memory.py                 # T = S = 8192, B = 1, N = 2, H = 64, f32
    python benchmarks/xla_memory.py --seq 2048 --mods causal "causal & window(256)"

For each mod and implementation it compiles ``attention`` (forward, and forward +
backward through ``jax.grad``) under ``jax.jit``, reads XLA's own accounting of the
compiled program (``compiled.memory_analysis()``: temporaries, arguments, outputs), and
times the median of a few runs after a warm-up. The outputs of the two implementations
are compared before timing. Prints one table; ``--json PATH`` also writes the rows.
Runs on any backend (CPU is fine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import scoremod


def _mib(n) -> str:
    return f"{n / 2**20:9.1f}"


def measure(fn, args, repeats: int):
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    temp = getattr(stats, "temp_size_in_bytes", float("nan")) if stats is not None else float("nan")
    out = compiled(*args)
    jax.block_until_ready(out)                       # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return out, temp, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mods", nargs="+", default=["causal", "causal & window(1024)"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    B, T, N, H = args.batch, args.seq, args.heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, T, N, H), dtype)
    v = jax.random.normal(kv, (B, T, N, H), dtype)
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"B={B} T=S={T} N={N} H={H} {dtype.name}; dense scores [B,N,T,S] f32 = "
          f"{B * N * T * T * 4 / 2**20:.0f} MiB")

    rows = []
    for mod in args.mods:
        outs = {}
        for impl in ("reference", "xla"):
            fwd = lambda q, k, v, impl=impl: scoremod.attention(q, k, v, mod=mod, implementation=impl)
            out, temp, secs = measure(fwd, (q, k, v), args.repeats)
            outs[impl] = out
            rows.append(dict(mod=mod, impl=impl, pass_="fwd", temp_bytes=temp, seconds=secs))
            if not args.no_backward:
                loss = lambda q, k, v, impl=impl: jnp.sum(
                    scoremod.attention(q, k, v, mod=mod, implementation=impl).astype(jnp.float32) ** 2)
                grad = jax.grad(loss, argnums=(0, 1, 2))
                _, temp, secs = measure(grad, (q, k, v), args.repeats)
                rows.append(dict(mod=mod, impl=impl, pass_="fwd+bwd", temp_bytes=temp, seconds=secs))
        err = float(jnp.max(jnp.abs(outs["xla"].astype(jnp.float32) - outs["reference"].astype(jnp.float32))))
        print(f"# {mod}: max |xla - reference| = {err:.2e}")

    print(f"{'mod':<24} {'pass':<8} {'impl':<10} {'temp MiB':>9} {'time ms':>9} {'mem ratio':>9} {'speedup':>8}")
    base = {(r["mod"], r["pass_"]): r for r in rows if r["impl"] == "reference"}
    for r in rows:
        ref = base[(r["mod"], r["pass_"])]
        ratio = r["temp_bytes"] / ref["temp_bytes"] if ref["temp_bytes"] else float("nan")
        print(f"{r['mod']:<24} {r['pass_']:<8} {r['impl']:<10} {_mib(r['temp_bytes'])} "
              f"{r['seconds'] * 1e3:9.1f} {ratio:9.3f} {ref['seconds'] / r['seconds']:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, B=B, T=T, N=N, H=H,
                           dtype=dtype.name, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
