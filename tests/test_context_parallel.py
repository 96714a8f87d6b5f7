"""Context parallelism (runtime/context_parallel.py, compiler/context_plan.py) on 8 CPU
devices (tests/conftest.py): the sharded call against the single-device reference on
generated mods and shapes, what the ring skips, balance, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import scoremod
from scoremod.compiler.context_plan import (ContextLayout, PairPlan, contiguous_layout, device_work, pair_plan,
                                            ring_schedule, zigzag_layout)
from scoremod.compiler.plan import EMPTY, build_plan
from scoremod.runtime import context_parallel as cp
from scoremod.runtime._dispatch import as_mod
from strategies import sources, tensors_for

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)")


def _mesh(devices: int, explicit: bool = False):
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh((devices,), ("sp",), axis_types=(kind,), devices=jax.devices()[:devices])


def _qkv(B, T, S, N, K, H, seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (B, T, N, H), jnp.float32).astype(dtype),
            jax.random.normal(k2, (B, S, K, H), jnp.float32).astype(dtype),
            jax.random.normal(k3, (B, S, K, H), jnp.float32).astype(dtype))


def _compare(mod, q, k, v, tensors, *, mesh, layout=None, implementation="reference", q_offset=0, kv_offset=0,
             atol=2e-5, strategy=None):
    """out, lse and (dq, dk, dv) of the sharded call against the single-device reference."""
    def run(**kw):
        # One jitted program for the forward and backward of each side: the same call as
        # eagerly (mod, tensors and offsets stay concrete, closed over), without compiling
        # every op of the reference and the plan builder one by one.
        @jax.jit
        def forward_backward(q, k, v):
            def f(q, k, v):
                return scoremod.attention(q, k, v, mod=mod, q_offset=q_offset, kv_offset=kv_offset, return_lse=True,
                                          **kw, **tensors)
            (out, lse), pullback = jax.vjp(f, q, k, v)
            # the cotangents of sum(out * w) + sum(finite lse): one forward and backward each
            w = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
            return out, lse, pullback((w, jnp.where(jnp.isneginf(lse), 0.0, 1.0)))
        return forward_backward(q, k, v)

    out, lse, got = run(implementation=implementation, mesh=mesh, context_axis="sp", context_layout=layout,
                        context_strategy=strategy)
    want_out, want_lse, want = run(implementation="reference")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32), atol=atol)
    assert (np.isneginf(lse) == np.isneginf(want_lse)).all()
    finite = ~np.isneginf(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], atol=atol)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=10 * atol,
                                   err_msg=name)


@settings(max_examples=5)
@given(src=sources(), devices=st.sampled_from([2, 4, 8]), layout=st.sampled_from([None, "contiguous", "zigzag", "balanced"]),
       chunk=st.integers(1, 3), heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]), batch=st.integers(1, 2),
       offsets=st.sampled_from([(0, 0), (5, 0), (0, 3)]), seed=st.integers(0, 2**16))
def test_sharded_matches_single_device(src, devices, layout, chunk, heads, batch, offsets, seed):
    T = S = 2 * devices * chunk * 2
    N, K = heads
    rng = np.random.default_rng(seed)
    q_offset, kv_offset = offsets
    tensors = tensors_for(src.text, batch, N, T, S, rng, q_offset=q_offset, kv_offset=kv_offset)
    q, k, v = _qkv(batch, T, S, N, K, 8, seed)
    _compare(src.text, q, k, v, tensors, mesh=_mesh(devices), layout=layout, q_offset=q_offset,
             kv_offset=kv_offset)


@pytest.mark.parametrize("mod, layout", [("causal & doc(ids)", "contiguous"), ("causal & window(5)", None),
                                         ("kv >= 20 & causal", "contiguous")])
def test_xla_as_the_local_kernel(mod, layout):
    # GQA, documents (a plan from tensor values), rows with no allowed key (kv >= 20).
    q, k, v = _qkv(2, 32, 32, 4, 2, 16)
    ids = np.sort(np.random.default_rng(0).integers(0, 4, (2, 32)), axis=1).astype(np.int32)
    tensors = {"ids": ids} if "ids" in mod else {}
    _compare(mod, q, k, v, tensors, mesh=_mesh(4), layout=layout, implementation="xla", atol=2e-5)


def test_a_layout_of_ones_own():
    q, k, v = _qkv(1, 32, 32, 2, 2, 8)
    layout = ContextLayout("contiguous", ((3,), (2,), (1,), (0,)))   # the name does not matter, the chunks do
    _compare("causal & window(9)", q, k, v, {}, mesh=_mesh(4), layout=layout)


def test_a_layout_of_lists_or_numpy_rows():
    """Rows given as lists or NumPy rows are taken as tuples of ints (they reached jax.jit as
    unhashable static arguments: a raw ValueError; a fourth audit); other entries are refused."""
    q, k, v = _qkv(1, 32, 32, 2, 2, 8)
    pairs = ((0, 4), (1, 5), (2, 6), (3, 7))
    for chunks in ([0, 4], [1, 5], [2, 6], [3, 7]), tuple(np.array(pairs)):
        layout = ContextLayout("pairs", chunks)
        assert layout.chunks == pairs and hash(layout) == hash(ContextLayout("pairs", pairs))
        _compare("causal", q, k, v, {}, mesh=_mesh(4), layout=layout, implementation="xla", atol=2e-5)
    for bad in ((("a",), ("b",)), ((0.0,), (1.0,)), ((True,), (False,))):
        with pytest.raises(scoremod.ScoreModShapeError, match="int chunk indices"):
            ContextLayout("bad", bad)


@pytest.mark.parametrize("T, S", [(32, 0), (0, 32)])
def test_no_queries_or_no_keys_as_on_one_device(T, S):
    """T or S = 0 gives zeros and lse -inf, as the single-device call (it was a
    ScoreModShapeError "kv_len=0 must be a positive int"; a fourth audit)."""
    q, k, v = _qkv(1, T, S, 2, 2, 8)
    out, lse = scoremod.attention(q, k, v, mod="causal", mesh=_mesh(4), context_axis="sp", return_lse=True)
    want_out, want_lse = scoremod.attention(q, k, v, mod="causal", return_lse=True)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))


def test_explicit_mesh_under_set_mesh():
    mesh = _mesh(4, explicit=True)
    q, k, v = _qkv(1, 32, 32, 2, 2, 8)
    with jax.sharding.set_mesh(mesh):
        x = jax.device_put(q, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sp")))
        out = scoremod.attention(x, k, v, mod="causal", mesh=mesh, context_axis="sp", implementation="reference")
    want = scoremod.attention(q, k, v, mod="causal", implementation="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)


# ---- what the ring runs ---------------------------------------------------------------------

@pytest.mark.parametrize("mod", ["causal", "causal & window(12)", None, "kv >= 60", "q == kv"])
@pytest.mark.parametrize("layout", [contiguous_layout(4), zigzag_layout(4)])
def test_pairs_run_are_the_nonempty_pairs(mod, layout):
    """The schedule runs exactly the non-empty (q-chunk, kv-chunk) pairs, checked against
    the block plan classified at chunk granularity directly; the traced program has one
    pair call per scheduled (step, chunk, chunk) and one ppermute pair per shift s != 0."""
    T = 64
    m = as_mod(mod)
    plan = pair_plan(m, layout, q_len=T, kv_len=T)
    size = T // layout.num_chunks
    chunk_classes = np.asarray(build_plan(m, q_len=T, kv_len=T, block_q=size, block_kv=size).classes)[0, 0]
    schedule = ring_schedule(plan, layout)
    assert schedule.pairs_run() == int((chunk_classes != EMPTY).sum())

    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return scoremod.attention(*a, **kw)
    q, k, v = _qkv(1, T, T, 2, 2, 8)
    ring_args = dict(mod=m, mesh=_mesh(4), context_axis="sp", layout=layout, scale=0.5, q_offset=0, kv_offset=0,
                     implementation="reference", tensors={})
    text = str(jax.make_jaxpr(lambda q, k, v: cp.context_attention(counting, q, k, v, **ring_args))(q, k, v))
    runs = np.array(schedule.runs, bool)                      # [steps, P, a, b]
    assert len(calls) == int(runs.any(axis=1).sum())
    assert text.count("ppermute") == 2 * sum(1 for s in schedule.shifts if s)


def test_window_talks_to_neighbours_only():
    layout = contiguous_layout(8)
    plan = pair_plan(scoremod.compile("causal & window(100)"), layout, q_len=8 * 128, kv_len=8 * 128)
    assert ring_schedule(plan, layout).shifts == (0, 1)


def test_zigzag_balances_causal():
    """Busiest device over the mean of work (non-empty 128 x 128 blocks) at T = 128k on 8 devices."""
    T = 131072
    m = scoremod.compile("causal")
    zig, contig = zigzag_layout(8), contiguous_layout(8)
    balance = {}
    for layout in (zig, contig):
        blocks = device_work(pair_plan(m, layout, q_len=T, kv_len=T, max_block=128), layout)
        balance[layout.name] = blocks.max() / blocks.mean()
    assert balance["zigzag"] <= 1.05 < balance["contiguous"]
    assert cp.choose_layout(m, 8, q_len=T, kv_len=T, batch=1, heads=1, q_offset=0, kv_offset=0,
                            tensors={})[0].name == "zigzag"


def test_merge_partials_of_empty_rows_has_finite_gradients():
    o = jnp.ones((1, 2, 1, 3))
    lse = jnp.array([[[-jnp.inf], [0.0]]])

    def f(o1, l1):
        out, l = cp.merge_partials(o1, l1, jnp.zeros_like(o), jnp.full_like(lse, -jnp.inf))
        return out.sum() + jnp.where(jnp.isneginf(l), 0.0, l).sum()
    g = jax.grad(f, argnums=(0, 1))(o, lse)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)
    out, merged = cp.merge_partials(o, lse, 2 * o, lse)     # equal weights: the mean; lse + log 2
    np.testing.assert_allclose(np.asarray(out[0, 1]), 1.5)
    assert (np.asarray(out[0, 0]) == 0).all() and np.isneginf(merged[0, 0, 0])
    np.testing.assert_allclose(float(merged[0, 1, 0]), np.log(2.0), rtol=1e-6)


# ---- bad input ------------------------------------------------------------------------------

def test_bad_context_arguments():
    q, k, v = _qkv(1, 32, 32, 2, 2, 8)
    call = dict(mod="causal", implementation="reference")
    with pytest.raises(scoremod.ScoreModShapeError, match="not an axis of the mesh"):
        scoremod.attention(q, k, v, mesh=_mesh(4), context_axis="dp", **call)
    with pytest.raises(scoremod.ScoreModShapeError, match=r"needs context_axis= \(and mesh= for global arrays\)"):
        scoremod.attention(q, k, v, mesh=_mesh(4), **call)
    with pytest.raises(scoremod.ScoreModShapeError, match="must be a jax.sharding.Mesh"):
        scoremod.attention(q, k, v, mesh="sp", context_axis="sp", **call)
    with pytest.raises(scoremod.ScoreModShapeError, match="q_len=30 must be a multiple of 8"):
        scoremod.attention(*_qkv(1, 30, 30, 2, 2, 8), mesh=_mesh(4), context_axis="sp", context_layout="zigzag",
                           **call)
    with pytest.raises(scoremod.ScoreModShapeError, match="is for 2 devices"):
        scoremod.attention(q, k, v, mesh=_mesh(4), context_axis="sp", context_layout=contiguous_layout(2), **call)
    with pytest.raises(scoremod.ScoreModShapeError, match="not one of"):
        scoremod.attention(q, k, v, mesh=_mesh(4), context_axis="sp", context_layout="ring", **call)
    with pytest.raises(scoremod.ScoreModShapeError, match="inside `with jax.set_mesh"):
        scoremod.attention(q, k, v, mesh=_mesh(4, explicit=True), context_axis="sp", **call)
    with pytest.raises(scoremod.ScoreModShapeError, match="chunk 1 is held twice"):
        ContextLayout("mine", ((0, 1), (1, 2)))
    with pytest.raises(scoremod.ScoreModTensorError):
        scoremod.attention(q, k, v, mod="doc(ids)", mesh=_mesh(4), context_axis="sp", implementation="reference")


# ---- balanced layouts ---------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(devices=st.integers(1, 5), per=st.integers(1, 5), seed=st.integers(0, 2**16), spread=st.sampled_from([3, 100]))
def test_balance_chunks_numpy_and_jax_agree_and_deal_every_chunk(devices, per, seed, spread):
    from scoremod.compiler.context_plan import balance_chunks
    w = np.random.default_rng(seed).integers(0, spread, devices * per)
    table = balance_chunks(w, devices)
    traced = np.asarray(jax.jit(balance_chunks, static_argnums=1)(jnp.asarray(w), devices))
    np.testing.assert_array_equal(table, traced)
    assert table.shape == (devices, per) and sorted(table.ravel()) == list(range(devices * per))
    assert (np.diff(table, axis=1) > 0).all()


def _documents(T, n, seed):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, T), n - 1, replace=False))
    return np.searchsorted(cuts, np.arange(T), side="right").astype(np.int32)[None]


@pytest.mark.parametrize("mod, seed", [("causal", 0), ("causal & doc(ids)", 0), ("causal & doc(ids)", 1)])
def test_balanced_layout_at_128k_on_8_devices(mod, seed):
    """Busiest device over the mean (non-empty 512 x 512 blocks) with the balanced layout,
    64 random-length documents; the contiguous layout's figure beside it."""
    T = 131072
    tensors = {"ids": _documents(T, 64, seed)} if "ids" in mod else {}
    layout = scoremod.context_layout(mod, 8, T, **tensors)
    assert layout.name == "balanced" and layout.chunks_per_device == 4
    m = scoremod.compile(mod)

    def balance(layout):
        plan = pair_plan(m, layout, q_len=T, kv_len=T, tensors=tensors)
        static = type(plan)(np.asarray(plan.blocks), plan.block_q, plan.block_kv, plan.q_chunk, plan.kv_chunk)
        work = device_work(static, ContextLayout(layout.name, tuple(map(tuple, np.asarray(layout.table())))))
        return work.max() / work.mean()
    assert balance(layout) <= 1.05 < balance(contiguous_layout(8))


@pytest.mark.parametrize("mod", ["causal & doc(ids)", "causal & window(7)"])
def test_balanced_layout_matches_single_device(mod):
    # documents: a layout computed from the ids inside the program; a window: a static one
    q, k, v = _qkv(2, 64, 64, 4, 2, 8, seed=3)
    ids = _documents(67, 5, 2).repeat(2, 0)          # positions run to 63 + 3
    tensors = {"ids": ids} if "ids" in mod else {}
    # the name (4 chunks per device) for the window; a layout object (2, fewer pairs to trace) for documents
    layout = scoremod.context_layout(mod, 4, 64, chunks_per_device=2, batch=2, q_offset=3, kv_offset=3,
                                     **tensors) if tensors else "balanced"
    _compare(mod, q, k, v, tensors, mesh=_mesh(4), layout=layout, q_offset=3, kv_offset=3)


def test_data_kept_in_layout_order_and_new_ids_do_not_recompile():
    mod, T, B = "causal & doc(ids)", 64, 2
    mesh = _mesh(4)
    q, k, v = _qkv(B, T, T, 2, 2, 8, seed=4)
    traces = []

    @jax.jit
    def step(q, k, v, ids):
        traces.append(1)
        layout = scoremod.context_layout(mod, 4, T, chunks_per_device=2, batch=B, ids=ids)
        order = layout.order(T)
        out = scoremod.attention(q[:, order], k[:, order], v[:, order], mod=mod, ids=ids, mesh=mesh,
                                 context_axis="sp", context_layout=layout.with_inputs_permuted(),
                                 implementation="reference")
        return out[:, layout.inverse_order(T)], layout.table()

    reference = jax.jit(lambda q, k, v, ids: scoremod.attention(q, k, v, mod=mod, ids=ids, implementation="reference"))
    tables = []
    for seed in (0, 1):
        ids = jnp.asarray(_documents(T, 4, seed).repeat(B, 0))
        out, table = step(q, k, v, ids)
        want = reference(q, k, v, ids)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
        tables.append(np.asarray(table))
    assert len(traces) == 1
    assert not np.array_equal(tables[0], tables[1])   # the layout followed the documents


def test_bad_balanced_layouts():
    with pytest.raises(scoremod.ScoreModShapeError, match="chunks_per_device must be a positive int"):
        scoremod.context_layout("causal", 4, 64, chunks_per_device=0)
    with pytest.raises(scoremod.ScoreModShapeError, match="must be a multiple of 16"):
        scoremod.context_layout("causal", 4, 60)
    with pytest.raises(scoremod.ScoreModTensorError):
        scoremod.context_layout("causal & doc(ids)", 4, 64)
    layout = scoremod.context_layout("causal", 2, 64)
    q, k, v = _qkv(1, 64, 64, 2, 2, 8)
    with pytest.raises(scoremod.ScoreModShapeError, match="layout is for 2 devices"):
        scoremod.attention(q, k, v, mod="causal", mesh=_mesh(4), context_axis="sp", context_layout=layout)
    with pytest.raises(scoremod.ScoreModShapeError, match="int array"):
        ContextLayout("mine", jnp.zeros((4,), jnp.float32))


@pytest.mark.parametrize("chunks, message", [
    ([[0, 1], [1, 2]], "chunk 1 is held twice \\(devices 0 and 1\\)"),
    ([[0, 1], [2, 4]], "device 1 holds chunk 4, outside 0..3"),
    ([[0, -1], [2, 3]], "device 0 holds chunk -1, outside 0..3"),
    ([[3, 2], [2, 3]], "chunk 2 is held twice"),
    (np.zeros((2, 0)), "hold no chunk"),
])
def test_a_concrete_chunk_table_must_hold_every_chunk_exactly_once(chunks, message):
    # A NumPy or concrete jax table is checked as tuples are (a wrong one gave wrong output silently).
    for table in (np.asarray(chunks, np.int32), jnp.asarray(chunks, jnp.int32), tuple(map(tuple, np.asarray(chunks, int)))):
        with pytest.raises(scoremod.ScoreModShapeError, match=message):
            ContextLayout("mine", table)


def test_good_chunk_tables_pass_and_a_traced_one_is_not_looked_at():
    for table in (np.array([[0, 3], [2, 1]], np.int32), jnp.array([[0, 3], [2, 1]], jnp.int32)):
        layout = ContextLayout("mine", table)
        np.testing.assert_array_equal(np.asarray(layout.order(8)), [0, 1, 6, 7, 4, 5, 2, 3])

    @jax.jit
    def order(table):   # inside jit the table's values are unknown: taken as it comes (documented)
        return ContextLayout("mine", table).order(8)
    np.testing.assert_array_equal(np.asarray(order(jnp.array([[0, 1], [1, 2]], jnp.int32))), [0, 1, 2, 3, 2, 3, 4, 5])



# ---- the all-gather strategy and local shards -----------------------------------------------------

@pytest.mark.parametrize("mod, layout, heads", [("causal & doc(ids)", None, (4, 2)), ("causal", "zigzag", (2, 2)),
                                                ("causal & doc(ids)", "balanced", (4, 1))])
def test_all_gather_strategy_matches_single_device(mod, layout, heads):
    N, K = heads
    q, k, v = _qkv(2, 64, 64, N, K, 8, seed=5)
    tensors = {"ids": _documents(64, 5, 3).repeat(2, 0)} if "ids" in mod else {}
    _compare(mod, q, k, v, tensors, mesh=_mesh(4), layout=layout, strategy="all_gather", q_offset=0)


def test_strategy_rule():
    """A ring where it skips steps (windows), an all-gather for GQA otherwise, else a ring;
    checked in the traced program (all_gather vs ppermute)."""
    def collectives(mod, N, K, **kw):
        q, k, v = _qkv(1, 64, 64, N, K, 8)
        f = lambda q, k, v: scoremod.attention(q, k, v, mod=mod, mesh=_mesh(4), context_axis="sp",  # noqa: E731
                                               implementation="reference", **kw)
        text = str(jax.make_jaxpr(f)(q, k, v))
        return ("all_gather" in text, "ppermute" in text)
    assert collectives("causal & window(4)", 4, 1) == (False, True)    # 2 of 4 ring steps: a ring
    assert collectives("causal", 4, 1) == (True, False)               # GQA, every step: gather
    assert collectives("causal", 2, 2) == (False, True)               # MHA: a ring
    assert collectives("causal", 2, 2, context_strategy="all_gather") == (True, False)
    with pytest.raises(scoremod.ScoreModShapeError, match="context_strategy must be"):
        collectives("causal", 2, 2, context_strategy="tree")


@pytest.mark.parametrize("layout, strategy, impl", [
    (None, None, "reference"), ("zigzag", "ring", "reference"), ("zigzag", "all_gather", "reference"),
    (None, None, "xla"), ("zigzag", "ring", "xla")])   # xla: its loops' carries once had the wrong type there
def test_local_shards_inside_shard_map(layout, strategy, impl):
    """attention(context_axis=) without mesh, inside the user's own shard_map: local shards
    of the data (in the layout's order) and global ids; out, lse and grads as one device."""
    mesh, T, B = _mesh(4), 64, 2
    mod = "causal & doc(ids)"
    q, k, v = _qkv(B, T, T, 4, 2, 8, seed=6)
    ids = jnp.asarray(_documents(T + 5, 4, 0).repeat(B, 0))
    order = (zigzag_layout(4) if layout == "zigzag" else contiguous_layout(4)).order(T)
    inverse = np.argsort(order)
    seq = jax.sharding.PartitionSpec(None, "sp")

    def sharded(q, k, v):
        def local(q, k, v, ids):
            return scoremod.attention(q, k, v, mod=mod, ids=ids, context_axis="sp", context_layout=layout,
                                      context_strategy=strategy, q_offset=5, kv_offset=5, return_lse=True,
                                      implementation=impl)
        out, lse = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, jax.sharding.PartitionSpec()),
                                 out_specs=(seq, seq))(q[:, order], k[:, order], v[:, order], ids)
        return out[:, inverse], lse[:, inverse]

    def single(q, k, v):
        return scoremod.attention(q, k, v, mod=mod, ids=ids, q_offset=5, kv_offset=5, return_lse=True,
                                  implementation="reference")
    def out_lse_grads(f):   # one jitted program per side: forward, and the gradients of a loss
        loss = lambda q, k, v: jnp.sum(f(q, k, v)[0] * jnp.cos(q))  # noqa: E731
        return jax.jit(lambda q, k, v: (*f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)
    out, lse, got = out_lse_grads(sharded)
    want_out, want_lse, want = out_lse_grads(single)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)


def test_plain_attention_inside_a_users_shard_map():
    """Data parallel: each device runs attention() (xla, the CPU default) on its own batch
    rows inside the user's shard_map, gradients included (the loops' constant initial
    carries met shards varying over the mesh axis: a raw while_loop TypeError; a third
    audit)."""
    mesh = _mesh(4)
    q, k, v = _qkv(4, 32, 32, 2, 2, 8, seed=3)
    rows = jax.sharding.PartitionSpec("sp")

    def run(q, k, v):
        return scoremod.attention(q, k, v, mod="causal & window(9)", implementation="xla")
    sharded = jax.shard_map(run, mesh=mesh, in_specs=(rows,) * 3, out_specs=rows)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(q))  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(sharded)(q, k, v)), np.asarray(run(q, k, v)), atol=2e-6)
    for a, b in zip(jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v),
                    jax.grad(loss(run), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_local_shards_need_an_enclosing_shard_map():
    q, k, v = _qkv(1, 16, 16, 2, 2, 8)
    with pytest.raises(scoremod.ScoreModShapeError, match="no enclosing shard_map binds it"):
        scoremod.attention(q, k, v, mod="causal", context_axis="sp")


@settings(max_examples=30, deadline=None)
@given(devices=st.sampled_from([2, 3, 4]), per=st.integers(1, 3), seed=st.integers(0, 2**16),
       density=st.sampled_from([0.05, 0.3]))
def test_shifts_needed_at_run_time_are_the_static_schedules_shifts(devices, per, seed, density):
    """The run-time twin (jax, for plans from tensor values) keeps exactly the shifts the
    static schedule keeps, for random pair plans and layouts."""
    from scoremod.compiler.context_plan import shifts_needed
    rng = np.random.default_rng(seed)
    C = devices * per
    blocks = (rng.random((1, 2, C, C)) < density).astype(np.int32)
    layout = ContextLayout("random", tuple(map(tuple, np.sort(rng.permutation(C).reshape(devices, per), axis=1))))
    plan = PairPlan(blocks, 1, 1, 1, 1)
    want = ring_schedule(plan, layout).shifts
    table = np.array(layout.chunks, np.int32)
    for got in (shifts_needed(blocks, table), np.asarray(jax.jit(shifts_needed)(blocks, table))):
        assert tuple(np.flatnonzero(got)) == want


def test_documents_send_only_the_shifts_some_device_needs():
    """A plan from ids keeps every shift in the program, each transfer under a cond on the
    run-time plan: two short documents per device need shift 0 only, and the result holds."""
    q, k, v = _qkv(1, 64, 64, 2, 2, 8, seed=8)
    ids = np.repeat(np.arange(8), 8)[None].astype(np.int32)          # 8 documents of 8: 2 per device
    f = lambda q, k, v: scoremod.attention(q, k, v, mod="causal & doc(ids)", ids=ids, mesh=_mesh(4),  # noqa: E731
                                           context_axis="sp", context_layout="contiguous",
                                           implementation="reference")
    text = str(jax.make_jaxpr(f)(q, k, v))
    assert text.count("ppermute") == 2 * 3 and text.count("cond[") >= 3
    _compare("causal & doc(ids)", q, k, v, {"ids": ids}, mesh=_mesh(4), layout="contiguous")
