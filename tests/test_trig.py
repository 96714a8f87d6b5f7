"""The built-in functions ``sin`` and ``cos`` through every layer: names and typing,
constant folding, lowering (against NumPy float32), the derivative in ``score`` (against
autodiff and finite differences of the float64 evaluator), interval bounds (sound in
float32), and ``dslc list``. Generated sources use them too (tests/strategies.py), so the
property tests compare every lowering with the evaluator on them."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoremod
from scoremod.compiler.derivative import derivative
from scoremod.compiler.intervals import EMPTY, FULL, PARTIAL, BlockGrid, PositionBlocks, classify_blocks
from scoremod.compiler.lowering import emit
from scoremod.dsl.ast import RealLit
from scoremod.errors import ScoreModDefinitionError, ScoreModNameError, ScoreModTypeError

from evaluator import attention_reference, evaluate_expr


class _Env:
    def __init__(self, **values):
        self.values = values

    def var(self, name):
        return self.values[name]

    def tensor(self, node, indices):
        raise AssertionError("no tensors here")


# ---- names and types -------------------------------------------------------------------------

def test_types_and_int_promotion():
    assert scoremod.compile("sin(q - kv)").kind == "bias"
    assert scoremod.compile("score + sin(score)").kind == "transform"
    assert scoremod.compile("cos(h) > 0.5").kind == "mask"


@pytest.mark.parametrize("text, error, fragment", [
    ("sin(causal)", ScoreModTypeError, "sin() needs numbers, but causal is a mask"),
    ("cos(causal & alibi(2))", ScoreModTypeError, "a mask acts as a -inf bias only at the top level"),
    ("sin(q, kv)", ScoreModNameError, "'sin' takes 1 argument, got 2"),
    ("cos + q", ScoreModNameError, "'cos' is a function"),
    ("sine(q)", ScoreModNameError, "did you mean 'sin'"),
    ("sin(x) = x\nsin(q)", ScoreModDefinitionError, "shadows the built-in function sin(x)"),
])
def test_errors(text, error, fragment):
    with pytest.raises(error) as info:
        scoremod.compile(text)
    assert fragment in info.value.message


def test_dslc_list_and_show_name_them():
    run = lambda *args: subprocess.run([sys.executable, "-m", "scoremod", *args], capture_output=True,  # noqa: E731
                                       text=True, check=True).stdout
    lines = run("list").splitlines()
    for sig in ("sin(x)", "cos(x)"):
        assert any(line.split()[:2] == [sig, "function"] for line in lines), sig
    assert "sin(x)  (built-in function)" in run("show", "sin")


# ---- constant folding -----------------------------------------------------------------------

def test_folding_of_float32_arguments():
    assert scoremod.compile("sin(0.5) + q").canonical.bias.lhs == RealLit(math.sin(0.5))
    assert str(scoremod.compile("cos(0) + q")) == "1.0 + q"
    assert str(scoremod.compile("sin(3) + q")) == f"{math.sin(3)} + q"


@pytest.mark.parametrize("text", [
    "sin(0.1) + q",          # 0.1 is no float32 value: the kernels compute sin(0.1f)
    "sin(16777217) + q",     # an int past 2**24 rounds to 16777216.0 first
    "cos(inf) + q",          # NaN
])
def test_no_folding_where_float32_differs(text):
    mod = scoremod.compile(text)
    assert ("sin(" in str(mod)) or ("cos(" in str(mod))


def test_folded_value_is_what_the_kernels_compute():
    # A literal fold of a float32 argument agrees with float32 jnp.sin of that argument.
    for x in (0.5, 2.0, 3.0, 1000.0, 16777216.0):
        folded = scoremod.compile(f"sin({x}) + q").canonical.bias.lhs.value
        assert abs(folded - float(jnp.sin(jnp.float32(x)))) < 1e-6


# ---- lowering ----------------------------------------------------------------------------------

def test_lowering_matches_numpy_float32():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.standard_normal(200) * 4, rng.uniform(-1e4, 1e4, 200),
                             [0.0, -0.0, np.pi, -np.pi / 2, 1e-30]]).astype(np.float32)
    q = np.arange(scores.size, dtype=np.int32) - 100
    env = _Env(score=jnp.asarray(scores), q=jnp.asarray(q))
    for fn, ref in (("sin", np.sin), ("cos", np.cos)):
        got = np.asarray(emit(scoremod.compile(f"{fn}(score)").canonical.transform, env))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref(scores), atol=2e-6, rtol=0)   # float32: a few ulps of 1
        ints = np.asarray(emit(scoremod.compile(f"{fn}(q)").canonical.bias, env))
        assert ints.dtype == np.float32
        np.testing.assert_allclose(ints, ref(q.astype(np.float32)), atol=2e-6, rtol=0)


def test_evaluator_values():
    for text, want in (("sin(2.5)", math.sin(2.5)), ("cos(2.5)", math.cos(2.5)), ("sin(-3)", math.sin(-3)),
                       ("cos(0)", 1.0)):
        assert evaluate_expr(text, 1, 1, 1, 1).item() == pytest.approx(want, rel=1e-15)
    assert evaluate_expr("sin(q)", 1, 1, 3, 1).dtype == np.float64


# ---- the derivative in score ---------------------------------------------------------------------

@pytest.mark.parametrize("source, printed", [
    ("score + sin(score)", "1 + cos(score)"),
    ("cos(score)", "-sin(score)"),
])
def test_symbolic_derivative(source, printed):
    assert str(derivative(scoremod.compile(source).canonical.transform)) == printed


@pytest.mark.parametrize("source", [
    "score + sin(score)",
    "cos(score / 3) * 4 + alibi(2)",
    "sin(score) * cos(2 * score + q - kv) - sin(cos(score))",
    "30 * tanh(sin(score / 30))",
])
def test_derivative_matches_autodiff(source):
    transform = scoremod.compile(source).canonical.transform
    rng = np.random.default_rng(1)
    scores = jnp.asarray(rng.normal(size=(7, 5)) * 4, jnp.float32)
    env = lambda s: _Env(score=s, q=jnp.arange(7, dtype=jnp.int32)[:, None] + 3,  # noqa: E731
                         kv=jnp.arange(5, dtype=jnp.int32)[None, :], h=jnp.int32(1), b=jnp.int32(0))
    want = jax.grad(lambda s: jnp.sum(emit(transform, env(s))))(scores)
    got = jnp.broadcast_to(emit(derivative(transform), env(scores)), scores.shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_attention_gradient_matches_finite_differences(impl):
    """jax.grad of attention with a transform using sin/cos against central differences of
    the float64 evaluator's attention (no JAX in the oracle)."""
    source = "causal & 2 * sin(score) + cos(score / 2) + score"
    rng = np.random.default_rng(2)
    B, T, S, N, H = 1, 6, 7, 2, 4
    q, k, v = (rng.standard_normal(shape) for shape in ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
    w = rng.standard_normal((B, T, N, H))

    def loss64(q, k, v):
        out, _ = attention_reference(q, k, v, source)
        return float(np.sum(out * w))

    def loss(q, k, v):
        out = scoremod.attention(q, k, v, mod=source, implementation=impl)
        return jnp.sum(out * w)

    got = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    eps = 1e-5
    for which, g in enumerate(got):
        args = [q, k, v]
        base = args[which]
        want = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args[which] = plus
            up = loss64(*args)
            args[which] = minus
            down = loss64(*args)
            want[idx] = (up - down) / (2 * eps)
        args[which] = base
        np.testing.assert_allclose(np.asarray(g), want, atol=5e-4, rtol=1e-3)


# ---- intervals -------------------------------------------------------------------------------

def _classes(source, T=16, S=16, block=4, tensors=None, xp=np):
    grid = BlockGrid(1, 1, PositionBlocks(T, block), PositionBlocks(S, block))
    return np.asarray(classify_blocks(scoremod.compile(source).canonical.mask, grid, tensors or {}, xp))


@pytest.mark.parametrize("xp", [np, jnp])
def test_interval_bounds(xp):
    assert np.all(_classes("sin(q) > 1.001 & true", xp=xp) == EMPTY)
    assert np.all(_classes("cos(q * 0.37 + kv) <= 1.001 & true", xp=xp) == FULL)
    assert np.all(_classes("sin(kv) < -1.001 & true", xp=xp) == EMPTY)
    # [-1, 1] is widened by float32 rounding: the bound 1 itself is not decided
    assert np.all(_classes("sin(q) <= 1 & true", xp=xp) == PARTIAL)


@pytest.mark.parametrize("xp", [np, jnp])
def test_infinite_arguments_are_nan_and_never_decided(xp):
    # sin(inf) is NaN, and NaN < 2 is false: FULL would be wrong, and EMPTY is not known.
    t = np.array([np.inf, 1.0, -np.inf, 0.5] * 4, np.float32)
    classes = _classes("sin(t[q]) < 2 & true", tensors={"t": xp.asarray(t)}, xp=xp)
    assert np.all(classes == PARTIAL)
    values = np.asarray(jnp.sin(jnp.asarray(t)) < 2)
    assert not values.all() and values.any()


def test_interval_classes_are_sound_against_float32_kernels():
    """Blocks decided FULL / EMPTY for masks comparing sin / cos of positions with
    thresholds hold at every position as the float32 lowering computes them."""
    from scoremod.compiler.lowering import mask_mod_fn
    T = S = 64
    for threshold in (-1.0, -0.999, -0.5, 0.0, 0.7, 0.9999, 1.0):
        for source in (f"sin(q * 0.01) >= {threshold}", f"cos(kv - q) < {threshold}",
                       f"sin(q) * cos(kv) > {threshold}"):
            mod = scoremod.compile(source)
            classes = _classes(source, T, S, 8)
            b = jnp.zeros((1, 1, 1, 1), jnp.int32)
            dense = np.asarray(mask_mod_fn(mod.canonical, {})(b, b, jnp.arange(T)[None, None, :, None],
                                                              jnp.arange(S)[None, None, None, :]))[0, 0]
            blocks = dense.reshape(T // 8, 8, S // 8, 8)
            assert not np.any((classes[0, 0] == FULL) & ~blocks.all(axis=(1, 3))), source
            assert not np.any((classes[0, 0] == EMPTY) & blocks.any(axis=(1, 3))), source
