"""The diagonal band (compiler/band.py) against the independent evaluator.

Sound: wherever the evaluator says a mask is true, ``q - kv`` lies in the band.
Exact: when the band says so, the mask is true exactly on the band (every b, h).
Masks come from two generators of tests/strategies.py: the general random masks and
``diagonal_masks`` (bounds on q - kv, windows, chunks, sinks, documents
combined with &, | and ~), where the interesting cases are.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import scoremod
from scoremod.compiler.band import Band, diagonal_band

from evaluator import evaluate_mask
from strategies import diagonal_masks, masks, tensors_for

B, N, T, S = 2, 2, 40, 40


def band_of(text: str) -> Band:
    return diagonal_band(scoremod.compile(text).canonical.mask)


def check_against_evaluator(text: str, seed: int, q_offset: int = 0):
    band = band_of(text)
    rng = np.random.default_rng(seed)
    tensors = tensors_for(text, B, N, T, S, rng, q_offset=q_offset)
    allowed = evaluate_mask(text, B, N, T, S, q_offset=q_offset, tensors=tensors)
    d = (np.arange(T)[:, None] + q_offset) - np.arange(S)[None, :]
    in_band = np.ones_like(d, bool)
    if band.lo is not None:
        in_band &= d >= band.lo
    if band.hi is not None:
        in_band &= d <= band.hi
    outside = np.argwhere(allowed & ~in_band[None, None])
    assert not len(outside), f"{text!r}: {band} but the mask allows (b, h, q, kv) = {outside[0].tolist()}"
    if band.exact:
        differ = np.argwhere(allowed != in_band[None, None])
        assert not len(differ), f"{text!r}: {band} claims exactness but differs at {differ[0].tolist()}"
    return band


@given(diagonal_masks(), st.integers(0, 12), st.integers(0, 2**32 - 1))
def test_diagonal_masks(text, q_offset, seed):
    check_against_evaluator(text, seed, q_offset)


@given(masks(), st.integers(0, 2**32 - 1))
def test_generated_masks_are_sound(src, seed):
    check_against_evaluator(src.text, seed)


@pytest.mark.parametrize("text,band", [
    ("causal", Band(0, None, True)),
    ("causal & window(4096)", Band(0, 4095, True)),
    ("window(3, 5)", Band(-5, 3, True)),
    ("q < kv", Band(None, -1, True)),
    ("causal & chunk(64)", Band(0, 63, False)),
    ("causal & doc(ids)", Band(0, None, False)),
    ("causal & (sink(4) | window(8))", Band(0, None, False)),
    ("abs(q - kv) >= 3", Band(None, None, False)),
    ("window(2) | q - kv == 3", Band(-1, 3, False)),
    ("window(2) | q - kv == 2", Band(-1, 2, True)),
    ("false", Band(1, 0, True)),
    ("alibi(4)", Band(None, None, True)),
])
def test_prelude_bands(text, band):
    assert band_of(text) == band
    check_against_evaluator(text, seed=0, q_offset=3)


def test_a_mod_or_its_canonical_form_gives_the_band_of_its_mask():
    mod = scoremod.compile("causal & window(8)")
    assert diagonal_band(mod) == diagonal_band(mod.canonical) == diagonal_band(mod.canonical.mask)
    assert diagonal_band(mod).hi == 7 and diagonal_band(mod).exact
