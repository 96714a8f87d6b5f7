"""scoremod inside Flax NNX's own attention layer: `scoremod.as_attention_fn`.

An `nnx.MultiHeadAttention` whose attention is `causal & doc(ids)` (packed documents),
checked against the same layer running Flax's own attention with the equivalent boolean
mask, then a few SGD steps through it (`nnx.value_and_grad`). Needs flax (the test extra
installs it; without it this script says so and exits). A few seconds on a 2-core CPU:

    python examples/flax_nnx.py
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import scoremod

try:
    from flax import nnx
except ImportError:
    print("this example needs flax: pip install flax")
    sys.exit(0)

BATCH, SEQ, HEADS, HEAD_DIM = 2, 32, 4, 8
WIDTH = HEADS * HEAD_DIM


def main():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, SEQ, WIDTH)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((BATCH, SEQ, WIDTH)), jnp.float32)
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (BATCH, SEQ)), axis=1), jnp.int32)

    ours = nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH, decode=False, rngs=nnx.Rngs(0),
                                  attention_fn=scoremod.as_attention_fn("causal & doc(ids)", ids=ids))
    flax_own = nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH, decode=False, rngs=nnx.Rngs(0))
    same_doc = ids[:, None, :, None] == ids[:, None, None, :]                      # [B, 1, T, T]
    mask = nnx.combine_masks(nnx.make_causal_mask(jnp.ones((BATCH, SEQ))), same_doc)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(flax_own(x, mask=mask)), atol=1e-5)
    print("the layer with scoremod == the layer with Flax's attention and a causal & same-document mask")

    def loss_fn(layer):
        return jnp.mean((layer(x) - target) ** 2)

    @nnx.jit
    def step(layer):
        loss, grads = nnx.value_and_grad(loss_fn)(layer)
        params = nnx.state(layer, nnx.Param)
        nnx.update(layer, jax.tree.map(lambda p, g: p - 0.1 * g, params, nnx.state(grads, nnx.Param)))
        return loss

    losses = [float(step(ours)) for _ in range(20)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    print(f"ok: 20 SGD steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
