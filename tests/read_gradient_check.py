"""The GPU check both kernels' read gradients share: a kernel's gradients of a loss with
respect to the mod's float tensors against xla's in float32, and bitwise equal on a
second run (the kernels reduce without atomics)."""

import jax
import jax.numpy as jnp
import numpy as np

import scoremod


def assert_read_gradients_match_xla(impl, mod, tensors, q, k, v, do, offsets, rtol=3e-2):
    """``tensors``: {name: float array} differentiated; ``offsets``: q_offset/kv_offset."""
    def grads(impl, q, k, v):
        def loss(ts):
            out = scoremod.attention(q, k, v, mod=mod, implementation=impl, **offsets, **ts)
            return jnp.sum(out.astype(jnp.float32) * do)
        return jax.jit(jax.grad(loss))(tensors)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    got, again = grads(impl, q, k, v), grads(impl, q, k, v)
    want = grads("xla", f32(q), f32(k), f32(v))
    for n in tensors:
        assert np.array_equal(np.asarray(got[n]), np.asarray(again[n])), n
        a, b = np.asarray(got[n]), np.asarray(want[n])
        assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), n
