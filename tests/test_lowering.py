"""compiler.lowering: the symbolic dT/dscore equals autodiff of the lowered transform,
and Mod's score_mod/mask_mod closures follow the FlexAttention protocol."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoremod
from scoremod.compiler.derivative import derivative
from scoremod.compiler.lowering import emit

TRANSFORMS = [
    "softcap(30)",
    "30 * tanh((score + alibi(8)) / 30)",
    "score * 2 + exp(score / 8) / (1 + score ** 2)",
    "clip(score, -5, 5) + alibi(4)",
    "max(score, 0.5 * score) - min(score, 1)",
    "where(q - kv < 3, score * score, -score) + sqrt(abs(score) + 1)",
    "log(1 + exp(score)) + sigmoid(score) * log2(2 + score * score)",
    "exp2(score / 4) - abs(score) + score % 3 + floor(score)",
    "-score / (h + 1)",
]


class _Env:
    def __init__(self, score, q, kv, h):
        self.values = {"score": score, "q": q, "kv": kv, "h": h, "b": jnp.int32(0)}

    def var(self, name):
        return self.values[name]

    def tensor(self, node, indices):
        raise AssertionError("no tensors here")


@pytest.mark.parametrize("source", TRANSFORMS)
def test_derivative_matches_autodiff(source):
    transform = scoremod.compile(source).canonical.transform
    assert transform is not None
    d = derivative(transform)
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(7, 5)) * 4, jnp.float32)
    q = jnp.arange(7, dtype=jnp.int32)[:, None] + 3
    kv = jnp.arange(5, dtype=jnp.int32)[None, :]
    h = jnp.int32(2)

    def total(s):
        return jnp.sum(emit(transform, _Env(s, q, kv, h)))

    expected = jax.grad(total)(scores)
    got = jnp.broadcast_to(emit(d, _Env(scores, q, kv, h)), scores.shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)


def test_derivative_of_score_free_expression_is_zero():
    bias = scoremod.compile("alibi(8)").canonical.bias
    assert str(derivative(bias)) == "0"


def test_score_mod_protocol_shapes_and_values():
    mod = scoremod.compile("causal & doc(ids) + alibi(2)")
    ids = jnp.asarray([[0, 0, 1, 1], [0, 1, 1, 1]], jnp.int32)
    sm = mod.score_mod(ids=ids)
    B, N, T, S = 2, 2, 4, 4
    scores = jnp.ones((B, N, T, S))
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(N)[None, :, None, None]
    q = jnp.arange(T)[None, None, :, None]
    kv = jnp.arange(S)[None, None, None, :]
    out = np.asarray(sm(scores, b, h, q, kv))
    assert out.shape == (B, N, T, S)
    ids_np = np.asarray(ids)
    for bi in range(B):
        for hi in range(N):
            for qi in range(T):
                for ki in range(S):
                    allowed = qi >= ki and ids_np[bi, qi] == ids_np[bi, ki]
                    slope = 2.0 ** (-8 * (hi + 1) / 2)
                    want = 1.0 - slope * abs(qi - ki) if allowed else -np.inf
                    assert out[bi, hi, qi, ki] == pytest.approx(want, rel=1e-6)
    mm = mod.mask_mod(ids=ids)
    mask = np.asarray(mm(b, h, q, kv))
    assert mask.shape == (B, N, T, S) and mask.dtype == bool
    np.testing.assert_array_equal(mask, np.isfinite(out))


def test_closures_check_tensor_names():
    mod = scoremod.compile("causal & doc(ids)")
    with pytest.raises(scoremod.ScoreModTensorError, match="missing tensor parameter 'ids'"):
        mod.score_mod()
    with pytest.raises(scoremod.ScoreModTensorError, match="unexpected tensor parameter 'idz'"):
        mod.mask_mod(ids=jnp.zeros(4, jnp.int32), idz=1)


def test_a_mask_that_reads_score_has_no_mask_mod_and_no_kernel():
    from scoremod.compiler.tile import TileProgram
    mod = scoremod.compile("(score > 0) & causal")
    with pytest.raises(scoremod.ScoreModError, match="reads score"):
        mod.mask_mod()
    ok, why = TileProgram.build(mod.canonical, {}).kernel_support()
    assert not ok and "reads score" in why
    sm = mod.score_mod()
    out = np.asarray(sm(jnp.asarray([[1.0, -1.0], [2.0, 3.0]]), 0, 0, jnp.arange(2)[:, None], jnp.arange(2)[None]))
    np.testing.assert_array_equal(out, [[1.0, -np.inf], [2.0, 3.0]])
