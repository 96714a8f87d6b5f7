"""Block plans (compiler/plan.py) and tensor checks (compiler/tensors.py).

The layout is checked against a plain Python reading of the classes; plans against the
independent evaluator (sound, and exact for prelude masks); the jax builder for
no-recompilation under jit; sizes, offsets and tensors for clear errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import scoremod
from scoremod.compiler import plan as plan_module
from scoremod.compiler.plan import (
    EMPTY, FULL, MAX_GRID_CELLS, BlockPlan, build_plan, check_tensors, plan_from_classes, plan_grid_shape,
)
from scoremod.errors import ScoreModShapeError, ScoreModTensorError

from evaluator import evaluate_mask
from strategies import masks, prelude_masks, shapes
from test_intervals import assert_exact, assert_sound

block_sizes = st.sampled_from([1, 2, 4, 8, 16])


def reference_layout(classes: np.ndarray):
    """(kv_counts, kv_indices, kv_full) read off classes [B, H, n, m] with Python loops."""
    B, H, n, m = classes.shape
    counts = np.zeros((B, H, n), np.int32)
    indices = np.zeros((B, H, n, m), np.int32)
    full = np.zeros((B, H, n, m), np.int8)
    for b in range(B):
        for h in range(H):
            for i in range(n):
                listed = [j for j in range(m) if classes[b, h, i, j] != EMPTY]
                counts[b, h, i] = len(listed)
                padded = listed + [listed[-1] if listed else 0] * (m - len(listed))
                indices[b, h, i] = padded
                full[b, h, i, :len(listed)] = [classes[b, h, i, j] == FULL for j in listed]
    return counts, indices, full


def assert_layout(plan: BlockPlan):
    classes = np.asarray(plan.classes)
    for got, want in zip((plan.kv_counts, plan.kv_indices, plan.kv_full), reference_layout(classes)):
        np.testing.assert_array_equal(np.asarray(got), want)
    transposed = np.swapaxes(classes, -1, -2)
    for got, want in zip((plan.q_counts, plan.q_indices, plan.q_full), reference_layout(transposed)):
        np.testing.assert_array_equal(np.asarray(got), want)
    for name, dtype in (("classes", np.int8), ("kv_counts", np.int32), ("kv_indices", np.int32),
                        ("kv_full", np.int8), ("q_counts", np.int32), ("q_indices", np.int32), ("q_full", np.int8)):
        assert np.asarray(getattr(plan, name)).dtype == dtype, name


# ---- layout --------------------------------------------------------------------------------------

@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_layout_from_classes(B, H, n, m, seed):
    classes = np.random.default_rng(seed).integers(0, 3, size=(B, H, n, m)).astype(np.int8)
    assert_layout(plan_from_classes(classes, q_len=n * 4, kv_len=m * 4, block_q=4, block_kv=4))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 9, 4)])
def test_layout_from_classes_with_jax(shape):
    classes = np.random.default_rng(sum(shape)).integers(0, 3, size=shape).astype(np.int8)
    classes[..., 0, :] = EMPTY  # a row with no block
    build = jax.jit(lambda c: plan_from_classes(c, q_len=shape[2] * 4, kv_len=shape[3] * 4, block_q=4, block_kv=4))
    plan = build(jnp.asarray(classes))
    assert isinstance(plan.kv_indices, jax.Array)
    assert_layout(plan)


def test_layout_of_causal():
    plan = build_plan(scoremod.compile("causal"), q_len=12, kv_len=12, block_q=4, block_kv=4)
    assert plan.grid_shape == (1, 1, 3, 3)
    assert plan.kv_counts.tolist() == [[[1, 2, 3]]]
    assert plan.kv_indices.tolist() == [[[[0, 0, 0], [0, 1, 1], [0, 1, 2]]]]
    assert plan.kv_full.tolist() == [[[[0, 0, 0], [1, 0, 0], [1, 1, 0]]]]
    assert plan.q_counts.tolist() == [[[3, 2, 1]]]
    assert plan.q_indices.tolist() == [[[[0, 1, 2], [1, 2, 2], [2, 2, 2]]]]
    assert plan.q_full.tolist() == [[[[0, 1, 1], [0, 1, 0], [0, 0, 0]]]]
    assert plan.metadata_bytes == 4 * 3 + 5 * 9 + 4 * 3 + 5 * 9


def test_plan_is_a_pytree():
    plan = build_plan(scoremod.compile("causal"), q_len=8, kv_len=8, block_q=4, block_kv=4)
    leaves, tree = jax.tree_util.tree_flatten(plan)
    assert len(leaves) == 7
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert (again.block_q, again.q_len) == (4, 8)


# ---- plans against the evaluator ---------------------------------------------------------------

def _plan(src_text, shape, bq, bk, tensors):
    return build_plan(scoremod.compile(src_text), q_len=shape.T, kv_len=shape.S, block_q=bq, block_kv=bk,
                      batch=shape.B, heads=shape.N, q_offset=shape.q_offset, kv_offset=shape.kv_offset,
                      tensors=tensors)


def _dense(text, shape, tensors):
    return evaluate_mask(text, *shape.grid, q_offset=shape.q_offset, kv_offset=shape.kv_offset, tensors=tensors)


@settings(max_examples=15)
@given(masks(), shapes(), block_sizes, block_sizes, st.integers(0, 2**32 - 1))
def test_plans_are_sound(src, shape, bq, bk, seed):
    tensors = src.make_tensors(shape, np.random.default_rng(seed))
    plan = _plan(src.text, shape, bq, bk, tensors)
    assert_sound(np.asarray(plan.classes), _dense(src.text, shape, tensors), bq, bk, src.text)
    assert_layout(plan)


@settings(max_examples=15)
@given(prelude_masks(), shapes(max_seq=40), block_sizes, block_sizes, st.integers(0, 2**32 - 1))
def test_plans_are_exact_for_prelude_masks(src, shape, bq, bk, seed):
    tensors = src.make_tensors(shape, np.random.default_rng(seed), sorted_ids=True)
    plan = _plan(src.text, shape, bq, bk, tensors)
    assert_exact(np.asarray(plan.classes), _dense(src.text, shape, tensors), bq, bk, src.text)


# ---- static and jitted builders ------------------------------------------------------------------

def test_static_plans_are_numpy_cached_and_read_only():
    mod = scoremod.compile("causal & window(64)")
    kw = dict(q_len=1000, kv_len=1000, block_q=128, block_kv=128, batch=4, heads=8)
    first = build_plan(mod, **kw)
    assert build_plan(scoremod.compile("window(64) & causal"), **kw) is first  # keyed on the IR, not the text
    assert isinstance(first.classes, np.ndarray) and first.grid_shape == (1, 1, 8, 8)
    with pytest.raises(ValueError):
        first.kv_indices[0, 0, 0, 0] = 3
    assert build_plan(mod, **{**kw, "q_offset": 128}) is not first


def test_tensor_plans_are_jax_and_new_values_never_retrace():
    mod = scoremod.compile("causal & doc(ids)")
    kw = dict(q_len=64, kv_len=64, block_q=16, block_kv=16)
    ids_a = np.repeat([0, 1], 32)
    ids_b = np.repeat([0, 1, 2, 3], 16)
    before = plan_module.TRACE_COUNTS["jax_builder"]
    plan_a = build_plan(mod, tensors={"ids": ids_a}, **kw)
    plan_b = build_plan(mod, tensors={"ids": ids_b}, **kw)
    assert plan_module.TRACE_COUNTS["jax_builder"] == before + 1
    assert isinstance(plan_a.kv_counts, jax.Array)
    assert np.asarray(plan_a.kv_counts).tolist() == [[[1, 2, 1, 2]]]
    assert np.asarray(plan_b.kv_counts).tolist() == [[[1, 1, 1, 1]]]

    @jax.jit
    def counts(ids, q_offset):
        return build_plan(mod, tensors={"ids": ids}, q_offset=q_offset, **kw).kv_counts

    counts(jnp.asarray(ids_a), 0)
    traced = plan_module.TRACE_COUNTS["jax_builder"]
    assert np.asarray(counts(jnp.asarray(ids_b), 0)).tolist() == [[[1, 1, 1, 1]]]
    assert np.asarray(counts(jnp.asarray(ids_a), jnp.int32(16))).tolist() == [[[2, 1, 2, 2]]]
    assert plan_module.TRACE_COUNTS["jax_builder"] == traced


def test_array_offsets_use_the_jax_builder_and_give_per_batch_plans():
    plan = build_plan(scoremod.compile("causal"), q_len=4, kv_len=8, block_q=4, block_kv=4, batch=2,
                      q_offset=np.array([0, 4]))
    assert isinstance(plan.classes, jax.Array)
    assert np.asarray(plan.classes).tolist() == [[[[1, 0]]], [[[2, 1]]]]


def test_grid_shape_collapses_batch_and_heads():
    mod = scoremod.compile("causal & doc(ids)")
    kw = dict(q_len=64, kv_len=64, block_q=16, block_kv=16, batch=3, heads=5)
    assert plan_grid_shape(mod, **kw, tensors={"ids": np.zeros(64)}) == (1, 1, 4, 4)
    assert plan_grid_shape(mod, **kw, tensors={"ids": np.zeros((3, 64))}) == (3, 1, 4, 4)
    plan = build_plan(scoremod.compile("h < 2 & causal"), **kw)
    assert plan.grid_shape == (1, 5, 4, 4)


# ---- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(q_len=0), "q_len=0 must be a positive int"),
    (dict(kv_len=-3), "kv_len=-3 must be a positive int"),
    (dict(batch=0), "batch=0 must be a positive int"),
    (dict(heads=2.0), "heads=2.0 must be a positive int"),
    (dict(block_q=96), "block_q=96 must be a power of two"),
    (dict(block_kv=0), "block_kv=0 must be a positive int"),
    (dict(q_len=1 << 20, kv_len=1 << 20, block_q=16, block_kv=16), "cells, more than"),
    (dict(q_offset=np.array([1, 2, 3])), "q_offset must be an int or an int array of shape [2]"),
    (dict(kv_offset=np.array([0.5, 1.0])), "kv_offset must be an int or an int array"),
])
def test_bad_sizes_raise_shape_errors(kw, message):
    args = {**dict(q_len=64, kv_len=64, block_q=16, block_kv=16, batch=2, heads=2), **kw}
    with pytest.raises(ScoreModShapeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build_plan(scoremod.compile("causal"), **args)
    assert MAX_GRID_CELLS < (1 << 20) ** 2 // 256


def test_missing_mask_tensor_raises_a_tensor_error():
    with pytest.raises(ScoreModTensorError, match="missing tensor 'ids'"):
        build_plan(scoremod.compile("doc(ids)"), q_len=8, kv_len=8, block_q=4, block_kv=4)


# ---- check_tensors ---------------------------------------------------------------------------------

def _check(source, tensors, B=2, N=4, T=64, S=64, **kw):
    check_tensors(scoremod.compile(source), tensors, B, N, T, S, **kw)


@pytest.mark.parametrize("source, tensors", [
    ("causal & doc(ids)", {"ids": np.zeros(64, np.int32)}),
    ("causal & doc(ids)", {"ids": np.zeros((2, 64), np.int32)}),
    ("causal & doc(ids)", {"ids": np.zeros((1, 100), np.int64)}),
    ("doc(qids, kvids)", {"qids": np.zeros(64), "kvids": np.zeros((2, 64), np.float32)}),
    ("prefix(n) | causal", {"n": 5}),
    ("prefix(n) | causal", {"n": np.array([3, 9])}),
    ("window(w) & causal", {"w": np.int32(16)}),
    ("causal + relpos(t, 4)", {"t": np.zeros((4, 9), np.float32)}),
    ("bias(t)", {"t": np.zeros((2, 1, 64, 64))}),
    ("bias(t)", {"t": np.zeros((64,))}),
    ("t[b, h, 0] > 0", {"t": np.zeros((2, 4, 3), bool)}),
])
def test_good_tensors_pass(source, tensors):
    _check(source, tensors)


@pytest.mark.parametrize("source, tensors, kw, message", [
    ("causal & doc(ids)", {}, {}, r"missing tensor 'ids': the mod reads ids\[b, q\]; expected shape \[2, >=64\]"),
    ("causal & doc(ids)", {"ids": np.zeros(64), "idz": 1}, {}, r"(?s)unexpected tensor 'idz'.*did you mean 'ids'"),
    ("causal", {"w": 3}, {}, r"unexpected tensor 'w': the mod reads no tensors"),
    ("causal & doc(ids)", {"ids": np.zeros((2, 2, 64))}, {}, r"tensor 'ids' has rank 3 .* expected shape \[2, >=64\]"),
    ("causal & doc(ids)", {"ids": np.zeros(40)}, {}, r"axis 0 \(indexed by q\) has size 40, too short"),
    ("causal & doc(ids)", {"ids": np.zeros(64)}, {"q_offset": 8}, r"too short for query positions up to 71"),
    ("causal & doc(ids)", {"ids": np.zeros((3, 64))}, {}, r"axis 0 \(indexed by b\) has size 3, expected 2"),
    ("causal & doc(ids)", {"ids": np.array(["a"] * 64)}, {}, r"tensor 'ids' has dtype <U1; expected int, float"),
    ("causal & doc(ids)", {"ids": np.zeros((2, 0))}, {}, r"tensor 'ids' is empty"),
    ("causal + relpos(t, 4)", {"t": np.zeros((4, 5))}, {}, r"index clip\(q - kv, -4, 4\) \+ 4 ranges over \[0, 8\] "
                                                          r"but axis 1 has size 5; expected shape \[4, 9\]"),
    ("relpos(t, 4)", {"t": np.zeros((3, 9))}, {}, r"axis 0 \(indexed by h\) has size 3, expected 4"),
    ("t[b, 5] > 0", {"t": np.zeros((2, 3))}, {}, r"index 5 is out of range for axis 1 of size 3"),
    ("w > q", {"w": np.zeros(3)}, {}, r"tensor 'w' has rank 1 .* expected shape a scalar"),
])
def test_bad_tensors_name_the_parameter_and_the_expected_shape(source, tensors, kw, message):
    with pytest.raises(ScoreModTensorError, match=message):
        _check(source, tensors, **kw)


def test_check_tensors_under_jit_checks_shapes_only():
    mod = scoremod.compile("causal & doc(ids)")

    @jax.jit
    def f(ids, q_offset):
        check_tensors(mod, {"ids": ids}, 1, 1, 32, 32, q_offset=q_offset)
        return ids.sum()

    f(jnp.zeros(32, jnp.int32), jnp.int32(100))  # traced offset: lengths checked against T only
    with pytest.raises(ScoreModTensorError, match="too short"):
        f(jnp.zeros(16, jnp.int32), jnp.int32(0))


@settings(max_examples=30, deadline=None)   # the jax twin compiles once per shape
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=9), min_size=1, max_size=6).filter(
    lambda rows: len({len(r) for r in rows}) == 1), st.sampled_from([None, 1, 5, 12]), st.booleans())
def test_compact_rows_numpy_and_jax_match_a_loop(rows, chunk_cells, by_counting):
    # chunk_cells: NumPy compacts a slice of rows at a time; small slices test the seams.
    # by_counting: jax compacts short rows by counting, long ones by cumsum and scatter.
    import scoremod.compiler.plan_layout as layout
    from scoremod.compiler.plan import compact_rows
    saved_cells = layout.COUNTING_COMPACTION_CELLS
    layout.COUNTING_COMPACTION_CELLS = saved_cells if by_counting else 0
    if chunk_cells is not None:
        saved = layout.NUMPY_CHUNK_CELLS
        layout.NUMPY_CHUNK_CELLS = chunk_cells
    selected = np.array(rows, bool)
    want_counts, want = [], []
    for row in selected:
        listed = [i for i, s in enumerate(row) if s]
        want_counts.append(len(listed))
        want.append(listed + [listed[-1] if listed else 0] * (len(row) - len(listed)))
    try:
        for got_counts, got in (compact_rows(selected), compact_rows(jnp.asarray(selected))):
            np.testing.assert_array_equal(np.asarray(got_counts), want_counts)
            np.testing.assert_array_equal(np.asarray(got), want)
    finally:
        layout.COUNTING_COMPACTION_CELLS = saved_cells
        if chunk_cells is not None:
            layout.NUMPY_CHUNK_CELLS = saved


@pytest.mark.parametrize("kw", [dict(q_offset=2**31 - 10), dict(kv_offset=-(2**31) - 1),
                                dict(q_offset=np.array([0, 2**31 - 1], np.int64), batch=2)])
def test_plans_refuse_positions_past_int32(kw):
    # Kernels compute positions in int32: a plan proved in int64 for them would be wrong.
    kw = {"batch": 1, **kw}
    with pytest.raises(ScoreModShapeError, match="outside int32"):
        build_plan(scoremod.compile("causal"), q_len=64, kv_len=64, block_q=16, block_kv=16, **kw)
    with pytest.raises(ScoreModShapeError, match="outside int32"):
        scoremod.compile("causal").explain(64, **kw)


def test_explain_width_must_be_positive():
    with pytest.raises(ScoreModShapeError, match="width=0"):
        scoremod.compile("causal").explain(64, width=0)
