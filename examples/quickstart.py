"""The README's main job: compile mods, show a block plan, run attention on this machine.

    python examples/quickstart.py [--seq 1024]

Runs in about 10 s on a 2-core CPU (mostly compiling); on an H100/H200 the same call picks
the Mosaic GPU kernel, on other GPUs the Pallas one.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import scoremod


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    args = parser.parse_args()
    T = args.seq

    print(f"jax {jax.__version__} on {jax.default_backend()}")
    for source in ["causal & window(256) + alibi(8)", "softcap(30) & causal", "causal & doc(ids)"]:
        mod = scoremod.compile(source)
        print(f"{source!r:40} -> {mod.kind:9} {mod}")

    # Three packed documents in one row of T tokens.
    lengths = [T // 2, T // 4, T - T // 2 - T // 4]
    ids = jnp.asarray(np.repeat(np.arange(3), lengths)[None, :], jnp.int32)
    mod = scoremod.compile("causal & doc(ids)")
    print()
    print(mod.explain(T, block=(128, 128), ids=ids))

    B, N, K, H = 1, 4, 2, 64
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32)

    out = scoremod.attention(q, k, v, mod=mod, ids=ids)
    ref = scoremod.attention(q, k, v, mod=mod, ids=ids, implementation="reference")
    err = float(jnp.max(jnp.abs(out - ref)))
    print(f"\nattention(q {q.shape}, k {k.shape}, v {v.shape}, mod='causal & doc(ids)') -> {out.shape}")
    print(f"max |default - reference| = {err:.2e}")
    # On GPUs float32 matrix products run in TF32 by default (as in jax.nn.dot_product_attention).
    tolerance = 5e-3 if jax.default_backend() == "gpu" else 1e-4
    assert err < tolerance, err


if __name__ == "__main__":
    main()
