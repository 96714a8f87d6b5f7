"""Paged decode benchmark: scoremod.paged_attention against JAX's own Pallas paged attention
and dense cuDNN attention, with and without a sliding window.

    python benchmarks/paged_bench.py                 # the full grid (GPU)
    python benchmarks/paged_bench.py --quick         # tiny shapes, any backend (a smoke test)
    python benchmarks/paged_bench.py --tokens 4 --batches 8 --contexts 32768,131072   # speculative decode
    python benchmarks/paged_bench.py --kv-heads 1 --batches 1,8                        # MQA 32/1
    python benchmarks/paged_bench.py --tokens 8 --kv-heads 1 --contexts 131072         # both

Decode of bf16 queries over a KV cache of N=32 query heads, K=8 KV heads (GQA 32/8), head
dim 128, pages of 16 (and 64) tokens, every sequence at the given context length.
Options of the shape:

* ``--tokens T`` (default 1): new tokens per sequence. T = 1 is plain decode; T = 4-8 is
  speculative decoding: token i of the T sits at position ``lengths[b] - T + i`` and
  sees the keys up to its own position (causal among the new tokens, bottom-right
  alignment, as ``paged_attention`` defines it).
* ``--kv-heads K`` (default 8; 2 with ``--quick``): KV heads; ``--kv-heads 1`` is MQA 32/1.

Contenders, each checked against a reference before it is timed:

* ``scoremod`` ``causal``: the Pallas kernel over every page;
* ``scoremod`` ``causal & window(4096)``: page skipping, so only the last pages are read;
* ``jax-pallas``: ``jax.experimental.pallas.ops.gpu.paged_attention`` (no masks, so it
  reads the whole context in both rows; one new token only, so its rows are reported
  as skipped when T > 1);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` over the dense,
  already gathered context (for the window row: over the last ``4096 + T - 1`` keys
  only, the least a dense kernel could read). For T = 1 it runs without a mask. For
  T > 1 cuDNN's ``is_causal`` would align the T queries top-left (query i sees keys
  0..i), so the row passes a boolean ``mask`` [1, 1, T, keys] with the bottom-right
  causal (and window) pattern, which JAX hands to cuDNN as a bias; if cuDNN refuses
  it, the row runs with no mask over the same keys (the same K/V bytes; the arithmetic
  differs on T(T-1)/2 entries, T(T-1) with the window) and its note says so.

Bytes needed: the K/V bytes of the keys the mask lets some new token see, ``B * keys *
K * H * 2 bytes * 2``, with keys = context for ``causal`` and ``min(context, 4096 + T - 1)``
for the window (its first token's window starts T - 1 keys before the last one's).

Time: each call runs n times inside one jitted, unrolled ``fori_loop`` whose carry feeds
the next query and length (so nothing is hoisted: finding the pages and the split
combine are timed with the kernel); per call = (loop of n - loop of n/4) / (3n/4),
median over ``--reps`` (the cost of launching a loop cancels out). Bandwidth: the needed
bytes over that time, compared to a measured
device-to-device copy (bytes read + written, ``copy_bandwidth``), to a measured pure read
(``read_bandwidth``) and to the card's nominal peak; cuDNN's row over the dense context is
the practical ceiling to quote beside them.
Writes JSON (``--json``; ``shape`` holds T and K) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
import warnings

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from scoremod.runtime.paged import PagedBlockSizes, paged_attention

WINDOW = 4096
NOMINAL_HBM = {"H100": 3.35e12, "H200": 4.8e12}


# ---- timing -------------------------------------------------------------------------------------

def loop_timer(fn, iters: int):
    """A jitted, unrolled ``fori_loop`` of ``iters`` calls of ``fn(q, lengths, *arrays)``; each call's
    query and lengths depend on the previous output, so XLA can hoist nothing out of the
    loop. Every array is an argument (closing over a KV pool would embed it as a constant)."""
    @jax.jit
    def run(q, lengths, *arrays):
        def body(_, carry):
            qi = q + carry.astype(q.dtype)                       # carry is 0 (outputs are finite)
            li = lengths + (carry > 1e30).astype(lengths.dtype)
            out = fn(qi, li, *arrays)
            return carry + out.reshape(-1)[0].astype(jnp.float32) * 0.0
        # Unrolled: a rolled loop pays a device-to-host sync of its predicate per trip
        # (about 10 us on an H100), which would be counted as part of every call.
        return lax.fori_loop(0, iters, body, jnp.float32(0), unroll=True)
    return run


def time_call(fn, q, lengths, arrays, *, iters: int, reps: int) -> float:
    """Seconds per call: the median over reps of (time of an ``iters``-call loop minus
    that of a loop a quarter as long) / the difference in calls, so the fixed cost of
    launching a loop and waiting for it cancels out."""
    short = max(1, iters // 4)
    long_run, short_run = loop_timer(fn, iters), loop_timer(fn, short)
    jax.block_until_ready(long_run(q, lengths, *arrays))      # compile + warm up
    jax.block_until_ready(short_run(q, lengths, *arrays))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(long_run(q, lengths, *arrays))
        t1 = time.perf_counter()
        jax.block_until_ready(short_run(q, lengths, *arrays))
        t2 = time.perf_counter()
        times.append(((t1 - t0) - (t2 - t1)) / (iters - short))
    return statistics.median(times)


def iterations(nbytes: int, target_s: float, lo: int = 4, hi: int = 40) -> int:
    """Loop length for about ``target_s`` seconds, guessing 2 TB/s plus 20 us a call."""
    return int(min(hi, max(lo, target_s / (nbytes / 2e12 + 20e-6))))


def _best_time(f, x, reps: int = 10, warm_s: float = 0.5) -> float:
    """Fastest of ``reps`` timed calls (each large enough that launching it is noise), after
    ``warm_s`` seconds of calls: the probes run first in a process, and on an H100 (2026-12-06)
    they read 2.1-2.6 TB/s in different processes on one machine while the decode kernels
    read 2.96, as if the card had not yet reached its clocks."""
    jax.block_until_ready(f(x))
    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        jax.block_until_ready(f(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(nbytes: int) -> float:
    """Bytes read + written per second by one ``x + 1`` over a bf16 array of ``nbytes``
    (a device-to-device copy with an add; one call of about a millisecond per 2 GiB, so
    the launch is noise). The H100 notes' probe ran ``x + 1`` in a ``fori_loop``, whose
    carry XLA copies each step: it read 2.9 TB/s on an H200 that copies at 4.3."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    t = _best_time(jax.jit(lambda a: a + 1), x)
    del x
    return 2 * nbytes / t


def read_bandwidth(nbytes: int) -> float:
    """Bytes read per second by row sums (f32) of a bf16 array of ``nbytes``: a pure read
    (the output is 1/8192 of the input), the ceiling a decode kernel that only reads K/V
    could reach."""
    x = jnp.ones((nbytes // 2 // 8192, 8192), jnp.bfloat16)
    t = _best_time(jax.jit(lambda a: jnp.sum(a, axis=1, dtype=jnp.float32)), x)
    del x
    return nbytes / t


# ---- contenders ---------------------------------------------------------------------------------

def jax_pallas_paged():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as mod
    return mod.paged_attention


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test on any backend)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new points after this")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--iters-target-s", type=float, default=0.03)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tune", action="store_true", help="try a few block sizes first and keep the fastest")
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    ap.add_argument("--batches", type=ints, default=None, help="only these batch sizes (e.g. 1,8)")
    ap.add_argument("--contexts", type=ints, default=None, help="only these context lengths")
    ap.add_argument("--num-splits", type=int, default=None, help="fix the kernel's split count")
    ap.add_argument("--block-sizes", default="",
                    help="PagedBlockSizes fields to override, e.g. num_splits=32,persistent=False")
    ap.add_argument("--max-tokens", type=int, default=2 * 1024 * 1024, help="largest batch * context")
    ap.add_argument("--tokens", type=int, default=1,
                    help="new tokens per sequence (T; 1: decode, 4-8: speculative decode)")
    ap.add_argument("--impls", default="pallas",
                    help="our implementations to time, comma-separated: pallas (row 'scoremod'), mosaic "
                         "(row 'scoremod-mosaic': the Mosaic GPU decode kernel, sm_90); IMPL:FIELD=VALUE+... "
                         "times a variant with those PagedBlockSizes fields (e.g. mosaic:consumers=2)")
    ap.add_argument("--kv-heads", type=int, default=None,
                    help="KV heads (default 8, 2 with --quick; 1: MQA)")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    print(f"# paged decode benchmark: {kind}, jax {jax.__version__}, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)

    if args.quick:
        N, K, H = 4, 2, 32
        page_sizes, batches, contexts, window = (16,), (1, 2), (256, 1024), 128
        interpret = not gpu
    else:
        N, K, H = 32, 8, 128
        page_sizes, batches, contexts, window = (16, 64), (1, 8, 64), (1024, 8192, 32768, 131072), WINDOW
        interpret = False
    if args.kv_heads is not None:
        K = args.kv_heads
    T = args.tokens
    if K < 1 or N % K != 0:
        ap.error(f"--kv-heads must divide the {N} query heads; got {K}")
    if T < 1 or T > min(contexts):
        ap.error(f"--tokens must be in [1, {min(contexts)}]; got {T}")
    print(f"# T = {T} new token{'s' if T > 1 else ''} per sequence, N = {N} query heads over K = {K} KV "
          f"head{'s' if K > 1 else ''} ({'MQA' if K == 1 else 'GQA'} {N}/{K}), H = {H}, bf16", flush=True)
    dtype = jnp.bfloat16
    points = [(ps, B, ctx) for ps in page_sizes for B in batches for ctx in contexts
              if B * ctx <= args.max_tokens and (B < 64 or ctx >= 8192)
              and (ps == 16 or (B, ctx) in ((8, 131072), (2, 1024)))]
    max_tokens = max(B * ctx for _, B, ctx in points)      # the pool's size, whatever is selected below
    points = [(ps, B, ctx) for ps, B, ctx in points
              if (not args.batches or B in args.batches) and (not args.contexts or ctx in args.contexts)]

    results = {"device": kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "shape": {"N": N, "K": K, "H": H, "dtype": "bfloat16", "T": T, "window": window}, "rows": []}
    peak = copy_bandwidth(2 << 30) if gpu else float("nan")
    read_peak = read_bandwidth(2 << 30) if gpu else float("nan")
    nominal = next((v for k, v in NOMINAL_HBM.items() if k in kind), float("nan"))
    results["copy_bandwidth"] = peak
    results["read_bandwidth"] = read_peak
    results["nominal_bandwidth"] = nominal
    print(f"# measured copy bandwidth {peak / 1e12:.2f} TB/s (read + write), read bandwidth "
          f"{read_peak / 1e12:.2f} TB/s; nominal {nominal / 1e12:.2f} TB/s "
          f"(the device notes: an H200 copies at about 4.3 TB/s)", flush=True)

    try:
        jpa = jax_pallas_paged()
    except Exception as exc:  # noqa: BLE001 - reported as missing
        jpa = None
        print(f"# jax-pallas paged_attention missing: {exc}")

    key = jax.random.PRNGKey(0)
    block_sizes = PagedBlockSizes.get_default()
    if args.num_splits:
        block_sizes = dataclasses.replace(block_sizes, num_splits=args.num_splits)
    block_sizes = with_fields(block_sizes, args.block_sizes, ",")
    print(f"# {block_sizes}", flush=True)

    for ps in page_sizes:
        pool_pages = max_tokens // ps + 8
        kk, kv_, kq = jax.random.split(jax.random.fold_in(key, ps), 3)
        k_pool = jax.random.normal(kk, (pool_pages, ps, K, H), dtype)
        v_pool = jax.random.normal(kv_, (pool_pages, ps, K, H), dtype)
        k_pool_t = v_pool_t = None
        if jpa is not None:
            k_pool_t = jnp.transpose(k_pool, (2, 0, 1, 3))    # JAX's op takes [K, P, page_size, H]
            v_pool_t = jnp.transpose(v_pool, (2, 0, 1, 3))

        if args.tune and ps == 16 and not args.quick:
            block_sizes = tune(k_pool, v_pool, N, K, H, T, ps, args, results)

        for (p_ps, B, ctx) in points:
            if p_ps != ps:
                continue
            if time.perf_counter() - start > args.budget_s:
                results["rows"].append({"page_size": ps, "B": B, "context": ctx, "T": T, "K": K,
                                        "skipped": "time budget"})
                print(format_row(results["rows"][-1]), flush=True)
                continue
            run_point(results, ps, B, ctx, N, K, H, T, dtype, window, k_pool, v_pool, k_pool_t, v_pool_t, jpa,
                      block_sizes, interpret, peak, nominal, args, kq)
        del k_pool, v_pool, k_pool_t, v_pool_t

    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"# total {time.perf_counter() - start:.0f} s", flush=True)


def with_fields(block_sizes, text, sep):
    """The dataclass ``block_sizes`` with the ``FIELD=VALUE`` items of ``text`` (separated by
    ``sep``) set: True/False as bools, digits as ints, anything else as a string (the
    benchmarks' variant syntax, for PagedBlockSizes and MosaicBlockSizes alike)."""
    for item in filter(None, text.split(sep)):
        field, value = item.split("=")
        parsed = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
        block_sizes = dataclasses.replace(block_sizes, **{field: parsed})
    return block_sizes


def make_point(ps, B, ctx, N, H, T, dtype, pool_pages, key):
    max_pages = ctx // ps
    rng = np.random.default_rng(B * 1_000_003 + ctx + ps)
    tables = rng.permutation(pool_pages)[:B * max_pages].reshape(B, max_pages).astype(np.int32)
    lengths = np.full((B,), ctx, np.int32)
    q = jax.random.normal(jax.random.fold_in(key, B * ctx), (B, T, N, H), dtype)
    return q, jnp.asarray(tables), jnp.asarray(lengths)


def needed_keys(mod, ctx, T, window):
    """Keys the mask lets some new token see (every sequence at length ctx): the whole
    context for ``causal``; for the window, the first new token's window (which starts
    T - 1 keys before the last one's) up to the last token."""
    if "window" in mod:
        return min(ctx, window + T - 1)
    return ctx


def dense_mask(T, first, last, window):
    """Boolean [1, 1, T, last - first]: may new token i (at position last - T + i) see key
    first + j? Causal with the bottom-right alignment of paged_attention, and within
    the window if one is given."""
    qpos = last - T + np.arange(T)[:, None]
    kpos = first + np.arange(last - first)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= qpos - kpos < window
    return jnp.asarray(allowed[None, None])


def run_point(results, ps, B, ctx, N, K, H, T, dtype, window, k_pool, v_pool, k_pool_t, v_pool_t, jpa,
              block_sizes, interpret, peak, nominal, args, key):
    q, tables, lengths = make_point(ps, B, ctx, N, H, T, dtype, k_pool.shape[0], key)
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    mods = ("causal", f"causal & window({window})")

    read_peak = results["read_bandwidth"]

    def record(name, mask, fn, arrays, keys, check=None, note=None):
        row = {"page_size": ps, "B": B, "context": ctx, "T": T, "K": K, "mask": mask, "impl": name}
        if note:
            row["note"] = note
        try:
            if check is not None:
                check()
            nbytes = B * keys * K * H * itemsize * 2
            t = time_call(fn, q, lengths, arrays, iters=iterations(nbytes, args.iters_target_s), reps=args.reps)
            row.update(time_us=t * 1e6, bytes=nbytes, bandwidth=nbytes / t, of_copy=nbytes / t / peak,
                       of_read=nbytes / t / read_peak, of_nominal=nbytes / t / nominal)
        except Exception as exc:  # noqa: BLE001 - a contender that cannot run is reported, not dropped
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
        print(format_row(row), flush=True)

    def ours(mod, impl="pallas", bs=block_sizes):
        def fn(qq, ll, kp, vp, tb):
            return paged_attention(qq, kp, vp, tb, ll, mod=mod, implementation=impl,
                                   block_sizes=bs, interpret=interpret)
        return fn

    ours_arrays = (k_pool, v_pool, tables)
    small = B * ctx <= 64 * 1024
    refs = {}

    def reference(mod):
        if mod not in refs:
            if small:
                refs[mod] = paged_attention(q, k_pool, v_pool, tables, lengths, mod=mod, implementation="reference")
            else:
                # Large points: the same attention over the window's (or the whole) dense
                # context, masked for the T new tokens (all true when T = 1).
                keys = needed_keys(mod, ctx, T, window)
                k, v = dense_kv(k_pool, v_pool, tables, ctx - keys, ctx)
                mask = dense_mask(T, ctx - keys, ctx, window if "window" in mod else None)
                refs[mod] = jax.jit(lambda a, b, c, m: jax.nn.dot_product_attention(a, b, c, mask=m))(q, k, v, mask)
                del k, v
        return refs[mod]

    def compare(what, out, ref):
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        if not err < 3e-2:
            raise AssertionError(f"{what} differs from the reference by {err}")

    outputs = {}

    def check_ours(mod, impl, bs):
        def check():
            out = jax.jit(ours(mod, impl, bs))(q, lengths, *ours_arrays)
            if impl == "pallas" and bs == block_sizes:
                outputs[mod] = out
            compare(f"scoremod {impl} {mod!r}", out, reference(mod))
        return check

    for spec in args.impls.split(","):
        impl, _, fields = spec.partition(":")   # e.g. mosaic:consumers=2+programs_per_core=2
        bs = with_fields(block_sizes, fields, "+")
        name = ("scoremod" if impl == "pallas" else f"scoremod-{impl}") + (f"[{fields}]" if fields else "")
        for mod in mods:
            record(name, mod, ours(mod, impl, bs), ours_arrays, needed_keys(mod, ctx, T, window),
                   check_ours(mod, impl, bs))

    if jpa is not None and T > 1:
        for mod in mods:
            row = {"page_size": ps, "B": B, "context": ctx, "T": T, "K": K, "mask": mod, "impl": "jax-pallas",
                   "skipped": f"takes one new token per sequence; T = {T}"}
            rows.append(row)
            print(format_row(row), flush=True)
    elif jpa is not None:
        k_splits = math.gcd(16, tables.shape[1])

        def peer(qq, ll, kt, vt, tb):
            # JAX's op does not scale the logits: fold 1/sqrt(H) into q (a tiny elementwise op).
            out = jpa(qq[:, 0] * (1.0 / math.sqrt(H)), kt, vt, tb, ll, block_h=16, pages_per_compute_block=8,
                      k_splits=k_splits, interpret=interpret)
            return out[:, None]

        peer_arrays = (k_pool_t, v_pool_t, tables)

        def check_peer():
            out = jax.jit(peer)(q, lengths, *peer_arrays)
            ref = outputs.get("causal")
            if ref is None:
                ref = jax.jit(ours("causal"))(q, lengths, *ours_arrays)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            if not err < 3e-2:
                raise AssertionError(f"jax-pallas differs from scoremod by {err}")
        record("jax-pallas", "causal", peer, peer_arrays, ctx, check_peer)
        full = rows[-1]
        win = {**full, "mask": mods[1], "note": "no mask support: reads the whole context"}
        if "time_us" in full:
            win["bytes"] = full["bytes"] * min(ctx, window) // ctx
            win["bandwidth"] = win["bytes"] / (full["time_us"] * 1e-6)
            win["of_copy"] = win["bandwidth"] / peak
            win["of_read"] = win["bandwidth"] / read_peak
            win["of_nominal"] = win["bandwidth"] / nominal
        rows.append(win)
        print(format_row(win), flush=True)

    def cudnn(qq, ll, k, v):
        return jax.nn.dot_product_attention(qq, k, v, implementation="cudnn")

    def cudnn_masked(qq, ll, k, v, m):
        return jax.nn.dot_product_attention(qq, k, v, mask=m, implementation="cudnn")

    def check_cudnn(fn, arrays, ref):
        def check():
            compare("cudnn", jax.jit(fn)(q, lengths, *arrays), ref())
        return check

    for mod in mods:
        keys = needed_keys(mod, ctx, T, window)
        k, v = dense_kv(k_pool, v_pool, tables, ctx - keys, ctx)
        if T == 1:
            # One query at the last position sees every key given: no mask.
            record("cudnn", mod, cudnn, (k, v), keys, check_cudnn(cudnn, (k, v), lambda mod=mod: reference(mod)))
        else:
            mask = dense_mask(T, ctx - keys, ctx, window if "window" in mod else None)
            try:
                jax.block_until_ready(jax.jit(cudnn_masked)(q, lengths, k, v, mask))
                refused = None
            except Exception as exc:  # noqa: BLE001 - fall back to no mask, said in the note
                refused = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            if refused is None:
                record("cudnn", mod, cudnn_masked, (k, v, mask), keys,
                       check_cudnn(cudnn_masked, (k, v, mask), lambda mod=mod: reference(mod)),
                       note=f"bottom-right mask [T, {keys}] as a bias")
            else:
                # No mask over the same keys: the same K/V bytes, checked against XLA's
                # unmasked attention (not the mod, which it does not compute exactly).
                differs = T * keys - int(jnp.sum(mask))
                unmasked = lambda: jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c))(q, k, v)  # noqa: E731
                record("cudnn", mod, cudnn, (k, v), keys, check_cudnn(cudnn, (k, v), unmasked),
                       note=f"mask refused ({refused}); no mask over the same keys "
                            f"(differs on {differs} of the {T}x{keys} scores of a head)")
        del k, v
    results["rows"].extend(rows)


@jax.jit
def _gather_dense(k_pool, v_pool, tables):
    B, max_pages = tables.shape
    ps, K, H = k_pool.shape[1:]
    return (k_pool[tables].reshape(B, max_pages * ps, K, H), v_pool[tables].reshape(B, max_pages * ps, K, H))


def dense_kv(k_pool, v_pool, tables, first: int, last: int):
    """Dense [B, last - first, K, H] keys/values first..last-1 of every sequence."""
    k, v = _gather_dense(k_pool, v_pool, tables)
    return k[:, first:last], v[:, first:last]


TUNE_CONFIGS = (
    PagedBlockSizes(64, None, 4, 4, 8),
    PagedBlockSizes(64, None, 4, 4, 4),
    PagedBlockSizes(128, None, 8, 3, 8),
    PagedBlockSizes(128, None, 8, 3, 4),
)


def tune(k_pool, v_pool, N, K, H, T, ps, args, results):
    """Time a few block sizes at (B=1, 128k) and (B=8, 32k) (page size 16, T new tokens);
    keep the one with the least total time."""
    points = [(1, 131072), (8, 32768)]
    made = [make_point(ps, B, ctx, N, H, T, jnp.bfloat16, k_pool.shape[0], jax.random.PRNGKey(1))
            for B, ctx in points]
    best, best_t = PagedBlockSizes.get_default(), float("inf")
    tried = []
    for bs in TUNE_CONFIGS:
        total, entry = 0.0, {"block_sizes": dict(bs.__dict__)}

        def fn(qq, ll, kp, vp, tb, bs=bs):
            return paged_attention(qq, kp, vp, tb, ll, mod="causal", implementation="pallas", block_sizes=bs)
        for (B, ctx), (q, tables, lengths) in zip(points, made):
            try:
                t = time_call(fn, q, lengths, (k_pool, v_pool, tables), iters=20, reps=2)
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                total = float("inf")
                break
            nbytes = B * ctx * K * H * 2 * 2
            entry[f"B{B}_ctx{ctx}_us"] = round(t * 1e6, 1)
            entry[f"B{B}_ctx{ctx}_TBps"] = round(nbytes / t / 1e12, 3)
            total += t
        tried.append(entry)
        print(f"# tune {entry}", flush=True)
        if total < best_t:
            best, best_t = bs, total
    results["tuning"] = tried
    results["block_sizes"] = dict(best.__dict__)
    print(f"# using {best}", flush=True)
    return best


def format_row(row) -> str:
    if "skipped" in row:
        return (f"| {row['page_size']} | {row['B']} | {row['context']} | {row.get('mask', '')} | "
                f"{row.get('impl', '')} | skipped ({row['skipped']}) | | | | |")
    if "error" in row:
        return (f"| {row['page_size']} | {row['B']} | {row['context']} | {row['mask']} | {row['impl']} | "
                f"– | – | – | – | {row['error']} |")
    note = row.get("note", "")
    return (f"| {row['page_size']} | {row['B']} | {row['context']} | {row['mask']} | {row['impl']} | "
            f"{row['time_us']:.1f} | {row['bandwidth'] / 1e12:.2f} | {100 * row['of_copy']:.0f}% | "
            f"{100 * row.get('of_read', float('nan')):.0f}% | {note} |")


def print_table(results):
    shape = results["shape"]
    print()
    print(f"T = {shape['T']} new token{'s' if shape['T'] > 1 else ''} per sequence, N = {shape['N']} query heads "
          f"over K = {shape['K']} KV head{'s' if shape['K'] > 1 else ''}, H = {shape['H']}, {shape['dtype']}:")
    print()
    print("| page | B | context | mask | impl | time (us) | needed K/V TB/s | of copy BW | of read BW | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        print(format_row(row))


if __name__ == "__main__":
    sys.exit(main())
