"""Mod.to_flex(): the exported module, run through real PyTorch FlexAttention on the CPU in
float64, computes what scoremod's reference computes; what it cannot express is refused.

FlexAttention called without torch.compile still traces the mods with dynamo (an "eager"
backend), so these tests also check that the generated functions trace.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import sys
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch.nn.attention.flex_attention import AuxRequest, flex_attention  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import scoremod  # noqa: E402
from scoremod.errors import ScoreModError  # noqa: E402
from strategies import shapes, sources, tensors_for  # noqa: E402

HEAD_DIM = 8
SCALE = 0.5


# Exported modules are written here and imported like a user's file (dynamo, which traces
# the mods even without torch.compile, looks modules up in sys.modules).
_MODULE_DIR = tempfile.TemporaryDirectory(prefix="scoremod_flex_")
_loaded = itertools.count()


def load(mod_or_source):
    """Import the exported source from a file, as a user would."""
    src = scoremod.compile(mod_or_source).to_flex()
    name = f"scoremod_flex_export_{next(_loaded)}"
    path = os.path.join(_MODULE_DIR.name, f"{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _torch(x):
    return x if isinstance(x, int) else torch.from_numpy(np.asarray(x))


@contextlib.contextmanager
def untraced():
    """FlexAttention's plain eager path (vmap over the mods, no dynamo): the same forward
    math, many times faster to start, for the many generated examples. Hand-written cases
    keep the traced path, which also checks that dynamo can trace the generated mods."""
    import torch.nn.attention.flex_attention as fa
    if not hasattr(fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"):   # a private switch: another torch may lack it
        yield
        return
    old = fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    try:
        yield
    finally:
        fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = old


def run_flex(module, q, k, v, *, q_offset=0, kv_offset=0, **tensors):
    """flex_attention (float64, CPU) with the module's mods; q [B, T, N, H] like scoremod.
    Returns (out [B, T, N, H], lse [B, T, N]) as NumPy."""
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    tt = {name: _torch(t) for name, t in tensors.items()}
    offsets = dict(q_offset=_torch(q_offset), kv_offset=_torch(kv_offset))
    mods = module.make_mods(**offsets, **tt)
    bm = module.block_mask(B, N, T, S, device="cpu", **offsets, **tt)
    f64 = lambda x: torch.from_numpy(np.asarray(x)).double().transpose(1, 2)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "flex_attention called without torch.compile()"
        out, aux = flex_attention(f64(q), f64(k), f64(v), score_mod=mods["score_mod"], block_mask=bm,
                                  scale=SCALE, enable_gqa=N != K, return_aux=AuxRequest(lse=True))
    return out.transpose(1, 2).numpy(), aux.lse.transpose(1, 2).numpy()


def run_reference(mod, q, k, v, *, q_offset=0, kv_offset=0, **tensors):
    """scoremod's reference, under one jit (op by op, every new shape would compile each op)."""
    def call(q, k, v, q_offset, kv_offset, tensors):
        return scoremod.attention(q, k, v, mod=mod, scale=SCALE, q_offset=q_offset, kv_offset=kv_offset,
                                  implementation="reference", return_lse=True, **tensors)
    offsets = [o if isinstance(o, int) else jnp.asarray(o) for o in (q_offset, kv_offset)]
    out, lse = jax.jit(call, static_argnums=[i + 3 for i, o in enumerate(offsets) if isinstance(o, int)])(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), *offsets, {n: jnp.asarray(t) for n, t in tensors.items()})
    return np.asarray(out), np.asarray(lse)


def qkv(B, N, K, T, S, rng):
    q = rng.standard_normal((B, T, N, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((B, S, K, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((B, S, K, HEAD_DIM)).astype(np.float32)
    return q, k, v


def check_matches(source, B=2, N=4, K=2, T=9, S=11, *, q_offset=0, kv_offset=0, seed=0, tensors=None,
                  traced=True):
    """Exported mods through flex_attention == scoremod's reference (out and lse)."""
    mod = scoremod.compile(source)
    rng = np.random.default_rng(seed)
    if tensors is None:
        tensors = tensors_for(source, B, N, T, S, rng, q_offset=q_offset, kv_offset=kv_offset)
    q, k, v = qkv(B, N, K, T, S, rng)
    expected = run_reference(mod, q, k, v, q_offset=q_offset, kv_offset=kv_offset, **tensors)
    with contextlib.nullcontext() if traced else untraced():
        got = run_flex(load(mod), q, k, v, q_offset=q_offset, kv_offset=kv_offset, **tensors)
    for g, e, what in zip(got, expected, ("out", "lse")):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5, err_msg=f"{what} of {source!r}")
    return got


# ---- generated sources ------------------------------------------------------------------------

@settings(max_examples=20)
@given(sources(max_depth=2), shapes(max_batch=2, max_heads=4, max_seq=10), st.integers(0, 2**32 - 1))
def test_generated_sources_match_the_reference(src, shape, seed):
    tensors = src.make_tensors(shape, np.random.default_rng(seed))
    check_matches(src.text, shape.B, shape.N, shape.K, shape.T, shape.S, q_offset=shape.q_offset,
                  kv_offset=shape.kv_offset, seed=seed, tensors=tensors, traced=False)


# ---- hand-written cases -------------------------------------------------------------------------

@pytest.mark.parametrize("source", [
    "causal",
    "causal & window(3)",
    "window(2, 1)",
    "causal & window(4) + alibi(4)",
    "softcap(5) & causal",
    "30 * tanh((score + alibi(4)) / 30)",
    "relpos(t, 3)",
    "causal & t[h, (q - kv) % 5] + t[h, abs(q - kv) // 2 + 1]",   # a bias table read at computed indices
    "causal & chunk(4) & dilated(2)",
    "sink(2) | causal & window(2)",
    "floor(score * 3) / 3 + ceil(-score) + sign(score) + exp2(score / 8) - log(abs(score) + 1) + sqrt(abs(score))",
    "score % 0.75 + score // 0.5 + clip(score, -1, 1) + min(score, 0.25) * max(q, kv)",
    "where(q > kv, 1, 2) + 0.5 * where(true, 3, 4) + (2147483647 + 1) * 0 + q ** 2 / 100",
    "score + sin(score)",
    "causal & 2 * sin(score / 2) * cos(q - kv) + cos(h) + sin(0.5)",
])
def test_hand_written_sources(source):
    check_matches(source)


def test_packed_documents():
    ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3]], np.int32)
    check_matches("causal & doc(ids)", T=11, S=11, tensors={"ids": ids})
    check_matches("causal & doc(ids)", T=11, S=11, tensors={"ids": ids[0]})   # [S] broadcasts over batch


def test_prefix_lm_with_per_batch_prefix_and_offsets():
    n = np.array([3, 7], np.int32)
    check_matches("causal | prefix(n)", tensors={"n": n})
    check_matches("causal | prefix(n)", tensors={"n": n}, q_offset=np.array([2, 0], np.int32), kv_offset=1)
    check_matches("causal | prefix(4)", T=5, S=11, q_offset=6)   # decode-style bottom-right alignment


def test_mask_that_reads_score_goes_to_score_mod():
    module = load("causal & (score > 0) & window(4) + alibi(4)")
    mods = module.make_mods()
    assert mods["mask_mod"] is not None and mods["score_mod"] is not None
    assert "score > 0" in module.SOURCE
    check_matches("causal & (score > 0) & window(4) + alibi(4)")
    only_score = load("score > 0")   # nothing left for mask_mod: no block mask
    assert only_score.make_mods()["mask_mod"] is None
    assert only_score.block_mask(1, 1, 4, 4) is None
    check_matches("score > 0")


def test_kinds_give_score_mod_or_mask_mod_or_both():
    mask = load("causal & window(8)").make_mods()
    assert mask["score_mod"] is None and mask["mask_mod"] is not None
    bias = load("alibi(8)")
    assert bias.make_mods()["mask_mod"] is None and bias.block_mask(1, 8, 16, 16) is None
    assert bias.KIND == "bias" and bias.TENSORS == ()


def test_everything_masked_gives_zero_output_and_minus_inf_lse():
    out, lse = check_matches("causal & false + alibi(2)")
    assert np.all(out == 0) and np.all(lse == -np.inf)
    out, lse = check_matches("kv > q + 100")   # rows with no key at all
    assert np.all(out == 0)


def test_integer_semantics_int32_floor_division_and_modulo():
    # Python's signs on negative operands, int32 wrap-around, a tensor divisor that may be 0
    # (undefined in the language: any value, but never an error; masked out here).
    check_matches("(q - kv) // 3 * 0.25 + (q - kv) % 4 + (kv - q) % -3 + q * 1000000000 / 1e9")
    d = np.array([0, 2, 3, 0, 5, 1, 4, 2, 3, 1, 2], np.int32)
    check_matches("d[kv] != 0 & (q // d[kv] + q % d[kv]) * 0.5", tensors={"d": d})


def test_float_to_int_saturates_like_xla():
    # floor of reals past the int32 range saturates, NaN gives 0 (as XLA converts).
    check_matches("causal & floor(score * 1e12) * 1e-12 + ceil(-score * 1e12) * 1e-12 + floor(log(score - score - 1)) * 0")


def test_tensor_dtypes_and_scalars():
    # float64 / bool tensors read as float32 / int32; a Python number is a scalar tensor.
    t = np.random.default_rng(1).standard_normal((4, 7))
    m = np.random.default_rng(2).integers(0, 2, size=(11,)).astype(bool)
    mod = scoremod.compile("causal & window(w) & m[kv] == 1 + relpos(t, 3)")
    q, k, v = qkv(2, 4, 2, 9, 11, np.random.default_rng(0))
    expected = run_reference(mod, q, k, v, t=t.astype(np.float32), m=m, w=np.int32(3))
    got = run_flex(load(mod), q, k, v, t=torch.from_numpy(t), m=torch.from_numpy(m), w=3)
    np.testing.assert_allclose(got[0], expected[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [np.bool_, np.int32])
def test_bool_tensors_read_as_masks(dtype):
    rng = np.random.default_rng(3)
    m = (rng.random((2, 9, 11)) < 0.6).astype(dtype)
    pad = (rng.random((2, 11)) < 0.3).astype(dtype)
    keep = np.array([True, False, True, True])
    source = "causal & m[b, q, kv] & (~pad[b, kv]) + where(keep[h], alibi(4), 0)"
    module = load(source)
    assert "m[b, q, kv] != 0" in module.SOURCE and module.make_mods(m=m, pad=pad, keep=keep)["mask_mod"] is not None
    got = check_matches(source, tensors={"m": m, "pad": pad, "keep": keep})
    # the same as writing the comparisons out
    same = check_matches("causal & m[b, q, kv] != 0 & (~(pad[b, kv] != 0)) + where(keep[h] != 0, alibi(4), 0)",
                         tensors={"m": m, "pad": pad, "keep": keep})
    np.testing.assert_array_equal(got[0], same[0])


def test_a_float_tensor_read_as_a_mask_is_refused_by_the_module():
    module = load("causal & m[q, kv]")
    with pytest.raises(ValueError, match="tensor 'm' has dtype torch.float32, but the mod reads it as a mask"):
        module.make_mods(m=torch.ones(9, 11))
    load("causal & m[q, kv] != 0").make_mods(m=torch.ones(9, 11))   # written out: any dtype
    load("causal + bias(t)").make_mods(t=torch.ones(9, 11))         # added: a bias


def test_literal_floats_are_float32():
    src = scoremod.compile("alibi(8) * 0.1").to_flex()
    assert "0.10000000149011612" in src


def test_generated_module_checks_its_tensors():
    module = load("causal & doc(ids) + bias(t)")
    ids = torch.zeros(8, dtype=torch.int32)
    t = torch.zeros(2, 8, 8)
    with pytest.raises(TypeError, match="missing tensor parameter 'ids'"):
        module.make_mods(t=t)
    with pytest.raises(TypeError, match="unexpected tensor parameter 'idz'"):
        module.make_mods(ids=ids, t=t, idz=ids)
    with pytest.raises(ValueError, match="tensor 'ids' of shape \\[1, 1, 8\\] has rank 3, but it is read with 2"):
        module.make_mods(ids=ids[None, None], t=t)
    with pytest.raises(ValueError, match="q_offset must be an int or an int tensor"):
        module.make_mods(ids=ids, t=t, q_offset=torch.zeros(2))
    # Names the source gives but simplification removed are accepted and ignored.
    assert load("where(true, alibi(8), bias(t))").make_mods(t=t)["score_mod"] is not None


def test_generated_module_imports_only_torch_and_the_exporter_never_imports_torch():
    import ast
    import scoremod.compiler.flex_export as fx

    def imported(text):
        tree = ast.parse(text)
        return {alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names} | \
            {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert imported(scoremod.compile("causal & doc(ids) + alibi(8)").to_flex()) == {"torch"}
    assert "torch" not in imported(open(fx.__file__).read())


# ---- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("source, name", [
    ("causal & window(device)", "device"),
    ("causal + bias(BLOCK_SIZE)", "BLOCK_SIZE"),
    ("where(true, alibi(8), bias(device))", "device"),   # named by the source, even if unused
])
def test_tensor_names_that_collide_with_block_mask_keywords_are_refused(source, name):
    with pytest.raises(ScoreModError, match=f"tensor parameter '{name}' has the name of block_mask\\(\\)'s {name}="):
        scoremod.compile(source).to_flex()


def test_source_errors_are_score_mod_errors():
    with pytest.raises(ScoreModError, match="did you mean 'window'"):
        from scoremod.compiler.flex_export import flex_module_source
        flex_module_source("causal & windw(4)")
