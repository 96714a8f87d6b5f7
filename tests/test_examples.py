"""Every script in examples/ runs to completion (each asserts its own results).

Examples run on the CPU unless JAX_PLATFORMS says otherwise, so that a test process
holding a GPU does not starve them of its memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300,
                            cwd=path.parent, env=env)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
