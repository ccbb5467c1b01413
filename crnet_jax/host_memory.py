"""Malloc settings for the command-line entry points: a training step's temporaries stay
mapped from one step to the next instead of being faulted in afresh (Linux, glibc 2.35+).

XLA:CPU mallocs an executable's temporaries as one block each time it runs (2.7 GiB per
training step of the lung network at 300 x 340, batch 8) and frees it when the run ends.
glibc serves a block that large with fresh mmap'd pages and unmaps it on free, so by default
every step faults all of it in again: 4 KiB page by page, 359,000 faults and about 1 s of
system time per step (measured on the 2-core machine). Three glibc tunables change that:

- glibc.malloc.hugetlb=1: glibc asks for transparent huge pages (madvise) on what it maps,
  2 MiB pages, about 1,900 faults per step and fewer TLB misses;
- glibc.malloc.mmap_max=0 and glibc.malloc.trim_threshold=1 TiB: large blocks come from the
  heap and a freed one stays there, so the next step reuses the same pages with no fault at
  all. On a virtual machine that hands freed memory back to its host (free page reporting),
  a fresh block costs far more than its faults: measured every other step paying 0.7-1.4 s
  of system time (steps of 1.86-1.94 s and 2.37-2.84 s alternating); with the heap kept,
  every step took 1.74-2.13 s with no system time (benchmarks/RESULTS.md, "eighth pass").

A kept heap holds as much as the largest set of blocks ever alive at once, so two steps'
temporaries must never overlap: XLA:CPU frees a step's block on its worker thread just after
the outputs are ready, and with asynchronous dispatch the next step may allocate its own
first; once that happened (1 step in 12) the heap held two blocks for good (peak RSS 6.0
instead of 3.3 GiB). So the entry points also turn off JAX's asynchronous CPU dispatch
(jax_cpu_enable_async_dispatch): a computation then runs in the calling thread and its
block is freed before the call returns. Python cannot run ahead of a step any more, which
costs nothing measurable with steps of seconds and data prepared on other threads.

glibc reads GLIBC_TUNABLES only when a process starts, so the entry points
(`python -m crnet_jax.train`, `.predict`, `.evaluate`) re-execute themselves once with the
variable set, before JAX has allocated anything. Set CRNET_MALLOC_TUNING=0 to opt out.
Huge pages take effect where /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or
"always"; the kept heap everywhere glibc runs.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=1099511627776",
)
OPT_OUT_ENV = "CRNET_MALLOC_TUNING"


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
    glibc 2.35+, opted out (CRNET_MALLOC_TUNING=0), or the settings already present."""
    if not _glibc() or env.get(OPT_OUT_ENV, "1").strip() == "0" or is_active(env):
        return None
    current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in MALLOC_TUNABLES}
    kept = [t for t in current if t.split("=", 1)[0] not in names]
    return {**env, "GLIBC_TUNABLES": ":".join(kept + list(MALLOC_TUNABLES))}


def synchronous_cpu_dispatch() -> None:
    """Run CPU computations in the calling thread (jax_cpu_enable_async_dispatch off), so a
    computation's temporaries are freed before the next one allocates (see the module
    docstring). Takes effect only before JAX creates its CPU backend."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def _launched_as(module: str, scripts: tuple[str, ...]) -> bool:
    """Whether this process was started to run `module` (python -m) or one of `scripts`
    (its console scripts): not a notebook or another program that calls its main()."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == module:
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in scripts


def reexec_with_malloc_settings(module: str | None = None, scripts: tuple[str, ...] = ()) -> None:
    """Re-execute this process (same interpreter, options and arguments) with the malloc
    settings, unless `tuned_environment` says there is nothing to do; once they are active,
    turn off asynchronous CPU dispatch (`synchronous_cpu_dispatch`) and return.
    module (and its console `scripts`): do it only when the process was started to run
    that entry point, never inside a program that merely calls it.
    Call it first thing in a command-line entry point, never from library code."""
    if module is not None and not _launched_as(module, scripts):
        return
    env = tuned_environment(os.environ)
    if env is not None:
        argv = sys.orig_argv  # the interpreter's own options included (Python 3.10+)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, [sys.executable, *argv[1:]], env)
        except OSError as e:  # run on as we are: slower, not wrong
            print(f"note: could not restart with the malloc settings ({e}); continuing without them", file=sys.stderr)
    if is_active():
        synchronous_cpu_dispatch()


def main() -> None:
    """`python -m crnet_jax.host_memory`: say whether the settings are active here."""
    reexec_with_malloc_settings("crnet_jax.host_memory")
    import jax

    state = "active" if is_active() else "not active"
    dispatch = "asynchronous" if jax.config.values["jax_cpu_enable_async_dispatch"] else "synchronous"
    print(f"malloc settings {state}: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}; "
          f"{dispatch} CPU dispatch")


if __name__ == "__main__":
    main()
