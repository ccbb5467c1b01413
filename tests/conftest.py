"""Shared fixtures: where the reference material lives, and multi-device CPU set-up."""
from __future__ import annotations

import os
import pathlib

# Expose 4 CPU devices so data-parallel code is exercised; must happen before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CRNET_SHARED", REPO_ROOT.parent / "shared"))


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"reference material not found at {path} (set CRNET_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The ../shared folder beside the checkout; skips the test when it is absent."""
    return _need(SHARED)


@pytest.fixture(scope="session")
def authors_dir(shared_dir: pathlib.Path) -> pathlib.Path:
    """The authors' trained Keras lung models and their reference outputs."""
    return _need(shared_dir / "reference" / "rescrnet-authors")


@pytest.fixture(scope="session")
def convlstm_dir(shared_dir: pathlib.Path) -> pathlib.Path:
    """Exact tf_keras references for the LSTM RES block."""
    return _need(shared_dir / "reference" / "convlstm-keras")


@pytest.fixture(scope="session")
def mcsz512_dir(shared_dir: pathlib.Path) -> pathlib.Path:
    """604 real CXRs with lung masks (Montgomery + Shenzhen), 512 x 512."""
    return _need(shared_dir / "data" / "mcsz512")
