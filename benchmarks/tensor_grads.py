"""Forward+backward of attention with LEARNABLE tensor parameters (issue 17): scoremod
beside FlexAttention (PyTorch), bf16, B=1, N=K=16 (MHA), H=128, T=S=8192.

    python benchmarks/tensor_grads.py            # on an H100/H200
    python benchmarks/tensor_grads.py --quick    # tiny sizes (T=256, N=2, H=64): a smoke test, runs on CPU

The loss is ``sum(out.float() * dO)`` with a fixed random dO; the gradients are taken
with respect to q, k, v and the learnable tensor. Cases:

* relpos: ``"causal + relpos(t, 128)"``, t f32 [N, 257] learnable. scoremod with
  ``implementation=None`` (the default dispatch) and ``implementation="xla"``; Flex with
  ``score + t[h, clamp(q - kv, -128, 128) + 128]`` and a causal block mask.
* slope: ``"causal + -s[h] * abs(q - kv)"``, s f32 [N] learnable (learned ALiBi slopes);
  Flex ``score - s[h] * abs(q - kv)``.
* slope-const: the same with s held constant (gradients of q, k, v only), to show what
  the tensor gradient costs, for both libraries.
* sinks: ``"causal & window(128)"`` with ``sinks=s``, s f32 [N] learnable. Flex has no
  sinks: its row is the same window mask without them ("flex (no sinks)"); a scoremod
  row without sinks is timed beside it.

Before timing, every row is checked on a reduced size (B=1, N=2, T=1024, H=128; with
``--quick`` the quick size) against scoremod's ``implementation="xla"`` in float32 on the
same (bf16-rounded) values: the relative error of the learnable tensor's gradient must be
< 3e-2 (asserted); q/k/v gradient errors are printed. Flex's gradients (in float32) are
compared with the same reference for relpos and slope, where the math is the same
(Flex's default scale is 1/sqrt(H), as ours).

One process per framework (as benchmarks/attention_bench.py): the JAX part runs first,
saves the inputs and the reference gradients in --work, and the PyTorch part runs after
it in a fresh process on the same inputs. Times are medians (attention_bench's
``_time_jax``; torch: the same scheme with CUDA events). The implementation scoremod
actually ran is read from the "scoremod" logger while the gradient is traced. Prints one
table; writes tensor_grads.json to --out ($OUT, else benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from attention_bench import _rel, _time_jax, run_parts, time_torch  # noqa: E402  (timing, error, parts)

WINDOW = 128          # the sinks case's sliding window
RELPOS = 128          # relpos(t, 128): t is [N, 2 * 128 + 1]

CASES = {
    "relpos": "causal + relpos(t, 128)",
    "slope": "causal + -s[h] * abs(q - kv)",
    "slope-const": "causal + -s[h] * abs(q - kv)",
    "sinks": "causal & window(128)",
}
TENSOR_NAME = {"relpos": "t", "slope": "s", "slope-const": "s", "sinks": "sinks"}

# (case, row label, scoremod implementation argument, what the tensor is:
#  "learn" = differentiated, "const" = held constant, "none" = not passed)
JAX_ROWS = [
    ("relpos", "scoremod", None, "learn"),
    ("relpos", "scoremod xla", "xla", "learn"),
    ("slope", "scoremod", None, "learn"),
    ("slope-const", "scoremod", None, "const"),
    ("sinks", "scoremod", None, "learn"),
    ("sinks", "scoremod (no sinks)", None, "none"),
]
# (case, row label, what the tensor is)
TORCH_ROWS = [
    ("relpos", "flex", "learn"),
    ("slope", "flex", "learn"),
    ("slope-const", "flex", "const"),
    ("sinks", "flex (no sinks)", "none"),
]
FLEX_LABEL = {case: label for case, label, _ in TORCH_ROWS}


def _shape(quick):
    if quick:
        return dict(B=1, N=2, T=256, H=64)
    return dict(B=1, N=16, T=8192, H=128)


def _check_shape(quick):
    if quick:
        return dict(B=1, N=2, T=256, H=64)
    return dict(B=1, N=2, T=1024, H=128)


def _tensor_values(case, N):
    """The learnable tensor's starting values (float32 numpy)."""
    import numpy as np
    rng = np.random.default_rng(1)
    if case == "relpos":
        return (0.5 * rng.standard_normal((N, 2 * RELPOS + 1))).astype(np.float32)
    if case in ("slope", "slope-const"):
        return np.array([2.0 ** (-8.0 * (h + 1) / N) for h in range(N)], np.float32)   # ALiBi slopes
    return rng.standard_normal(N).astype(np.float32)                                   # sink logits


def _cases(args):
    if not args.cases:
        return list(CASES)
    names = args.cases.split(",")
    unknown = set(names) - set(CASES)
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; the cases are {list(CASES)}")
    return names


# ---- JAX part -----------------------------------------------------------------------------

class _UsedImplementations(logging.Handler):
    """Collects the implementations scoremod's dispatch picks ("using X for ...", INFO)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.names = []

    def emit(self, record):
        m = re.search(r": using (\S+) for", record.getMessage())
        if m and m.group(1) not in self.names:
            self.names.append(m.group(1))


def _first_call(fn, args):
    """Call fn (a fresh jit: it traces now) and return (result, the implementations scoremod ran)."""
    import jax
    log = logging.getLogger("scoremod")
    handler = _UsedImplementations()
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        out = jax.block_until_ready(fn(*args))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    return out, "+".join(handler.names) or "?"


def _grad_fn(case, implementation, use):
    """jit(grad of sum(out.float() * dO)) with respect to q, k, v (and x when use == "learn").
    Arguments (q, k, v, x, do)."""
    import jax
    import jax.numpy as jnp
    import scoremod
    mod = CASES[case]

    def loss(q, k, v, x, do):
        if case == "sinks":
            out = scoremod.attention(q, k, v, mod=mod, implementation=implementation,
                                     sinks=None if use == "none" else x)
        else:
            out = scoremod.attention(q, k, v, mod=mod, implementation=implementation,
                                     **{TENSOR_NAME[case]: x})
        return jnp.sum(out.astype(jnp.float32) * do)

    argnums = (0, 1, 2, 3) if use == "learn" else (0, 1, 2)
    return jax.jit(jax.grad(loss, argnums=argnums))


def _inputs(shape, seed):
    """q, k, v bf16 [B, T, N, H] and dO (bf16 values, held as float32)."""
    import jax
    import jax.numpy as jnp
    B, N, T, H = shape["B"], shape["N"], shape["T"], shape["H"]
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (B, T, N, H), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (B, T, N, H), jnp.float32).astype(jnp.bfloat16)
    do = jax.random.normal(kd, (B, T, N, H), jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)
    return q, k, v, do


def _save_bf16(path, x):
    import jax
    import jax.numpy as jnp
    import numpy as np
    np.save(path, np.asarray(jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)))


def jax_part(args):
    import numpy as np
    import jax
    import jax.numpy as jnp
    import scoremod

    work = args.work
    os.makedirs(work, exist_ok=True)
    info = dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                scoremod=scoremod.__version__)
    try:
        import jaxlib
        info["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    print("JAX part:", info, flush=True)
    cases = _cases(args)
    f32 = lambda x: x.astype(jnp.float32)   # noqa: E731

    # ---- 1. check on a reduced size against implementation="xla" in float32 ----
    cs = _check_shape(args.quick)
    print(f"\ncheck: B={cs['B']} N={cs['N']} T=S={cs['T']} H={cs['H']}, bf16 rows against xla float32 "
          f"on the same values", flush=True)
    q, k, v, do = _inputs(cs, seed=1)
    for name, x in (("q", q), ("k", k), ("v", v), ("do", do)):
        _save_bf16(os.path.join(work, f"check_{name}.npy"), x)
    checks = {}
    refs = {}
    for case, label, impl, use in JAX_ROWS:
        if case not in cases:
            continue
        x = jnp.asarray(_tensor_values(case, cs["N"]))
        np.save(os.path.join(work, f"check_x_{case}.npy"), np.asarray(x))
        if (case, use) not in refs:
            ref = _grad_fn(case, "xla", use)(f32(q), f32(k), f32(v), x, do)
            refs[case, use] = ref
            if use == "learn" and case in ("relpos", "slope"):     # for Flex's check
                for i, name in enumerate(("q", "k", "v", "x")):
                    np.save(os.path.join(work, f"check_ref_{case}_{name}.npy"), np.asarray(ref[i], np.float32))
        ref = refs[case, use]
        rec = dict(implementation=impl)
        try:
            got, ran = _first_call(_grad_fn(case, impl, use), (q, k, v, x, do))
            rec["ran"] = ran
            rec["qkv_err"] = max(_rel(f32(got[i]), ref[i]) for i in range(3))
            if use == "learn":
                rec["tensor_err"] = _rel(got[3], ref[3])
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(limit=3)
        checks[case, label] = rec
        errs = " ".join(f"{key}={rec[key]:.2e}" for key in ("tensor_err", "qkv_err") if key in rec)
        print(f"  {case:12s} {label:20s} implementation={impl!r:7s} ran {rec.get('ran', '-'):8s} {errs} "
              f"{rec.get('error', '')}", flush=True)
    for (case, label), rec in checks.items():   # a row that failed to run is reported and not timed
        if "tensor_err" in rec:
            assert rec["tensor_err"] < 3e-2, (case, label, "tensor gradient error", rec["tensor_err"])
    del q, k, v, do, refs

    # ---- 2. time at the full size ----
    sh = _shape(args.quick)
    print(f"\ntime: bf16 B={sh['B']} N=K={sh['N']} T=S={sh['T']} H={sh['H']}", flush=True)
    q, k, v, do = _inputs(sh, seed=0)
    for name, x in (("q", q), ("k", k), ("v", v), ("do", do)):
        _save_bf16(os.path.join(work, f"{name}.npy"), x)
    rows = []
    for case, label, impl, use in JAX_ROWS:
        if case not in cases:
            continue
        x = jnp.asarray(_tensor_values(case, sh["N"]))
        np.save(os.path.join(work, f"x_{case}.npy"), np.asarray(x))
        rec = dict(case=case, label=label, implementation=impl, tensor=use,
                   check=checks.get((case, label), {}))
        if "error" in rec["check"]:
            rec["error"] = "not timed: the check failed: " + rec["check"]["error"]
            rows.append(rec)
            print(f"  {case:12s} {label:20s} {rec['error']}", flush=True)
            continue
        try:
            fn = _grad_fn(case, impl, use)
            t0 = time.perf_counter()
            _, rec["ran"] = _first_call(fn, (q, k, v, x, do))
            rec["first_call_s"] = time.perf_counter() - t0
            rec["ms"] = _time_jax(fn, (q, k, v, x, do))
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(limit=3)
        rows.append(rec)
        ms = f"{rec['ms']:.3f} ms" if "ms" in rec else "ERROR " + rec.get("error", "")
        print(f"  {case:12s} {label:20s} implementation={impl!r:7s} ran {rec.get('ran', '-'):8s} {ms}",
              flush=True)
    results = dict(info=info, shape=sh, check_shape=cs, rows=rows)
    with open(os.path.join(work, "jax.json"), "w") as f:
        json.dump(results, f, indent=1)


# ---- torch part ---------------------------------------------------------------------------

def torch_part(args):
    import numpy as np
    work = args.work
    out_path = os.path.join(work, "torch.json")
    try:
        import torch
    except Exception as exc:
        print(f"torch part skipped: no torch ({exc})", flush=True)
        json.dump(dict(missing=f"torch: {exc}"), open(out_path, "w"))
        return
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    info = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0) if cuda else "cpu")
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        pass
    print("torch part:", info, flush=True)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        for name in ("recompile_limit", "cache_size_limit"):   # one compile per case and size
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    except Exception as exc:
        msg = f"FlexAttention unavailable: {type(exc).__name__}: {exc}"
        print("torch part skipped:", msg, flush=True)
        json.dump(dict(info=info, missing=msg), open(out_path, "w"))
        return
    cases = _cases(args)

    def load_bf16(name):     # [B, T, N, H] on disk -> [B, N, T, H]
        x = torch.from_numpy(np.load(os.path.join(work, f"{name}.npy")).view(np.int16)).to(dev)
        return x.view(torch.bfloat16).transpose(1, 2).contiguous()

    def load_f32(name):
        return torch.from_numpy(np.load(os.path.join(work, f"{name}.npy"))).to(dev)

    def score_mod_for(case, x):
        if case == "relpos":
            return lambda score, b, h, q_idx, kv_idx: score + x[h, (q_idx - kv_idx).clamp(-RELPOS, RELPOS) + RELPOS]
        if case in ("slope", "slope-const"):
            return lambda score, b, h, q_idx, kv_idx: score - x[h] * (q_idx - kv_idx).abs()
        return None     # sinks: Flex has none; the window mask only

    def mask_mod_for(case):
        if case == "sinks":
            return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)
        return lambda b, h, q_idx, kv_idx: q_idx >= kv_idx

    def make_fwd_bwd(case, use, q, k, v, x, do):
        """fn() running forward + backward of sum(out.float() * do), leaving the grads in .grad."""
        B, N, T, H = q.shape
        q, k, v = (a.detach().clone().requires_grad_(True) for a in (q, k, v))
        x = x.detach().clone().requires_grad_(use == "learn")
        leaves = [q, k, v] + ([x] if use == "learn" else [])
        sm = score_mod_for(case, x)
        bm = create_block_mask(mask_mod_for(case), None, None, T, T, device=dev)
        scale = 1.0 / math.sqrt(H)

        def fn():
            for a in leaves:
                a.grad = None
            out = flex(q, k, v, score_mod=sm, block_mask=bm, scale=scale)
            (out.float() * do).sum().backward()
        return fn, leaves

    results = dict(info=info, checks={}, rows=[])
    skip = None     # why the flex rows are skipped (set on a machine without CUDA: Flex has no CPU backward)

    def cannot_run_here(exc):
        return not cuda and isinstance(exc, NotImplementedError)

    # ---- 1. check Flex's gradients (float32) against our xla float32 gradients ----
    print("\ncheck: Flex float32 gradients against scoremod xla float32", flush=True)
    for case in ("relpos", "slope"):
        if case not in cases or skip:
            continue
        rec = {}
        try:
            q, k, v = (load_bf16(f"check_{n}").float() for n in ("q", "k", "v"))
            do = load_bf16("check_do").float()
            x = load_f32(f"check_x_{case}")
            fn, leaves = make_fwd_bwd(case, "learn", q, k, v, x, do)
            fn()
            ref = {n: np.load(os.path.join(work, f"check_ref_{case}_{n}.npy")) for n in ("q", "k", "v", "x")}
            rec["tensor_err"] = _rel(leaves[3].grad.cpu().numpy(), ref["x"])
            rec["qkv_err"] = max(_rel(a.grad.transpose(1, 2).cpu().numpy(), ref[n])
                                 for a, n in zip(leaves[:3], ("q", "k", "v")))
        except Exception as exc:
            if cannot_run_here(exc):
                skip = f"no CUDA: {exc}"
                break
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(limit=3)
        results["checks"][case] = rec
        errs = " ".join(f"{key}={rec[key]:.2e}" for key in ("tensor_err", "qkv_err") if key in rec)
        flag = " MISMATCH (> 3e-2)" if rec.get("tensor_err", 0) >= 3e-2 else ""
        print(f"  {case:12s} flex {errs}{flag} {rec.get('error', '')}", flush=True)

    # ---- 2. time at the full size ----
    print("\ntime:", flush=True)
    q, k, v = (load_bf16(n) for n in ("q", "k", "v"))
    do = load_bf16("do").float()
    for case, label, use in TORCH_ROWS:
        if case not in cases:
            continue
        rec = dict(case=case, label=label, tensor=use, check=results["checks"].get(case, {}))
        if skip:
            rec["missing"] = skip
            results["rows"].append(rec)
            continue
        try:
            x = load_f32(f"x_{case}")
            fn, _ = make_fwd_bwd(case, use, q, k, v, x, do)
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            rec["first_call_s"] = time.perf_counter() - t0
            rec["ms"] = time_torch(fn)
        except Exception as exc:
            if cannot_run_here(exc):
                skip = rec["missing"] = f"no CUDA: {exc}"
                results["rows"].append(rec)
                continue
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(limit=3)
        results["rows"].append(rec)
        ms = f"{rec['ms']:.3f} ms" if "ms" in rec else "ERROR " + rec.get("error", "")
        print(f"  {case:12s} {label:20s} {ms}", flush=True)
    if skip:
        results["missing"] = skip
        print(f"flex rows skipped: {skip}", flush=True)
    json.dump(results, open(out_path, "w"), indent=1)


# ---- table --------------------------------------------------------------------------------

def report(args):
    jx = json.load(open(os.path.join(args.work, "jax.json")))
    try:
        th = json.load(open(os.path.join(args.work, "torch.json")))
    except Exception as exc:
        th = dict(missing=f"the torch part wrote nothing: {exc}")
    rows = list(jx["rows"]) + list(th.get("rows", []))
    sh = jx["shape"]
    flex_ms = {r["case"]: r.get("ms") for r in th.get("rows", [])}

    print(f"\nfwd+bwd of sum(out.float() * dO), grads to q, k, v (+ the tensor where learnable); "
          f"bf16 B={sh['B']} N=K={sh['N']} T=S={sh['T']} H={sh['H']}")
    print(f"JAX: {jx['info']}")
    print(f"torch: {th.get('info', {})}" + (f" ({th['missing']})" if "missing" in th else ""))
    cs = jx["check_shape"]
    print(f"check errors: relative L2 against scoremod xla float32 at B={cs['B']} N={cs['N']} "
          f"T=S={cs['T']} H={cs['H']} (scoremod rows bf16, flex rows float32)")
    print("/ flex: the row's time over the flex row of the same case (< 1: faster than flex); "
          "ran: the implementation scoremod's dispatch picked under jax.grad\n")
    print("| case | row | implementation arg | ran | tensor | fwd+bwd ms | / flex | tensor grad err | q,k,v grad err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        for r in rows:
            if r["case"] != case:
                continue
            ms = r.get("ms")
            is_flex = r["label"] == FLEX_LABEL[case]
            ratio = "1" if is_flex and ms else (f"{ms / flex_ms[case]:.3g}" if ms and flex_ms.get(case) else "–")
            cell_ms = f"{ms:.3f}" if ms else ("missing" if "missing" in r else "ERR")
            chk = r.get("check", {})
            terr = f"{chk['tensor_err']:.1e}" if "tensor_err" in chk else "–"
            qerr = f"{chk['qkv_err']:.1e}" if "qkv_err" in chk else "–"
            if is_flex:
                impl, ran = "flex", "flex"
                if r["label"] != "flex" or r["tensor"] != "learn":
                    terr = qerr = "–"          # checked only where the math is the same
            else:
                impl, ran = repr(r["implementation"]), r.get("ran", "-")
            print(f"| {case} | {r['label']} | {impl} | {ran} | {r['tensor']} | {cell_ms} | {ratio} "
                  f"| {terr} | {qerr} |")
    ours = {(r["case"], r["label"]): r.get("ms") for r in jx["rows"]}
    a, b = ours.get(("slope", "scoremod")), ours.get(("slope-const", "scoremod"))
    fa, fb = flex_ms.get("slope"), flex_ms.get("slope-const")
    print("\ntensor-gradient overhead (slope learnable / slope constant): "
          f"scoremod {a / b:.2f}x" if a and b else "\ntensor-gradient overhead: scoremod –", end="")
    print(f", flex {fa / fb:.2f}x" if fa and fb else ", flex –")
    errors = [f"{r['case']}/{r['label']}: {r['error']}" for r in rows if "error" in r]
    for e in errors:
        print("error:", e)
    out = dict(shape=sh, check_shape=cs, jax_info=jx["info"], torch_info=th.get("info"),
               torch_missing=th.get("missing"), rows=rows, flex_checks=th.get("checks"),
               date=time.strftime("%Y-%m-%d"))
    os.makedirs(args.out, exist_ok=True)
    json.dump(out, open(os.path.join(args.out, "tensor_grads.json"), "w"), indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (T=256, N=2, H=64): a smoke test")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "out")))
    p.add_argument("--work", default="/tmp/scoremod_tensor_grads")
    p.add_argument("--part", choices=["all", "jax", "torch", "report"], default="all")
    p.add_argument("--cases", default="", help=f"comma-separated, of {','.join(CASES)} (default: all)")
    args = p.parse_args()
    if args.part == "jax":
        return jax_part(args)
    if args.part == "torch":
        return torch_part(args)
    if args.part == "report":
        return report(args)
    for name in ("jax.json", "torch.json"):      # no stale results from an earlier run
        if os.path.exists(os.path.join(args.work, name)):
            os.remove(os.path.join(args.work, name))
    flags = ["--work", args.work, "--out", args.out] + (["--quick"] if args.quick else [])
    if args.cases:
        flags += ["--cases", args.cases]
    run_parts(__file__, flags)
    report(args)


if __name__ == "__main__":
    main()
