"""The C++ kernels' instruction sets in tests: which this CPU runs, and switching to one."""
from __future__ import annotations

import jax
import pytest

from crnet_jax import _ffi

ORDER = ["baseline", "avx2", "avx512"]  # narrowest first


def runnable_isas() -> list[str]:
    """The instruction sets this CPU runs ([] without the C++ kernels)."""
    if not _ffi.available():
        return []
    return ORDER[: ORDER.index(_ffi.best_isa()) + 1]


def require_isa(isa: str) -> None:
    """Skip the calling test unless this CPU runs `isa`."""
    if isa not in runnable_isas():
        pytest.skip(f"this CPU does not run {isa}")


def use_isa(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip unless this CPU runs `isa`; else make every kernel traced from now on use it
    (the instruction set is read when a call is traced, so cached traces are dropped)."""
    require_isa(isa)
    monkeypatch.setenv("CRNET_DEPTHWISE_ISA", isa)
    jax.clear_caches()
