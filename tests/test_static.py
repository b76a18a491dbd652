"""The package type-checks under mypy --strict and passes ruff; the public API is pinned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tierstore

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.static
def test_mypy_strict() -> None:
    result = _run("mypy", "--strict", "tierstore")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.static
def test_ruff() -> None:
    result = _run("ruff", "check", "tierstore", "tests", "loadtest")
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_is_pinned() -> None:
    assert sorted(tierstore.__all__) == sorted([
        "CheckpointArchived", "ConfigurationError", "CorruptPayload", "InvalidInput",
        "Keyring", "LeaseBusy", "LeaseLost", "LifecycleError", "PayloadTooLarge",
        "PruneRefused", "ResidencyError", "SaverOptions", "StorageError",
        "TierUnavailable", "TieredSaver", "TierstoreError", "TurnInProgress", "UsageError",
        "VersionConflict", "retry_on_conflict", "retry_on_conflict_sync", "DecompressionLimit",
        "UnsafePayload",
    ])
    for name in tierstore.__all__:
        assert getattr(tierstore, name) is not None
