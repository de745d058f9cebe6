"""The models for tests/: shared/models.py's list (the product's, which posttrain/ and bench/ read too),
re-exported under the name every test family imports, plus the helpers only a test needs."""

import importlib
import os

from shared.models import (
    BENCH_CPU,
    BENCH_QUICK,
    MODELS,
    VARIANTS,
    ModelSpec,
    by_name,
    hf_from_pretrained,
    randomize_,
)

__all__ = [
    "BENCH_CPU",
    "BENCH_QUICK",
    "MODELS",
    "VARIANTS",
    "ModelSpec",
    "by_name",
    "hf_from_pretrained",
    "import_transformers",
    "randomize_",
]


def import_transformers(name="transformers"):
    """Import the transformers oracle (or one of its modules). Without it, a test is skipped on a
    laptop but fails in CI (CI=true, as CI services set it): a parity suite that silently skips
    everything must not pass there."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        return importlib.import_module(name)  # ModuleNotFoundError fails the test
    import pytest

    return pytest.importorskip(name)
