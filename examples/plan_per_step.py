"""One block plan per training step, shared by every layer: `scoremod.plan`.

A mask that reads tensors (`causal & doc(ids)`) has its block plan built from the
tensor's values on the device. A model of L layers calling `scoremod.attention` in each
layer builds it L times per step; `scoremod.plan(...)` builds it once and
`attention(q, k, v, plan=plan)` uses it in every layer (inside `jit` and `lax.scan`).

Runs a 4-layer stack both ways, checks they agree, and takes a gradient through the
planned one (a few seconds on a 2-core CPU):

    python examples/plan_per_step.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import scoremod

LAYERS, BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 4, 2, 96, 4, 2, 16
MOD = "causal & doc(ids)"


def stack(x, weights, ids, *, with_plan):
    """x: f32[B, T, N*H]; weights: f32[L, N*H, (N+2K)*H]; ids: int32[B, T]."""
    plan = None
    if with_plan:   # once per step: the layers below only read it
        plan = scoremod.plan(MOD, SEQ, batch=BATCH, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                             dtype=x.dtype, ids=ids)

    def layer(x, w):
        qkv = (x @ w).reshape(BATCH, SEQ, HEADS + 2 * KV_HEADS, HEAD_DIM)
        q, k, v = jnp.split(qkv, [HEADS, HEADS + KV_HEADS], axis=2)
        if with_plan:
            a = scoremod.attention(q, k, v, plan=plan)
        else:
            a = scoremod.attention(q, k, v, mod=MOD, ids=ids)
        x = x + a.reshape(BATCH, SEQ, HEADS * HEAD_DIM)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6), None

    return jax.lax.scan(layer, x, weights)[0]


def main():
    rng = np.random.default_rng(0)
    width = HEADS * HEAD_DIM
    x = jnp.asarray(rng.standard_normal((BATCH, SEQ, width)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((LAYERS, width, (HEADS + 2 * KV_HEADS) * HEAD_DIM)) / np.sqrt(width),
                          jnp.float32)
    ids = jnp.asarray(np.sort(rng.integers(0, 5, (BATCH, SEQ)), axis=1), jnp.int32)

    planned = jax.jit(lambda x, w, ids: stack(x, w, ids, with_plan=True))(x, weights, ids)
    per_layer = jax.jit(lambda x, w, ids: stack(x, w, ids, with_plan=False))(x, weights, ids)
    np.testing.assert_allclose(np.asarray(planned), np.asarray(per_layer), rtol=1e-5, atol=1e-5)

    loss = lambda w: jnp.sum(stack(x, w, ids, with_plan=True) ** 2)   # noqa: E731
    grads = jax.jit(jax.grad(loss))(weights)
    assert np.isfinite(np.asarray(grads)).all()

    plan = scoremod.plan(MOD, SEQ, batch=BATCH, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         dtype=jnp.float32, ids=ids)
    print(plan)
    print(f"ok: {LAYERS} layers with one plan == {LAYERS} layers planning each call; gradient finite")


if __name__ == "__main__":
    main()
