"""Export a mod to PyTorch FlexAttention and check it against scoremod's reference.

    python examples/export_flex.py

Prints the generated module for `causal & doc(ids) + alibi(4)`. When torch is installed
it also imports the module, runs flex_attention (eager, float64, CPU) with its score_mod
and block mask, and checks the output against scoremod.attention(implementation="reference").
The same module comes from the shell: `dslc export "causal & doc(ids) + alibi(4)" --to flex`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import warnings

import numpy as np

import scoremod

SOURCE = "causal & doc(ids) + alibi(4)"


def main() -> None:
    mod = scoremod.compile(SOURCE)
    text = mod.to_flex()
    print(text)

    if importlib.util.find_spec("torch") is None:
        print("torch is not installed: printed the module only (pip install torch to run it)")
        return
    import jax.numpy as jnp
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    # Import the generated module from a file, as a user would.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "doc_alibi_mods.py")
        with open(path, "w") as f:
            f.write(text)
        spec = importlib.util.spec_from_file_location("doc_alibi_mods", path)
        flex_mods = importlib.util.module_from_spec(spec)
        sys.modules["doc_alibi_mods"] = flex_mods
        spec.loader.exec_module(flex_mods)

    B, N, T, H = 2, 4, 24, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, N, H)).astype(np.float32) for _ in range(3))
    ids = np.sort(rng.integers(0, 3, size=(B, T)), axis=-1).astype(np.int32)   # packed documents

    expected = scoremod.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mod=mod,
                                  implementation="reference", ids=jnp.asarray(ids))

    mods = flex_mods.make_mods(ids=torch.from_numpy(ids))
    block_mask = flex_mods.block_mask(B, N, T, T, device="cpu", ids=torch.from_numpy(ids))
    to_bnth = lambda x: torch.from_numpy(x).double().transpose(1, 2)   # noqa: E731  [B, T, N, H] -> [B, N, T, H]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # flex_attention without torch.compile warns that it is slow
        out = flex_attention(to_bnth(q), to_bnth(k), to_bnth(v), score_mod=mods["score_mod"], block_mask=block_mask)
    out = out.transpose(1, 2).numpy()

    err = float(np.max(np.abs(out - np.asarray(expected))))
    print(f"flex_attention vs scoremod reference: max abs difference {err:.2e}")
    assert err < 1e-4, err


if __name__ == "__main__":
    main()
