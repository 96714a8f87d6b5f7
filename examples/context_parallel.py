"""Context parallelism: one attention over a sequence sharded across 4 devices.

On a CPU, XLA pretends to have several devices (the flag below, set before jax starts);
on a machine with 4 GPUs the same code shards over them. The sharded call gives the
single-device answer, gradients included; a causal mask is laid out zigzag (every device
gets an early and a late chunk, so the same work) and a sliding window only talks to
the neighbouring device. Runs in about 30 s on a 2-core CPU:

    python examples/context_parallel.py
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax
import jax.numpy as jnp
import numpy as np

import scoremod
from scoremod.compiler.context_plan import contiguous_layout, device_work, pair_plan, ring_schedule, zigzag_layout

DEVICES, BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 4, 2, 128, 4, 2, 16


def main():
    mesh = jax.make_mesh((DEVICES,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:DEVICES])
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (BATCH, SEQ, HEADS, HEAD_DIM))
    k = jax.random.normal(kk, (BATCH, SEQ, KV_HEADS, HEAD_DIM))
    v = jax.random.normal(kv, (BATCH, SEQ, KV_HEADS, HEAD_DIM))
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 6, (BATCH, SEQ)), axis=1), jnp.int32)

    # What the compiler plans: work per device under each layout, and the ring steps a window needs.
    causal = scoremod.compile("causal")
    for layout in (contiguous_layout(DEVICES), zigzag_layout(DEVICES)):
        work = device_work(pair_plan(causal, layout, q_len=SEQ, kv_len=SEQ), layout)
        print(f"causal, {layout.name:10s} layout: (q, kv) positions computed per device {work.tolist()}")
    window = contiguous_layout(DEVICES)
    shifts = ring_schedule(pair_plan(scoremod.compile("causal & window(16)"), window, q_len=SEQ, kv_len=SEQ),
                           window).shifts
    print(f"causal & window(16): ring shifts {shifts} (the device itself and its neighbour)")
    assert shifts == (0, 1)

    for mod, tensors in (("causal", {}), ("causal & doc(ids)", {"ids": ids}), ("causal & window(16)", {})):
        def loss(q, k, v, **where):
            out = scoremod.attention(q, k, v, mod=mod, implementation="xla", **where, **tensors)
            return jnp.sum(out ** 2), out
        (_, sharded), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            q, k, v, mesh=mesh, context_axis="sp")
        (_, single), want = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        err = float(jnp.abs(sharded - single).max())
        gerr = max(float(jnp.abs(a - b).max()) for a, b in zip(grads, want))
        print(f"{mod:22s} sharded over {DEVICES} devices: max |out - single device| {err:.1e}, grads {gerr:.1e}")
        assert err < 1e-5 and gerr < 1e-4


if __name__ == "__main__":
    main()
