"""TileProgram (what kernels evaluate on one tile) against the independent evaluator,
on generated sources, shapes, offsets and random tile rectangles; gather reads (tables
read at computed indices) through a TableLookup as the Pallas kernel feeds them."""

import numpy as np
import pytest
import jax.numpy as jnp
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import scoremod
from scoremod.compiler.tile import TableLookup, TileProgram

from evaluator import evaluate_logits, evaluate_expr
from strategies import gather_sources, shapes, sources


def _positions(offset, B, n):
    return np.asarray(offset, np.int32).reshape(-1, 1) * np.ones((B, 1), np.int32) + np.arange(n, dtype=np.int32)


def _tile_case(draw_source, shape, seed, rect):
    mod = scoremod.compile(draw_source.text)
    rng = np.random.default_rng(seed)
    tensors = draw_source.make_tensors(shape, rng)
    ranks = {name: np.ndim(value) for name, value in tensors.items()}
    prog = TileProgram.build(mod.canonical, ranks)
    ok, _ = prog.kernel_support(gathers=True)
    return mod, tensors, prog, ok


@settings(max_examples=25)
@given(src=st.one_of(sources(), gather_sources()), shape=shapes(max_seq=12), seed=st.integers(0, 2**16),
       data=st.data())
def test_tile_logits_match_evaluator(src, shape, seed, data):
    B, N, T, S = shape.grid
    mod, tensors, prog, ok = _tile_case(src, shape, seed, None)
    assume(ok)
    q_pos = _positions(shape.q_offset, B, T)
    kv_pos = _positions(shape.kv_offset, B, S)
    scores = np.random.default_rng(seed + 1).normal(size=(B, N, T, S)) * 3
    expected = evaluate_logits(src.text, scores=scores, q_offset=shape.q_offset,
                               kv_offset=shape.kv_offset, tensors=tensors)
    reads = prog.materialize_reads({k: jnp.asarray(v) for k, v in tensors.items()}, B, N, q_pos, kv_pos)

    q0 = data.draw(st.integers(0, T - 1)); q1 = data.draw(st.integers(q0 + 1, T))
    k0 = data.draw(st.integers(0, S - 1)); k1 = data.draw(st.integers(k0 + 1, S))
    b = data.draw(st.integers(0, B - 1)); h = data.draw(st.integers(0, N - 1))

    def tile_of(spec, read):
        if spec.gather:   # the whole table; the program gathers from it
            flat = jnp.reshape(read, (-1,))
            return TableLookup(tuple(read.shape), lambda offsets: flat[offsets])
        bi = b if read.shape[0] > 1 else 0
        hi = h if read.shape[1] > 1 else 0
        r = read[bi, hi]
        r = r[q0:q1] if r.shape[0] > 1 else r
        return r[:, k0:k1] if r.shape[1] > 1 else r

    tiles = [tile_of(spec, r) for spec, r in zip(prog.reads, reads)]
    args = dict(b=jnp.int32(b), h=jnp.int32(h), q=jnp.asarray(q_pos[b, q0:q1, None]),
                kv=jnp.asarray(kv_pos[b, None, k0:k1]), reads=tiles)
    tile_scores = jnp.asarray(scores[b, h, q0:q1, k0:k1], jnp.float32)
    got = np.asarray(prog.logits(tile_scores, **args), np.float64)
    want = expected[b, h, q0:q1, k0:k1]
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-4)

    mask = np.asarray(prog.mask(**args))
    assert mask.shape == got.shape
    # where the mask holds, the logit is T + B (finite unless the values overflow)
    assert np.all(np.isneginf(got[~mask]))


@settings(max_examples=25)
@given(src=sources(kind="transform", with_tensors=False), shape=shapes(max_seq=8, offsets=False),
       seed=st.integers(0, 2**16))
def test_tile_dscore_matches_finite_differences(src, shape, seed):
    B, N, T, S = shape.grid
    mod = scoremod.compile(src.text)
    assume(mod.canonical.transform is not None)
    prog = TileProgram.build(mod.canonical, {})
    scores = np.random.default_rng(seed).normal(size=(B, N, T, S)) * 2
    eps = 1e-4
    expr = str(mod.canonical.transform)
    at = lambda shift: evaluate_expr(expr, B, N, T, S, scores=scores + shift)  # noqa: E731
    up, mid, down = at(eps), at(0.0), at(-eps)
    forward, backward = (up - mid) / eps, (mid - down) / eps
    numeric = (up - down) / (2 * eps)
    # Compare only where the function is smooth around the point: a kink or a jump
    # (abs, clip, floor, %) between score - eps and score + eps makes the one-sided
    # differences disagree.
    smooth = np.isfinite(numeric) & (np.abs(forward - backward) <= 1e-3 * (1 + np.abs(numeric)))
    assert smooth.mean() > 0.5, "too few smooth points to test"
    q = jnp.arange(T, dtype=jnp.int32)[:, None]
    kv = jnp.arange(S, dtype=jnp.int32)[None, :]
    for b in range(B):
        for h in range(N):
            got = np.asarray(prog.dscore(jnp.asarray(scores[b, h], jnp.float32), b=jnp.int32(b),
                                         h=jnp.int32(h), q=q, kv=kv), np.float64)
            ok = smooth[b, h]
            np.testing.assert_allclose(got[ok], numeric[b, h][ok], rtol=1e-2, atol=1e-2,
                                       err_msg=src.text)


def test_only_gathering_kernels_take_computed_index_reads():
    # mosaic and the paged kernel ask kernel_support(); pallas asks kernel_support(gathers=True).
    prog = TileProgram.build(scoremod.compile("causal + relpos(t, 4)").canonical, {"t": 2})
    ok, why = prog.kernel_support()
    assert not ok and "computed positions" in why
    assert prog.kernel_support(gathers=True) == (True, "")
    by_score = TileProgram.build(scoremod.compile("t[clip(floor(score), 0, 7)] + score").canonical, {"t": 1})
    for gathers in (False, True):
        ok, why = by_score.kernel_support(gathers=gathers)
        assert not ok and "indexes by score" in why


def test_table_lookup_clips_like_the_xla_gather():
    table = jnp.arange(12.0).reshape(3, 4)
    lookup = TableLookup((3, 4), lambda offsets: jnp.reshape(table, (-1,))[offsets])
    rows = jnp.asarray([[-5], [0], [2], [9]])
    cols = jnp.asarray([[-1, 0, 3, 4, 100]])
    want = np.asarray(table)[np.clip(np.asarray(rows), 0, 2), np.clip(np.asarray(cols), 0, 3)]
    np.testing.assert_array_equal(np.asarray(lookup.gather([jnp.int32(7), rows, cols])), want)   # leading index ignored


@pytest.mark.parametrize("source, fixed", [
    ("score + relpos(t, 4)", 1),                       # t[h, clip(q - kv, -4, 4) + 4]
    ("score + t[1, h, q // 4]", 2),                    # a literal and h
    ("score + t[c[b], h, abs(q - kv) % 5]", 2),        # an int read of b
    ("score + t[abs(q - kv), h]", 0),                  # q - kv leads: the whole table
])
def test_gather_slices_and_offsets_make_the_gather_offsets(source, fixed):
    # The dQ kernel scatters a table's gradient to (slice, offset within it): slices over
    # the leading axes indexed by neither q nor kv (per program), offsets over the rest.
    # slice * slice size + offset must be the offset the forward gathers at.
    B, N, T, S = 2, 3, 9, 11
    shapes = {"t": (3, N, 12) if "t[1" in source or "c[b]" in source else (N, 9) if "relpos" in source else (20, N)}
    tensors = {"t": jnp.arange(np.prod(shapes["t"]), dtype=jnp.float32).reshape(shapes["t"]),
               "c": jnp.asarray([2, 0], jnp.int32)}
    tensors = {n: t for n, t in tensors.items() if f"{n}[" in source or (n == "t" and "relpos" in source)}
    prog = TileProgram.build(scoremod.compile(source).canonical, {n: t.ndim for n, t in tensors.items()})
    i = next(n for n, r in enumerate(prog.reads) if r.name == "t")
    assert prog.reads[i].fixed_axes == fixed
    q_pos, kv_pos = _positions(np.asarray([1, 4]), B, T), _positions(0, B, S)
    reads = prog.materialize_reads(tensors, B, N, q_pos, kv_pos)
    shapes_of = [tuple(np.shape(r)) for r in reads]
    slices = np.asarray(prog.gather_slices(i, reads, shapes_of, B, N))
    size = int(np.prod(shapes["t"][fixed:]))
    for b in range(B):
        for h in range(N):
            tiles = [TableLookup(tuple(np.shape(r)), lambda flat, r=r: jnp.reshape(r, (-1,))[flat]) if spec.gather
                     else r[b if r.shape[0] > 1 else 0, h if r.shape[1] > 1 else 0]
                     for spec, r in zip(prog.reads, reads)]
            args = dict(b=jnp.int32(b), h=jnp.int32(h), q=jnp.asarray(q_pos[b, :, None]), kv=jnp.asarray(kv_pos[b, None, :]))
            local = np.asarray(prog.gather_offsets(i, reads=tiles, **args))
            assert local.shape == (T, S) and local.min() >= 0 and local.max() < size
            # t holds its own offsets, so the values at score 0 (score + t[...]) are where
            # the forward gathers
            want = np.asarray(prog.values(jnp.zeros((T, S)), reads=tiles, **args))
            np.testing.assert_array_equal(slices[b, h] * size + local, want)


@settings(max_examples=12, suppress_health_check=[HealthCheck.filter_too_much])
@given(src=sources(), shape=shapes(max_seq=8), seed=st.integers(0, 2**16))
def test_tile_dread_matches_finite_differences(src, shape, seed):
    """``dread(i)`` (the symbolic d(T + B)/d read the kernels give float tables their
    gradients with) against central differences of the tile's values in that read."""
    B, N, T, S = shape.grid
    mod = scoremod.compile(src.text)
    rng = np.random.default_rng(seed)
    tensors = src.make_tensors(shape, rng)
    prog = TileProgram.build(mod.canonical, {name: np.ndim(value) for name, value in tensors.items()})
    ok, _ = prog.kernel_support(gathers=True)
    floats = [i for i, r in enumerate(prog.reads)
              if not r.gather and np.issubdtype(np.asarray(tensors[r.name]).dtype, np.floating)]
    assume(ok and floats)
    q_pos, kv_pos = _positions(shape.q_offset, B, T), _positions(shape.kv_offset, B, S)
    reads = prog.materialize_reads({k: jnp.asarray(v) for k, v in tensors.items()}, B, N, q_pos, kv_pos)
    scores = jnp.asarray(rng.normal(size=(T, S)) * 2, jnp.float32)
    b, h = B - 1, N - 1
    tiles = [TableLookup(tuple(r.shape), lambda flat, r=r: jnp.reshape(r, (-1,))[flat]) if spec.gather
             else r[b if r.shape[0] > 1 else 0, h if r.shape[1] > 1 else 0] for spec, r in zip(prog.reads, reads)]
    args = dict(b=jnp.int32(b), h=jnp.int32(h), q=jnp.asarray(q_pos[b, :, None]), kv=jnp.asarray(kv_pos[b, None, :]))
    eps = 1e-3
    for i in floats:
        def values(shift):
            shifted = list(tiles)
            shifted[i] = jnp.broadcast_to(tiles[i], (T, S)) + shift
            return np.asarray(jnp.broadcast_to(prog.values(scores, reads=shifted, **args), (T, S)), np.float64)
        up, mid, down = values(eps), values(0.0), values(-eps)
        numeric = (up - down) / (2 * eps)
        forward, backward = (up - mid) / eps, (mid - down) / eps
        smooth = np.isfinite(numeric) & (np.abs(forward - backward) <= 1e-2 * (1 + np.abs(numeric)))
        full = [jnp.broadcast_to(t, (T, S)) if n == i else t for n, t in enumerate(tiles)]
        got = np.asarray(prog.dread(i, scores, reads=full, **args), np.float64)
        assert got.shape == (T, S)
        np.testing.assert_allclose(got[smooth], numeric[smooth], rtol=2e-2, atol=2e-2, err_msg=f"{src.text} {i}")


def test_reads_along_q_or_kv_are_laid_out_per_batch_row_under_per_batch_offsets():
    # u[q] with query offsets [3, 8]: row 0 reads u[3..], row 1 reads u[8..] (a read that
    # does not mention b still varies with the batch row through its positions).
    prog = TileProgram.build(scoremod.compile("score + u[q] + w[kv]").canonical, {"u": 1, "w": 1})
    u, w = jnp.arange(20.0), 100 + jnp.arange(20.0)
    q_pos, kv_pos = _positions([3, 8], 2, 4), _positions([0, 5], 2, 6)
    per_batch = prog.materialize_reads({"u": u, "w": w}, 2, 1, q_pos, kv_pos)
    assert [r.shape for r in per_batch] == [(2, 1, 4, 1), (2, 1, 1, 6)]
    np.testing.assert_array_equal(per_batch[0][:, 0, :, 0], np.asarray(u)[q_pos])
    np.testing.assert_array_equal(per_batch[1][:, 0, 0, :], np.asarray(w)[kv_pos])
    shared = prog.materialize_reads({"u": u, "w": w}, 2, 1, q_pos, kv_pos, q_per_batch=False, kv_per_batch=False)
    assert [r.shape for r in shared] == [(1, 1, 4, 1), (1, 1, 1, 6)]
