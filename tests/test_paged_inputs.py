"""paged_attention's validation and dispatch: clear errors before any kernel runs.

Cheap tests: shapes and values are checked in Python, so none of these traces a kernel
(apart from the few that check a fallback or the jit behaviour, on the reference path).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import jax

from test_paged_attention import make_cache, oracle

from scoremod.errors import ScoreModError, ScoreModShapeError, ScoreModTensorError
from scoremod.runtime.paged import PagedBlockSizes, paged_attention, paged_attention_reference


@pytest.fixture(scope="module")
def cache():
    rng = np.random.default_rng(0)
    # B=2, T=3, N=4, K=2, H=16, 5 pages of 4 per sequence, a pool of 13 pages.
    return make_cache(rng, B=2, T=3, N=4, K=2, H=16, page_size=4, max_pages=5, lengths=[20, 7])


def _call(cache, **changes):
    q, kp, vp, tables, lengths = cache
    args = dict(q=q, k_pages=kp, v_pages=vp, block_tables=tables, lengths=lengths)
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return paged_attention(args["q"], args["k_pages"], args["v_pages"], args["block_tables"], args["lengths"],
                           implementation=kwargs.pop("implementation", "reference"), **kwargs)


def _bad_tables(cache):
    tables = cache[3].copy()
    tables[1, 1] = 13            # sequence 1 has length 7: pages 0 and 1 hold keys; the pool has 13 pages
    return tables


BAD = [
    ("q rank", lambda c: dict(q=c[0][0]), ScoreModShapeError, "q must have rank 4"),
    ("k_pages rank", lambda c: dict(k_pages=c[1][0]), ScoreModShapeError, "k_pages must have rank 4"),
    ("tables rank", lambda c: dict(block_tables=c[3][0]), ScoreModShapeError, "block_tables must have rank 2"),
    ("lengths rank", lambda c: dict(lengths=c[4][:, None]), ScoreModShapeError, "lengths must have rank 1"),
    ("k/v shapes", lambda c: dict(v_pages=c[2][:-1]), ScoreModShapeError, "same shape"),
    ("head dim", lambda c: dict(q=np.zeros((2, 3, 4, 8), np.float32)), ScoreModShapeError, "head dims differ"),
    ("N % K", lambda c: dict(q=np.zeros((2, 3, 3, 16), np.float32)), ScoreModShapeError, "multiple of key/value heads"),
    ("int q", lambda c: dict(q=c[0].astype(np.int32)), ScoreModShapeError, "q must be bfloat16, float16 or float32"),
    ("mixed dtypes", lambda c: dict(q=c[0].astype(np.float16)), ScoreModShapeError, "share one dtype"),
    ("float tables", lambda c: dict(block_tables=c[3].astype(np.float32)), ScoreModShapeError, "block_tables must be an int32"),
    ("float lengths", lambda c: dict(lengths=c[4].astype(np.float32)), ScoreModShapeError, "lengths must be an int32"),
    ("batch", lambda c: dict(block_tables=c[3][:1]), ScoreModShapeError, "block_tables has 1 rows but q has B=2"),
    ("lengths batch", lambda c: dict(lengths=c[4][:1]), ScoreModShapeError, "lengths must have shape [B]"),
    ("T > length", lambda c: dict(lengths=np.array([20, 2], np.int32)), ScoreModShapeError,
     "lengths[1]=2 is smaller than T=3"),
    ("capacity", lambda c: dict(lengths=np.array([21, 7], np.int32)), ScoreModShapeError,
     "exceeds the block table's capacity max_pages * page_size = 5 * 4 = 20"),
    ("table outside pool", lambda c: dict(block_tables=_bad_tables(c)), ScoreModShapeError,
     "block_tables[1, 1]=13 points outside the page pool [0, 13)"),
    ("int64 tables", lambda c: dict(block_tables=np.asarray(c[3], np.int64) + 2**32), ScoreModShapeError,
     "points outside the page pool [0, 13)"),
    ("int64 ids", lambda c: dict(mod="causal & doc(ids)", ids=np.full((2, 20), 2**40, np.int64)),
     ScoreModTensorError, "tensor parameter 'ids' holds 1099511627776, outside int32"),
    ("scale", lambda c: dict(scale="big"), ScoreModShapeError, "scale must be a real number"),
    ("implementation", lambda c: dict(implementation="cuda"), ScoreModError, "unknown implementation 'cuda'"),
    ("mod type", lambda c: dict(mod=3), ScoreModError, "mod must be a source string"),
    ("bad source", lambda c: dict(mod="causal & windw(4)"), ScoreModError, "unknown name 'windw'"),
    ("missing tensor", lambda c: dict(mod="causal & doc(ids)"), ScoreModTensorError, "missing tensor 'ids'"),
    ("extra tensor", lambda c: dict(mod="causal", ids=np.zeros(20, np.int32)), ScoreModTensorError,
     "unexpected tensor 'ids'"),
    ("short ids", lambda c: dict(mod="causal & doc(ids)", ids=np.zeros((2, 12), np.int32)), ScoreModTensorError,
     "[2, >=20]"),
    ("ids batch", lambda c: dict(mod="causal & doc(ids)", ids=np.zeros((3, 20), np.int32)), ScoreModTensorError,
     "[2, >=20]"),
    ("block sizes", lambda c: dict(block_sizes=(128, 2)), ScoreModError, "block_sizes must be a PagedBlockSizes"),
]


@pytest.mark.parametrize("name,change,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_before_running(cache, name, change, error, message):
    with pytest.raises(error) as info:
        _call(cache, **change(cache))
    assert message in str(info.value)
    assert isinstance(info.value, ScoreModError)


def test_unused_table_entries_may_hold_anything(cache):
    q, kp, vp, tables, lengths = cache
    tables = tables.copy()
    tables[1, 2:] = [-1, 10 ** 6, -7]          # sequence 1 (length 7) uses pages 0 and 1 only
    out = paged_attention(q, kp, vp, tables, lengths, mod="causal", implementation="reference")
    np.testing.assert_allclose(np.asarray(out), oracle(q, kp, vp, tables, lengths, "causal"), atol=1e-5, rtol=1e-5)


def test_under_jit_values_are_not_checked(cache):
    """Traced block tables are clipped into the pool and traced lengths are trusted (documented)."""
    q, kp, vp, tables, lengths = cache
    f = jax.jit(lambda t, l: paged_attention(q, kp, vp, t, l, mod="causal", implementation="reference"))
    out = f(_bad_tables(cache), lengths)
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()


def test_dispatch_falls_back_and_logs(cache, caplog):
    q, kp, vp, tables, lengths = cache
    rp = np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32)
    mod = "causal + relpos(rp, 3)"     # a gather read: the kernel cannot run it
    with pytest.raises(NotImplementedError, match="indexes by computed positions"):
        paged_attention(q, kp, vp, tables, lengths, mod=mod, implementation="pallas", rp=rp)
    with caplog.at_level(logging.INFO, logger="scoremod"):
        out = paged_attention(q, kp, vp, tables, lengths, mod=mod, implementation=("pallas", "xla"), rp=rp)
    assert "pallas cannot run" in caplog.text and "using xla" in caplog.text
    np.testing.assert_allclose(np.asarray(out), oracle(q, kp, vp, tables, lengths, mod, {"rp": rp}),
                               atol=1e-5, rtol=1e-5)


def test_kernel_shape_limits_fall_back(cache, caplog):
    q, kp, vp, tables, lengths = cache
    q, kp, vp = q[..., :12], kp[..., :12], vp[..., :12]      # head dim 12: not a power of 2
    with pytest.raises(NotImplementedError, match="power-of-2 head dim"):
        paged_attention(q, kp, vp, tables, lengths, implementation="pallas")
    with caplog.at_level(logging.INFO, logger="scoremod"):
        out = paged_attention(q, kp, vp, tables, lengths, implementation=["pallas", "reference"])
    assert "using reference" in caplog.text
    np.testing.assert_allclose(np.asarray(out), oracle(q, kp, vp, tables, lengths), atol=1e-5, rtol=1e-5)


def test_default_implementation_on_cpu_is_reference(cache, caplog):
    if jax.default_backend() == "gpu":
        pytest.skip("CPU default")
    q, kp, vp, tables, lengths = cache
    with caplog.at_level(logging.INFO, logger="scoremod"):
        paged_attention(q, kp, vp, tables, lengths, mod="causal")
    assert "using reference" in caplog.text


def test_default_on_a_gpu_tries_mosaic_for_chunked_prefill_only():
    """implementation=None on a GPU: from MOSAIC_PREFILL_TOKENS new tokens the Mosaic forward
    first (it declines off sm_90, falling through to pallas), decode on pallas."""
    from scoremod.runtime.paged import MOSAIC_PREFILL_TOKENS, _default_on_gpu
    assert _default_on_gpu(1) == _default_on_gpu(MOSAIC_PREFILL_TOKENS - 1) == ("pallas", "reference")
    assert _default_on_gpu(MOSAIC_PREFILL_TOKENS) == _default_on_gpu(4096) == ("mosaic", "pallas", "reference")


def test_reference_entry_scale_and_empty_query(cache):
    q, kp, vp, tables, lengths = cache
    out = paged_attention_reference(q, kp, vp, tables, lengths, mod="causal & window(5)", scale=0.5)
    np.testing.assert_allclose(np.asarray(out), oracle(q, kp, vp, tables, lengths, "causal & window(5)", scale=0.5),
                               atol=1e-5, rtol=1e-5)
    empty = paged_attention(q[:, :0], kp, vp, tables, lengths, implementation="reference")
    assert empty.shape == (2, 0, 4, 16)


def test_ids_by_absolute_position_rank_1_and_2(cache):
    q, kp, vp, tables, lengths = cache
    ids1 = np.repeat(np.arange(4), 5).astype(np.int32)          # [max_len]
    ids2 = np.stack([ids1, ids1[::-1]])                           # [B, max_len]
    for ids in (ids1, ids2):
        out = paged_attention(q, kp, vp, tables, lengths, mod="causal & doc(ids)", implementation="reference", ids=ids)
        want = oracle(q, kp, vp, tables, lengths, "causal & doc(ids)", {"ids": ids})
        np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)


def test_block_sizes_default():
    assert PagedBlockSizes.get_default() == PagedBlockSizes()


def test_split_count_fills_whole_waves():
    """Programs per (sequence, KV head): B*K*splits stays within programs_per_core per SM
    (rounded down), at least 1, at most one per step (or per min_chunks steps); num_splits
    overrides."""
    from scoremod.runtime.paged import _num_splits
    cores = int(getattr(jax.devices()[0], "core_count", 0) or 0) or 132
    bs = PagedBlockSizes(programs_per_core=4)
    for programs, steps in ((8, 2048), (64, 2048), (512, 512), (4096, 64), (3, 5)):
        n = _num_splits(bs, programs, steps)
        assert 1 <= n <= steps
        assert programs * n <= max(4 * cores, programs)
        assert n == steps or programs * (n + 1) > 4 * cores
    # The Mosaic decode kernel's rule: at least min_chunks steps per split (4 waves would give 66).
    assert _num_splits(bs, 8, 64, min_chunks=8) == 8 and _num_splits(bs, 8, 5, min_chunks=8) == 1
    # programs_per_core=None: the kernel's own default (16 waves for Triton, 2 items per SM
    # for the persistent Mosaic kernel); an explicit value overrides it.
    assert _num_splits(PagedBlockSizes(), 8, 2048) == 16 * cores // 8
    assert _num_splits(PagedBlockSizes(), 8, 2048, per_core=2) == 2 * cores // 8
    assert _num_splits(PagedBlockSizes(programs_per_core=4), 8, 2048, per_core=2) == 4 * cores // 8
    assert _num_splits(PagedBlockSizes(num_splits=7), 8, 100) == 7
    assert _num_splits(PagedBlockSizes(num_splits=700), 8, 100) == 100


@pytest.mark.parametrize("bad", [dict(block_kv=0), dict(num_splits=-1), dict(num_splits=0), dict(programs_per_core=0),
                                 dict(num_warps=2.5), dict(chunk_rows=0)])
def test_paged_block_sizes_must_be_positive(bad):
    with pytest.raises(ScoreModShapeError, match="must be"):
        PagedBlockSizes(**bad)


def test_pallas_no_sequences_no_gradient_no_compiled_cpu_kernel(cache):
    """Three user mistakes or edge cases that reached Pallas' internals (a third audit):
    no sequences (B=0) gives an empty output; jax.grad through the pallas kernel is a
    clear ScoreModError (it is forward only); interpret=False on the CPU says why."""
    q, kp, vp, tables, lengths = cache
    empty = paged_attention(q[:0], kp, vp, tables[:0], lengths[:0], mod="causal", implementation="pallas")
    assert empty.shape == (0,) + q.shape[1:]
    with pytest.raises(ScoreModError, match="forward only"):
        jax.grad(lambda q: paged_attention(q, kp, vp, tables, lengths, mod="causal",
                                           implementation="pallas").sum())(np.asarray(q, np.float32))
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError, match="interpret=False"):
            paged_attention(q, kp, vp, tables, lengths, mod="causal", implementation="pallas", interpret=False)
    # the reference stays differentiable
    g = jax.grad(lambda q: paged_attention(q, kp, vp, tables, lengths, mod="causal").sum())(np.asarray(q, np.float32))
    assert np.isfinite(np.asarray(g)).all()


def test_unused_entries_may_hold_any_marker_and_an_empty_table_is_refused(cache):
    """Entries past a length may hold an out-of-int32 "no page" marker (a uint32 0xFFFFFFFF,
    an int64 2**40: they were refused by a whole-table int32 check); one that holds keys may
    not. A table with no columns is a ScoreModShapeError also under jit (it was a raw
    TypeError from Pallas, or a NumPy reduction error from the reference; a fourth audit)."""
    q, kp, vp, tables, lengths = cache
    want = _call(cache, mod="causal")
    unused = np.arange(tables.shape[1])[None, :] >= -(-np.asarray(lengths)[:, None] // kp.shape[1])
    for dtype, marker in ((np.uint32, 0xFFFFFFFF), (np.int64, 2 ** 40)):
        marked = np.where(unused, marker, tables).astype(dtype)
        np.testing.assert_array_equal(np.asarray(_call(cache, block_tables=marked, mod="causal")), np.asarray(want))
        marked[1, 0] = marker          # sequence 1's first page holds keys
        with pytest.raises(ScoreModShapeError, match="outside the page pool"):
            _call(cache, block_tables=marked, mod="causal")
    empty = tables[:, :0]
    for impl in ("reference", "pallas"):
        with pytest.raises(ScoreModShapeError, match="no pages"):
            jax.jit(lambda q, t, n: paged_attention(q, kp, vp, t, n, mod="causal", implementation=impl))(
                q, empty, lengths)
