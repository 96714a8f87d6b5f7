"""Attention benchmark: scoremod's kernels against every peer on the machine (BENCHMARKS.md).

    python benchmarks/attention_bench.py [--quick] [--out DIR] [--masks causal,doc] [--impls mosaic,pallas] [--sweep]

Shapes: bf16, B=2, N=16, T=S=8192, H=128 (``--quick``: T=S=2048); masks dense, causal,
causal sliding window 1024 ("swa"), causal packed documents with 8 random-length
documents per batch row ("doc"); forward and forward+backward.

One process per framework: the JAX part (scoremod "mosaic", "mosaic-pallas-bwd" (the
Mosaic forward with the Pallas backward), "pallas" and "xla",
jax.nn.dot_product_attention cudnn/xla, JAX's Pallas GPU ``mha``) runs first and saves
the inputs and a reference slice; the PyTorch part (FlexAttention compiled, SDPA) runs
after it in a fresh process on the same inputs. Every output is checked against a
float32 dense reference on a slice (batch 0, heads 0-1, the full sequence) before it is
timed; our gradients too. Times are medians of several batches of back-to-back calls
(JAX: block_until_ready around each batch; torch: CUDA events). TF/s counts only the
work the mask leaves (4*B*N*T*S*H*density; fwd+bwd counted as 3.5x fwd). Missing peers
are reported as missing. Prints one table and writes ``bench.json`` to --out ($OUT).

``--sweep`` instead times our pallas kernel over several forward PallasBlockSizes (tuning);
``--sweep --sweep-bwd`` over backward ones; ``--part pick`` reads the sweep and prints 1
when the one-loop backward won (used as ``SCOREMOD_BWD_ONE_LOOP`` for the bench).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
MASKS = {
    "dense": None,
    "causal": "causal",
    "swa": "causal & window(1024)",
    "doc": "causal & doc(ids)",
}
WINDOW = 1024
NUM_DOCS = 8


def _shape(quick):
    return dict(B=2, N=16, T=2048 if quick else 8192, H=128)


def _doc_ids(B, T, seed=0, n_docs=NUM_DOCS):
    """Sorted segment ids int32[B, T]: n_docs random-length documents per row."""
    import numpy as np
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), n_docs - 1, replace=False))
        ids[b] = np.searchsorted(cuts, np.arange(T), side="right")
    return ids


def _density(name, T, ids):
    import numpy as np
    if name == "dense":
        return 1.0
    rows = np.arange(T)
    if name == "causal":
        return float((rows + 1).sum()) / (T * T)
    if name == "swa":
        return float(np.minimum(rows + 1, WINDOW).sum()) / (T * T)
    total = 0
    for b in range(ids.shape[0]):
        _, lens = np.unique(ids[b], return_counts=True)
        total += (lens * (lens + 1) // 2).sum()
    return float(total) / (ids.shape[0] * T * T)


# ---- timing -------------------------------------------------------------------------------

def _time_jax(fn, args, *, target_s=0.03, reps=7):
    import jax
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    est = time.perf_counter() - t0
    n = max(1, min(200, int(target_s / max(est, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times) * 1e3


def _rel(a, b):
    import numpy as np
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if np.isnan(a).any():
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---- JAX part -----------------------------------------------------------------------------

def jax_part(args):
    import numpy as np
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))

    sh = _shape(args.quick)
    B, N, T, H = sh["B"], sh["N"], sh["T"], sh["H"]
    S = T
    work = args.work
    os.makedirs(work, exist_ok=True)
    info = dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), backend=jax.default_backend())
    try:
        import jaxlib
        info["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    print("JAX part:", info, flush=True)

    key = jax.random.PRNGKey(0)
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (B, S, N, H), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (B, S, N, H), jnp.float32).astype(jnp.bfloat16)
    do = jax.random.normal(kd, (B, T, N, H), jnp.float32).astype(jnp.bfloat16)
    ids_np = _doc_ids(B, T)
    ids = jnp.asarray(ids_np)
    for name, x in (("q", q), ("k", k), ("v", v), ("do", do)):
        np.save(os.path.join(work, f"{name}.npy"), np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16)))
    np.save(os.path.join(work, "ids.npy"), ids_np)
    scale = 1.0 / math.sqrt(H)

    from scoremod.compiler.mod import compile_mod
    from scoremod.runtime import pallas_attention as pa

    # reference on a slice: batch 0, heads 0..1, whole sequence, f32
    hs = slice(0, 2)

    def ref_fn(qs, ks, vs, mod, tensors):
        m = compile_mod(mod or "true")
        s = jnp.einsum("btnh,bsnh->bnts", qs.astype(jnp.float32), ks.astype(jnp.float32)) * scale
        bi = jnp.zeros((1, 1, 1, 1), jnp.int32)
        hi = jnp.arange(qs.shape[2], dtype=jnp.int32)[None, :, None, None]
        qi = jnp.arange(T, dtype=jnp.int32)[None, None, :, None]
        ki = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
        logits = m.score_mod(**tensors)(s, bi, hi, qi, ki)
        p = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", p, vs.astype(jnp.float32))

    block_sizes = None
    if args.block_sizes:
        names = [f.name for f in dataclasses.fields(pa.PallasBlockSizes)]
        block_sizes = pa.PallasBlockSizes(**dict(zip(names, (int(x) for x in args.block_sizes.split(",")))))
    one_loop = os.environ.get("SCOREMOD_BWD_ONE_LOOP") == "1"
    info["bwd_one_loop"] = one_loop

    results = dict(info=info, shape=dict(B=B, N=N, T=T, S=S, H=H), masks={}, plan={})
    impls = _jax_impls(q, k, v, ids, scale, block_sizes, one_loop)
    if args.impls:
        unknown = set(args.impls.split(",")) - set(impls)
        if unknown:
            raise SystemExit(f"--impls: unknown {sorted(unknown)}; the JAX rows are {sorted(impls)}")
        impls = {name: make for name, make in impls.items() if name in args.impls.split(",")}

    for mname, mod in MASKS.items():
        if args.masks and mname not in args.masks.split(","):
            continue
        dens = _density(mname, T, ids_np)
        tensors = {"ids": ids} if mname == "doc" else {}
        ref_tensors = {"ids": ids[:1]} if mname == "doc" else {}
        qs, ks, vs, dos = q[:1, :, hs], k[:1, :, hs], v[:1, :, hs], do[:1, :, hs]
        ref_out, ref_vjp = jax.vjp(lambda a, b_, c: ref_fn(a, b_, c, mod, ref_tensors), qs, ks, vs)
        ref_grads = ref_vjp(dos.astype(jnp.float32))
        np.save(os.path.join(work, f"ref_{mname}.npy"), np.asarray(ref_out, np.float32))
        entry = dict(density=dens, impls={})
        print(f"\n== {mname} (density {dens:.3f}) ==", flush=True)
        for iname, make in impls.items():
            rec = {}
            try:
                fwd = make(mname, mod, tensors)
            except Exception as exc:  # peer missing / cannot run this mask
                rec["missing"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                entry["impls"][iname] = rec
                print(f"  {iname:14s} missing: {rec['missing']}", flush=True)
                continue
            try:
                fwd_j = jax.jit(fwd)
                out = fwd_j(q, k, v)
                rec["fwd_err"] = _rel(out[:1, :, hs].astype(jnp.float32), ref_out)
                ok = rec["fwd_err"] < 2e-2
                if ok:
                    rec["fwd_ms"] = _time_jax(fwd_j, (q, k, v))
                bwd_j = jax.jit(lambda a, b_, c, d: jax.vjp(fwd, a, b_, c)[1](d))
                grads = bwd_j(q, k, v, do)
                rec["grad_err"] = max(_rel(g[:1, :, hs].astype(jnp.float32), r)
                                      for g, r in zip(grads, ref_grads))
                del grads
                if ok and rec["grad_err"] < 3e-2:
                    rec["fwdbwd_ms"] = _time_jax(bwd_j, (q, k, v, do))
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                traceback.print_exc(limit=3)
            entry["impls"][iname] = rec
            print(f"  {iname:14s} {_fmt_rec(rec)}", flush=True)
        results["masks"][mname] = entry

    # plan construction for the data-dependent doc mask (what pallas_attention builds)
    try:
        from scoremod.compiler.plan import build_plan
        bs = block_sizes or pa.PallasBlockSizes.get_default(H, jnp.bfloat16)
        pairs = sorted({(bs.block_q, bs.block_kv), (bs.block_q_dq, bs.block_kv_dq),
                        (bs.block_q_dkv, bs.block_kv_dkv)})
        mod = compile_mod(MASKS["doc"])
        for pair in [pairs[0], None]:
            use = pairs if pair is None else [pair]
            f = jax.jit(lambda ids: [build_plan(mod, q_len=T, kv_len=S, block_q=a, block_kv=b_,
                                                batch=B, heads=N, tensors={"ids": ids})
                                     for a, b_ in use])
            ms = _time_jax(f, (ids,))
            results["plan"]["doc_fwd" if pair else "doc_all"] = dict(ms=ms, blocks=[list(p) for p in use])
            print(f"plan build doc {use}: {ms:.3f} ms", flush=True)
        T1 = 1 << 20
        ids1 = jnp.asarray(_doc_ids(1, T1))
        f = jax.jit(lambda ids: build_plan(mod, q_len=T1, kv_len=T1, block_q=128, block_kv=128,
                                           batch=1, heads=1, tensors={"ids": ids}))
        ms = _time_jax(f, (ids1,), reps=3)
        results["plan"]["doc_1M_128"] = dict(ms=ms)
        print(f"plan build doc 1M tokens (128x128): {ms:.2f} ms", flush=True)
    except Exception as exc:
        results["plan"]["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print("plan timing failed:", results["plan"]["error"], flush=True)

    with open(os.path.join(work, "jax.json"), "w") as f:
        json.dump(results, f, indent=1)


def _fmt_rec(rec):
    if "missing" in rec:
        return "missing"
    parts = []
    for k in ("fwd_err", "grad_err"):
        if k in rec:
            parts.append(f"{k}={rec[k]:.2e}")
    for k in ("fwd_ms", "fwdbwd_ms"):
        if k in rec:
            parts.append(f"{k}={rec[k]:.3f}")
    if "error" in rec:
        parts.append("ERROR " + rec["error"])
    return " ".join(parts)


def _jax_impls(q, k, v, ids, scale, block_sizes, one_loop=False):
    import dataclasses
    import jax

    def ours(impl):
        def make(mname, mod, tensors):
            if impl == "mosaic-pallas-bwd":   # the Mosaic forward with the Pallas backward
                from scoremod.runtime.mosaic_attention import MosaicBlockSizes, mosaic_attention
                bs = dataclasses.replace(MosaicBlockSizes.get_default(q.shape[-1]), backward="pallas")
                return lambda a, b, c: mosaic_attention(a, b, c, mod=mod, scale=scale, tensors=tensors,
                                                        block_sizes=bs)
            if impl == "pallas":
                from scoremod.runtime.pallas_attention import PallasBlockSizes, pallas_attention
                bs = block_sizes
                if one_loop and mod is not None:
                    bs = dataclasses.replace(bs or PallasBlockSizes.get_default(q.shape[-1], q.dtype),
                                             bwd_one_loop=True)
                return lambda a, b, c: pallas_attention(a, b, c, mod=mod, scale=scale, tensors=tensors,
                                                        block_sizes=bs)
            import scoremod
            return lambda a, b, c: scoremod.attention(a, b, c, mod=mod, scale=scale,
                                                      implementation=impl, **tensors)
        return make

    def jax_nn(impl):
        def make(mname, mod, tensors):
            if mname == "doc":
                raise NotImplementedError("jax.nn.dot_product_attention has no segment ids")
            kw = dict(scale=scale, implementation=impl)
            if mname in ("causal", "swa"):
                kw["is_causal"] = True
            if mname == "swa":
                kw["local_window_size"] = (WINDOW - 1, 0)
            return lambda a, b, c: jax.nn.dot_product_attention(a, b, c, **kw)
        return make

    def jax_mha(mname, mod, tensors):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu.attention import mha
        if mname == "swa":
            raise NotImplementedError("mha has no sliding window")
        seg = ids if mname == "doc" else None
        causal = mname != "dense"
        return lambda a, b, c: mha(a, b, c, seg, sm_scale=scale, causal=causal)

    return {"mosaic": ours("mosaic"), "mosaic-pallas-bwd": ours("mosaic-pallas-bwd"), "pallas": ours("pallas"), "xla": ours("xla"), "jax-cudnn": jax_nn("cudnn"),
            "jax-xla": jax_nn("xla"), "jax-pallas-mha": jax_mha}


# ---- torch part ---------------------------------------------------------------------------

def torch_part(args):
    import numpy as np
    try:
        import torch
        import torch.nn.functional as F
    except Exception as exc:
        json.dump(dict(missing=f"torch: {exc}"), open(os.path.join(args.work, "torch.json"), "w"))
        return
    work = args.work
    info = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0))
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        pass
    print("torch part:", info, flush=True)
    sh = _shape(args.quick)
    B, T, H = sh["B"], sh["T"], sh["H"]
    S = T
    scale = 1.0 / math.sqrt(H)

    def load(name):
        x = torch.from_numpy(np.load(os.path.join(work, f"{name}.npy")).view(np.int16)).cuda()
        return x.view(torch.bfloat16).transpose(1, 2).contiguous()   # [B, N, T, H]

    q, k, v, do = (load(n) for n in ("q", "k", "v", "do"))
    ids = torch.from_numpy(np.load(os.path.join(work, "ids.npy"))).cuda()

    results = dict(info=info, masks={}, block_mask={})
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:
        flex = None
        flex_missing = f"{type(exc).__name__}: {exc}"

    def causal_mod(b, h, qi, ki):
        return qi >= ki

    def swa_mod(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < WINDOW)

    def doc_mod(b, h, qi, ki):
        return (ids[b, qi] == ids[b, ki]) & (qi >= ki)

    mods = {"dense": None, "causal": causal_mod, "swa": swa_mod, "doc": doc_mod}
    for mname, mm in mods.items():
        if args.masks and mname not in args.masks.split(","):
            continue
        ref = np.load(os.path.join(work, f"ref_{mname}.npy"))     # [1, T, 2, H]
        entry = dict(impls={})
        print(f"\n== {mname} ==", flush=True)
        # FlexAttention
        rec = {}
        if flex is None:
            rec["missing"] = flex_missing
        else:
            try:
                bm = None
                if mm is not None:
                    bsz = B if mname == "doc" else None
                    bm = create_block_mask(mm, bsz, None, T, S, device="cuda")
                    if mname == "doc":
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(5):
                            create_block_mask(mm, bsz, None, T, S, device="cuda")
                        torch.cuda.synchronize()
                        results["block_mask"]["doc_ms"] = (time.perf_counter() - t0) / 5 * 1e3
                rec.update(_torch_run(lambda a, b_, c: flex(a, b_, c, block_mask=bm, scale=scale),
                                      q, k, v, do, ref, time_torch))
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                traceback.print_exc(limit=3)
        entry["impls"]["torch-flex"] = rec
        print(f"  torch-flex     {_fmt_rec(rec)}", flush=True)
        # SDPA (flash / cuDNN backends pick themselves)
        rec = {}
        if mname in ("dense", "causal"):
            try:
                rec.update(_torch_run(lambda a, b_, c: F.scaled_dot_product_attention(
                    a, b_, c, is_causal=mname == "causal", scale=scale), q, k, v, do, ref, time_torch))
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            rec["missing"] = "SDPA has no sparse sliding-window / document kernel"
        entry["impls"]["torch-sdpa"] = rec
        print(f"  torch-sdpa     {_fmt_rec(rec)}", flush=True)
        results["masks"][mname] = entry
    json.dump(results, open(os.path.join(work, "torch.json"), "w"), indent=1)


def time_torch(fn, target_ms=30.0, reps=7):
    """Median ms per call of a torch function: batches of back-to-back calls timed with
    CUDA events (perf_counter on a CPU), the batch sized to about ``target_ms``."""
    import torch
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()
    fn(); fn()
    sync()
    t0 = time.perf_counter(); fn(); sync()
    n = max(1, min(200, int(target_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    times = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / n)
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(times)


def run_parts(script, flags):
    """Run ``script --part jax`` then ``--part torch`` (each framework in its own process;
    the torch part may fail without stopping the report). flags: the shared arguments."""
    base = [sys.executable, os.path.abspath(script), *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(base + ["--part", "jax"], env=env, check=True)
    subprocess.run(base + ["--part", "torch"], env=env, check=False)


def _torch_run(fn, q, k, v, do, ref, time_torch):
    import torch
    rec = {}
    with torch.no_grad():
        out = fn(q, k, v)
    got = out[:1, :2].transpose(1, 2).float().cpu().numpy()
    rec["fwd_err"] = _rel(got, ref)
    if rec["fwd_err"] < 2e-2:
        with torch.no_grad():
            rec["fwd_ms"] = time_torch(lambda: fn(q, k, v))
        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))

        def fb():
            o = fn(qg, kg, vg)
            o.backward(do)
        rec["fwdbwd_ms"] = time_torch(fb)
    return rec


# ---- sweep (tuning our kernel) --------------------------------------------------------------

FWD_SWEEP = [  # block_q, block_kv, num_warps, num_stages, fwd_one_loop
    (128, 128, 8, 3, False), (128, 128, 8, 3, True), (128, 64, 4, 3, False), (128, 64, 4, 3, True),
]
BWD_SWEEP = [  # block_q_dq, block_kv_dq, block_q_dkv, block_kv_dkv, warps_bwd, stages_bwd, bwd_one_loop
    (64, 64, 64, 64, 4, 2, False), (64, 64, 64, 64, 4, 2, True),
]
# Earlier sweeps (H100, 2026-11-22): benchmarks/NOTES_pallas.md.


def sweep_part(args):
    """Tune our kernel: forward configs on every mask, then backward configs (fwd fixed)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from scoremod.runtime import pallas_attention as pa
    sh = _shape(args.quick)
    B, N, T, H = sh["B"], sh["N"], sh["T"], sh["H"]
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, T, N, H), jnp.float32).astype(jnp.bfloat16) for kk in ks)
    ids = jnp.asarray(_doc_ids(B, T))
    base = pa.PallasBlockSizes.get_default(H, jnp.bfloat16)
    rows = []

    def run(bs, mname, kinds):
        mod = MASKS[mname]
        tensors = {"ids": ids} if mname == "doc" else {}
        fl = 4 * B * N * T * T * H * _density(mname, T, np.asarray(ids))
        f = lambda a, b, c: pa.pallas_attention(a, b, c, mod=mod, tensors=tensors, block_sizes=bs)
        rec = dict(cfg=list(dataclasses_astuple(bs)), mask=mname)
        try:
            if "fwd" in kinds:
                rec["fwd_ms"] = _time_jax(jax.jit(f), (q, k, v), reps=5)
                rec["fwd_tfs"] = fl / rec["fwd_ms"] / 1e9
            if "fwdbwd" in kinds:
                gj = jax.jit(lambda a, b, c, d: jax.vjp(f, a, b, c)[1](d))
                rec["fwdbwd_ms"] = _time_jax(gj, (q, k, v, do), reps=5)
                rec["fwdbwd_tfs"] = 3.5 * fl / rec["fwdbwd_ms"] / 1e9
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(rec)
        print(json.dumps(rec), flush=True)

    import dataclasses
    for cfg in (FWD_SWEEP if not args.sweep_bwd else []):
        bs = dataclasses.replace(base, block_q=cfg[0], block_kv=cfg[1], num_warps=cfg[2], num_stages=cfg[3],
                                 fwd_one_loop=cfg[4])
        for mname in (args.masks or "dense,causal,swa,doc").split(","):
            run(bs, mname, ("fwd",))
    for cfg in (BWD_SWEEP if args.sweep_bwd else []):
        bs = dataclasses.replace(base, block_q_dq=cfg[0], block_kv_dq=cfg[1], block_q_dkv=cfg[2],
                                 block_kv_dkv=cfg[3], num_warps_bwd=cfg[4], num_stages_bwd=cfg[5],
                                 bwd_one_loop=cfg[6])
        for mname in ("causal", "doc"):
            run(bs, mname, ("fwdbwd",))
    json.dump(rows, open(os.path.join(args.out, "sweep.json"), "w"), indent=1)


def dataclasses_astuple(x):
    import dataclasses
    return dataclasses.astuple(x)


# ---- table --------------------------------------------------------------------------------

def report(args):
    jx = json.load(open(os.path.join(args.work, "jax.json")))
    try:
        th = json.load(open(os.path.join(args.work, "torch.json")))
    except Exception as exc:
        th = dict(missing=f"torch part produced nothing: {exc}", masks={})
    sh = jx["shape"]
    merged = {}
    for mname, entry in jx["masks"].items():
        impls = dict(entry["impls"])
        tm = th.get("masks", {}).get(mname, {}).get("impls", {})
        if not tm:
            tm = {"torch-flex": {"missing": th.get("missing", "not run")},
                  "torch-sdpa": {"missing": th.get("missing", "not run")}}
        impls.update(tm)
        merged[mname] = dict(density=entry["density"], impls=impls)
    names = []
    for m in merged.values():
        for n in m["impls"]:
            if n not in names:
                names.append(n)
    B, N, T, S, H = sh["B"], sh["N"], sh["T"], sh["S"], sh["H"]
    print(f"\nbf16 B={B} N={N} T=S={T} H={H}; {jx['info']}; {th.get('info', {})}")
    cols = [(m, kind) for m in merged for kind in ("fwd", "fwdbwd")]
    head = "| impl | " + " | ".join(f"{m} {'fwd' if k == 'fwd' else 'fwd+bwd'}" for m, k in cols) + " |"
    print(head)
    print("|" + "---|" * (len(cols) + 1))
    for n in names:
        cells = []
        for m, kind in cols:
            rec = merged[m]["impls"].get(n, {"missing": "-"})
            ms = rec.get(f"{kind}_ms")
            if ms is None:
                cells.append("missing" if "missing" in rec else ("ERR" if "error" in rec else "–"))
                continue
            fl = 4 * B * N * T * S * H * merged[m]["density"] * (3.5 if kind == "fwdbwd" else 1.0)
            cells.append(f"{ms:.3f} ({fl / ms / 1e9:.0f})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for ours_name in ("mosaic", "pallas"):
        print(f"\nratio {ours_name} / peer (time; < 1 means {ours_name} is faster)")
        print("| peer | " + " | ".join(f"{m} {'fwd' if k == 'fwd' else 'fwd+bwd'}" for m, k in cols) + " |")
        print("|" + "---|" * (len(cols) + 1))
        for n in names:
            if n == ours_name:
                continue
            cells = []
            for m, kind in cols:
                ours = merged[m]["impls"].get(ours_name, {}).get(f"{kind}_ms")
                theirs = merged[m]["impls"].get(n, {}).get(f"{kind}_ms")
                cells.append(f"{ours / theirs:.2f}" if ours and theirs else "–")
            print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nplan construction:", json.dumps(jx.get("plan", {})),
          "| flex create_block_mask:", json.dumps(th.get("block_mask", {})))
    out = dict(shape=sh, jax_info=jx["info"], torch_info=th.get("info"), masks=merged,
               plan=jx.get("plan"), flex_block_mask=th.get("block_mask"),
               date=time.strftime("%Y-%m-%d"))
    os.makedirs(args.out, exist_ok=True)
    json.dump(out, open(os.path.join(args.out, "bench.json"), "w"), indent=1)


def pick_fwd(args):
    """Print 1 if the one-loop backward beat the two-loop backward in the sweep (mean
    fwd+bwd time over the masks swept, by more than 2%), else 0."""
    rows = json.load(open(os.path.join(args.out, "sweep.json")))
    t = {True: [], False: []}
    for r in rows:
        if "fwdbwd_ms" in r:
            t[bool(r["cfg"][-1])].append(r["fwdbwd_ms"])
    one, two = (sum(v) / len(v) if v else float("inf") for v in (t[True], t[False]))
    print(1 if one < 0.98 * two else 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "out")))
    p.add_argument("--work", default="/tmp/scoremod_bench")
    p.add_argument("--part", choices=["all", "jax", "torch", "report", "sweep", "pick"], default="all")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-bwd", action="store_true", help="also sweep backward block sizes")
    p.add_argument("--masks", default="")
    p.add_argument("--impls", default="", help="comma-separated JAX rows to run (default: all)")
    p.add_argument("--block-sizes", default="", help="comma-separated PallasBlockSizes fields for pallas")
    args = p.parse_args()
    if args.sweep:
        args.part = "sweep"
    if args.part == "jax":
        return jax_part(args)
    if args.part == "torch":
        return torch_part(args)
    if args.part == "report":
        return report(args)
    if args.part == "pick":
        return pick_fwd(args)
    if args.part == "sweep":
        os.makedirs(args.out, exist_ok=True)
        return sweep_part(args)
    flags = ["--work", args.work, "--out", args.out] + (["--quick"] if args.quick else [])
    if args.masks:
        flags += ["--masks", args.masks]
    if args.impls:
        flags += ["--impls", args.impls]
    if args.block_sizes:
        flags += ["--block-sizes", args.block_sizes]
    run_parts(__file__, flags)
    report(args)


if __name__ == "__main__":
    main()
