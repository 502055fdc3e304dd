"""Shared fixtures. Real data lives in ../shared/data (override with DINODIFF_TEST_DATA).

The data folder is required: a missing folder fails the run loudly instead of skipping,
so CI can never go green without exercising the real-image tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("DINODIFF_TEST_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


def pytest_sessionstart(session: pytest.Session) -> None:
    data = shared_data_dir()
    if not (data / "cxr-covid").is_dir():
        raise pytest.UsageError(
            f"Test data not found at {data}. Put the shared data folder at ../shared/data "
            "or set DINODIFF_TEST_DATA to its path."
        )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real chest X-ray data (cxr-covid, lungs-covid, lungs-shenzhen, weights)."""
    return shared_data_dir()


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may reach the network; random encoders are cached per test session, not in ~/.cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DINODIFF_CACHE", str(tmp_path_factory.getbasetemp() / "dinodiff-cache"))


@pytest.fixture(scope="session")
def prepared_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 phantoms prepared at 64 px into shards of 8 (test split 20%): small data with known structure."""
    from dinodiff.data.phantoms import write_phantoms
    from dinodiff.prepare import prepare

    root = tmp_path_factory.mktemp("phantoms")
    source = write_phantoms(root / "raw", 24, size=96, seed=0, progress=False)
    prepare([source], root / "prepared", size=64, shard_size=8, workers=1, test_fraction=0.2, seed=0, progress=False)
    return root / "prepared"


def tiny_config(run_dir: Path, shards: Path, *overrides: str):
    """The `tiny` preset pointed at `shards`, writing to `run_dir`."""
    from dinodiff.config import load_training_settings

    return load_training_settings("tiny", [f"data.shards={shards}", f"train.run_dir={run_dir}", *overrides])
