"""The Mosaic kernels' schedules side by side: "persist", ``MosaicBlockSizes(persistent=True,
backward_persistent=True)`` (one CUDA block per SM taking tiles heaviest first, in the forward
and the backward) against "grid", both False (one block per tile),
bf16, B=2, N=16, T=S=8192, H=128, masks causal / causal & window(1024) / causal & doc(ids)
(attention_bench's shapes and ids), forward and forward+backward. Each variant is checked
against the first (out, lse, grads) and the first against the f32 xla path on two heads;
cuDNN (jax.nn.dot_product_attention) is timed beside for causal and the window.

    python benchmarks/mosaic_schedule.py        # on an H100/H200
    python benchmarks/mosaic_schedule.py --variant kv128: --variant kv64:block_kv=64,num_stages=4 --forward-only

``--variant NAME:FIELD=VALUE,...`` (repeatable) replaces the two default variants with
``MosaicBlockSizes`` fields set over the head dim's defaults; the first variant is the
reference the others are checked against and the ratios are taken from.
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np, jax, jax.numpy as jnp
from attention_bench import _doc_ids, _time_jax, _density
from paged_bench import with_fields
from scoremod.runtime import mosaic_attention as ma
import scoremod

B, N, T, H = 2, 16, 8192, 128
ids = jnp.asarray(_doc_ids(B, T))
ks = jax.random.split(jax.random.key(0), 4)
q, k, v, do = (jax.random.normal(kk, (B, T, N, H), jnp.bfloat16) for kk in ks)
masks = {"causal": ("causal", {}), "swa": ("causal & window(1024)", {}), "doc": ("causal & doc(ids)", {"ids": ids}),
         "alibi": ("causal + alibi(16)", {})}   # alibi: a mod with values (--masks causal,alibi)
f32 = lambda x: x.astype(jnp.float32)
print(jax.devices()[0].device_kind, jax.__version__, "SMs", jax.devices()[0].core_count, flush=True)
ap = argparse.ArgumentParser()
ap.add_argument("--variant", action="append", default=[], help="NAME:FIELD=VALUE,... (MosaicBlockSizes fields)")
ap.add_argument("--forward-only", action="store_true", help="time the forward only")
ap.add_argument("--masks", default="causal,swa,doc")
args = ap.parse_args()


variants = dict(text.partition(":")[::2] for text in args.variant) or {
    "grid": "persistent=False,backward_persistent=False", "persist": "persistent=True,backward_persistent=True"}
masks = {name: masks[name] for name in args.masks.split(",")}
first, last = list(variants)[0], list(variants)[-1]

for name, (mod, tensors) in masks.items():
    dens = _density("causal" if name == "alibi" else name, T, np.asarray(ids))
    flops = 4 * B * N * T * T * H * dens
    want = None
    res = {}
    for vname, fields in variants.items():
        bs = with_fields(ma.MosaicBlockSizes.get_default(H), fields, ",")
        fwd = jax.jit(lambda q, k, v, t: ma.mosaic_attention(q, k, v, mod=mod, tensors=t, block_sizes=bs, return_lse=True))
        t0 = time.perf_counter()
        out, lse = jax.block_until_ready(fwd(q, k, v, tensors))
        c = time.perf_counter() - t0
        if want is None:
            sl = slice(0, 2)
            wo = scoremod.attention(f32(q[:1, :, sl]), f32(k[:1, :, sl]), f32(v[:1, :, sl]), mod=mod, implementation="xla",
                                    **{n: t[:1] for n, t in tensors.items()})
            err_ref = float(jnp.max(jnp.abs(f32(out[:1, :, sl]) - wo)))
            want = (out, lse)
            err = 0.0
        else:
            err = float(jnp.max(jnp.abs(f32(out) - f32(want[0]))))
            err_ref = float(jnp.nanmax(jnp.abs(lse - want[1])))
        ms = _time_jax(fwd, (q, k, v, tensors))
        if args.forward_only:
            res[vname] = (ms, float("nan"))
            print(f"{name:6s} {vname:8s} fwd {ms:7.3f} ms ({flops/ms/1e9:4.0f} TF/s)  err {err:.2e} / {err_ref:.2e} "
                  f"(first call {c:.1f} s)", flush=True)
            assert err < 2e-2 and err_ref < 5e-2, (name, vname, err, err_ref)
            continue
        def loss(q, k, v, t):
            return jnp.sum(f32(ma.mosaic_attention(q, k, v, mod=mod, tensors=t, block_sizes=bs)) * f32(do))
        fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        g = jax.block_until_ready(fb(q, k, v, tensors))
        if "g" not in res:
            res["g"] = g
        gerr = max(float(jnp.max(jnp.abs(f32(a) - f32(b))) / (jnp.max(jnp.abs(f32(b))) + 1e-6)) for a, b in zip(g, res["g"]))
        assert gerr < 2e-2, (name, vname, gerr)
        ms_fb = _time_jax(fb, (q, k, v, tensors))
        res[vname] = (ms, ms_fb)
        print(f"{name:6s} {vname:8s} fwd {ms:7.3f} ms ({flops/ms/1e9:4.0f} TF/s)  fwd+bwd {ms_fb:7.3f}  "
              f"err {err:.2e} / {err_ref:.2e} grad {gerr:.1e} (first call {c:.1f} s)", flush=True)
        assert err < 2e-2 and err_ref < 5e-2, (name, vname, err, err_ref)
    if name in ("causal", "swa"):
        kw = dict(is_causal=True, implementation="cudnn")
        if name == "swa":
            kw["local_window_size"] = (1023, 0)
        cf = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw))
        cms = _time_jax(cf, (q, k, v))
        cms_fb = float("nan")
        if not args.forward_only:
            cfb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f32(jax.nn.dot_product_attention(q, k, v, **kw)) * f32(do)),
                                   argnums=(0, 1, 2)))
            cms_fb = _time_jax(cfb, (q, k, v))
        print(f"{name:6s} cudnn    fwd {cms:7.3f} ms ({flops/cms/1e9:4.0f} TF/s)  fwd+bwd {cms_fb:7.3f}   "
              f"ratios {last}/cudnn {res[last][0]/cms:.3f} / {res[last][1]/cms_fb:.3f}  "
              f"{first}/cudnn {res[first][0]/cms:.3f}", flush=True)
    print(f"{name:6s} {last}/{first} fwd {res[last][0]/res[first][0]:.3f}", flush=True)
print("FWDSWEEP OK")
