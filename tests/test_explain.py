"""``Mod.explain`` and ``dslc explain`` (compiler/explain.py): snapshot tests of the text and
JSON reports, the numbers in them, and CLI errors.

Snapshots live in tests/snapshots/explain_<name>.{txt,json}. After an intended change of
the output, regenerate them with ``SCOREMOD_UPDATE_SNAPSHOTS=1 pytest tests/test_explain.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import scoremod
from scoremod.cli import main
from scoremod.cli import parse_tensor_value
from scoremod.compiler.explain import Explanation, explain
from scoremod.runtime._dispatch_order import dispatch_summary
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
    from scoremod.compiler.plan import build_plan
    plan = build_plan(scoremod.compile("causal"), q_len=1000, kv_len=1000, block_q=128, block_kv=128)
    assert result.plan_bytes == plan.metadata_bytes


def test_json_leaves_out_large_grids():
    result = explain("causal", 1 << 14, block=16)  # 1024 x 1024 blocks
    obj = result.to_dict()
    assert obj["grid_omitted"] is True and "grid" not in obj
    assert obj["grid_shape"] == [1, 1, 1024, 1024]
    assert sum(obj["counts"].values()) == 1024 * 1024


def test_dispatch_summary_names_the_paths_in_dispatch_order():
    from scoremod.runtime._dispatch_order import ATTENTION_ON_GPU
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


# ---- Explanation.to_svg and dslc explain --svg ---------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"
CLASS_OF = {"empty": 0, "partial": 1, "full": 2}   # the classes' int8 codes (Explanation.classes)


def _drawn_grids(svg: str) -> list[tuple[str, np.ndarray]]:
    """(planes label, drawn grid of class codes) per grid panel, rebuilt from the rects; every
    cell must be covered by exactly one rect."""
    root = ET.fromstring(svg)
    out = []
    for panel in root.iter(f"{SVG}g"):
        if panel.get("class") != "plane":
            continue
        rects = [(CLASS_OF[g.get("class")], r) for g in panel.iter(f"{SVG}g") if g.get("class") in CLASS_OF
                 for r in g.iter(f"{SVG}rect")]
        boxes = [(cls, *(int(r.get(k)) for k in ("x", "y", "width", "height"))) for cls, r in rects]
        rows = max(y + h for _, _, y, _, h in boxes)
        cols = max(x + w for _, x, _, w, _ in boxes)
        grid = np.full((rows, cols), -1)
        for cls, x, y, w, h in boxes:
            assert (grid[y:y + h, x:x + w] == -1).all(), "overlapping rects"
            grid[y:y + h, x:x + w] = cls
        assert (grid >= 0).all(), "cells left undrawn"
        out.append((panel.get("data-planes"), grid))
    return out


def _svg_texts(svg: str) -> list[str]:
    return ["".join(t.itertext()) for t in ET.fromstring(svg).iter(f"{SVG}text")]


def test_svg_draws_every_block_of_a_small_grid():
    result = explain("causal", 1000, block=128)
    svg = result.to_svg()
    [(label, grid)] = _drawn_grids(svg)
    assert label == ""
    # causal over 8 x 8 blocks: partial diagonal, full below, empty above
    expected = np.tril(np.full((8, 8), 2), -1) + np.eye(8, dtype=int)
    np.testing.assert_array_equal(grid, expected)
    texts = _svg_texts(svg)
    assert "each cell: 1 x 1 block of 128 x 128 positions" in texts
    assert any("28 full, 8 partial, 28 empty" in t for t in texts)
    assert any(t.startswith("density:") and "56.2% of blocks visited" in t for t in texts)


@pytest.mark.parametrize("name, args", [c for c in CLI_CASES if c[0] != "downsampled"],
                         ids=[c[0] for c in CLI_CASES if c[0] != "downsampled"])
def test_svg_area_per_class_equals_the_counts(name, args, tmp_path, capsys):
    path = tmp_path / f"{name}.svg"
    assert main(["explain", *args, "--svg", str(path)]) == 0
    report = capsys.readouterr().out
    svg = path.read_text(encoding="utf-8")
    grids = _drawn_grids(svg)
    blocks = report.split("blocks:")[1].splitlines()[0]   # "  64 in a [1, 1, 8, 8] grid: 7 full, ..."
    counts = {k: int(blocks.split(f" {k}")[0].rsplit(" ", 1)[-1].replace(",", "")) for k in CLASS_OF}
    # A panel stands for the planes its label names: "" one, "h=0-1" two, "h=0-1,3" three.
    planes = [sum(int(hi or lo) - int(lo) + 1 for lo, _, hi in (span.partition("-") for span in label[2:].split(",")))
              if label else 1 for label, _ in grids]
    drawn = {k: sum(n * int((g == code).sum()) for n, (_, g) in zip(planes, grids)) for k, code in CLASS_OF.items()}
    assert drawn == counts
    assert f"canonical: {report.splitlines()[0].split(': ', 1)[1]}" in _svg_texts(svg)


def test_svg_draws_each_distinct_head_grid():
    result = explain("causal & (h < 2 | sink(64))", 512, block=64, heads=4)
    svg = result.to_svg()
    grids = dict(_drawn_grids(svg))
    assert list(grids) == ["h=0-1", "h=2-3"]
    np.testing.assert_array_equal(grids["h=0-1"], result.classes[0, 0])
    np.testing.assert_array_equal(grids["h=2-3"], result.classes[0, 3])
    assert not (result.classes[0, 0] == result.classes[0, 3]).all()
    title = ET.fromstring(svg).find(f"{SVG}title").text
    assert "2 distinct grids for the 4 (batch, head) planes" in title


def test_svg_draws_at_most_four_distinct_batch_grids():
    result = scoremod.compile("causal | kv < n[b]").explain(1024, block=64, batch=6,
                                                           n=np.array([0, 100, 300, 500, 700, 900]))
    svg = result.to_svg()
    grids = _drawn_grids(svg)
    assert [label for label, _ in grids] == ["b=0", "b=1", "b=2", "b=3"]
    for b, (_, grid) in enumerate(grids):
        np.testing.assert_array_equal(grid, result.classes[b, 0])
    assert "... and 2 more distinct grids" in _svg_texts(svg)
    assert "the first 4 drawn" in ET.fromstring(svg).find(f"{SVG}title").text


def _summary_by_loops(classes: np.ndarray, f: int) -> np.ndarray:
    """Each f x f group of blocks: full if all are full, empty if all are empty, else partial."""
    nq, nk = classes.shape
    out = np.zeros((-(-nq // f), -(-nk // f)), dtype=int)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            seen = set(np.unique(classes[r * f:(r + 1) * f, c * f:(c + 1) * f]).tolist())
            out[r, c] = 2 if seen == {2} else 0 if seen == {0} else 1
    return out


def test_svg_downsamples_large_grids_and_says_so():
    result = explain("causal & window(4096)", 131072, block=128)   # 1024 x 1024 blocks
    svg = result.to_svg()
    [(_, grid)] = _drawn_grids(svg)
    assert grid.shape == (256, 256)
    np.testing.assert_array_equal(grid, _summary_by_loops(result.classes[0, 0], 4))
    texts = _svg_texts(svg)
    assert any(t.startswith("each cell: 4 x 4 blocks of 128 x 128 positions") for t in texts)
    assert len(svg.encode()) < 150_000


def test_svg_64_blocks_a_side_are_drawn_one_per_cell():
    result = explain("causal & window(1024)", 8192)
    [(_, grid)] = _drawn_grids(result.to_svg())
    np.testing.assert_array_equal(grid, result.classes[0, 0])


def test_svg_stays_small_for_a_grid_of_many_short_runs():
    # Blocks in 4 x 4 tiles alternating full / empty: 4 x 4 cells would be a 256 x 256
    # checkerboard (65,536 rects), so the cells grow to 8 x 8 blocks (every one mixed: partial).
    tiles = (np.add.outer(np.arange(1024) // 4, np.arange(1024) // 4) % 2 * 2).astype(np.int8)
    result = Explanation(scoremod.compile("causal"), tiles[None, None], 1024 * 128, 1024 * 128, 128, 128, 1, 1)
    svg = result.to_svg()
    assert len(svg.encode()) < 400_000
    [(_, grid)] = _drawn_grids(svg)
    assert grid.shape == (128, 128) and (grid == 1).all()
    assert any(t.startswith("each cell: 8 x 8 blocks") for t in _svg_texts(svg))


def test_svg_escapes_the_source():
    result = explain("causal & window(100) | kv > q + 300", 512, block=64)
    source = str(result.mod)
    assert "&" in source and "<" in source and ">" in source
    svg = result.to_svg()
    assert source not in svg                      # raw '&' / '<' would not be XML
    root = ET.fromstring(svg)
    assert source in root.find(f"{SVG}title").text
    assert f"canonical: {source}" in _svg_texts(svg)


def test_svg_shows_warnings():
    svg = explain("kv > q + 300", 512, block=128).to_svg()
    warnings = [t for t in _svg_texts(svg) if t.startswith("warning:")]
    assert len(warnings) == 1 and "have no key" in warnings[0]


def test_explain_refuses_integers_outside_int32_like_attention():
    # A window of 2**32 - 5 would wrap in the kernels' int32: attention() refuses it, and
    # explain (which computes its plan in int64) used to report 16 FULL blocks for it.
    mod = scoremod.compile("window(w)")
    for w in (2**32 - 5, np.int64(2**32 - 5), np.asarray([[2**40]], np.int64).reshape(())):
        with pytest.raises(scoremod.ScoreModTensorError, match="outside int32"):
            mod.explain(64, block=(16, 16), w=w)
    assert mod.explain(64, block=(16, 16), w=2**31 - 1).to_dict()["counts"]
