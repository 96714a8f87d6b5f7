"""Reusable plans: ``scoremod.plan`` and ``attention(..., plan=)`` (runtime/attention_plan.py).

What is proved: a call with a plan gives what the same call without one gives (outputs,
lse and gradients, on generated sources and shapes, for xla and pallas); with a plan, no
block plan is built in the call; the plan passes through jit and scan; every way a plan
can disagree with its call is a ScoreModError naming it.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

import scoremod
from scoremod.runtime import attention_plan

sys.path.insert(0, os.path.dirname(__file__))
from strategies import shapes, sources  # noqa: E402

DOC = "causal & doc(ids)"


def _inputs(B, T, S, N, K, H, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H), dtype), jax.random.normal(ks[1], (B, S, K, H), dtype),
            jax.random.normal(ks[2], (B, S, K, H), dtype))


def _ids(B, T, seed=0):
    return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 4, (B, T)), axis=1).astype(np.int32))


def _out_lse_grads(fn, q, k, v):
    """out, lse and the gradients of a loss of both, in one jitted program (the plan and
    the tensors, closed over, stay concrete as in an eager call)."""
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))) + \
            jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, lse, *grads)


@settings(max_examples=10)
@given(src=sources(max_depth=2), shape=shapes(max_seq=32), seed=st.integers(0, 2**16),
       impl=st.sampled_from(["xla", "pallas"]))
def test_call_with_plan_matches_call_without(src, shape, seed, impl):
    tensors = src.make_tensors(shape, np.random.default_rng(seed))
    q, k, v = _inputs(shape.B, shape.T, shape.S, shape.N, shape.K, 8, seed=seed)
    call = dict(q_offset=shape.q_offset, kv_offset=shape.kv_offset, implementation=impl)
    try:
        plan = scoremod.plan(src.text, shape.T, shape.S, batch=shape.B, heads=shape.N, kv_heads=shape.K,
                             head_dim=8, dtype="float32", **call, **tensors)
    except NotImplementedError:   # pallas declines this source: so does attention()
        assume(impl == "pallas")
        assume(False)
    assert plan.implementation == impl
    with_plan = _out_lse_grads(lambda q, k, v: scoremod.attention(q, k, v, plan=plan, return_lse=True), q, k, v)
    without = _out_lse_grads(lambda q, k, v: scoremod.attention(q, k, v, mod=src.text, return_lse=True, **call,
                                                                **tensors), q, k, v)
    for a, b in zip(with_plan, without):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_no_plan_is_built_in_a_call_with_a_plan(monkeypatch):
    B, T, N = 2, 96, 2
    ids = _ids(B, T)
    q, k, v = _inputs(B, T, T, N, N, 16)
    built = []
    real = attention_plan.build_plan
    monkeypatch.setattr(attention_plan, "build_plan", lambda *a, **kw: (built.append(kw.get("block_q")), real(*a, **kw))[1])
    for impl in ("xla", "pallas"):
        built.clear()
        plan = scoremod.plan(DOC, T, batch=B, heads=N, head_dim=16, dtype="float32", implementation=impl, ids=ids)
        assert plan.plans and not plan.static
        built.clear()
        # forward and backward traced in one jitted program (the plan is built where it is
        # traced, so a build in the call would be recorded as it is eagerly)
        jax.jit(lambda q: (scoremod.attention(q, k, v, plan=plan),
                           jax.grad(lambda q: scoremod.attention(q, k, v, plan=plan).sum())(q)))(q)
        assert built == [], impl
        jax.jit(lambda q: scoremod.attention(q, k, v, mod=DOC, ids=ids, implementation=impl))(q)   # without: it builds
        assert built, impl


def test_plan_through_jit_and_scan_over_layers():
    B, T, N, H, layers = 2, 80, 2, 16, 3
    ids = _ids(B, T, seed=1)
    q, k, v = _inputs(B, T, T, N, N, H, seed=2)
    w = jax.random.normal(jax.random.key(3), (layers, H, H)) / H

    def model(x, ids, with_plan):
        plan = scoremod.plan(DOC, T, batch=B, heads=N, head_dim=H, dtype="float32", ids=ids) if with_plan else None

        def layer(x, wl):
            y = x @ wl
            out = (scoremod.attention(y, y, y, plan=plan) if with_plan else
                   scoremod.attention(y, y, y, mod=DOC, ids=ids))
            return x + out, None
        return jax.lax.scan(layer, x, w)[0]

    fast = jax.jit(lambda x, ids: model(x, ids, True))(q, ids)
    slow = model(q, ids, False)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-5, atol=1e-5)
    # a plan built outside jit goes in as an argument (a pytree)
    plan = scoremod.plan(DOC, T, batch=B, heads=N, head_dim=H, dtype="float32", ids=ids)
    out = jax.jit(lambda p, q: scoremod.attention(q, k, v, plan=p))(plan, q)
    np.testing.assert_allclose(np.asarray(out), np.asarray(scoremod.attention(q, k, v, mod=DOC, ids=ids)),
                               rtol=1e-5, atol=1e-5)


def test_plan_is_a_pytree_and_static_masks_hold_no_plans():
    ids = _ids(2, 67)   # positions run to 63 + 3
    plan = scoremod.plan(DOC, 64, batch=2, heads=2, head_dim=16, ids=ids, q_offset=jnp.array([0, 3]))
    leaves, tree = jax.tree.flatten(plan)
    again = jax.tree.unflatten(tree, leaves)
    assert again.plans.keys() == plan.plans.keys() and again.mod == plan.mod
    np.testing.assert_array_equal(np.asarray(again.q_offset), [0, 3])
    static = scoremod.plan("causal & window(8)", 64, batch=2, heads=2, head_dim=16, q_offset=5)
    assert static.static and static.plans == {} and jax.tree.leaves(static) == []
    assert "static" in str(static) and "512" not in str(static)


def test_a_plan_that_does_not_fit_the_call_is_an_error():
    B, T, N, H = 1, 64, 2, 16
    ids = _ids(B, T)
    q, k, v = _inputs(B, T, T, N, N, H)
    plan = scoremod.plan(DOC, T, batch=B, heads=N, head_dim=H, dtype="float32", ids=ids)
    with pytest.raises(scoremod.ScoreModShapeError, match=r"query has shape \(1, 32, 2, 16\); the plan was built"):
        scoremod.attention(q[:, :32], k, v, plan=plan)
    with pytest.raises(scoremod.ScoreModShapeError, match="key has shape"):
        scoremod.attention(q, k[:, :32], v[:, :32], plan=plan)
    with pytest.raises(scoremod.ScoreModTensorError, match="the plan carries the tensors"):
        scoremod.attention(q, k, v, plan=plan, ids=ids)
    with pytest.raises(scoremod.ScoreModError, match="is not the plan's mod"):
        scoremod.attention(q, k, v, plan=plan, mod="causal")
    scoremod.attention(q, k, v, plan=plan, mod=DOC)   # the same mod is fine
    with pytest.raises(scoremod.ScoreModError, match="q_offset is the plan's"):
        scoremod.attention(q, k, v, plan=plan, q_offset=4)
    with pytest.raises(scoremod.ScoreModError, match=r"built for implementation 'xla'.*this call needs \d+x\d+ blocks"):
        scoremod.attention(q, k, v, plan=plan, implementation="pallas")
    with pytest.raises(scoremod.ScoreModError, match="cannot be combined with context parallelism"):
        scoremod.attention(q, k, v, plan=plan, mesh=jax.make_mesh((1,), ("sp",)), context_axis="sp")
    with pytest.raises(scoremod.ScoreModError, match="plan must be a scoremod.plan"):
        scoremod.attention(q, k, v, plan="causal")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(q_len=0), scoremod.ScoreModShapeError, "q_len must be a positive int"),
    (dict(q_len=64, heads=2.0), scoremod.ScoreModShapeError, "heads must be a positive int"),
    (dict(q_len=64, dtype="nope"), scoremod.ScoreModShapeError, "dtype must be a float dtype"),
    (dict(q_len=64, dtype="int32"), scoremod.ScoreModShapeError, "int32"),
    (dict(q_len=64, heads=3, kv_heads=2), scoremod.ScoreModShapeError, "multiple"),
])
def test_bad_plan_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        scoremod.plan("causal", **kwargs)


def test_plan_checks_tensors_like_attention():
    with pytest.raises(scoremod.ScoreModTensorError, match="ids"):
        scoremod.plan(DOC, 64, batch=2, heads=2)
    with pytest.raises(scoremod.ScoreModTensorError):
        scoremod.plan(DOC, 64, batch=2, heads=2, ids=jnp.zeros((3, 64), jnp.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("mod", [DOC, "causal & window(100)"])
def test_mosaic_plan_through_scan_matches_the_call_without(mod):
    """On the GPU's default kernel: a plan built once in jit serves every layer of a scan,
    forward and backward, and gives what the calls without it give (bf16, GQA, ragged T)."""
    B, T, N, K, H, layers = 2, 1000, 4, 2, 128, 3
    ids = _ids(B, T, seed=4)
    q, _, _ = _inputs(B, T, T, N, K, H, seed=5, dtype=jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(6), (layers, H, H)) / np.sqrt(H)).astype(jnp.bfloat16)
    tensors = dict(ids=ids) if mod == DOC else {}

    def model(x, ids, with_plan):
        t = dict(ids=ids) if mod == DOC else {}
        plan = scoremod.plan(mod, T, batch=B, heads=N, kv_heads=K, head_dim=H, dtype=x.dtype, **t) \
            if with_plan else None

        def layer(x, wl):
            y = x @ wl
            kv = y[:, :, :K]
            out = (scoremod.attention(y, kv, kv, plan=plan) if with_plan else
                   scoremod.attention(y, kv, kv, mod=mod, **t))
            x = x + out
            return x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)).astype(x.dtype), None
        return jax.lax.scan(layer, x, w)[0]

    def loss(x, ids, with_plan):
        return jnp.sum(model(x, ids, with_plan).astype(jnp.float32) ** 2)

    plan = scoremod.plan(mod, T, batch=B, heads=N, kv_heads=K, head_dim=H, dtype=q.dtype, **tensors)
    assert plan.implementation == "mosaic"
    fast = jax.jit(jax.value_and_grad(lambda x, ids: loss(x, ids, True)))(q, ids)
    slow = jax.jit(jax.value_and_grad(lambda x, ids: loss(x, ids, False)))(q, ids)
    for a, b in zip(fast, slow):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * float(np.abs(b).max()))
