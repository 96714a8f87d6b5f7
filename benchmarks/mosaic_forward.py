"""The Mosaic GPU forward on an H100/H200: check it, then time it beside cuDNN and pallas.

    python benchmarks/mosaic_forward.py [--check-only] [--time-only] [--quick] [--configs]

1. Checks ``implementation="mosaic"`` (out and lse) against the dense float32 reference
   on generated cases: masks (causal, windows, documents, prefix, per-head and per-batch
   masks, biases, softcap, tables read at positions), odd sizes, GQA, offsets (int and
   [B]), fully masked rows, bf16 and f16, head dims 64/128/256. Each check also runs
   with NaN in every K/V block the plan skips (the output must not change).
2. Times the forward (median ms, effective TF/s counting only the work the mask leaves)
   of mosaic, pallas and cuDNN (``jax.nn.dot_product_attention``) on the benchmark
   shapes (bf16, B=2, N=16, T=S=8192, H=128: dense, causal, swa 1024, doc) plus GQA
   (N=32, K=8), head dims 64 and 256, and causal at T=32768.
``--configs`` times MosaicBlockSizes variants on causal and dense instead of step 2.
Prints a table; writes mosaic_forward.json to $OUT (or benchmarks/out).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from attention_bench import _doc_ids, _time_jax  # noqa: E402  (the attention benchmarks' inputs and timing)


def _rel(a, b):
    import jax.numpy as jnp
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    finite = jnp.isfinite(b)
    if bool(jnp.any(jnp.isnan(a))):
        return float("nan")
    if not bool(jnp.all(jnp.isfinite(a) == finite)) or not bool(jnp.all(jnp.where(finite, True, a == b))):
        return float("inf")
    a = jnp.where(finite, a, 0)
    b = jnp.where(finite, b, 0)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-6))


CASES = [
    # (name, mod, B, T, S, N, K, H, dtype, q_offset, kv_offset, tensors)
    ("dense", None, 2, 256, 256, 2, 2, 128, "bfloat16", 0, 0, {}),
    ("causal", "causal", 2, 384, 384, 2, 2, 128, "bfloat16", 0, 0, {}),
    ("causal odd", "causal", 1, 300, 333, 3, 1, 128, "bfloat16", 0, 0, {}),
    ("causal f16 h64", "causal", 2, 520, 520, 4, 2, 64, "float16", 0, 0, {}),
    ("window", "causal & window(100)", 1, 700, 700, 2, 2, 128, "bfloat16", 0, 0, {}),
    ("window offs", "causal & window(64)", 2, 200, 456, 2, 1, 128, "bfloat16", 256, 0, {}),
    ("doc", "causal & doc(ids)", 2, 640, 640, 4, 2, 128, "bfloat16", 0, 0, {"ids": "docs"}),
    ("prefix", "causal | prefix(n)", 2, 300, 300, 2, 2, 64, "bfloat16", 0, 0, {"n": "prefix"}),
    ("alibi", "causal + alibi(4)", 1, 256, 256, 4, 4, 128, "bfloat16", 0, 0, {}),
    ("softcap win", "softcap(20) & causal & window(128)", 1, 400, 400, 2, 2, 128, "bfloat16", 0, 0, {}),
    ("per head", "q - kv < 16 * (h + 1) & causal", 1, 300, 300, 4, 4, 128, "bfloat16", 0, 0, {}),
    ("masked rows", "kv >= 200 & causal", 1, 256, 256, 2, 2, 128, "bfloat16", 0, 0, {}),
    ("bias table", "causal + bias(t)", 1, 256, 256, 2, 2, 64, "bfloat16", 0, 0, {"t": "bias"}),
    ("arr offsets", "causal & window(90)", 2, 200, 300, 2, 2, 128, "bfloat16", "arr", "arr", {}),
    ("int div", "(q // 64) == (kv // 64) | kv % 100 == 0", 1, 256, 256, 2, 2, 128, "bfloat16", 0, 0, {}),
]


def check(args):
    import jax
    import jax.numpy as jnp
    import scoremod
    from scoremod.compiler.plan import build_plan
    from scoremod.runtime.mosaic_attention import MosaicBlockSizes

    rows = []
    key = jax.random.key(0)
    for name, mod, B, T, S, N, K, H, dtype, qo, ko, tspec in CASES:
        faulthandler.dump_traceback_later(args.case_timeout, exit=True)   # a hung kernel ends the run, loudly
        key, k1, k2, k3, k4 = jax.random.split(key, 5)
        dt = jnp.dtype(dtype)
        q = jax.random.normal(k1, (B, T, N, H), jnp.float32).astype(dt)
        k = jax.random.normal(k2, (B, S, K, H), jnp.float32).astype(dt)
        v = jax.random.normal(k3, (B, S, K, H), jnp.float32).astype(dt)
        tensors = {}
        for tname, kind in tspec.items():
            if kind == "docs":
                tensors[tname] = jnp.asarray(_doc_ids(B, max(T, S), seed=1, n_docs=5)[:, :T])
            elif kind == "prefix":
                tensors[tname] = jnp.asarray([37, 150][:B], jnp.int32)
            elif kind == "bias":
                tensors[tname] = jax.random.normal(k4, (B, N, T, S), jnp.float32)
        if qo == "arr":
            qo = jnp.asarray([0, 100][:B], jnp.int32)
            ko = jnp.asarray([3, 0][:B], jnp.int32)
        call = dict(mod=mod, q_offset=qo, kv_offset=ko, return_lse=True, **tensors)
        try:
            ref, ref_lse = scoremod.attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                              v.astype(jnp.float32), implementation="reference", **call)
            out, lse = jax.jit(lambda q, k, v: scoremod.attention(q, k, v, implementation="mosaic", **call))(q, k, v)
            err, lerr = _rel(out, ref), _rel(lse, ref_lse)
            # NaN in every K/V block the plan never lists: nothing may change.
            bs = MosaicBlockSizes.get_default(H)
            plan = build_plan(scoremod.compile(mod or "true"), q_len=T, kv_len=S, block_q=2 * bs.block_q,
                              block_kv=bs.block_kv, batch=B, heads=N, q_offset=qo, kv_offset=ko,
                              tensors=tensors)
            used = np.zeros((B, S), bool)
            cls = np.asarray(plan.classes)
            for b in range(B):
                listed = (cls[min(b, cls.shape[0] - 1)] != 0).any(axis=(0, 1))
                used[b] = np.repeat(listed, bs.block_kv)[:S]
            poison = jnp.asarray(~used)[:, :, None, None]
            kn = jnp.where(poison, jnp.nan, k).astype(dt)
            vn = jnp.where(poison, jnp.nan, v).astype(dt)
            outn, _ = jax.jit(lambda q, k, v: scoremod.attention(q, k, v, implementation="mosaic", **call))(q, kn, vn)
            nerr = _rel(outn, ref)
            tol = 2e-2 if dt == jnp.bfloat16 else 5e-3
            ok = err < tol and lerr < 1e-3 and nerr < tol
            rows.append(dict(case=name, err=err, lse_err=lerr, nan_err=nerr, skipped=int((~used).sum()), ok=ok))
        except Exception as exc:  # report, keep going
            rows.append(dict(case=name, ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
        r = rows[-1]
        print(f"check {name:14s} " + ("ok  " if r["ok"] else "FAIL") + "  " +
              (f"err {r['err']:.2e} lse {r['lse_err']:.2e} nan-skip {r['nan_err']:.2e} ({r['skipped']} poisoned keys)"
               if "err" in r else r["error"]), flush=True)
    return rows


def timing(args, configs=False):
    import jax
    import jax.numpy as jnp
    import scoremod
    from scoremod.runtime.mosaic_attention import MosaicBlockSizes, mosaic_attention

    T0 = 2048 if args.quick else 8192
    shapes = [
        # (label, mod, B, T, N, K, H, tensors)
        ("dense", None, 2, T0, 16, 16, 128),
        ("causal", "causal", 2, T0, 16, 16, 128),
        ("swa", "causal & window(1024)", 2, T0, 16, 16, 128),
        ("doc", "causal & doc(ids)", 2, T0, 16, 16, 128),
    ]
    if not args.quick and not configs:
        shapes += [
            ("causal gqa 32/8", "causal", 2, T0, 32, 8, 128),
            ("causal h64", "causal", 2, T0, 16, 16, 64),
            ("causal h256", "causal", 2, T0, 16, 16, 256),
            ("causal 32k", "causal", 1, 32768, 16, 16, 128),
            ("dense h64", None, 2, T0, 16, 16, 64),
            ("dense h256", None, 2, T0, 16, 16, 256),
        ]
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if s[0] in wanted]
    rows = []
    for label, mod, B, T, N, K, H in shapes:
        faulthandler.dump_traceback_later(args.case_timeout, exit=True)
        key = jax.random.key(1)
        k1, k2, k3 = jax.random.split(key, 3)
        q = jax.random.normal(k1, (B, T, N, H), jnp.bfloat16)
        k = jax.random.normal(k2, (B, T, K, H), jnp.bfloat16)
        v = jax.random.normal(k3, (B, T, K, H), jnp.bfloat16)
        tensors = {"ids": jnp.asarray(_doc_ids(B, T))} if mod and "ids" in mod else {}
        # densities of the masks, as attention_bench.py counts them
        if mod is None:
            density = 1.0
        elif mod == "causal":
            density = (T + 1) / (2 * T)
        elif "window" in mod:
            w = 1024
            density = sum(min(i + 1, w + 1) for i in range(T)) / (T * T)
        else:
            ids = np.asarray(tensors["ids"])
            density = float(np.mean([np.sum(np.bincount(r) * (np.bincount(r) + 1) / 2) for r in ids])) / (T * T)
        flops = 4 * B * N * T * T * H * density
        impls = {}
        if configs:
            for bkv in (64, 128, 192, 256):
                for st in (2, 3, 4):
                    bs = MosaicBlockSizes(64, bkv, st)
                    if bs.smem_bytes(H) > 227 * 1024:
                        continue
                    impls[f"mosaic {bkv}x{st}"] = jax.jit(
                        lambda q, k, v, bs=bs: mosaic_attention(q, k, v, mod=mod, tensors=tensors, block_sizes=bs))
        else:
            for impl in ("mosaic", "pallas", "cudnn"):
                impls[impl] = jax.jit(lambda q, k, v, impl=impl: scoremod.attention(
                    q, k, v, mod=mod, implementation=impl, **tensors))
        rec = dict(shape=label, B=B, T=T, N=N, K=K, H=H, density=density)
        for name, fn in impls.items():
            try:
                ms = _time_jax(fn, (q, k, v), target_s=0.05)
                rec[name] = ms
            except NotImplementedError:
                rec[name] = None
            except Exception as exc:
                rec[name] = None
                print(f"  {label} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        rec["flops"] = flops
        rows.append(rec)
        parts = []
        for name in impls:
            ms = rec[name]
            parts.append(f"{name} " + ("-" if ms is None else f"{ms:.3f} ({flops / ms / 1e9:.0f})"))
        ratio = ""
        if rec.get("mosaic") and rec.get("cudnn"):
            ratio += f"  mosaic/cudnn {rec['mosaic'] / rec['cudnn']:.2f}"
        if rec.get("mosaic") and rec.get("pallas"):
            ratio += f"  mosaic/pallas {rec['mosaic'] / rec['pallas']:.2f}"
        print(f"time {label:16s} " + "  ".join(parts) + ratio, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--time-only", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", action="store_true")
    p.add_argument("--shapes", default="", help="comma-separated timing labels (default: all)")
    p.add_argument("--case-timeout", type=float, default=90.0, help="seconds before a case counts as hung")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "out")))
    args = p.parse_args()
    import jax
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    result = {}
    if not args.time_only:
        result["check"] = check(args)
    if not args.check_only:
        result["time"] = timing(args, configs=args.configs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mosaic_forward.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
