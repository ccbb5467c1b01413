"""Host memory for XLA:CPU's per-step blocks: transparent huge pages for malloc, and a
cache that keeps a step's block mapped for the next step (Linux, glibc 2.35 and newer).

XLA:CPU allocates an executable's temporaries as one block each time it runs (2.87 GB per
training step of the lung network at 300 x 340, batch 8) and frees it at the end. glibc
serves blocks above 32 MiB with fresh mmap'd pages and unmaps them when they are freed, so
every step touches all of it anew and the kernel faults and zeroes it page by page.

1. glibc.malloc.hugetlb=1: glibc asks for transparent huge pages (madvise) on the blocks it
   maps: 2 MiB pages, about 930 faults instead of 359,000 per step and fewer TLB misses
   (benchmarks/RESULTS.md, "sixth pass"). Where the system's transparent huge pages are
   "never" it changes nothing. Opt out: CRNET_HUGE_PAGES=0.
2. The block cache (crnet_jax/csrc/block_cache.c, built with the package as
   crnet_jax/_block_cache*.so and preloaded with LD_PRELOAD): aligned requests of 64 MiB
   and more get 2 MiB-aligned huge-page mappings, and a freed one stays mapped as a spare
   for the next request it can hold: no faults at all after the first step. On a VM that
   hands freed memory back to its host, re-faulting cost up to 1.4 s of system time in
   every other 2 s step ("ninth pass"). Spares are unmapped before a new block is mapped
   whenever keeping them would exceed the most bytes ever in use at once, so resident
   memory stays within one step's peak (the training loop keeps one step in flight on CPU
   and settles the cache between steps: one block for the whole run). Not added when
   LD_PRELOAD already names another library (another allocator may be preloaded). Opt out:
   CRNET_BLOCK_CACHE=0.

glibc reads GLIBC_TUNABLES, and the dynamic loader LD_PRELOAD, only when a process starts,
so the command-line entry points (`python -m crnet_jax.train`, `.predict`, `.evaluate`)
re-execute themselves once with the variables set, before JAX has allocated anything.
Programs they start inherit the variables (both are harmless to other programs).
"""
from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import platform
import sys
from typing import Mapping

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)
OPT_OUT_ENV = "CRNET_HUGE_PAGES"
BLOCK_CACHE_OPT_OUT_ENV = "CRNET_BLOCK_CACHE"


def _glibc() -> bool:
    """Linux with glibc 2.35 or newer (the first with glibc.malloc.hugetlb)."""
    if not sys.platform.startswith("linux"):
        return False
    lib, version = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def is_active(env: Mapping[str, str] | None = None) -> bool:
    """Whether the malloc settings are in the environment (of this process by default)."""
    tunables = (os.environ if env is None else env).get("GLIBC_TUNABLES", "").split(":")
    return all(t in tunables for t in MALLOC_TUNABLES)


def block_cache_library() -> pathlib.Path | None:
    """The built block cache (crnet_jax/_block_cache*.so), or None (not built: not Linux,
    no C compiler, or CRNET_NO_EXTENSION at install)."""
    found = sorted(pathlib.Path(__file__).parent.glob("_block_cache*.so"))
    return found[0] if found else None


def _opted_out(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "1").strip() == "0"


def tuned_environment(env: Mapping[str, str], library: pathlib.Path | None = None) -> dict[str, str] | None:
    """`env` with the malloc settings added to GLIBC_TUNABLES (any settings already there are
    kept; ours come last and win) and the block cache `library` (default: the built one) as
    LD_PRELOAD; or None when nothing is to be done: not Linux with glibc 2.35+, opted out
    (CRNET_HUGE_PAGES=0, CRNET_BLOCK_CACHE=0), or everything already present. The cache is
    not added beside other preloaded libraries."""
    if not _glibc():
        return None
    out = dict(env)
    if not _opted_out(env, OPT_OUT_ENV) and not is_active(env):
        current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        names = {t.split("=", 1)[0] for t in MALLOC_TUNABLES}
        kept = [t for t in current if t.split("=", 1)[0] not in names]
        out["GLIBC_TUNABLES"] = ":".join(kept + list(MALLOC_TUNABLES))
    library = library or block_cache_library()
    if library is not None and not _opted_out(env, BLOCK_CACHE_OPT_OUT_ENV) and not env.get("LD_PRELOAD", "").strip():
        out["LD_PRELOAD"] = str(library)
    return None if out == dict(env) else out


def block_cache_stats() -> dict[str, int] | None:
    """The block cache's counters in this process (blocks mapped, requests served by a
    spare, blocks unmapped; bytes the spares hold now, blocks in use now, the high-water
    mark of bytes in use at once), or None when it is not preloaded."""
    handle = _block_cache_handle()
    if handle is None:
        return None
    out = (ctypes.c_ulonglong * 6)()
    handle.crnet_block_cache_stats(out)
    names = ("mapped", "reused", "unmapped", "spare_bytes", "in_use", "high_water_bytes")
    return dict(zip(names, (int(v) for v in out)))


def blocks_in_use() -> int:
    """How many of the cache's blocks are in use now (0 when it is not preloaded)."""
    stats = block_cache_stats()
    return 0 if stats is None else stats["in_use"]


def settle_block_cache(in_use_at_most: int = 0, timeout_s: float = 0.05) -> int:
    """Wait until at most `in_use_at_most` of the cache's blocks are in use, for at most
    `timeout_s` seconds; returns how many are (0 when the cache is not preloaded).
    XLA:CPU frees a step's block a moment after the step's outputs are ready: a loop that
    has just waited for a step calls this (with `blocks_in_use()` from before that step was
    dispatched) before dispatching the next, which then reuses the block instead of
    mapping another."""
    handle = _block_cache_handle()
    if handle is None:
        return 0
    micros = ctypes.c_uint(max(0, min(int(timeout_s * 1e6), 2**32 - 1)))
    return int(handle.crnet_block_cache_settle(ctypes.c_int(in_use_at_most), micros))


def release_block_cache() -> int:
    """Unmap the cache's spare blocks now (a long-lived program done with its large steps);
    returns the bytes released (0 when the cache is not preloaded)."""
    handle = _block_cache_handle()
    if handle is None:
        return 0
    handle.crnet_block_cache_release.restype = ctypes.c_ulonglong
    return int(handle.crnet_block_cache_release())


@functools.lru_cache(maxsize=None)
def _block_cache_handle() -> ctypes.CDLL | None:
    """The block cache if this process preloaded it (RTLD_NOLOAD: never loads it anew; a
    library loaded later would not replace the allocator anyway). LD_PRELOAD is read once,
    as the loader did at start."""
    preloaded = os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")
    library = block_cache_library()
    if library is None or not any(p and pathlib.Path(p).resolve() == library.resolve() for p in preloaded):
        return None
    try:
        return ctypes.CDLL(str(library), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:  # named but not loaded (the loader could not preload it)
        return None


def _launched_as(module: str, scripts: tuple[str, ...]) -> bool:
    """Whether this process was started to run `module` (python -m) or one of `scripts`
    (its console scripts): not a notebook or another program that calls its main()."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == module:
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in scripts


def reexec_with_host_memory_settings(module: str | None = None, scripts: tuple[str, ...] = ()) -> None:
    """Re-execute this process (same interpreter, options and arguments) with the malloc
    settings and the block cache, unless `tuned_environment` says there is nothing to do;
    returns only then.
    module (and its console `scripts`): do it only when the process was started to run
    that entry point, never inside a program that merely calls it.
    Call it first thing in a command-line entry point, never from library code."""
    if module is not None and not _launched_as(module, scripts):
        return
    env = tuned_environment(os.environ)
    if env is None:
        return
    argv = sys.orig_argv  # the interpreter's own options included (Python 3.10+)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as e:  # run on as we are: slower, not wrong
        print(f"note: could not restart with the malloc settings ({e}); continuing without them", file=sys.stderr)


def main() -> None:
    """`python -m crnet_jax.host_memory`: say whether the settings are active here."""
    reexec_with_host_memory_settings("crnet_jax.host_memory")
    state = "active" if is_active() else "not active"
    print(f"malloc settings {state}: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
    stats = block_cache_stats()
    library = block_cache_library()
    if stats is not None:
        print(f"block cache active: {library}")
    else:
        why = "not built" if library is None else f"not preloaded (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')})"
        print(f"block cache not active: {why}")


if __name__ == "__main__":
    main()
