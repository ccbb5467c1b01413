"""Loader for the optional C++ XLA FFI extension `crnet_jax._depthwise_ffi`.

The extension is compiled by `pip install` (setup.py, `optional=True`): when no C++
compiler is available the install still succeeds and `available()` is False; callers
then fall back to the pure-JAX implementation (see crnet_jax.depthwise).
"""
from __future__ import annotations

import pathlib
import threading
import warnings

import jax

from crnet_jax.csrc_digest import source_digest

ISA_NAMES = {0: "auto", 1: "baseline", 2: "avx2", 3: "avx512"}
ISA_CODES = {"auto": 0, "best": 0, "baseline": 1, "base": 1, "sse2": 1, "avx2": 2, "avx512": 3}

# The calling convention this Python code expects of the extension (kAbiVersion in
# csrc/depthwise_ffi.cc) and the targets it calls: an extension built from older sources
# (an in-place build left behind by a checkout of newer code) is refused, with the
# command that rebuilds it, rather than called with operands it does not expect.
ABI_VERSION = 6
REQUIRED_TARGETS = frozenset({
    "crnet_depthwise_fwd", "crnet_depthwise_bwd", "crnet_separable_fwd", "crnet_separable_bwd",
    "crnet_separable_fwd_into", "crnet_separable_fwd_stats", "crnet_separable_bwd_acc",
    "crnet_separable_bwd_bn", "crnet_separable_bwd_bn_acc", "crnet_separable_fwd_into_sums",
    "crnet_block_infer", "crnet_fanout_fwd_stats", "crnet_pointwise_bn_sums", "crnet_pointwise_bn_dx",
    "crnet_pointwise_bwd",
})
_REBUILD = ("rebuild it: pip install -e . (or, with setuptools >= 77 installed, "
            "python setup.py build_ext --inplace --force)")

_lock = threading.Lock()
_state: dict = {}


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        try:
            from crnet_jax import _depthwise_ffi as mod  # compiled extension
        except ImportError as e:  # not built (no compiler at install time) or broken
            _state.update(ok=False, reason=f"crnet_jax._depthwise_ffi could not be imported ({e})")
            return _state
        reason = stale_reason(mod)
        if reason:
            _state.update(ok=False, reason=reason)
            return _state
        try:
            for name, capsule in mod.registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)
        except Exception as e:  # pragma: no cover - jax/jaxlib incompatibility
            _state.update(ok=False, reason=f"registering the FFI targets failed ({type(e).__name__}: {e})")
            return _state
        try:
            _self_test()
        except Exception as e:  # e.g. extension built against an incompatible jaxlib
            _state.update(ok=False, reason=f"the FFI self-test failed ({type(e).__name__}: {e})")
            return _state
        _state.update(ok=True, reason="", module=mod, best_isa=int(mod.best_isa()))
        outdated = outdated_reason(mod, pathlib.Path(__file__).parent / "csrc")
        if outdated:  # still correct for this calling convention: warn, do not refuse
            warnings.warn(outdated, RuntimeWarning, stacklevel=2)
        return _state


def stale_reason(mod) -> str:
    """Why the compiled module `mod` does not match this Python code ('' when it does)."""
    version = getattr(mod, "abi_version", lambda: 1)()
    if version != ABI_VERSION:
        return (f"crnet_jax._depthwise_ffi ({getattr(mod, '__file__', '?')}) was built for "
                f"calling convention {version}, this code needs {ABI_VERSION}: {_REBUILD}")
    missing = sorted(REQUIRED_TARGETS - set(mod.registrations()))
    if missing:
        return (f"crnet_jax._depthwise_ffi ({getattr(mod, '__file__', '?')}) lacks the "
                f"targets {', '.join(missing)}: {_REBUILD}")
    return ""


def outdated_reason(mod, csrc: pathlib.Path) -> str:
    """Why the compiled module `mod` is older than the C++ sources in `csrc` ('' when it
    was built from them, or when either digest is unknown: an install without sources)."""
    built = getattr(mod, "source_digest", lambda: "")()
    here = source_digest(csrc)
    if not built or not here or built == here:
        return ""
    return (f"crnet_jax._depthwise_ffi ({getattr(mod, '__file__', '?')}) was built from other "
            f"sources than {csrc} (digest {built}, the sources now {here}): it runs, but without "
            f"their changes; {_REBUILD}")


def _self_test() -> None:
    """Runs a tiny forward through XLA once, so an incompatible build is caught here
    (and the caller falls back) rather than in the middle of a user's computation."""
    import numpy as np

    x = np.arange(2 * 3 * 4 * 16, dtype=np.float32).reshape(2, 3, 4, 16) / 100.0
    w = np.linspace(-1.0, 1.0, 9 * 16, dtype=np.float32).reshape(1, 3, 3, 16)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(xp[:, u : u + 3, v : v + 4, :] * w[0, u, v] for u in range(3) for v in range(3))
    attrs = dict(dilation=np.int64(1), isa=np.int64(0), threads=np.int64(1))
    with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
        call = jax.ffi.ffi_call("crnet_depthwise_fwd", jax.ShapeDtypeStruct(x.shape, np.float32))
        y = np.asarray(call(x, w, **attrs))
    if not np.allclose(y, ref, rtol=1e-5, atol=1e-5):
        raise RuntimeError("wrong result from the C++ kernel")


def available() -> bool:
    """True when the C++ CPU kernels are built and registered with XLA."""
    return bool(_load()["ok"])


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()["reason"]


def best_isa() -> str:
    """Instruction set the kernels use on this CPU: 'avx512', 'avx2' or 'baseline'."""
    st = _load()
    if not st["ok"]:
        raise RuntimeError(st["reason"])
    return ISA_NAMES[st["best_isa"]]
