"""``dslc explain --devices P`` and ``compiler/context_explain.explain_context``: the shard-level
plan of context parallelism. The figures are checked against ``pair_plan`` / ``device_work`` /
``ring_schedule`` called here directly, and against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

import scoremod
from scoremod.cli import main
from scoremod.compiler.context_explain import ContextExplanation, explain_context
from scoremod.compiler.context_plan import (ContextLayout, PairPlan, balanced_layout, contiguous_layout,
                                            device_work, pair_plan, ring_schedule, zigzag_layout)
from scoremod.errors import ScoreModShapeError
from scoremod.runtime.context_parallel import choose_layout

DOCS = [2048, 512, 512, 512, 256, 256]          # one long document, then short ones
DOC_IDS = np.repeat(np.arange(len(DOCS)), DOCS).astype(np.int32)


def figures(text, layout_name, P, T, **tensors):
    """(work, shifts, pairs run) computed directly from the context plan functions, every
    layout planned in the balanced layout's blocks (T / 4P positions, at most 512)."""
    mod = scoremod.compile(text)
    block = min(512, T // (4 * P))
    if layout_name == "balanced":
        layout, plan = balanced_layout(mod, P, 4, q_len=T, kv_len=T, tensors=tensors, max_block=block)
        layout = ContextLayout("balanced", tuple(map(tuple, np.asarray(layout.table()).tolist())))
    else:
        layout = {"contiguous": contiguous_layout, "zigzag": zigzag_layout}[layout_name](P)
        plan = pair_plan(mod, layout, q_len=T, kv_len=T, tensors=tensors, max_block=block)
    plan = PairPlan(np.asarray(plan.blocks), plan.block_q, plan.block_kv, plan.q_chunk, plan.kv_chunk)
    schedule = ring_schedule(plan, layout)
    return device_work(plan, layout).tolist(), schedule.shifts, schedule.pairs_run()


def cli_json(capsys, *args):
    assert main(["explain", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_causal_figures_equal_the_plan_functions_and_the_hand_count():
    r = explain_context("causal", 4, 1024)
    assert isinstance(r, ContextExplanation) and not r.from_values and r.omitted == ()
    assert [f.name for f in r.layouts] == ["contiguous", "zigzag", "balanced"]
    for f in r.layouts:
        work, shifts, run = figures("causal", f.name, 4, 1024)
        assert list(f.work) == work and f.shifts == shifts and f.pairs_run == run, f.name
    contiguous, zigzag = r.layout("contiguous"), r.layout("zigzag")
    # Every layout in 64-blocks (the balanced layout's chunks). Contiguous: chunks of 4 x 4
    # blocks; device d computes d full chunks (16 blocks each) and a diagonal chunk (10).
    assert contiguous.block == zigzag.block == 64
    assert contiguous.work == tuple((16 * d + 10) * 64 * 64 for d in range(4))
    assert contiguous.balance == pytest.approx(58 / 34) and contiguous.pairs_run == 10 and contiguous.pairs == 16
    # Zigzag: chunk i (2 x 2 blocks) computes 4i + 3 blocks; device d holds chunks d and 7 - d: 34 blocks.
    assert zigzag.work == (34 * 64 * 64,) * 4 and zigzag.balance == 1.0
    assert zigzag.pairs_run == 36 and zigzag.pairs == 64
    assert r.layout("balanced").balance == pytest.approx(1.0)
    shard = 2 * 1 * 256 * 1 * 128 * 2                # K and V of [B=1, S/P=256, K=1, H=128], bf16
    assert r.shard_bytes == shard and r.plain_ring_bytes == 3 * shard
    for f in r.layouts:
        assert f.steps == 4 and f.received_bytes == 3 * shard


def test_window_needs_two_ring_steps_contiguous():
    r = explain_context("causal & window(100)", 4, 1024)
    contiguous, zigzag = r.layout("contiguous"), r.layout("zigzag")
    assert contiguous.shifts == (0, 1) and contiguous.steps == 2
    assert contiguous.received_bytes == r.shard_bytes          # one shard, from the neighbour
    assert contiguous.pairs_run == 7                            # 4 diagonal pairs + 3 from the left
    assert zigzag.shifts == figures("causal & window(100)", "zigzag", 4, 1024)[1] == (0, 1, 3)
    assert zigzag.received_bytes == 2 * r.shard_bytes


def test_documents_balanced_beats_contiguous_through_the_cli(capsys):
    obj = cli_json(capsys, "causal & doc(ids)", "--seq", "4096", "--devices", "4",
                   "--tensor", "ids=segments:" + ",".join(map(str, DOCS)))
    cp = obj["context_parallel"]
    rows = {row["layout"]: row for row in cp["layouts"]}
    for name, row in rows.items():
        work, shifts, run = figures("causal & doc(ids)", name, 4, 4096, ids=DOC_IDS)
        assert row["work"] == work and row["shifts"] == list(shifts) and row["pairs_run"] == run, name
    # In 256-blocks: device 0 holds the first half of the long document (10 blocks), device 1
    # its second half (5 + 6 + 7 + 8 = 26), device 2 two documents of 2 x 2 blocks (3 + 3),
    # device 3 one of 2 x 2 and two of 1 (3 + 1 + 1): busiest 26 of a mean 47 / 4.
    assert rows["contiguous"]["work"] == [b * 256 * 256 for b in (10, 26, 6, 5)]
    assert rows["contiguous"]["balance"] == pytest.approx(26 / (47 / 4), abs=1e-5)
    assert rows["balanced"]["balance"] < 1.05 < rows["zigzag"]["balance"] < rows["contiguous"]["balance"]
    # From tensor values: the run time sends only the shifts the plan needs (contiguous: 2 of 4).
    assert cp["plan_from_values"] is True and cp["default_layout"] == "contiguous"
    assert rows["contiguous"]["shifts"] == [0, 1] and rows["contiguous"]["ring_steps"] == 2
    assert rows["contiguous"]["kv_bytes_received"] == cp["shard_bytes"] == cp["plain_ring_bytes"] // 3


def test_text_report_follows_the_usual_one(capsys):
    assert main(["explain", "causal", "--seq", "1024", "--devices", "4", "--width", "80"]) == 0
    out = capsys.readouterr().out
    usual, _, shards = out.partition("\n\ncontext parallel: 4 devices")
    assert usual.startswith("canonical: q >= kv\n") and shards
    lines = shards.splitlines()
    assert lines[1].split() == ["layout", "chunks", "plan", "block", "busiest", "work", "balance", "pairs", "run",
                                "ring", "steps", "K/V", "received"]
    assert lines[2].split() == ["contiguous", "4", "x", "1", "64", "232", "Ki", "1.71", "10", "/", "16", "4", "/",
                                "4", "384", "KiB"]
    assert lines[3].split()[:7] == ["zigzag", "4", "x", "2", "64", "136", "Ki"] and "1.00" in lines[3]
    assert "    contiguous  40 Ki, 104 Ki, 168 Ki, 232 Ki" in lines
    assert "default: attention(context_layout=None) takes zigzag" in shards
    assert "1 kv head x 128 dims x 2 bytes, bf16" in shards and "note:" not in shards

    assert main(["explain", "causal & doc(ids)", "--seq", "4096", "--devices", "4", "--width", "80",
                 "--tensor", "ids=segments:" + ",".join(map(str, DOCS))]) == 0
    out = capsys.readouterr().out
    assert "2 / 4" in out and "512 KiB" in out and "(plan" not in out
    assert "note: the mask reads tensors (ids)" in out and "lax.cond" in out
    assert 'hint: context_layout="balanced" brings the balance from 2.21 to 1.02' in out


@pytest.mark.parametrize("text, T, tensors, expected", [
    ("causal", 1024, {}, "zigzag"),
    ("causal & window(100)", 1024, {}, None),      # whichever device_work favours
    ("causal & doc(ids)", 4096, {"ids": f"segments:{','.join(map(str, DOCS))}"}, "contiguous"),   # from values
    ("causal", 1100, {}, "contiguous"),            # zigzag does not fit
])
def test_default_layout_is_the_runtimes_choice(capsys, text, T, tensors, expected):
    args = [a for name, value in tensors.items() for a in ("--tensor", f"{name}={value}")]
    obj = cli_json(capsys, text, "--seq", str(T), "--devices", "4", *args)
    values = {"ids": DOC_IDS} if tensors else {}
    chosen, _ = choose_layout(scoremod.compile(text), 4, q_len=T, kv_len=T, batch=1, heads=1, q_offset=0,
                              kv_offset=0, tensors=values)
    assert obj["context_parallel"]["default_layout"] == chosen.name
    assert chosen.name == (expected or chosen.name)


def test_json_round_trip_and_the_usual_keys_unchanged(capsys):
    args = ["causal & window(100)", "--seq", "1024", "--batch", "2", "--heads", "8"]
    plain = cli_json(capsys, *args)
    obj = cli_json(capsys, *args, "--devices", "4", "--kv-heads", "2", "--head-dim", "64")
    cp = obj.pop("context_parallel")
    assert obj == plain                                     # --devices only adds its key
    report = explain_context("causal & window(100)", 4, 1024, batch=2, heads=8, kv_heads=2, head_dim=64,
                             default_layout=cp["default_layout"])
    assert cp == json.loads(report.to_json())
    assert cp["shard_bytes"] == 2 * 2 * 256 * 2 * 64 * 2     # K and V of [B=2, 256, K=2, H=64], bf16
    assert cp["layouts"][0]["kv_bytes_received"] == cp["shard_bytes"]   # contiguous: shift 1 only


def test_lengths_that_zigzag_or_balanced_do_not_fit_are_omitted_with_the_reason(capsys):
    obj = cli_json(capsys, "causal", "--seq", "1100", "--devices", "4")
    cp = obj["context_parallel"]
    assert [row["layout"] for row in cp["layouts"]] == ["contiguous"]
    assert cp["omitted"] == [
        {"layout": "zigzag", "reason": "q 1100 and kv 1100 must be multiples of 8 (4 devices x 2 chunks)"},
        {"layout": "balanced", "reason": "q 1100 and kv 1100 must be multiples of 16 (4 devices x 4 chunks)"}]
    assert main(["explain", "causal", "--seq", "1100", "--devices", "4"]) == 0
    out = capsys.readouterr().out
    assert "  zigzag      omitted: q 1100 and kv 1100 must be multiples of 8" in out
    assert "takes contiguous (zigzag does not fit these lengths)" in out


def test_everything_masked_has_no_balance():
    r = explain_context("causal & kv > q", 2, 256)
    for f in r.layouts:
        assert f.work == (0, 0) and f.balance is None and f.steps == 0 and f.received_bytes == 0
    assert "  contiguous  2 x 1   32          0             -" in r.render()


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(devices=0), "devices=0 must be a positive int"),
    (dict(devices=True), "devices=True must be a positive int"),
    (dict(devices=2.0), "devices=2.0 must be a positive int"),
    (dict(devices=3), "q_len=1024 is not a multiple of 3"),
    (dict(devices=4, kv_len=1002), "kv_len=1002 is not a multiple of 4"),
    (dict(devices=4, heads=6, kv_heads=4), "must be a multiple of key/value heads K=4"),
    (dict(devices=4, head_dim=0), "head_dim=0 must be a positive int"),
    (dict(devices=4, default_layout="ring"), "default_layout='ring'"),
])
def test_library_errors(kwargs, fragment):
    kwargs = {"q_len": 1024, **kwargs}
    with pytest.raises(ScoreModShapeError) as info:
        explain_context("causal", **kwargs)
    assert fragment in str(info.value)
