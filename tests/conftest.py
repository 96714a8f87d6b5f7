"""Shared test setup: Hypothesis profiles, the ``gpu`` marker, test helpers on the path.

Profiles (choose with the environment variable ``HYPOTHESIS_PROFILE``):

* ``ci`` (default): derandomized (the same examples on every run and machine), few
  examples, no deadline. This is what ``pytest`` runs in CI.
* ``dev``: random, many more examples, for hunting bugs locally:
  ``HYPOTHESIS_PROFILE=dev pytest tests/test_dsl_parser.py``.
* ``device``: like ``ci`` but reports the first failing examples without shrinking them
  (shrinking a kernel failure can take minutes of a metered GPU machine):
  ``HYPOTHESIS_PROFILE=device pytest -m gpu``.

Markers:

* ``@pytest.mark.gpu``: needs a GPU backend; skipped unless ``jax.default_backend() == "gpu"``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, Phase, settings


def pytest_sessionstart(session):
    """A Python without the project installed (a bare `pytest`): one clear message before
    collection, instead of an ImportError per test file."""
    missing = [name for name in ("jax", "scoremod") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.exit(f"{' and '.join(missing)} cannot be imported by {sys.executable}. Run the tests with the "
                    "README's command, which installs the project and its test dependencies in .venv first: "
                    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
                    ".venv/bin/python -m pytest -q -p no:cacheprovider", returncode=4)


# Context-parallel tests need several devices; on CPU XLA pretends to have 8 (set before
# jax starts; computations that name no device still run on device 0).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# tests/evaluator.py and tests/strategies.py are imported as top-level modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=1000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "device", derandomize=True, max_examples=40, deadline=None, print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU backend (skipped elsewhere)")


@lru_cache(maxsize=None)
def _has_gpu() -> bool:
    try:
        import jax
        return jax.default_backend() == "gpu"
    except Exception:  # no jax, or no backend at all: certainly no GPU
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a GPU backend (jax.default_backend() != 'gpu')")
    for item in items:
        # Importing jax is only paid for when some collected test needs a GPU.
        if "gpu" in item.keywords and not _has_gpu():
            item.add_marker(skip_gpu)
