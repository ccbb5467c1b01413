"""crnet_jax.host_memory: the entry points restart once with glibc.malloc.hugetlb=1 and the
block cache preloaded; with the former a large malloc'd block is faulted in 2 MiB pages,
not 4 KiB ones (the cache itself: tests/test_block_cache.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from crnet_jax import host_memory as hm

glibc_only = pytest.mark.skipif(not hm._glibc(), reason="glibc.malloc.hugetlb needs Linux with glibc 2.35+")


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unknown"


def _env(**changes):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", hm.OPT_OUT_ENV, hm.BLOCK_CACHE_OPT_OUT_ENV)}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


@glibc_only
def test_tuned_environment_adds_keeps_and_respects_opt_out():
    env = hm.tuned_environment(_env())
    assert env["GLIBC_TUNABLES"] == ":".join(hm.MALLOC_TUNABLES) and hm.is_active(env)
    # other settings are kept, ours replace a conflicting value of the same name
    env = hm.tuned_environment(_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4:glibc.malloc.hugetlb=0"))
    parts = env["GLIBC_TUNABLES"].split(":")
    assert parts == ["glibc.malloc.arena_max=4", "glibc.malloc.hugetlb=1"] and hm.is_active(env)
    assert hm.tuned_environment(env) is None  # already there: nothing to do (no restart loop)
    assert hm.tuned_environment(_env(**{hm.OPT_OUT_ENV: "0", hm.BLOCK_CACHE_OPT_OUT_ENV: "0"})) is None


@glibc_only
def test_tuned_environment_preloads_the_block_cache_alone(tmp_path):
    lib = tmp_path / "_block_cache.so"
    env = hm.tuned_environment(_env(), library=lib)
    assert env["LD_PRELOAD"] == str(lib) and hm.is_active(env)
    assert hm.tuned_environment(env, library=lib) is None  # no restart loop
    # opted out: huge pages only
    env = hm.tuned_environment(_env(**{hm.BLOCK_CACHE_OPT_OUT_ENV: "0"}), library=lib)
    assert "LD_PRELOAD" not in env and hm.is_active(env)
    # another preloaded library (perhaps an allocator): ours is not added beside it
    env = hm.tuned_environment(_env(LD_PRELOAD="/opt/libjemalloc.so"), library=lib)
    assert env["LD_PRELOAD"] == "/opt/libjemalloc.so" and hm.is_active(env)
    # huge pages opted out, the cache still preloaded
    env = hm.tuned_environment(_env(**{hm.OPT_OUT_ENV: "0"}), library=lib)
    assert env["LD_PRELOAD"] == str(lib) and not hm.is_active(env)


def _run(code_or_module: list[str], env: dict) -> str:
    proc = subprocess.run([sys.executable, *code_or_module], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@glibc_only
def test_entry_point_restarts_itself_with_the_settings_keeping_options_and_arguments():
    out = _run(["-m", "crnet_jax.host_memory"], _env())
    assert "malloc settings active" in out and ":".join(hm.MALLOC_TUNABLES) in out
    if hm.block_cache_library() is not None:
        assert f"block cache active: {hm.block_cache_library()}" in out
    out = _run(["-m", "crnet_jax.host_memory"], _env(**{hm.OPT_OUT_ENV: "0", hm.BLOCK_CACHE_OPT_OUT_ENV: "0"}))
    assert "malloc settings not active" in out and "block cache not active" in out
    # interpreter options and arguments survive the restart
    code = ("import sys; from crnet_jax.host_memory import reexec_with_host_memory_settings, is_active; "
            "reexec_with_host_memory_settings(); print(is_active(), sys.flags.dont_write_bytecode, sys.argv[1:])")
    out = _run(["-B", "-c", code, "a", "--b"], _env())
    assert out.strip() == "True 1 ['a', '--b']"


FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():  # what XLA does with its temporaries (numpy asks for huge pages itself)
    p = libc.malloc(200 * 2**20); ctypes.memset(p, 1, 200 * 2**20); libc.free(p)
touch()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@glibc_only
@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_huge_pages_cut_page_faults_on_fresh_large_blocks():
    """What the setting is for: a 200 MiB block allocated, touched and freed three times
    faults its 51,200 4 KiB pages each time by default ("always" aside), about 100 huge
    pages each time with the setting."""
    huge = int(_run(["-c", FAULTS], hm.tuned_environment(_env())))
    assert huge < 3_000, huge
    if _thp_mode() == "madvise":
        default = int(_run(["-c", FAULTS], _env(**{hm.OPT_OUT_ENV: "0"})))
        assert default > 3 * 40_000, default


@glibc_only
def test_a_program_calling_an_entry_point_is_not_restarted():
    """Only a process started to run the entry point restarts: one that imports it and calls
    the restart with the entry point's name (a notebook calling train.main()) goes on as it is."""
    code = ("import os; from crnet_jax.host_memory import reexec_with_host_memory_settings, is_active; "
            "pid = os.getpid(); reexec_with_host_memory_settings('crnet_jax.train', ('crnet-train',)); "
            "print(is_active(), pid == os.getpid())")
    assert _run(["-c", code], _env()).strip() == "False True"
