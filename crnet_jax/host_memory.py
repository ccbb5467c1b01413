"""Transparent huge pages for malloc'd memory: fewer page faults on every training step
(Linux, glibc 2.35 and newer).

XLA:CPU allocates an executable's temporaries with malloc each time it runs (1.4 GiB per
training step of the lung network at 300 x 340, batch 8, with remat). glibc serves blocks
above 32 MiB with fresh mmap'd pages and unmaps them when they are freed, so every step
touches all of it anew and the kernel faults and zeroes it 4 KiB page by page: measured
359,000 page faults and about 1 s of system CPU time per 5.5 s step on the 2-core machine.
With glibc.malloc.hugetlb=1 glibc asks for transparent huge pages (madvise) on the blocks it
maps: 2 MiB pages, about 930 faults and 0.3 s of system time per step, fewer TLB misses,
and steps of 5.07-5.19 s instead of 5.71-5.83 s (benchmarks/RESULTS.md, "sixth pass").
Keeping the freed blocks instead (glibc.malloc.mmap_max=0, a high trim threshold, one
arena: no faults at all) measured slower: the heap stays on 4 KiB pages.

It takes effect where the system's transparent huge pages are "madvise" or "always"
(/sys/kernel/mm/transparent_hugepage/enabled); under "never" it changes nothing. glibc reads
GLIBC_TUNABLES only when a process starts, so the command-line entry points
(`python -m crnet_jax.train`, `.predict`, `.evaluate`) re-execute themselves once with the
variable set, before JAX has allocated anything. Set CRNET_HUGE_PAGES=0 to opt out.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)
OPT_OUT_ENV = "CRNET_HUGE_PAGES"


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


def tuned_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with the malloc settings added to GLIBC_TUNABLES (any settings already there
    are kept; ours come last and win), or None when nothing is to be done: not Linux with
    glibc 2.35+, opted out (CRNET_HUGE_PAGES=0), or the settings already present."""
    if not _glibc() or env.get(OPT_OUT_ENV, "1").strip() == "0" or is_active(env):
        return None
    current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in MALLOC_TUNABLES}
    kept = [t for t in current if t.split("=", 1)[0] not in names]
    return {**env, "GLIBC_TUNABLES": ":".join(kept + list(MALLOC_TUNABLES))}


def _launched_as(module: str, scripts: tuple[str, ...]) -> bool:
    """Whether this process was started to run `module` (python -m) or one of `scripts`
    (its console scripts): not a notebook or another program that calls its main()."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == module:
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in scripts


def reexec_with_huge_pages(module: str | None = None, scripts: tuple[str, ...] = ()) -> None:
    """Re-execute this process (same interpreter, options and arguments) with the malloc
    settings, unless `tuned_environment` says there is nothing to do; returns only then.
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
    reexec_with_huge_pages("crnet_jax.host_memory")
    state = "active" if is_active() else "not active"
    print(f"malloc settings {state}: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")


if __name__ == "__main__":
    main()
