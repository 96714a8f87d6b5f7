"""A 32-layer attention stack with the document plan built once (``scoremod.plan``) vs in every layer.

    python benchmarks/plan_reuse.py [--layers 32] [--seq 8192] [--impl mosaic] [--out DIR]

bf16, B=2, N=16, H=128, ``causal & doc(ids)`` with 8 random-length documents per row. Each
layer is ``x = rmsnorm(x + attention(x, x, x))``; the stack runs as a ``lax.scan`` over layers and
as an unrolled Python loop (where XLA may merge the identical per-layer plan builds on its
own), each with the plan built in every layer and with one ``scoremod.plan`` per step.
Also times building the plan alone and one forward. Checks the two variants agree, then
prints medians (ms) and writes ``plan_reuse.json`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _time(fn, args, reps=7, target_s=0.2):
    import jax
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t, 1e-6)
    n = max(1, int(target_s / one))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / n * 1e3)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--impl", default=None, help="implementation (default: what attention() picks)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import scoremod

    B, T, N, H, L = args.batch, args.seq, args.heads, 128, args.layers
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, T), 7, replace=False))
    ids = jnp.asarray(np.tile(np.searchsorted(cuts, np.arange(T), side="right"), (B, 1)).astype(np.int32))
    x = jax.random.normal(jax.random.key(0), (B, T, N, H), jnp.bfloat16)
    mod = "causal & doc(ids)"
    impl = args.impl

    def make_plan(ids):
        return scoremod.plan(mod, T, batch=B, heads=N, head_dim=H, dtype=x.dtype, implementation=impl, ids=ids)

    def attend(x, plan, ids):
        if plan is None:
            return scoremod.attention(x, x, x, mod=mod, implementation=impl, ids=ids)
        return scoremod.attention(x, x, x, plan=plan)

    def layer(x, plan, ids):
        # A residual step with an RMS norm (as real stacks have): without one, x doubles in
        # every layer (each row attends most to itself) and 32 layers leave bf16's range.
        x = x + attend(x, plan, ids)
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)).astype(x.dtype)

    def scan_stack(once):
        def f(x, ids):
            plan = make_plan(ids) if once else None
            return jax.lax.scan(lambda x, _: (layer(x, plan, ids), None), x, None, length=L)[0]
        return jax.jit(f)

    def unrolled_stack(once):
        def f(x, ids):
            plan = make_plan(ids) if once else None
            for _ in range(L):
                x = layer(x, plan, ids)
            return x
        return jax.jit(f)

    info = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, B=B, T=T, N=N, H=H, layers=L,
                implementation=make_plan(ids).implementation)
    print("plan_reuse:", info, flush=True)
    results = dict(info=info)
    outs = {}
    for name, make in (("scan", scan_stack), ("unrolled", unrolled_stack)):
        for once in (False, True):
            key = f"{name}_{'plan_once' if once else 'plan_per_layer'}"
            fn = make(once)
            t = time.perf_counter()
            outs[key] = np.asarray(jax.block_until_ready(fn(x, ids)), np.float32)
            compile_s = time.perf_counter() - t
            results[key] = dict(ms=_time(fn, (x, ids), reps=5), compile_s=compile_s)
            print(f"  {key:26s} {results[key]['ms']:8.3f} ms   (first call {compile_s:.1f} s)", flush=True)
    for name in ("scan", "unrolled"):
        a, b = outs[f"{name}_plan_once"], outs[f"{name}_plan_per_layer"]
        diff = float(np.abs(a - b).max())
        results[f"{name}_max_diff"] = diff
        print(f"  {name}: max |plan once - per layer| = {diff:.3g}", flush=True)
        assert np.isfinite(a).all() and np.isfinite(b).all() and diff <= 1e-2 * max(1.0, float(np.abs(b).max())), name
    results["plan_build_ms"] = _time(jax.jit(make_plan), (ids,))
    results["one_forward_ms"] = _time(jax.jit(lambda x, ids: attend(x, None, ids)), (x, ids))
    print(f"  plan build alone {results['plan_build_ms']:.3f} ms; one forward with its plan "
          f"{results['one_forward_ms']:.3f} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan_reuse.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
