"""Shared test set-up: 8 fake CPU devices (set before JAX starts) and the reference fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "reference" / "fixtures"
REFERENCE = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture
def fixtures_dir() -> Path:
    """The authors' reference outputs; tests using it skip where the folder is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (only inside the workplace)")
    return FIXTURES


@pytest.fixture
def reference_dir() -> Path:
    """The released checkpoints' parameter listings."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference listings not found at {REFERENCE} (only inside the workplace)")
    return REFERENCE
