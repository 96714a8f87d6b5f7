"""``dslc`` (``python -m scoremod``): check, list, show and --help, through a subprocess like a
user runs them; exit codes 0 / 1 (2 for usage errors, as argparse does)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scoremod.cli import main
from scoremod.dsl.definitions import BUILTIN_SIGNATURES, prelude


def dslc(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "scoremod", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_check_ok():
    r = dslc("check", "causal & window(1024) + alibi(8)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: bias\ncanonical: ")
    assert r.stderr == ""


def test_check_error_has_message_caret_and_exit_1():
    r = dslc("check", "causal & windw(128)")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == ("error: unknown name 'windw' — did you mean 'window'?\n"
                        "  causal & windw(128)\n"
                        "           ^^^^^\n")


def test_check_reads_stdin_and_warns_when_everything_is_masked():
    r = dslc("check", "-", stdin="swa(w) = causal & window(w)\nswa(4) & doc(ids)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "ok: mask"
    assert r.stdout.splitlines()[-1] == "tensors: ids"
    r = dslc("check", "causal & false + alibi(8)")
    assert r.returncode == 0
    assert "warning: the mask is false everywhere" in r.stderr


def test_list_shows_every_name_with_its_kind():
    r = dslc("list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    for d in prelude():
        assert any(line.startswith(d.signature + " ") for line in lines), d.signature
    for sig in BUILTIN_SIGNATURES.values():
        assert any(line.startswith(sig + " ") for line in lines), sig
    kinds = {line.split()[0]: line.split()[1] for line in lines if not line.startswith(("window(l", "doc(q"))}
    assert kinds["causal"] == "mask" and kinds["alibi(n)"] == "bias" and kinds["softcap(c)"] == "transform"


def test_show():
    r = dslc("show", "window")
    assert r.returncode == 0
    assert "window(w) = abs(q - kv) < w" in r.stdout
    assert "window(l, r) = kv >= q - l & kv <= q + r" in r.stdout
    assert "kind: mask" in r.stdout
    r = dslc("show", "windw")
    assert r.returncode == 1
    assert "unknown name 'windw' — did you mean 'window'?" in r.stderr


@pytest.mark.parametrize("command", ["check", "list", "show", "explain"])
def test_help_for_each_subcommand(command):
    r = dslc(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: dslc {command}")


def test_top_level_help_and_usage_errors():
    r = dslc("--help")
    assert r.returncode == 0
    for command in ("check", "list", "show", "explain"):
        assert command in r.stdout
    assert dslc().returncode == 2


# In-process (fast) checks of the same entry point.

def test_main_in_process(capsys):
    assert main(["check", "doc(ids) & causal"]) == 0
    out = capsys.readouterr().out
    assert "ok: mask" in out and "tensors: ids" in out
    assert main(["check", "q < kv < 3"]) == 1
    err = capsys.readouterr().err
    assert "comparisons do not chain" in err and "^" in err
    assert main(["show", "abs"]) == 0
    assert "built-in function" in capsys.readouterr().out


def _npy_files(tmp_path):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    lying = tmp_path / "lying.npy"   # a header promising 100000 ints, then 16 bytes
    header = b'{"descr": "<i4", "fortran_order": False, "shape": (100000,), }'
    lying.write_bytes(b"\x93NUMPY\x01\x00" + bytes([118, 0]) + header.ljust(117) + b"\n" + b"\x00" * 16)
    return empty, lying


@pytest.mark.parametrize("args, fragment", [
    (["--seq", "9" * 25], "more positions than int32 holds"),
    (["--seq", "2000000", "--tensor", "ids=0"], "more than explain draws"),
    (["--seq", "100", "--tensor", "ids=segments:1000000000"], "segments cover 1,000,000,000 positions"),
    (["--seq", "100", "--tensor", "ids=EMPTY"], "cannot read"),
    (["--seq", "100", "--tensor", "ids=LYING"], "cannot read"),
    (["--seq", "0"], "q_len=0 must be a positive int"),
    (["--seq", "100", "--kv-seq", "-1"], "kv_len=-1 must be a positive int"),
    (["--seq", "100", "--block", "100"], "must be a power of two"),
    (["--seq", "100", "--batch", "0"], "batch=0 must be a positive int"),
    (["--seq", "100", "--heads", "-1"], "heads=-1 must be a positive int"),
    (["--seq", "100", "--q-offset", "99999999999999", "--tensor", "ids=0"], "q_offset puts positions at"),
    (["--seq", "100", "--kv-offset", "-99999999999", "--tensor", "ids=0"], "kv_offset puts positions at"),
    (["--seq", "100", "--tensor", "noequals"], "--tensor expects NAME=VALUE"),
    (["--seq", "100", "--tensor", "ids="], "is not a number, a .npy file or segments"),
    (["--seq", "100", "--tensor", "ids=0", "--tensor", "idz=3"], "unexpected tensor 'idz'"),
    (["--seq", "100", "--tensor", "ids=0", "--width", "0"], "width=0 must be a positive int"),
])
def test_explain_bad_arguments_are_clear_errors_without_tracebacks(tmp_path, args, fragment):
    empty, lying = _npy_files(tmp_path)
    args = [a.replace("EMPTY", str(empty)).replace("LYING", str(lying)) for a in args]
    r = dslc("explain", "causal & doc(ids)", *args)
    assert r.returncode == 1, r.stdout
    assert fragment in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--devices", "0"], "--devices 0: must be a positive int"),
    (["--devices", "-3"], "--devices -3: must be a positive int"),
    (["--devices", "3"], "q_len=1024 is not a multiple of 3"),
    (["--devices", "4", "--kv-seq", "1026"], "kv_len=1026 is not a multiple of 4"),
    (["--devices", "4", "--heads", "6", "--kv-heads", "4"], "must be a multiple of key/value heads K=4"),
    (["--devices", "4", "--head-dim", "0"], "--head-dim 0: must be a positive int"),
    (["--kv-heads", "2"], "--kv-heads sets the K/V bytes of context parallelism: it needs --devices P"),
])
def test_explain_bad_devices_are_clear_errors_without_tracebacks(args, fragment):
    r = dslc("explain", "causal", "--seq", "1024", *args)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert fragment in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_explain_devices_prints_the_shard_plan():
    r = dslc("explain", "causal", "--seq", "1024", "--devices", "4", "--width", "80")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("canonical: q >= kv\n")
    assert "\n\ncontext parallel: 4 devices; q 1024, kv 1024; batch 1, heads 1\n" in r.stdout
    assert "takes zigzag" in r.stdout
    assert "--devices P" in dslc("explain", "--help").stdout


@pytest.mark.parametrize("args, fragment", [
    (["--seq", "64", "--devices", "four"], "argument --devices: invalid int value: 'four'"),
    (["--seq", "abc"], "argument --seq: invalid int value"),
    (["--seq", "64", "--block", "64,abc"], "argument --block: expected BQ or BQ,BKV"),
    (["--seq", "64", "--block", "7,3,2"], "argument --block: expected BQ or BQ,BKV"),
    (["--kv-seq", "64"], "the following arguments are required: --seq"),
    (["--seq", "64", "--width", "wide"], "argument --width: invalid int value"),
])
def test_explain_malformed_flags_are_usage_errors(args, fragment):
    r = dslc("explain", "causal", *args)
    assert r.returncode == 2, r.stdout
    assert fragment in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_version():
    import scoremod
    r = dslc("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dslc (scoremod) {scoremod.__version__}"
    assert scoremod.__version__[0].isdigit()   # from the installed package's metadata


# ---- dslc export ----------------------------------------------------------------------------

def test_export_prints_the_module_or_writes_it_to_a_file(tmp_path):
    r = dslc("export", "causal & doc(ids) + alibi(8)", "--to", "flex")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# Generated by scoremod") and r.stderr == ""
    for name in ("def make_mods(", "def block_mask(", "def score_mod(score, b, h, q_idx, kv_idx):",
                 "def mask_mod(b, h, q_idx, kv_idx):", "TENSORS = ('ids',)"):
        assert name in r.stdout, name
    compile(r.stdout, "exported.py", "exec")   # valid Python (running it needs torch: tests/test_flex_export.py)
    out = tmp_path / "mods.py"
    w = dslc("export", "-", "--to", "flex", "-o", str(out), stdin="causal & doc(ids) + alibi(8)\n")
    assert w.returncode == 0 and w.stdout == "", w.stderr
    assert out.read_text() == r.stdout


def test_export_errors_and_refusals_exit_1():
    r = dslc("export", "causal & windw(128)", "--to", "flex")
    assert r.returncode == 1 and r.stdout == ""
    assert "did you mean 'window'" in r.stderr and "^^^^^" in r.stderr
    r = dslc("export", "causal & window(device)", "--to", "flex")
    assert r.returncode == 1 and r.stdout == ""
    assert "cannot export to FlexAttention: tensor parameter 'device'" in r.stderr
    assert "Traceback" not in r.stderr
    r = dslc("export", "causal", "--to", "flex", "-o", "/nonexistent-dir/mods.py")
    assert r.returncode == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, fragment", [
    (["causal", "--to", "onnx"], "argument --to: invalid choice: 'onnx'"),
    (["causal"], "the following arguments are required: --to"),
    (["--to", "flex"], "the following arguments are required: SOURCE"),
])
def test_export_usage_errors(args, fragment):
    r = dslc("export", *args)
    assert r.returncode == 2, r.stdout
    assert fragment in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_export_help_and_listing():
    r = dslc("export", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: dslc export")
    assert "--to {flex}" in r.stdout
    assert "export" in dslc("--help").stdout


def test_export_in_process(capsys):
    assert main(["export", "softcap(30) & causal", "--to", "flex"]) == 0
    out = capsys.readouterr().out
    assert "KIND = 'transform'" in out and "torch.tanh" in out


# ---- dslc explain --svg ---------------------------------------------------------------------

def test_explain_svg_writes_the_picture_and_still_prints_the_report(tmp_path):
    import xml.etree.ElementTree as ET
    out = tmp_path / "window.svg"
    r = dslc("explain", "causal & window(256)", "--seq", "1024", "--svg", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("canonical: abs(q - kv) < 256 & q >= kv\n") and r.stderr == ""
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    # 8 x 8 blocks of 128, kv in (q - 256, q]: block (i, i) partial, (i, i - 1) full (q - kv is
    # 1..255), (i, i - 2) partial (129..383), the rest empty
    area = {g.get("class"): sum(int(rect.get("width")) * int(rect.get("height")) for rect in g)
            for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") in ("full", "partial", "empty")}
    assert area == {"full": 7, "partial": 8 + 6, "empty": 64 - 7 - 14}
    j = dslc("explain", "causal", "--seq", "256", "--json", "--svg", str(out))
    assert j.returncode == 0 and j.stdout.startswith("{"), j.stderr
    assert "causal" not in out.read_text() and "q &gt;= kv" in out.read_text()   # overwritten


@pytest.mark.parametrize("target", ["/nonexistent-dir/grid.svg", "DIR"])
def test_explain_svg_unwritable_file_is_a_clear_error(tmp_path, target):
    r = dslc("explain", "causal", "--seq", "256", "--svg", target.replace("DIR", str(tmp_path)))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: cannot write") and "Traceback" not in r.stderr, r.stderr


def test_explain_help_mentions_svg():
    r = dslc("explain", "--help")
    assert r.returncode == 0 and "--svg FILE" in r.stdout


# ---- what a command loads ----------------------------------------------------------------------

def _loads(command: str) -> dict:
    """Which of numpy and jax ``dslc COMMAND`` imports, run in a fresh interpreter."""
    code = ("import sys, contextlib, io\n"
            "from scoremod.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    code = main({command!r})\n"
            "print(code, 'numpy' in sys.modules, 'jax' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    exit_code, numpy, jax = r.stdout.split()
    return {"exit": int(exit_code), "numpy": numpy == "True", "jax": jax == "True"}


def test_check_loads_no_jax_and_numpy_only_for_the_interval_analysis():
    assert _loads(["check", "causal & window(128) + softcap(30)"]) == {"exit": 0, "numpy": False, "jax": False}
    # alibi's -8 * (h + 1) / 8 is simplified where the interval analysis (NumPy) says it cannot wrap.
    assert _loads(["check", "causal & window(128) + alibi(8)"]) == {"exit": 0, "numpy": True, "jax": False}


@pytest.mark.parametrize("source", ["causal & window(128)", "causal & window(128) + alibi(8)",
                                    "softcap(30) & chunk(64)", "(score > 0) & causal"])
def test_explain_of_a_static_mod_never_loads_jax(source):
    # compiler/plan_layout.py and runtime/_dispatch_order.py: no jax; ~0.25 s instead of ~1.2 s.
    assert _loads(["explain", source, "--seq", "4096"]) == {"exit": 0, "numpy": True, "jax": False}


def test_explain_of_a_mod_with_tensors_still_works():
    # jax is loaded there (the tile program says what the kernels decline); the report is whole.
    r = dslc("explain", "causal & doc(ids)", "--seq", "256", "--tensor", "ids=segments:128,128")
    assert r.returncode == 0, r.stderr
    assert "lowering:" in r.stdout and "blocks:" in r.stdout


def test_a_tensor_given_twice_is_an_error(capsys):
    # (the last value used to win silently)
    assert main(["explain", "window(w)", "--seq", "64", "--tensor", "w=4", "--tensor", "w=8"]) == 1
    assert "--tensor w is given twice" in capsys.readouterr().err
    assert main(["explain", "window(w)", "--seq", "64", "--tensor", "w=8"]) == 0
