"""``Mod.explain`` and ``dslc explain`` (compiler/explain.py): snapshot tests of the text and
JSON reports, the numbers in them, and CLI errors.

Snapshots live in tests/snapshots/explain_<name>.{txt,json}. After an intended change of
the output, regenerate them with ``SCOREMOD_UPDATE_SNAPSHOTS=1 pytest tests/test_explain.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import scoremod
from scoremod.cli import main
from scoremod.cli import parse_tensor_value
from scoremod.compiler.explain import Explanation, explain
from scoremod.runtime._dispatch import dispatch_summary
from scoremod.errors import ScoreModShapeError, ScoreModTensorError

SNAPSHOTS = Path(__file__).parent / "snapshots"


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("SCOREMOD_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"missing snapshot {path}: run with SCOREMOD_UPDATE_SNAPSHOTS=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"explain output differs from {path}"


def _json_text(obj: dict) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


# (snapshot name, dslc explain arguments)
CLI_CASES = [
    ("causal", ["causal", "--seq", "1024"]),
    ("sliding_window", ["causal & window(256)", "--seq", "4096", "--block", "128"]),
    ("documents", ["causal & doc(ids)", "--seq", "2048", "--tensor", "ids=segments:700,300,1048"]),
    ("decode_offset", ["causal", "--seq", "64", "--kv-seq", "1000", "--q-offset", "936", "--block", "64,128"]),
    ("alibi_bias", ["causal & window(128) + alibi(8)", "--seq", "512", "--block", "64", "--heads", "8"]),
    ("softcap_chunk", ["softcap(30) & causal & chunk(256)", "--seq", "1024", "--block", "64,128"]),
    ("masked_everywhere", ["causal & kv > q", "--seq", "256", "--block", "64"]),
    ("no_key_rows", ["kv > q + 300", "--seq", "512", "--block", "128"]),
    ("head_dependent", ["causal & (h < 2 | sink(64))", "--seq", "512", "--block", "64", "--heads", "4"]),
    ("downsampled", ["causal & window(4096)", "--seq", "131072", "--block", "128"]),
]


@pytest.mark.parametrize("name, args", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_text_snapshot(name, args, capsys):
    assert main(["explain", *args, "--width", "80"]) == 0
    check_snapshot(f"explain_{name}.txt", capsys.readouterr().out)


@pytest.mark.parametrize("name, args", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_json_snapshot(name, args, capsys):
    assert main(["explain", *args, "--json"]) == 0
    out = capsys.readouterr().out
    obj = json.loads(out)
    assert out.count("\n") == 1  # one object on one line
    for key in ("canonical", "kind", "block", "grid_shape", "counts", "density"):
        assert key in obj
    assert ("grid" in obj) != obj.get("grid_omitted", False)
    check_snapshot(f"explain_{name}.json", _json_text(obj))


def test_per_batch_grids_through_mod_explain():
    mod = scoremod.compile("causal | prefix(n)")
    result = mod.explain(512, block=(64, 64), batch=3, n=np.array([64, 300, 64]))
    assert isinstance(result, Explanation)
    assert result.grid_shape == (3, 1, 8, 8)
    text = result.render(width=80)
    assert "b=0,2:" in text and "b=1:" in text
    check_snapshot("explain_prefix_per_batch.txt", text + "\n")


def test_numbers():
    result = explain("causal", 1000, block=128)
    nq = 8
    assert result.grid_shape == (1, 1, nq, nq)
    assert result.counts == {"full": nq * (nq - 1) // 2, "partial": nq, "empty": nq * (nq - 1) // 2}
    assert result.density == pytest.approx(36 / 64)
    # Visited area: every block on or below the diagonal; the last row/column holds 1000 - 896 = 104.
    visited = sum(min(128, 1000 - 128 * i) * min(128, 1000 - 128 * j) for i in range(nq) for j in range(i + 1))
    assert result.flops_saved == pytest.approx(1 - visited / 1000**2)
    plan = scoremod.compiler.plan.build_plan(scoremod.compile("causal"), q_len=1000, kv_len=1000, block_q=128,
                                             block_kv=128)
    assert result.plan_bytes == plan.metadata_bytes


def test_json_leaves_out_large_grids():
    result = explain("causal", 1 << 14, block=16)  # 1024 x 1024 blocks
    obj = result.to_dict()
    assert obj["grid_omitted"] is True and "grid" not in obj
    assert obj["grid_shape"] == [1, 1, 1024, 1024]
    assert sum(obj["counts"].values()) == 1024 * 1024


def test_dispatch_summary_names_the_paths_in_dispatch_order():
    from scoremod.runtime._dispatch import ATTENTION_ON_GPU
    text = dispatch_summary(scoremod.compile("causal & doc(ids)"))
    assert " then ".join(ATTENTION_ON_GPU) in text and "chunked path" in text
    assert "ids" in text
    assert "cudnn" in dispatch_summary(scoremod.compile("causal"))
    declined = dispatch_summary(scoremod.compile("causal + relpos(t, 4)"))
    assert "decline" in declined and "computed positions" in declined


def test_mod_explain_leaves_the_runtime_out():
    # The compiler's report knows nothing of the runtime; dslc explain adds the paragraph.
    assert "lowering" not in str(scoremod.compile("causal").explain(256, block=64))


def test_parse_tensor_value(tmp_path):
    assert parse_tensor_value("n", "12") == 12
    assert parse_tensor_value("w", "0.5") == 0.5
    np.testing.assert_array_equal(parse_tensor_value("ids", "segments:2,1,3"), [0, 0, 1, 2, 2, 2])
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(5))
    np.testing.assert_array_equal(parse_tensor_value("ids", str(path)), np.arange(5))
    for bad in ("segments:", "segments:3,-1", "abc", str(tmp_path / "missing.npy")):
        with pytest.raises(ScoreModTensorError, match="tensor 'ids'"):
            parse_tensor_value("ids", bad)


@pytest.mark.parametrize("args, message", [
    (["causal & windw(8)", "--seq", "64"], "unknown name 'windw'"),
    (["causal", "--seq", "64", "--block", "96"], "block_q=96 must be a power of two"),
    (["causal", "--seq", "0"], "q_len=0 must be a positive int"),
    (["causal & doc(ids)", "--seq", "64"], "missing tensor 'ids'"),
    (["causal & doc(ids)", "--seq", "64", "--tensor", "ids=segments:10,10"], "too short"),
    (["causal", "--seq", "64", "--tensor", "ids=3"], "unexpected tensor 'ids'"),
    (["causal & doc(ids)", "--seq", "64", "--tensor", "ids"], "--tensor expects NAME=VALUE"),
    (["causal", "--seq", str(1 << 20), "--block", "16"], "cells, more than"),
])
def test_cli_errors_exit_1_with_a_message(args, message, capsys):
    assert main(["explain", *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.startswith("error:")


def test_bad_block_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "causal", "--seq", "64", "--block", "a,b"])
    assert exc.value.code == 2


def test_explain_errors_are_scoremod_errors():
    with pytest.raises(ScoreModShapeError):
        explain("causal", 64, block=(64, 48))
    with pytest.raises(ScoreModTensorError, match="missing tensor 'n'"):
        explain("prefix(n)", 64)
