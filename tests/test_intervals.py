"""Interval analysis (compiler/intervals.py): sound for every mask, exact for prelude masks.

Every property compares block classes with the independent evaluator (tests/evaluator.py)
on the dense grid of small shapes: FULL blocks must be all true, EMPTY blocks all false,
and for prelude masks PARTIAL blocks must really be mixed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

import scoremod
from scoremod.compiler.intervals import (
    EMPTY, FULL, PARTIAL, BlockGrid, PositionBlocks, batch_head_dependence, classify_blocks, mask_truth,
    value_interval,
)
from scoremod.compiler.rewrite import simplify

from evaluator import evaluate_mask
from strategies import masks, prelude_masks, shapes

block_sizes = st.sampled_from([1, 2, 4, 8, 16])


def _grid(B, N, T, S, bq, bk, q_offset=0, kv_offset=0) -> BlockGrid:
    return BlockGrid(B, N, PositionBlocks(T, bq, q_offset), PositionBlocks(S, bk, kv_offset))


def block_truth(dense: np.ndarray, bq: int, bk: int):
    """(all_true, any_true) bool [B, N, nq, nk] of a dense mask bool [B, N, T, S], on valid positions only."""
    B, N, T, S = dense.shape
    nq, nk = -(-T // bq), -(-S // bk)
    padded_all = np.ones((B, N, nq * bq, nk * bk), bool)
    padded_any = np.zeros((B, N, nq * bq, nk * bk), bool)
    padded_all[:, :, :T, :S] = dense
    padded_any[:, :, :T, :S] = dense
    all_true = padded_all.reshape(B, N, nq, bq, nk, bk).all(axis=(3, 5))
    any_true = padded_any.reshape(B, N, nq, bq, nk, bk).any(axis=(3, 5))
    return all_true, any_true


def assert_sound(classes, dense, bq, bk, what=""):
    all_true, any_true = block_truth(dense, bq, bk)
    classes = np.broadcast_to(np.asarray(classes), all_true.shape)
    wrong_full = np.argwhere((classes == FULL) & ~all_true)
    wrong_empty = np.argwhere((classes == EMPTY) & any_true)
    assert not len(wrong_full), f"{what}: FULL blocks that are not all true at {wrong_full[:5].tolist()}"
    assert not len(wrong_empty), f"{what}: EMPTY blocks that are not all false at {wrong_empty[:5].tolist()}"


def assert_exact(classes, dense, bq, bk, what=""):
    assert_sound(classes, dense, bq, bk, what)
    all_true, any_true = block_truth(dense, bq, bk)
    classes = np.broadcast_to(np.asarray(classes), all_true.shape)
    not_mixed = np.argwhere((classes == PARTIAL) & (all_true | ~any_true))
    assert not len(not_mixed), f"{what}: PARTIAL blocks that are not mixed at {not_mixed[:5].tolist()}"


def _classify(text, shape, bq, bk, tensors, xp=np):
    mod = scoremod.compile(text)
    grid = _grid(shape.B, shape.N, shape.T, shape.S, bq, bk, shape.q_offset, shape.kv_offset)
    if xp is np:
        return classify_blocks(mod.canonical.mask, grid, tensors, np)
    # One compilation per example is cheaper than jax's op-by-op dispatch of every primitive.
    return np.asarray(jax.jit(lambda t: classify_blocks(mod.canonical.mask, grid, t, jnp))(tensors))


def _dense(text, shape, tensors):
    return evaluate_mask(text, *shape.grid, q_offset=shape.q_offset, kv_offset=shape.kv_offset, tensors=tensors)


# ---- properties ------------------------------------------------------------------------------

@given(prelude_masks(), shapes(max_seq=40), block_sizes, block_sizes, st.integers(0, 2**32 - 1))
def test_prelude_masks_are_exact(src, shape, bq, bk, seed):
    tensors = src.make_tensors(shape, np.random.default_rng(seed), sorted_ids=True)
    classes = _classify(src.text, shape, bq, bk, tensors)
    assert_exact(classes, _dense(src.text, shape, tensors), bq, bk, src.text)


@settings(max_examples=20)
@given(prelude_masks(), shapes(max_seq=40), block_sizes, block_sizes, st.integers(0, 2**32 - 1))
def test_prelude_masks_are_exact_with_jax(src, shape, bq, bk, seed):
    tensors = src.make_tensors(shape, np.random.default_rng(seed), sorted_ids=True)
    classes = _classify(src.text, shape, bq, bk, tensors, jnp)
    assert_exact(classes, _dense(src.text, shape, tensors), bq, bk, src.text)


@settings(max_examples=120)
@given(masks(), shapes(), block_sizes, block_sizes, st.integers(0, 2**32 - 1))
def test_generated_masks_are_sound(src, shape, bq, bk, seed):
    tensors = src.make_tensors(shape, np.random.default_rng(seed))
    classes = _classify(src.text, shape, bq, bk, tensors)
    assert_sound(classes, _dense(src.text, shape, tensors), bq, bk, src.text)


@settings(max_examples=20)
@given(masks(), shapes(), block_sizes, block_sizes, st.integers(0, 2**32 - 1))
def test_generated_masks_are_sound_with_jax(src, shape, bq, bk, seed):
    tensors = src.make_tensors(shape, np.random.default_rng(seed))
    classes = _classify(src.text, shape, bq, bk, tensors, jnp)
    assert_sound(classes, _dense(src.text, shape, tensors), bq, bk, src.text)


@given(st.sampled_from(["causal & window(5)", "causal & chunk(6)", "window(3, 2) & causal",
                        "causal | prefix(4)", "causal & sink(3)", "causal & dilated(2)"]),
       shapes(max_seq=40), block_sizes, st.integers(0, 2**32 - 1))
def test_common_combinations_are_sound(text, shape, block, seed):
    classes = _classify(text, shape, block, block, {})
    assert_sound(classes, _dense(text, shape, {}), block, block, text)


@given(shapes(max_seq=40), block_sizes, block_sizes, st.integers(0, 2**32 - 1), st.booleans())
def test_cross_document_refinement_is_sound_on_unsorted_ids(shape, bq, bk, seed, sorted_ids):
    rng = np.random.default_rng(seed)
    hi = max(np.max(shape.q_offset) + shape.T, np.max(shape.kv_offset) + shape.S)
    qids = rng.integers(0, 5, size=(shape.B, hi))
    kvids = rng.integers(0, 5, size=(shape.B, hi))
    if sorted_ids:
        qids, kvids = np.sort(qids, -1), np.sort(kvids, -1)
    tensors = {"qids": qids, "kvids": kvids}
    text = "doc(qids, kvids)"
    classes = _classify(text, shape, bq, bk, tensors)
    check = assert_exact if sorted_ids else assert_sound
    check(classes, _dense(text, shape, tensors), bq, bk, text)


# ---- hand-written cases ------------------------------------------------------------------------

def test_causal_on_ragged_blocks():
    mask = scoremod.compile("causal").canonical.mask
    classes = classify_blocks(mask, _grid(1, 1, 10, 10, 4, 4), {}, np)
    assert classes.tolist() == [[[[1, 0, 0], [2, 1, 0], [2, 2, 1]]]]
    # q starts at 4 (decode-style offset): the diagonal moves one block to the right.
    classes = classify_blocks(mask, _grid(1, 1, 6, 10, 4, 4, q_offset=4), {}, np)
    assert classes.tolist() == [[[[2, 1, 0], [2, 2, 1]]]]


def test_ragged_last_block_counts_only_valid_positions():
    # kv < 9 holds on every valid key of the last block (keys 8..8), so it is FULL.
    mask = scoremod.compile("kv < 9").canonical.mask
    classes = classify_blocks(mask, _grid(1, 1, 4, 9, 4, 4), {}, np)
    assert classes.tolist() == [[[[2, 2, 2]]]]


def test_tensor_ranks_align_right_and_size_one_broadcasts():
    mask = scoremod.compile("doc(ids)").canonical.mask
    ids = np.repeat([0, 1], 8)
    grid = _grid(2, 1, 16, 16, 8, 8)
    for value in (ids, ids[None, :], np.stack([ids, ids])):
        classes = classify_blocks(mask, grid, {"ids": value}, np)
        assert classes.shape == ((2, 1, 2, 2) if value.shape[0] == 2 and value.ndim == 2 else (1, 1, 2, 2))
        assert classes[0, 0].tolist() == [[2, 0], [0, 2]]


def test_per_batch_tensors_and_offsets():
    mask = scoremod.compile("prefix(n)").canonical.mask
    classes = classify_blocks(mask, _grid(2, 1, 4, 16, 4, 4), {"n": np.array([4, 10])}, np)
    assert classes.tolist() == [[[[2, 0, 0, 0]]], [[[2, 2, 1, 0]]]]
    causal = scoremod.compile("causal").canonical.mask
    classes = classify_blocks(causal, _grid(2, 1, 4, 8, 4, 4, q_offset=np.array([0, 4])), {}, np)
    assert classes.tolist() == [[[[1, 0]]], [[[2, 1]]]]


def test_nan_in_a_float_tensor_gives_partial():
    mask = scoremod.compile("t[kv] < 0.5").canonical.mask
    t = np.array([0.0, 0.0, np.nan, 0.0, 1.0, 1.0, 1.0, 1.0])
    classes = classify_blocks(mask, _grid(1, 1, 4, 8, 4, 4), {"t": t}, np)
    assert classes.tolist() == [[[[1, 1]]]]
    classes = classify_blocks(mask, _grid(1, 1, 4, 8, 4, 4), {"t": np.nan_to_num(t)}, np)
    assert classes.tolist() == [[[[2, 0]]]]


@pytest.mark.parametrize("xp", [np, jnp])
def test_int32_overflow_is_never_trusted(xp):
    # q * 2**30 overflows int32 for q >= 2: the analysis must not claim FULL or EMPTY there.
    mask = scoremod.compile("q * 1073741824 > 0").canonical.mask
    classes = np.asarray(classify_blocks(mask, _grid(1, 1, 8, 4, 1, 4), {}, xp))
    assert classes[0, 0, :2, 0].tolist() == [0, 2]
    assert set(classes[0, 0, 2:, 0].tolist()) == {PARTIAL}


def test_division_by_an_interval_holding_zero_is_unknown():
    mask = scoremod.compile("10 // (kv - 3) > 100").canonical.mask
    classes = classify_blocks(mask, _grid(1, 1, 1, 8, 1, 4), {}, np)
    assert classes.tolist() == [[[[1, 0]]]]


def test_reals_are_widened_but_tight_on_simple_bounds():
    iv = value_interval(scoremod.compile("exp(q / 4.0) > 0").canonical.mask.lhs, _grid(1, 1, 8, 1, 8, 1), {}, np)
    assert iv.lo[0, 0, 0, 0] <= 1.0 <= iv.lo[0, 0, 0, 0] + 1e-5
    assert iv.hi[0, 0, 0, 0] >= np.exp(7 / 4.0)


def test_truth_keeps_python_bools_for_constants():
    truth = mask_truth(scoremod.compile("true").canonical.mask, _grid(1, 1, 4, 4, 4, 4))
    assert truth.may_true is True and truth.may_false is False


def test_batch_head_dependence():
    def dep(text, shapes=None, **kw):
        return batch_head_dependence(scoremod.compile(text).canonical.mask, shapes or {}, **kw)
    assert dep("causal") == (False, False)
    assert dep("causal", q_per_batch=True) == (True, False)
    assert dep("sink(3)", q_per_batch=True) == (False, False)
    assert dep("doc(ids)", {"ids": (64,)}) == (False, False)
    assert dep("doc(ids)", {"ids": (1, 64)}) == (False, False)
    assert dep("doc(ids)", {"ids": (2, 64)}) == (True, False)
    assert dep("doc(ids)", {"ids": (64,)}, kv_per_batch=True) == (True, False)
    assert dep("prefix(n)", {"n": ()}) == (False, False)
    assert dep("prefix(n)", {"n": (3,)}) == (True, False)
    assert dep("h < 2 & causal") == (False, True)
    assert dep("t[h, q - kv] > 0", {"t": (4, 9)}) == (False, True)


def test_large_grid_is_classified_in_slices_without_a_dense_mask():
    # 2**16 tokens with blocks of 64: a 1024 x 1024 grid, classified slice by slice.
    T = 1 << 16
    ids = np.repeat(np.arange(16), T // 16)
    mask = scoremod.compile("causal & doc(ids)").canonical.mask
    classes = classify_blocks(simplify(mask), _grid(1, 1, T, T, 64, 64), {"ids": ids}, np)
    nq = T // 64
    per_doc = nq // 16
    expected_full_per_doc = per_doc * (per_doc - 1) // 2
    assert classes.shape == (1, 1, nq, nq)
    assert int((classes == FULL).sum()) == 16 * expected_full_per_doc
    assert int((classes == PARTIAL).sum()) == nq


# ---- sound for the arithmetic kernels run (float32), not only for float64 -------------------

def _float32_mask(source, B, N, T, S, q_offset=0, kv_offset=0):
    """The mask as the kernels compute it: the Mod's jnp mask_mod, float32 reals, int32 ints."""
    mm = scoremod.compile(source).mask_mod()
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(N, dtype=jnp.int32)[None, :, None, None]
    q = (q_offset + jnp.arange(T, dtype=jnp.int32))[None, None, :, None]
    kv = (kv_offset + jnp.arange(S, dtype=jnp.int32))[None, None, None, :]
    # jitted as the kernels run it (one compilation, not one per op); the indices are
    # arguments, so XLA compiles the arithmetic rather than folding it as constants
    return np.broadcast_to(np.asarray(jax.jit(mm)(b, h, q, kv)), (B, N, T, S))


@pytest.mark.parametrize("source, q_offset", [
    ("exp(q) * 0.1 >= 1e38", 82),        # exp overflows float32 at 88.7: inf * 0.1 >= 1e38
    ("q * 1e38 >= 3e38", 0),             # q * 1e38 is inf in float32 from q = 4
    ("exp(-q) > 0", 80),                 # underflows to 0 in float32 from q = 104
    ("kv * 0.3 >= 0.9 * (q - q + 1)", 0),   # 0.3 and 0.9 are not float32 numbers
    ("exp2(q) - exp2(q) >= 0", 120),     # inf - inf is NaN in float32
    ("1 / exp(q) > 0", 70),
])
def test_plans_are_sound_for_float32_arithmetic(source, q_offset):
    B, N, T, S = 1, 1, 64, 64
    dense = _float32_mask(source, B, N, T, S, q_offset=q_offset)
    for bq, bk in ((8, 8), (16, 32), (64, 64)):
        classes = classify_blocks(simplify(scoremod.compile(source).canonical.mask),
                                  _grid(B, N, T, S, bq, bk, q_offset))
        assert_sound(classes, dense, bq, bk, f"{source} q_offset={q_offset}")


@settings(max_examples=40, deadline=None)
@given(src=masks(with_tensors=False), shape=shapes(max_seq=40), bq=block_sizes, bk=block_sizes,
       big=st.integers(0, 3))
def test_generated_plans_are_sound_for_float32_arithmetic(src, shape, bq, bk, big):
    # Large offsets push reals toward float32's range, where float64 and float32 part ways.
    q_offset = [0, 80, 1000, 2**20][big]
    dense = _float32_mask(src.text, shape.B, shape.N, shape.T, shape.S, q_offset=q_offset)
    classes = classify_blocks(simplify(scoremod.compile(src.text).canonical.mask),
                              _grid(shape.B, shape.N, shape.T, shape.S, bq, bk, q_offset))
    assert_sound(classes, dense, bq, bk, src.text)
