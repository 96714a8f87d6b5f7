"""paged_attention against an independent float64 oracle (Pallas in interpret mode on CPU).

The oracle builds dense K/V from the pages with NumPy, asks the independent evaluator
(tests/evaluator.py) for the mod's logits at the paged positions (query i of sequence b
at ``lengths[b] - T + i``), drops the keys past each length and takes a float64
softmax (rows with no allowed key give 0). Page skipping is checked twice: the
compacted page counts equal a brute-force count, and pages the walk must skip are
filled with NaN (so reading one would show). GPU cases are marked ``gpu``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

from evaluator import evaluate_logits, evaluate_mask
from strategies import diagonal_masks, prelude_masks, sources, tensors_for

from scoremod.compiler.mod import compile_mod
from scoremod.compiler.band import diagonal_band
from scoremod.compiler.page_walk import EMPTY, FULL, WalkPlan, compact_pages, page_classes, walk_pages
from scoremod.errors import ScoreModShapeError
from scoremod.runtime.paged import PagedBlockSizes, paged_attention, _program
from scoremod.runtime.sinks import add_sinks

ON_GPU = jax.default_backend() == "gpu"


def make_cache(rng, *, B=3, T=1, N=8, K=2, H=16, page_size=4, max_pages=6, pool=None, lengths=None,
               dtype=np.float32):
    """Random q, page pool, shuffled block tables (-1 past each length) and ragged lengths."""
    pool = pool or B * max_pages + 3
    if lengths is None:
        lengths = rng.integers(T, max_pages * page_size + 1, size=B)
        lengths[0] = max_pages * page_size          # one sequence fills its table
    lengths = np.asarray(lengths, np.int32)
    q = rng.standard_normal((B, T, N, H)).astype(dtype)
    k_pages = rng.standard_normal((pool, page_size, K, H)).astype(dtype)
    v_pages = rng.standard_normal((pool, page_size, K, H)).astype(dtype)
    tables = rng.permutation(pool)[:B * max_pages].reshape(B, max_pages).astype(np.int32)
    used = np.arange(max_pages)[None, :] < -(-lengths[:, None] // page_size)
    tables = np.where(used, tables, -1).astype(np.int32)
    return q, k_pages, v_pages, tables, lengths


def poison_unread_slots(k_pages, v_pages, tables, lengths):
    """Copies of the pools with NaN in every page no sequence uses and in every slot past a
    sequence's length (a kernel that read one would show it)."""
    k_pages, v_pages = np.array(k_pages), np.array(v_pages)
    page_size = k_pages.shape[1]
    used = np.zeros(k_pages.shape[0], bool)
    used[tables[tables >= 0]] = True
    k_pages[~used], v_pages[~used] = np.nan, np.nan
    for b, length in enumerate(lengths):
        j, tail = divmod(int(length), page_size)
        if tail:
            k_pages[tables[b, j], tail:] = np.nan
            v_pages[tables[b, j], tail:] = np.nan
    return k_pages, v_pages


def dense_kv(k_pages, v_pages, tables):
    """[B, max_pages * page_size, K, H] float64 K and V in position order."""
    P, ps, K, H = k_pages.shape
    B, max_pages = tables.shape
    idx = np.clip(tables, 0, P - 1)
    k = np.asarray(k_pages, np.float64)[idx].reshape(B, max_pages * ps, K, H)
    v = np.asarray(v_pages, np.float64)[idx].reshape(B, max_pages * ps, K, H)
    return k, v


def oracle(q, k_pages, v_pages, tables, lengths, source=None, tensors=None, scale=None, sinks=None):
    """float64 [B, T, N, H]; ``sinks [N]``: one more logit per row and head that carries no value."""
    q = np.asarray(q, np.float64)
    B, T, N, H = q.shape
    K = k_pages.shape[2]
    k, v = dense_kv(k_pages, v_pages, tables)
    S = k.shape[1]
    lengths = np.asarray(lengths)
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    G = N // K
    k = np.repeat(k, G, axis=2)
    v = np.repeat(v, G, axis=2)
    scores = scale * np.einsum("btnh,bsnh->bnts", q, k)
    logits = scores if source is None else evaluate_logits(source, scores=scores, q_offset=lengths - T,
                                                           tensors=tensors or {})
    exists = np.arange(S)[None, :] < lengths[:, None]
    logits = np.where(exists[:, None, None, :], logits, -np.inf)
    v = np.where(exists[:, :, None, None], v, 0.0)
    if sinks is not None:
        column = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], logits.shape[:3] + (1,))
        logits = np.concatenate([logits, column], axis=-1)
        v = np.concatenate([v, np.zeros((B, 1) + v.shape[2:])], axis=1)
    m = logits.max(-1, keepdims=True)
    empty = m == -np.inf
    with np.errstate(invalid="ignore", under="ignore"):
        p = np.where(empty, 0.0, np.exp(logits - np.where(empty, 0.0, m)))
    l = p.sum(-1, keepdims=True)
    p = p / np.where(l > 0, l, 1.0)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("source,T,N,K,splits", [("causal & window(6)", 3, 4, 4, 1), ("causal & doc(ids)", 3, 4, 1, 2),
                                                 (None, 1, 8, 2, None), ("false", 1, 4, 2, None)])
def test_sinks_match_oracle(source, T, N, K, splits):
    rng = np.random.default_rng(_seed("sinks", source, T, N, K))
    B, ps, max_pages = 3, 4, 6
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, page_size=ps, max_pages=max_pages)
    tensors = _tensors(source, B, N, T, max_pages * ps, lengths, rng)
    sinks = (2 * rng.standard_normal(N)).astype(np.float32)
    want = oracle(q, kp, vp, tables, lengths, source, tensors, sinks=sinks)
    for impl in ("pallas", "reference"):
        out = paged_attention(q, kp, vp, tables, lengths, mod=source, implementation=impl, sinks=sinks,
                              block_sizes=PagedBlockSizes(block_kv=8, num_splits=splits), **tensors)
        np.testing.assert_allclose(np.asarray(out), want, atol=3e-5, rtol=3e-5, err_msg=impl)
    with pytest.raises(ScoreModShapeError, match="sinks must have shape"):
        paged_attention(q, kp, vp, tables, lengths, mod=source, sinks=sinks[:-1], **tensors)


def nonempty_pages(source, lengths, T, N, page_size, max_pages, tensors=None):
    """bool[B, max_pages] by brute force: some (head, query) may attend some existing key."""
    lengths = np.asarray(lengths)
    B = len(lengths)
    S = max_pages * page_size
    allowed = evaluate_mask(source, B, N, T, S, q_offset=lengths - T, tensors=tensors or {})
    allowed &= (np.arange(S)[None, :] < lengths[:, None])[:, None, None, :]
    return allowed.reshape(B, N * T, max_pages, page_size).any(axis=(1, 3))


def _tensors(source, B, N, T, S, lengths, rng):
    if source is None:
        return {}
    return {k: np.asarray(v) for k, v in
            tensors_for(source, B, N, T, S, rng, q_offset=np.asarray(lengths) - T, sorted_ids=True).items()}


def _seed(*parts) -> int:
    """A seed that is the same on every run (str hashes are salted per process)."""
    return sum((i + 1) * ord(c) for i, c in enumerate("|".join(map(str, parts))))


# (source, T, N, K, num_splits): prelude masks, biases and transforms; GQA, MHA and MQA;
# one split and several; rows with no allowed key; a head-dependent mask.
CASES = [
    (None, 1, 8, 2, None),
    ("causal", 3, 8, 2, None),
    ("causal & window(6)", 3, 4, 4, 1),
    ("causal & doc(ids)", 3, 4, 1, 2),
    ("causal & softcap(2.5) + alibi(8)", 1, 8, 2, None),
    ("causal | prefix(n)", 1, 8, 2, None),
    ("causal & chunk(8)", 3, 8, 2, None),
    ("causal & (sink(2) | window(3))", 1, 8, 2, None),
    ("causal & (h % 2 == 0 | window(3))", 1, 8, 2, None),
    ("q < kv", 3, 4, 2, None),
    ("false", 1, 4, 2, None),
]


@pytest.mark.parametrize("source,T,N,K,splits", CASES, ids=[f"{c[0]}-T{c[1]}-N{c[2]}K{c[3]}" for c in CASES])
def test_matches_oracle(source, T, N, K, splits):
    rng = np.random.default_rng(_seed(source, T, N, K))
    B, ps, max_pages = 3, 4, 6
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, page_size=ps, max_pages=max_pages)
    tensors = _tensors(source, B, N, T, max_pages * ps, lengths, rng)
    want = oracle(q, kp, vp, tables, lengths, source, tensors)
    for impl in ("pallas", "reference"):
        out = paged_attention(q, kp, vp, tables, lengths, mod=source, implementation=impl,
                              block_sizes=PagedBlockSizes(block_kv=8, num_splits=splits), **tensors)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert np.isfinite(np.asarray(out)).all()
        np.testing.assert_allclose(np.asarray(out), want, atol=3e-5, rtol=3e-5, err_msg=impl)


def test_bf16_and_one_split():
    rng = np.random.default_rng(7)
    q, kp, vp, tables, lengths = make_cache(rng, B=2, T=3, N=8, K=2, H=32, page_size=8, max_pages=5)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    out = paged_attention(bf(q), bf(kp), bf(vp), tables, lengths, mod="causal & window(11)",
                          implementation="pallas", block_sizes=PagedBlockSizes(block_kv=16, num_splits=1))
    assert out.dtype == jnp.bfloat16
    want = oracle(np.asarray(bf(q), np.float32), np.asarray(bf(kp), np.float32), np.asarray(bf(vp), np.float32),
                  tables, lengths, "causal & window(11)")
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


SKIP_CASES = [("causal & window(6)", 1), ("causal & doc(ids)", 3), ("causal & chunk(8)", 1)]


@pytest.mark.parametrize("source,T", SKIP_CASES)
def test_skipped_pages_are_never_read(source, T):
    """Pages the mask empties are filled with NaN (and so are slots past each length):
    the kernel must not read them, and the compacted lists are exactly the non-EMPTY pages."""
    rng = np.random.default_rng(_seed("skip", source, T))
    B, N, K, ps, max_pages = 4, 4, 2, 4, 8
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, page_size=ps, max_pages=max_pages)
    tensors = _tensors(source, B, N, T, max_pages * ps, lengths, rng)
    classes = np.asarray(page_classes(source, jnp.asarray(lengths), T, ps, max_pages, heads=N,
                                      tensors={k: jnp.asarray(v) for k, v in tensors.items()}))
    needed = nonempty_pages(source, lengths, T, N, ps, max_pages, tensors)
    kept = classes != EMPTY
    assert (kept | ~needed).all(), "a page the mask needs was classified EMPTY"
    assert kept.sum() < (-(-lengths // ps)).sum(), "nothing was skipped"
    if source.startswith("causal & window(6)"):
        np.testing.assert_array_equal(kept, needed)          # the last pages only
        assert kept.sum(1).max() <= 3
    logical, physical, counts = map(np.asarray, compact_pages(jnp.asarray(classes), jnp.asarray(tables), kp.shape[0]))
    np.testing.assert_array_equal(counts, kept.sum(1))
    for b in range(B):
        np.testing.assert_array_equal(logical[b, :counts[b]], np.nonzero(kept[b])[0])
        np.testing.assert_array_equal(physical[b, :counts[b]], tables[b, np.nonzero(kept[b])[0]])

    listed = np.zeros(kp.shape[0], bool)
    listed[tables[kept]] = True
    kp_bad, vp_bad = kp.copy(), vp.copy()
    kp_bad[~listed] = np.nan
    vp_bad[~listed] = np.nan
    for b in range(B):
        j, tail = divmod(int(lengths[b]), ps)
        if tail and kept[b, j]:
            kp_bad[tables[b, j], tail:] = np.nan
            vp_bad[tables[b, j], tail:] = np.nan
    out = paged_attention(q, kp_bad, vp_bad, tables, lengths, mod=source, implementation="pallas",
                          block_sizes=PagedBlockSizes(block_kv=8), **tensors)
    want = oracle(q, kp, vp, tables, lengths, source, tensors)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), want, atol=3e-5, rtol=3e-5)


# (source, interval analysis expected exact here)
CLASS_CASES = [("causal", True), ("causal & window(5)", True), ("causal & doc(ids)", True),
               ("causal | prefix(n)", True), ("causal & chunk(4)", True), ("causal & (h % 2 == 0 | window(3))", False),
               ("dilated(3)", False), ("causal + alibi(4)", True), (None, True)]


@pytest.mark.parametrize("source,tight", CLASS_CASES)
def test_page_classes(source, tight):
    """exact=True equals a brute-force evaluation; the interval classes are sound (EMPTY and
    FULL never wrong) and, for prelude masks on sorted ids, equal to it."""
    rng = np.random.default_rng(_seed("classes", source))
    B, T, N, ps, max_pages = 3, 2, 4, 4, 7
    lengths = rng.integers(T, ps * max_pages + 1, size=B).astype(np.int32)
    S = ps * max_pages
    tensors = _tensors(source, B, N, T, S, lengths, rng)
    allowed = (np.ones((B, N, T, S), bool) if source is None else
               evaluate_mask(source, B, N, T, S, q_offset=lengths - T, tensors=tensors))
    exists = np.arange(S)[None, :] < lengths[:, None]
    pages = lambda x: x.reshape(B, -1, max_pages, ps)  # noqa: E731
    nonempty = pages(allowed & exists[:, None, None, :]).any(axis=(1, 3))
    whole = (np.arange(max_pages)[None, :] + 1) * ps <= lengths[:, None]
    full = pages(allowed).all(axis=(1, 3)) & whole & nonempty
    for exact in (True, False):
        classes = np.asarray(page_classes(source, jnp.asarray(lengths), T, ps, max_pages, heads=N, exact=exact,
                                          tensors={k: jnp.asarray(v) for k, v in tensors.items()}))
        assert not (nonempty & (classes == EMPTY)).any(), "unsound EMPTY"
        assert not (~full & (classes == FULL)).any(), "unsound FULL"
        if exact or tight:
            np.testing.assert_array_equal(classes != EMPTY, nonempty)
            np.testing.assert_array_equal(classes == FULL, full)


def check_walk(text, lengths, T, N, ps, max_pages, rng, multiple_of=1):
    """walk_pages lists every page the brute force needs, in order, only pages holding keys,
    and exactly the needed pages when the band is exact (or the mask a prelude mask)."""
    B = len(lengths)
    pool = B * max_pages + 2
    tables = rng.permutation(pool)[:B * max_pages].reshape(B, max_pages).astype(np.int32)
    tensors = _tensors(text, B, N, T, max_pages * ps, lengths, rng)
    mod = compile_mod(text)
    logical, physical, counts = map(np.asarray, walk_pages(
        mod, jnp.asarray(lengths), jnp.asarray(tables), {k: jnp.asarray(v) for k, v in tensors.items()},
        num_tokens=T, page_size=ps, heads=N, num_pool_pages=pool, multiple_of=multiple_of))
    assert logical.shape[1] % multiple_of == 0
    needed = nonempty_pages(text, lengths, T, N, ps, max_pages, tensors)
    for b in range(B):
        listed = logical[b, :counts[b]]
        assert (np.diff(listed) > 0).all(), f"{text!r}: pages out of order {listed}"
        assert (listed >= 0).all() and (listed * ps < lengths[b]).all(), f"{text!r}: a page without keys {listed}"
        missing = set(np.nonzero(needed[b])[0]) - set(listed.tolist())
        assert not missing, f"{text!r}: sequence {b} (length {lengths[b]}) misses pages {sorted(missing)}"
        np.testing.assert_array_equal(physical[b, :counts[b]], tables[b, listed])
        if counts[b]:
            assert (logical[b, counts[b]:] == listed[-1]).all()
    return mod, needed, counts


@given(st.one_of(diagonal_masks(), prelude_masks().map(lambda s: s.text)), st.sampled_from([1, 3]),
       st.sampled_from([1, 4, 8]), st.integers(0, 2**32 - 1))
def test_walk_pages_against_brute_force(text, T, ps, seed):
    rng = np.random.default_rng(seed)
    max_pages = 40 // ps + 1
    lengths = rng.integers(T, max_pages * ps + 1, size=3).astype(np.int32)
    mod, needed, counts = check_walk(text, lengths, T, 4, ps, max_pages, rng, multiple_of=int(rng.integers(1, 4)))
    if diagonal_band(mod.canonical.mask).exact:
        np.testing.assert_array_equal(counts, needed.sum(1), err_msg=text)


def test_walk_is_bounded_by_the_window():
    """A sliding window's candidate list does not grow with the table (time flat in context)."""
    for max_pages in (512, 8192):
        plan = WalkPlan.build(compile_mod("causal & window(4096)"), 1, 16, max_pages)
        assert plan.exact and plan.num_candidates == 257
        plan = WalkPlan.build(compile_mod("causal & chunk(1024) & doc(ids)"), 3, 16, max_pages)
        assert not plan.exact and plan.num_candidates == 66
    assert WalkPlan.build(compile_mod("causal & doc(ids)"), 1, 16, 8192).num_candidates == 8192
    rng = np.random.default_rng(5)
    lengths = np.array([3, 200, 37, 64], np.int32)
    _, needed, counts = check_walk("causal & window(20)", lengths, 3, 4, 8, 25, rng)
    np.testing.assert_array_equal(counts, needed.sum(1))
    assert counts.max() <= 4


@settings(max_examples=4)
@given(src=sources(max_depth=2), T=st.sampled_from([1, 3]), seed=st.integers(0, 2 ** 31 - 1))
def test_generated_sources(src, T, seed):
    rng = np.random.default_rng(seed)
    B, N, K, ps, max_pages = 2, 4, 2, 4, 4
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, page_size=ps, max_pages=max_pages)
    tensors = _tensors(src.text, B, N, T, ps * max_pages, lengths, rng)
    want = oracle(q, kp, vp, tables, lengths, src.text, tensors)
    mod = compile_mod(src.text)
    supported, _ = _program(mod, {k: jnp.asarray(v) for k, v in tensors.items()}).kernel_support()
    if not supported:
        with pytest.raises(NotImplementedError):
            paged_attention(q, kp, vp, tables, lengths, mod=mod, implementation="pallas", **tensors)
    out = paged_attention(q, kp, vp, tables, lengths, mod=mod, implementation=("pallas", "reference"),
                          block_sizes=PagedBlockSizes(block_kv=8), **tensors)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=1e-4, err_msg=src.text)


def test_under_jit_tables_and_lengths_are_traced():
    rng = np.random.default_rng(3)
    B, T, N, K, ps, max_pages = 3, 1, 4, 2, 4, 6
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, page_size=ps, max_pages=max_pages)
    ids = _tensors("causal & doc(ids)", B, N, T, ps * max_pages, lengths, rng)["ids"]
    f = jax.jit(lambda *a: paged_attention(*a[:5], mod="causal & doc(ids)", implementation="pallas", ids=a[5]))
    out = f(q, kp, vp, tables, lengths, ids)
    np.testing.assert_allclose(np.asarray(out), oracle(q, kp, vp, tables, lengths, "causal & doc(ids)", {"ids": ids}),
                               atol=3e-5, rtol=3e-5)
    # New lengths and tables reuse the compiled function.
    lengths2 = np.maximum(lengths - 5, T).astype(np.int32)
    out2 = f(q, kp, vp, tables[::-1].copy(), lengths2, ids)
    np.testing.assert_allclose(np.asarray(out2),
                               oracle(q, kp, vp, tables[::-1].copy(), lengths2, "causal & doc(ids)", {"ids": ids}),
                               atol=3e-5, rtol=3e-5)


# ---- GPU (Triton lowering), realistic sizes ----------------------------------------------------

GPU_CASES = [(None, 1), ("causal & window(300)", 1), ("causal & doc(ids)", 4), ("causal & softcap(30) + alibi(32)", 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("source,T", GPU_CASES)
def test_gpu_matches_oracle(source, T):
    rng = np.random.default_rng(_seed("gpu", source, T))
    B, N, K, H, ps, max_pages = 3, 32, 8, 128, 16, 80
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, H=H, page_size=ps, max_pages=max_pages,
                                            pool=300)
    tensors = _tensors(source, B, N, T, ps * max_pages, lengths, rng)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    f32 = lambda x: np.asarray(bf(x), np.float32)  # noqa: E731
    want = oracle(f32(q), f32(kp), f32(vp), tables, lengths, source, tensors)
    kp_bad, vp_bad = f32(kp), f32(vp)
    if source is not None and "window" in source:   # pages outside every window: NaN
        classes = np.asarray(page_classes(source, jnp.asarray(lengths), T, ps, max_pages, heads=N))
        listed = np.zeros(kp.shape[0], bool)
        listed[tables[classes != EMPTY]] = True
        kp_bad[~listed] = np.nan
        vp_bad[~listed] = np.nan
    for splits in (None, 1):
        out = paged_attention(bf(q), bf(kp_bad), bf(vp_bad), tables, lengths, mod=source, implementation="pallas",
                              block_sizes=PagedBlockSizes(num_splits=splits), **tensors)
        out = np.asarray(out, np.float32)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_long_context_split():
    rng = np.random.default_rng(11)
    B, T, N, K, H, ps, max_pages = 1, 1, 32, 8, 128, 16, 2048
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, H=H, page_size=ps, max_pages=max_pages,
                                            lengths=[32000])
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    for source in ("causal", "causal & window(4096)"):
        out = paged_attention(bf(q), bf(kp), bf(vp), tables, lengths, mod=source, implementation="pallas")
        ref = paged_attention(bf(q), bf(kp), bf(vp), tables, lengths, mod=source, implementation="reference")
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_nan_query_rows_and_inf_logits_propagate(impl):
    """A NaN query row gives a NaN row (only that row); a +inf logit gives NaN: as attention()."""
    from scoremod import paged_attention
    from scoremod.runtime.paged import PagedBlockSizes
    rng = np.random.default_rng(3)
    q, kp, vp, tables, lengths = make_cache(rng, B=2, T=2, N=4, K=2, lengths=[20, 9])
    q[1, 0, 2] = np.nan
    # Several splits per sequence: the merge of their lse must not drop a NaN split.
    extra = dict(block_sizes=PagedBlockSizes(block_kv=4, num_splits=3)) if impl == "pallas" else {}
    out = np.asarray(paged_attention(q, kp, vp, tables, lengths, mod="causal", implementation=impl, **extra))
    nan_rows = np.isnan(out).any(axis=-1)
    expected = np.zeros_like(nan_rows)
    expected[1, 0, 2] = True
    assert (nan_rows == expected).all()
    q[1, 0, 2] = 0.0
    out = np.asarray(paged_attention(q, kp, vp, tables, lengths, mod="where(causal, inf, 0)", implementation=impl,
                                     **extra))
    assert np.isnan(out).all()


# ---- chunked prefill: many new tokens, cut into chunks that each walk their own pages ------

PREFILL_CASES = [
    ("causal", 4, 2),
    ("causal & window(7)", 4, 1),
    ("causal & doc(ids)", 2, 2),
    ("causal & softcap(2.5) + alibi(4)", 4, 4),
    ("causal | prefix(n)", 4, 2),
    ("causal & (h % 2 == 0 | window(3))", 4, 2),
    ("q < kv", 4, 2),
    (None, 4, 4),
]


@pytest.mark.parametrize("source,N,K", PREFILL_CASES, ids=[f"{c[0]}-N{c[1]}K{c[2]}" for c in PREFILL_CASES])
def test_chunked_prefill_matches_oracle(source, N, K):
    """T new tokens (up to a whole sequence), GQA/MHA/MQA, ragged lengths, a chunk size that
    does not divide T, several splits: against the float64 oracle, with every page no chunk
    needs and every slot past a length filled with NaN."""
    rng = np.random.default_rng(_seed("prefill", source, N, K))
    B, ps, max_pages, T = 3, 4, 9, 13
    lengths = np.array([max_pages * ps, T, 25], np.int32)
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, page_size=ps, max_pages=max_pages,
                                            lengths=lengths)
    tensors = _tensors(source, B, N, T, max_pages * ps, lengths, rng)
    want = oracle(q, kp, vp, tables, lengths, source, tensors)
    needed = nonempty_pages(source, lengths, T, N, ps, max_pages, tensors) if source else \
        np.arange(max_pages)[None, :] * ps < lengths[:, None]
    kp_bad, vp_bad = kp.copy(), vp.copy()
    unused = np.ones(kp.shape[0], bool)
    unused[tables[needed]] = False
    kp_bad[unused], vp_bad[unused] = np.nan, np.nan
    for b in range(B):
        j, tail = divmod(int(lengths[b]), ps)
        if tail:
            kp_bad[tables[b, j], tail:] = np.nan
            vp_bad[tables[b, j], tail:] = np.nan
    G = N // K
    for rows, splits in ((2 * G, None), (3 * G, 2), (G, 1)):      # 2, 3 and 1 tokens per chunk
        out = paged_attention(q, kp_bad, vp_bad, tables, lengths, mod=source, implementation="pallas",
                              block_sizes=PagedBlockSizes(block_kv=8, num_splits=splits, chunk_rows=rows),
                              **tensors)
        assert np.isfinite(np.asarray(out)).all(), (source, rows)
        np.testing.assert_allclose(np.asarray(out), want, atol=3e-5, rtol=3e-5, err_msg=f"{source} rows={rows}")


def test_chunking_and_each_chunk_walks_only_its_pages():
    from scoremod.runtime.paged import chunking
    assert chunking(1, 4, 128) == (1, 1) and chunking(32, 4, 128) == (32, 1)     # decode: one chunk
    assert chunking(2048, 4, 128) == (32, 64) and chunking(100, 32, 128) == (4, 25)
    assert chunking(5, 256, 128) == (1, 5)                                       # at least one token
    # causal & window(8), pages of 4: a chunk of 4 queries ending at e needs keys e-12 .. e-1
    mod = compile_mod("causal & window(8)")
    lengths = jnp.array([64], jnp.int32)
    tables = jnp.arange(16, dtype=jnp.int32)[None]
    for end in (4, 20, 64):
        logical, _, counts = walk_pages(mod, lengths, tables, {}, num_tokens=4, page_size=4, heads=1,
                                        num_pool_pages=16, query_end=jnp.array([end], jnp.int32))
        first = max(end - 4 - 7, 0) // 4
        assert list(np.asarray(logical[0, :int(counts[0])])) == list(range(first, (end - 1) // 4 + 1))


def test_chunked_prefill_under_jit_and_bf16():
    rng = np.random.default_rng(11)
    q, kp, vp, tables, lengths = make_cache(rng, B=2, T=10, N=4, K=2, H=32, page_size=8, max_pages=4,
                                            lengths=np.array([32, 17], np.int32))
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    run = jax.jit(lambda q, kp, vp, t, n: paged_attention(
        q, kp, vp, t, n, mod="causal & window(9)", implementation="pallas",
        block_sizes=PagedBlockSizes(block_kv=16, chunk_rows=8)))
    out = run(bf(q), bf(kp), bf(vp), tables, lengths)
    assert out.dtype == jnp.bfloat16
    want = oracle(np.asarray(bf(q), np.float32), np.asarray(bf(kp), np.float32), np.asarray(bf(vp), np.float32),
                  tables, lengths, "causal & window(9)")
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


# ---- the Mosaic decode kernel's inputs, through its slow twin (CPU) -----------------------------

@settings(max_examples=25, deadline=None)
@given(text=st.one_of(diagonal_masks(), st.sampled_from(["causal + alibi(4)", "causal & softcap(5) + t[h] * (kv - q) / 8",
                                                          "doc(ids) & kv >= q - 40"])), T=st.sampled_from([1, 3, 9]),
       heads=st.sampled_from([(4, 4), (16, 2), (8, 1)]), page_size=st.sampled_from([8, 16]),
       block_kv=st.sampled_from([16, 64, 128]), num_splits=st.sampled_from([None, 2, 5]), seed=st.integers(0, 2**31 - 1))
def test_mosaic_decode_inputs_match_oracle_through_the_twin(text, T, heads, page_size, block_kv, num_splits, seed):
    """What the Mosaic decode kernel is given (page list with tail copies, key positions, row
    tokens and heads, tensor reads along the rows and the keys, split ranges) gives the
    oracle's answer when its slow twin (``decode_partials_reference``) runs on it: random
    masks, T > 1 in several 64-row chunks, GQA and MQA, forced splits, NaN in every page no
    sequence uses and in every slot past a length. The lse is checked through sinks (one
    more logit per head, which only a right lse merges right)."""
    from scoremod.runtime.paged import _paged_mosaic_decode
    rng = np.random.default_rng(seed)
    N, K = heads
    B, H, max_pages = 3, 16, 320 // page_size
    lengths = rng.integers(T, max_pages * page_size + 1, size=B).astype(np.int32)
    lengths[0] = max_pages * page_size
    lengths[1] = T
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, H=H, page_size=page_size,
                                            max_pages=max_pages, lengths=lengths)
    tensors = _tensors(text, B, N, T, max_pages * page_size, lengths, rng)
    sinks = rng.standard_normal(N).astype(np.float32)
    want = oracle(q, kp, vp, tables, lengths, text, tensors, sinks=sinks)
    kp, vp = poison_unread_slots(kp, vp, tables, lengths)
    mod = compile_mod(text)
    out, lse = _paged_mosaic_decode(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(tables),
                                    jnp.asarray(lengths), {n: jnp.asarray(t) for n, t in tensors.items()}, mod=mod,
                                    scale=1 / math.sqrt(H),
                                    block_sizes=PagedBlockSizes(block_kv=block_kv, num_splits=num_splits), stages=2,
                                    twin=True)
    out = np.asarray(add_sinks(out, lse, jnp.asarray(sinks))[0])
    assert np.isfinite(out).all(), text
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4, err_msg=text)


@pytest.mark.parametrize("text, T, heads", [
    ("causal & softcap(5) + t[h] * (kv - q) / 8", 1, (16, 2)), ("causal & doc(ids)", 3, (8, 2)), ("causal + alibi(4)", 9, (16, 2)),
    ("window(20) & t[b, q] > kv - 50", 2, (8, 1)),
])
def test_mosaic_decode_reads_through_the_twin(text, T, heads):
    """The decode kernel's tensor reads, along the rows (``t[h]``, ``t[b, q]``) and along the
    keys (``ids[b, kv]``), materialized at the positions it visits: through the twin
    against the oracle, with GQA (several heads per row block) and T > 1."""
    from scoremod.runtime.paged import _paged_mosaic_decode
    rng = np.random.default_rng(_seed(text, T))
    N, K = heads
    B, H, ps, max_pages = 3, 16, 8, 12
    q, kp, vp, tables, lengths = make_cache(rng, B=B, T=T, N=N, K=K, H=H, page_size=ps, max_pages=max_pages)
    tensors = _tensors(text, B, N, T, max_pages * ps, lengths, rng)
    want = oracle(q, kp, vp, tables, lengths, text, tensors)
    out, _ = _paged_mosaic_decode(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(tables),
                                  jnp.asarray(lengths), {n: jnp.asarray(t) for n, t in tensors.items()},
                                  mod=compile_mod(text), scale=1 / math.sqrt(H),
                                  block_sizes=PagedBlockSizes(block_kv=16, num_splits=2), stages=2, twin=True)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=1e-4, err_msg=text)


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.integers(0, 13), min_size=1, max_size=8), consumers=st.sampled_from([1, 2]),
       slot_pairs=st.integers(1, 4))
def test_mosaic_decode_consumers_share_each_item_and_keep_their_slots(items, consumers, slot_pairs):
    """The Mosaic decode kernel's split of a block's ring steps between its consumer
    warpgroups (``consumer_share``), over a run of items of random step counts: every step of
    every item goes to exactly one consumer, and each ring slot (a multiple of the consumer
    count of them) is always waited on by the same consumer, as its barrier's per-thread
    phase tracking needs."""
    from scoremod.runtime._mosaic_paged_decode import consumer_share
    stages = consumers * slot_pairs
    waiter = {}
    step0 = 0
    for n in items:
        taken = []
        for w in range(consumers):
            first, count = (int(x) for x in consumer_share(w, consumers, step0, n))
            steps = [first + k * consumers for k in range(count)]
            assert all(0 <= i < n for i in steps)
            for i in steps:
                assert waiter.setdefault((step0 + i) % stages, w) == w
            taken += steps
        assert sorted(taken) == list(range(n))
        step0 += n
