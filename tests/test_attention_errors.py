"""Bad calls to attention(): a ScoreModError subclass that says what was expected and what was given,
raised from shapes and dtypes alone (also under jit), before any implementation runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoremod
from scoremod import ScoreModError, ScoreModShapeError, ScoreModTensorError

B, T, S, N, K, H = 2, 8, 10, 4, 2, 16
Q = jnp.zeros((B, T, N, H))
KV = jnp.zeros((B, S, K, H))
IDS = jnp.zeros((B, S), jnp.int32)


def call(q=Q, k=KV, v=KV, **kw):
    return scoremod.attention(q, k, v, **kw)


BAD = [
    # id, call, error class, fragments the message must contain
    ("query-rank", lambda: call(q=Q[0]), ScoreModShapeError, ["query", "rank 4", "[B, T, N, H]", "(8, 4, 16)"]),
    ("key-rank", lambda: call(k=KV[..., 0]), ScoreModShapeError, ["key", "rank 4", "(2, 10, 2)"]),
    ("batch", lambda: call(k=KV[:1], v=KV[:1]), ScoreModShapeError, ["B=2", "B=1"]),
    ("head-dim", lambda: call(k=KV[..., :8], v=KV[..., :8]), ScoreModShapeError, ["H=16", "H=8"]),
    ("k-v-shapes", lambda: call(v=KV[:, :5]), ScoreModShapeError, ["same shape", "(2, 10, 2, 16)", "(2, 5, 2, 16)"]),
    ("no-head-dim", lambda: call(q=Q[..., :0], k=KV[..., :0], v=KV[..., :0]), ScoreModShapeError,
     ["empty head dim", "at least 1"]),
    ("empty-batch", lambda: call(q=Q[:0], k=KV[:0], v=KV[:0]), ScoreModShapeError, ["empty batch", "at least 1"]),
    ("gqa", lambda: call(k=jnp.zeros((B, S, 3, H)), v=jnp.zeros((B, S, 3, H))), ScoreModShapeError,
     ["N=4", "K=3", "multiple"]),
    ("int-dtype", lambda: call(q=Q.astype(jnp.int32)), ScoreModShapeError, ["query", "int32", "bfloat16"]),
    ("mixed-dtypes", lambda: call(q=Q.astype(jnp.bfloat16)), ScoreModShapeError, ["one dtype", "bfloat16", "float32"]),
    ("not-an-array", lambda: call(q=[[1.0]]), ScoreModShapeError, ["query", "array", "list"]),
    ("scale", lambda: call(scale="big"), ScoreModShapeError, ["scale", "'big'"]),
    ("return-lse", lambda: call(return_lse="yes"), ScoreModShapeError, ["return_lse"]),
    ("offset-float", lambda: call(q_offset=1.5), ScoreModShapeError, ["q_offset", "int"]),
    ("offset-shape", lambda: call(kv_offset=jnp.zeros(3, jnp.int32)), ScoreModShapeError, ["kv_offset", "B=2", "(3,)"]),
    ("mod-type", lambda: call(mod=3), ScoreModError, ["mod", "string", "int"]),
    ("implementation", lambda: call(implementation="fast"), ScoreModError, ["'fast'", "reference", "xla", "pallas"]),
    ("implementation-empty", lambda: call(implementation=()), ScoreModError, ["implementation"]),
    ("tensor-missing", lambda: call(mod="causal & doc(ids)"), ScoreModTensorError, ["missing", "'ids'", "ids[b, q]"]),
    ("tensor-extra", lambda: call(mod="causal & doc(ids)", ids=IDS, idz=IDS), ScoreModTensorError,
     ["unexpected", "'idz'"]),
    ("tensor-for-no-tensors", lambda: call(mod="causal", ids=IDS), ScoreModTensorError, ["unexpected", "'ids'"]),
    ("tensor-short", lambda: call(mod="doc(ids)", ids=IDS[:, :5]), ScoreModTensorError,
     ["'ids'", "[2, 5]", "too short"]),
    ("tensor-short-offset", lambda: call(mod="doc(ids)", ids=IDS, q_offset=5), ScoreModTensorError,
     ["'ids'", "q", "12", ">=13"]),
    ("tensor-batch", lambda: call(mod="doc(ids)", ids=jnp.zeros((3, S), jnp.int32)), ScoreModTensorError,
     ["'ids'", "b", "3", "2"]),
    ("tensor-rank", lambda: call(mod="doc(ids)", ids=jnp.zeros((2, B, S), jnp.int32)), ScoreModTensorError,
     ["'ids'", "rank 3", "2 indices"]),
    ("tensor-scalar", lambda: call(mod="causal & window(w)", w=jnp.ones(3, jnp.int32)), ScoreModTensorError,
     ["'w'", "scalar"]),
    ("tensor-heads", lambda: call(mod="relpos(rp, 2)", rp=jnp.zeros((3, 5))), ScoreModTensorError,
     ["'rp'", "h", "3", "4"]),
    ("tensor-dtype", lambda: call(mod="causal & window(w)", w="wide"), ScoreModTensorError, ["'w'"]),
    ("float-index", lambda: call(mod="t[ids[b, q]] > 0", ids=IDS.astype(jnp.float32), t=jnp.ones(4)),
     ScoreModTensorError, ["'ids'", "index", "float32", "int"]),
    ("keyword-collision", lambda: call(mod="bias(scale)", scale=1.0), ScoreModError, ["scale"]),
    # A new user's mistakes get a pointer to what they meant.
    ("prelude-typo", lambda: call(mod="causl & window(8)"), ScoreModTensorError,
     ["missing tensor 'causl'", "did you mean 'causal'?"]),
    ("keyword-typo", lambda: call(mod="causal & doc(ids)", id=IDS), ScoreModTensorError,
     ["missing tensor 'ids'", "you passed 'id'", "ids=id"]),
    ("is-causal", lambda: call(is_causal=True), ScoreModTensorError, ["'is_causal'", 'mod="causal"']),
    ("segment-ids", lambda: call(segment_ids=IDS), ScoreModTensorError, ["'segment_ids'", "doc(ids)"]),
    ("bias-keyword", lambda: call(bias=IDS), ScoreModTensorError, ["'bias'", "bias(t)"]),
    ("mask-keyword", lambda: call(mask=IDS), ScoreModTensorError, ["'mask'", "m[b, h, q, kv]"]),
    # int32 is what every implementation computes in: nothing wider is truncated silently.
    ("ids-int64", lambda: call(mod="causal & doc(ids)", ids=np.arange(B * S, dtype=np.int64).reshape(B, S) << 32),
     ScoreModTensorError, ["'ids'", "81604378624", "int32", "np.unique"]),
    ("scalar-int64", lambda: call(mod="causal & window(w)", w=2**40), ScoreModTensorError, ["'w'", "int32"]),
    ("q-offset-2-32", lambda: call(q_offset=2**32), ScoreModShapeError, ["q_offset", "4294967303", "int32"]),
    ("positions-past-int32", lambda: call(kv_offset=2**31 - 5), ScoreModShapeError,
     ["kv_offset", "2147483652", "int32"]),
    ("offset-array-int64", lambda: call(q_offset=np.array([0, 2**33])), ScoreModShapeError, ["q_offset", "int32"]),
    ("negative-offset-past-int32", lambda: call(q_offset=-(2**31) - 1), ScoreModShapeError, ["q_offset", "int32"]),
    # The compiler relies on h < 65,536 (docs/language.md, "8. Arithmetic").
    ("too-many-heads", lambda: call(q=jnp.zeros((1, 1, 65537, 1)), k=jnp.zeros((1, 1, 1, 1)), v=jnp.zeros((1, 1, 1, 1))),
     ScoreModShapeError, ["65,537 query heads", "65,536"]),
    ("too-many-heads-plan", lambda: scoremod.plan("causal", 8, heads=65537), ScoreModShapeError, ["65,537 query heads"]),
    ("too-many-heads-explain", lambda: scoremod.compile("causal").explain(8, heads=65537), ScoreModShapeError,
     ["65,537 query heads"]),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_a_clear_error(bad):
    _, fn, error, fragments = bad
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_errors_are_raised_under_jit_before_running():
    @jax.jit
    def f(q, ids):
        return scoremod.attention(q, KV, KV, mod="causal & doc(ids)", ids=ids)
    with pytest.raises(ScoreModTensorError, match="ids"):
        f(Q, IDS[:, :3])
    with pytest.raises(ScoreModShapeError, match="rank 4"):
        jax.jit(lambda q: scoremod.attention(q, KV, KV))(Q[0])


def test_traced_scale_is_refused_and_traced_offsets_are_accepted():
    with pytest.raises(ScoreModShapeError, match="static"):
        jax.jit(lambda s: scoremod.attention(Q, KV, KV, scale=s))(0.5)
    out = jax.jit(lambda o: scoremod.attention(Q, KV, KV, mod="causal", q_offset=o))(jnp.array([0, 2], jnp.int32))
    assert out.shape == Q.shape


def test_python_numbers_and_broadcast_tensors_are_accepted():
    out = call(mod="causal & window(w) & doc(ids)", w=3, ids=np.zeros((1, S), np.int32), implementation="reference")
    assert out.shape == Q.shape and bool(jnp.all(jnp.isfinite(out)))


def test_tensors_the_source_names_but_simplification_removed_are_accepted_and_ignored():
    source = "causal & where(true, alibi(2), bias(t))"
    mod = scoremod.compile(source)
    assert mod.tensors == () and mod.source_tensors == ("t",)
    with_t = call(mod=source, t=jnp.ones((B, N, T, S)))
    without = call(mod=source)
    np.testing.assert_array_equal(np.asarray(with_t), np.asarray(without))
    with pytest.raises(ScoreModTensorError, match="unexpected tensor 'u'"):
        call(mod=source, u=1)


def test_reserved_tensor_names_are_exactly_the_keywords_of_the_entries():
    """One list (dsl/definitions.py) keeps a tensor from taking a keyword of attention() or
    paged_attention(): it must name every keyword a call takes, and nothing else."""
    import inspect
    from scoremod.dsl.definitions import RESERVED_TENSOR_NAMES, VARIABLES
    from scoremod.runtime.paged import paged_attention
    keywords = set()
    for fn in (scoremod.attention, paged_attention):
        keywords |= {name for name, p in inspect.signature(fn).parameters.items() if p.kind != p.VAR_KEYWORD}
    assert RESERVED_TENSOR_NAMES == keywords - set(VARIABLES)


# Per-batch offsets that are concrete (NumPy, or a jax array closed over by jit) are checked at
# their values with and without jit; T=12 queries, S=10 keys, so ids[b, q] sets the length needed.
T12 = jnp.zeros((B, 12, N, H))
OFFSET_CASES = [
    # id, q_offset, ids length, accepted: positions q_offset + 0..11 must lie below the length
    ("negative-fits", np.array([-2, -1], np.int32), 11, True),       # positions up to 10
    ("positive-too-short", np.array([0, 3], np.int32), 12, False),   # positions up to 14
    ("scalar-array-fits", np.array(-1, np.int32), 11, True),         # 0-d: broadcast to [B]
    ("jax-int16-too-short", jnp.array([3, 0], jnp.int16), 12, False),  # astype: a tracer under jit
]


@pytest.mark.parametrize("case", OFFSET_CASES, ids=[c[0] for c in OFFSET_CASES])
def test_concrete_offsets_are_checked_at_their_values_with_and_without_jit(case):
    _, q_offset, length, accepted = case
    ids = np.zeros((B, length), np.int32)

    def f(q):
        return scoremod.attention(q, KV, KV, mod="causal & doc(ids)", ids=ids, q_offset=q_offset,
                                  implementation="xla")
    for fn in (f, jax.jit(f)):
        if accepted:
            assert fn(T12).shape == T12.shape
        else:
            with pytest.raises(ScoreModTensorError, match="too short for query positions up to 14"):
                fn(T12)


def test_traced_offsets_check_tensor_lengths_against_t_and_s():
    """Offsets passed to jit as arguments are not known while tracing: a q/kv axis must then
    cover T / S (docs/compiler.md, "Tensor checks"); the kernels clip what lies beyond."""
    def f(q_offset, ids):
        return scoremod.attention(T12, KV, KV, mod="causal & doc(ids)", ids=ids, q_offset=q_offset,
                                  implementation="xla")
    offset = jnp.array([0, 3], jnp.int32)
    assert jax.jit(f)(offset, jnp.zeros((B, 12), jnp.int32)).shape == T12.shape
    with pytest.raises(ScoreModTensorError, match="too short for query positions up to 11"):
        jax.jit(f)(offset, jnp.zeros((B, 11), jnp.int32))


def test_an_index_below_zero_is_told_to_be_bounded_not_given_a_shape():
    # q - kv + 10 reaches -3 at these positions: no table size holds it, so the error says
    # how to bound the index instead of suggesting a shape.
    q = jnp.zeros((1, 36, 2, 8))
    kv = jnp.zeros((1, 14, 2, 8))
    with pytest.raises(scoremod.ScoreModTensorError, match=r"goes below 0.*max\(q - kv \+ 10, 0\)") as info:
        scoremod.attention(q, kv, kv, mod="causal + t[q - kv + 10]", t=jnp.zeros(60), implementation="xla")
    assert "expected shape" not in str(info.value)
    out = scoremod.attention(q, kv, kv, mod="causal + t[max(q - kv, 0) + 10]", t=jnp.zeros(46), implementation="xla")
    assert out.shape == q.shape


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_second_derivatives_say_so(impl):
    """A gradient of a gradient through the xla or pallas path is a clear ScoreModError (it
    was jax's "Reverse-mode differentiation does not work for lax.while_loop", or a bare
    AssertionError from Pallas; a third audit); the reference supports it."""
    x = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))

    def second(impl):
        inner = jax.grad(lambda x: scoremod.attention(x, x, x, mod="causal", implementation=impl).sum())
        return jax.grad(lambda x: inner(x).sum())(x)
    with pytest.raises(scoremod.ScoreModError, match=f"second derivatives .* the {impl} path"):
        second(impl)
    assert np.isfinite(np.asarray(second("reference"))).all()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_second_derivatives_through_a_tensor_parameter_say_so(impl):
    """The same through a float tensor the mod reads, q, k and v held constant (pallas gave
    a bare AssertionError: its guard covered q, k and v only; a third audit)."""
    q, k, v, t = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(1), 4), [(1, 16, 2, 16)] * 3 + [(1, 2, 16, 16)]))

    def second(impl):
        inner = jax.grad(lambda t: (scoremod.attention(q, k, v, mod="causal + bias(t)", t=t,
                                                       implementation=impl) ** 2).sum())
        return jax.grad(lambda t: (inner(t) ** 2).sum())(t)
    with pytest.raises(scoremod.ScoreModError, match=f"second derivatives .* the {impl} path"):
        second(impl)
    assert np.isfinite(np.asarray(second("reference"))).all()
