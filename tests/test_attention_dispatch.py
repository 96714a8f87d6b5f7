"""implementation=: names, sequences, fallback on NotImplementedError/ImportError, logging, cuDNN rules."""

from __future__ import annotations

import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoremod
from scoremod.runtime import attention as attention_module

rng = np.random.default_rng(0)
Q = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
KV = jnp.asarray(rng.standard_normal((1, 16, 1, 8)), jnp.float32)


def reference(**kw):
    return scoremod.attention(Q, KV, KV, implementation="reference", **kw)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the default backend is a GPU (only dispatch reads it here)."""
    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "gpu")


ON_GPU = jax.default_backend() == "gpu"
TOL = 2e-2 if ON_GPU else 1e-5   # GPUs run float32 matmuls as TF32 by default


@pytest.mark.skipif(ON_GPU, reason="the default differs on GPU")
def test_default_on_cpu_is_xla_and_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="scoremod"):
        out = scoremod.attention(Q, KV, KV, mod="causal")
    assert "using xla" in caplog.text
    np.testing.assert_allclose(out, reference(mod="causal"), atol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="mosaic runs on an sm_90 GPU")
def test_a_sequence_is_tried_in_order(caplog):
    with caplog.at_level(logging.INFO, logger="scoremod"):
        out = scoremod.attention(Q, KV, KV, mod="causal", implementation=("mosaic", "cudnn", "reference"))
    assert "mosaic cannot run" in caplog.text and "sm_90" in caplog.text
    assert "cudnn cannot run" in caplog.text and "using reference" in caplog.text
    np.testing.assert_array_equal(out, reference(mod="causal"))


@pytest.mark.skipif(ON_GPU, reason="mosaic runs on an sm_90 GPU")
def test_when_nothing_can_run_every_reason_is_given():
    with pytest.raises(NotImplementedError) as info:
        scoremod.attention(Q, KV, KV, implementation=["mosaic", "cudnn"])
    assert "mosaic: the mosaic kernel needs an sm_90 GPU" in str(info.value) and "cudnn: " in str(info.value)
    with pytest.raises(NotImplementedError, match="sm_90"):
        scoremod.attention(Q, KV, KV, implementation="mosaic")


def test_default_on_gpu_tries_mosaic_pallas_then_xla(gpu, monkeypatch, caplog):
    def no_pallas(*args, **kwargs):
        raise NotImplementedError("tensor read by computed positions")
    monkeypatch.setitem(attention_module._RUNNERS, "pallas", no_pallas)
    with caplog.at_level(logging.INFO, logger="scoremod"):
        out = scoremod.attention(Q, KV, KV, mod="causal")
    assert "mosaic cannot run" in caplog.text   # this "GPU" is the CPU in disguise: no sm_90
    assert "pallas cannot run" in caplog.text and "computed positions" in caplog.text and "using xla" in caplog.text
    np.testing.assert_allclose(out, reference(mod="causal"), atol=TOL)


def test_a_missing_pallas_module_falls_back(gpu, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "scoremod.runtime.pallas_attention", None)   # import raises ImportError
    with caplog.at_level(logging.INFO, logger="scoremod"):
        out = scoremod.attention(Q, KV, KV, mod="causal")
    assert "pallas cannot run" in caplog.text and "using xla" in caplog.text
    assert out.shape == Q.shape


def test_pallas_through_attention_matches_reference_with_lse():
    # Interpret mode on CPU: checks the glue (arguments, lse layout [B, T, N]).
    out, lse = scoremod.attention(Q, KV[:, :12], KV[:, :12], mod="causal", q_offset=3, implementation="pallas",
                                  return_lse=True)
    ref_out, ref_lse = scoremod.attention(Q, KV[:, :12], KV[:, :12], mod="causal", q_offset=3,
                                          implementation="reference", return_lse=True)
    assert lse.shape == (1, 16, 2)
    np.testing.assert_allclose(out, ref_out, atol=TOL)
    np.testing.assert_allclose(lse, ref_lse, atol=TOL)


@pytest.fixture
def fake_cudnn(gpu, monkeypatch):
    calls = []

    def dot_product_attention(query, key, value, **kw):
        calls.append(kw)
        return jnp.zeros(query.shape, query.dtype)
    monkeypatch.setattr(attention_module.jax.nn, "dot_product_attention", dot_product_attention)
    return calls


@pytest.mark.parametrize("mod, causal", [("causal", True), (None, False), ("q >= kv", True)])
def test_cudnn_runs_dense_and_causal(fake_cudnn, mod, causal):
    q, kv = Q.astype(jnp.bfloat16), KV.astype(jnp.bfloat16)
    scoremod.attention(q, kv, kv, mod=mod, implementation="cudnn")
    assert fake_cudnn[-1]["is_causal"] is causal and fake_cudnn[-1]["implementation"] == "cudnn"


@pytest.mark.parametrize("why, kw", [
    ("window", dict(mod="causal & window(4)")),
    ("bias", dict(mod="alibi(2) + causal")),
    ("transform", dict(mod="softcap(20)")),
    ("offset", dict(mod="causal", q_offset=1)),
    ("T != S", dict(mod="causal", kv_len=12)),
    ("float32", dict(mod="causal", dtype=jnp.float32)),
    ("lse", dict(mod="causal", return_lse=True)),
])
def test_cudnn_refuses_what_it_does_not_do(fake_cudnn, why, kw):
    dtype = kw.pop("dtype", jnp.bfloat16)
    kv_len = kw.pop("kv_len", 16)
    q, kv = Q.astype(dtype), KV[:, :kv_len].astype(dtype)
    with pytest.raises(NotImplementedError, match="cudnn cannot run"):
        scoremod.attention(q, kv, kv, implementation="cudnn", **kw)
    assert not fake_cudnn


@pytest.mark.skipif(ON_GPU, reason="needs a machine without GPU")
def test_cudnn_needs_a_gpu():
    with pytest.raises(NotImplementedError, match="GPU"):
        scoremod.attention(Q.astype(jnp.bfloat16), KV.astype(jnp.bfloat16), KV.astype(jnp.bfloat16),
                           mod="causal", implementation="cudnn")


@pytest.mark.gpu
def test_default_on_gpu_runs_float32_with_pallas(caplog):
    # mosaic (first on sm_90) runs bf16/f16 only; pallas takes float32.
    with caplog.at_level(logging.INFO, logger="scoremod"):
        out = scoremod.attention(Q, KV, KV, mod="causal & window(4)")
    assert "using pallas" in caplog.text
    np.testing.assert_allclose(out, reference(mod="causal & window(4)"), atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mod", [None, "causal"])
def test_cudnn_on_gpu_matches_reference(mod):
    q = jnp.asarray(rng.standard_normal((2, 128, 4, 64)), jnp.bfloat16)
    kv = jnp.asarray(rng.standard_normal((2, 128, 2, 64)), jnp.bfloat16)
    out = scoremod.attention(q, kv, kv, mod=mod, implementation="cudnn")
    ref = scoremod.attention(q, kv, kv, mod=mod, implementation="reference")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


def test_a_table_read_at_a_score_dependent_index_falls_back_from_pallas(caplog):
    # Its tile program has a derivative (0: the read is piecewise constant in score); the
    # kernel declines the computed-index read, and xla runs it (was a TypeError).
    table = jnp.arange(8.0)
    mod = "t[clip(floor(score), 0, 7)] + score"
    with caplog.at_level(logging.INFO, logger="scoremod"):
        out = scoremod.attention(Q, KV, KV, mod=mod, t=table, implementation=("pallas", "xla"))
    assert "pallas cannot run" in caplog.text and "using xla" in caplog.text
    np.testing.assert_allclose(out, reference(mod=mod, t=table), atol=TOL)
    # Full f32 products: on a GPU the default precision (TF32) alone moved the xla
    # gradient 5e-4 from the reference's (H100, 2026-12-06).
    with jax.default_matmul_precision("float32"):
        g = jax.grad(lambda q: scoremod.attention(q, KV, KV, mod=mod, t=table, implementation="xla").sum())(Q)
        g_ref = jax.grad(lambda q: scoremod.attention(q, KV, KV, mod=mod, t=table,
                                                      implementation="reference").sum())(Q)
    np.testing.assert_allclose(g, g_ref, atol=1e-4)


def test_forward_mode_autodiff_says_what_supports_it():
    # jax.jvp through a custom_vjp path is a decline with the way out (was jax's TypeError),
    # so a sequence falls through to an implementation that supports it.
    with pytest.raises(NotImplementedError, match="implementation='reference' supports it"):
        jax.jvp(lambda q: scoremod.attention(q, KV, KV, mod="causal", implementation="xla"), (Q,), (Q,))
    out, tangent = jax.jvp(lambda q: scoremod.attention(q, KV, KV, mod="causal", implementation=("xla", "reference")),
                           (Q,), (Q,))
    assert np.isfinite(np.asarray(tangent)).all()


def test_dispatch_says_what_would_run_without_running(caplog):
    q = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)   # no arrays needed
    d = scoremod.dispatch(q, q, q, mod="causal & window(4)", implementation=("mosaic", "pallas", "xla"))
    assert d.implementation == "pallas"
    assert [name for name, _ in d.declined] == ["mosaic"]
    assert "runs: pallas" in str(d) and "mosaic declines" in str(d)
    nothing = scoremod.dispatch(q, q, q, mod="causal", implementation="cudnn")
    assert nothing.implementation is None and nothing.declined[0][0] == "cudnn"
    # The same choice as attention() makes for the real call.
    with caplog.at_level(logging.INFO, logger="scoremod"):
        scoremod.attention(Q, KV, KV, mod="causal & window(4)", implementation=("mosaic", "pallas", "xla"))
    assert "using pallas" in caplog.text


def test_dispatch_raises_the_mistakes_attention_raises():
    q = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
    with pytest.raises(scoremod.ScoreModTensorError, match="missing tensor"):
        scoremod.dispatch(q, q, q, mod="causal & doc(ids)")
    with pytest.raises(scoremod.ScoreModShapeError):
        scoremod.dispatch(q, jax.ShapeDtypeStruct((1, 16, 3, 8), jnp.float32), q)


def test_dispatch_takes_abstract_tensors():
    """Tensors as ShapeDtypeStructs, like q, k, v (they were converted with jnp.asarray: a
    raw TypeError; a third audit); their shapes are still checked."""
    q = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
    d = scoremod.dispatch(q, q, q, mod="causal & doc(ids)", implementation=("pallas", "xla"),
                          ids=jax.ShapeDtypeStruct((1, 16), jnp.int32))
    assert d.implementation == "pallas"
    assert scoremod.dispatch(q, q, q, mod="relpos(t, 4) + causal", implementation="xla",
                             t=jax.ShapeDtypeStruct((2, 9), jnp.float32)).implementation == "xla"
    with pytest.raises(scoremod.ScoreModTensorError):
        scoremod.dispatch(q, q, q, mod="causal & doc(ids)", ids=jax.ShapeDtypeStruct((1, 15), jnp.int32))


@pytest.mark.gpu
def test_dispatch_on_a_gpu_picks_mosaic_for_bf16():
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    d = scoremod.dispatch(q, q, q, mod="causal")
    on_hopper = str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
    assert d.implementation == ("mosaic" if on_hopper else "pallas"), d
