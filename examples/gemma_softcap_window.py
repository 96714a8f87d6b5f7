"""Gemma-2 style attention: logit soft-capping with local (sliding window) and global layers.

Gemma 2 alternates layers that attend to a causal sliding window with layers that attend
causally to everything, and caps every logit with `c * tanh(score / c)` before the mask.
In scoremod that is one source per layer kind:

    local:  softcap(50) + causal & window(w)      (w: a runtime scalar, no recompiles)
    global: softcap(50) + causal

The example checks the chunked "xla" implementation against the dense "reference" one,
forward and gradient, then decodes a few tokens against a KV cache with `q_offset`
(bottom-right alignment: the query at position `q_offset` sees keys `<= q_offset`).

    python examples/gemma_softcap_window.py
"""

import jax
import jax.numpy as jnp

import scoremod

LOCAL = scoremod.compile("softcap(50) + causal & window(w)")
GLOBAL = scoremod.compile("softcap(50) + causal")
B, T, N, K, H = 2, 96, 4, 2, 32


def attend(q, k, v, layer: int, implementation="xla", q_offset=0, window=16):
    if layer % 2 == 0:
        return scoremod.attention(q, k, v, mod=LOCAL, w=jnp.int32(window), q_offset=q_offset,
                                  implementation=implementation)
    return scoremod.attention(q, k, v, mod=GLOBAL, q_offset=q_offset, implementation=implementation)


def main():
    print("local: ", LOCAL, f"({LOCAL.kind})")
    print("global:", GLOBAL, f"({GLOBAL.kind})")
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H)) * 4.0    # large logits, so the cap matters
    k = jax.random.normal(kk, (B, T, K, H)) * 4.0
    v = jax.random.normal(kv, (B, T, K, H))

    for layer in (0, 1):
        f = lambda impl: jax.jit(lambda q, k, v: attend(q, k, v, layer, impl))
        loss = lambda impl: jax.grad(lambda q: jnp.sum(jnp.sin(attend(q, k, v, layer, impl))))
        out, ref = f("xla")(q, k, v), f("reference")(q, k, v)
        g, g_ref = jax.jit(loss("xla"))(q), jax.jit(loss("reference"))(q)
        err, gerr = float(jnp.max(jnp.abs(out - ref))), float(jnp.max(jnp.abs(g - g_ref)))
        print(f"layer {layer} ({'local' if layer % 2 == 0 else 'global'}): |xla - reference| "
              f"out {err:.1e}, dq {gerr:.1e}")
        assert err < 1e-4 and gerr < 1e-3

    # Decode against a fixed-size KV cache: one query at position `pos`, keys past `pos` not
    # written yet (zeros here). `causal` with q_offset=pos hides them; `pos` is a [B] array,
    # so every step reuses one compilation.
    step = jax.jit(lambda q1, k, v, pos: attend(q1, k, v, 0, q_offset=pos))
    full = attend(q, k, v, 0)
    for pos in (40, 41, 95):
        written = (jnp.arange(T) <= pos)[None, :, None, None]
        k_cache, v_cache = jnp.where(written, k, 0.0), jnp.where(written, v, 0.0)
        out1 = step(q[:, pos:pos + 1], k_cache, v_cache, jnp.full((B,), pos, jnp.int32))
        err = float(jnp.max(jnp.abs(out1[:, 0] - full[:, pos])))
        print(f"decode position {pos}: matches the full forward ({err:.1e})")
        assert err < 1e-4
    assert step._cache_size() == 1
    print("ok")


if __name__ == "__main__":
    # Full float32 matmuls, so the comparisons hold on GPUs too (they default to TF32).
    with jax.default_matmul_precision("float32"):
        main()
