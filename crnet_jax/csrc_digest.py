"""Digest of the C++ extension's sources (crnet_jax/csrc), recorded in the extension when
setup.py builds it and compared at import by crnet_jax._ffi, so that an extension built from
other sources than the checkout's (an in-place build left behind by a `git pull`) is
reported. Standard library only: setup.py loads this file before anything is installed."""
from __future__ import annotations

import hashlib
import pathlib

SUFFIXES = (".cc", ".h", ".inc")


def source_digest(csrc: str | pathlib.Path) -> str:
    """First 16 hex digits of the SHA-256 over the names and bytes of the .cc, .h and .inc
    files in `csrc`, in name order; '' when the directory holds none (an install without
    the sources)."""
    files = sorted(p for p in pathlib.Path(csrc).glob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        return ""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
