"""The block cache (crnet_jax/csrc/block_cache.c), preloaded in a subprocess: large aligned
blocks are reused instead of mapped afresh, what stays mapped never exceeds the most that was
in use at once, everything else is glibc's, and JAX computes the same with it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from crnet_jax import host_memory as hm

LIBRARY = hm.block_cache_library()
needs_cache = pytest.mark.skipif(LIBRARY is None or not hm._glibc(), reason="block cache not built (Linux, glibc)")
MiB = 2**20

PRELUDE = textwrap.dedent("""
    import ctypes, resource
    from crnet_jax import host_memory as hm
    libc = ctypes.CDLL(None)
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
    libc.aligned_alloc.restype = ctypes.c_void_p
    libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.realloc.restype = ctypes.c_void_p
    libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.malloc_usable_size.restype = ctypes.c_size_t
    libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
    MiB = 2**20

    def alloc(nbytes, alignment=64):
        p = ctypes.c_void_p()
        assert libc.posix_memalign(ctypes.byref(p), alignment, nbytes) == 0
        return p.value

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
""")


def _run(code: str, preload: bool = True, **env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CRNET_BLOCK_CACHE_LOG")}
    if preload:
        env["LD_PRELOAD"] = str(LIBRARY)
    env.update(env_changes)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built on Linux only")
def test_the_cache_is_built_where_the_extension_is():
    from crnet_jax import _ffi

    if not _ffi.available():
        pytest.skip("the C++ extension is not built here either (no compiler, or CRNET_NO_EXTENSION)")
    # same compiler, same install: a missing cache would be a packaging bug
    assert LIBRARY is not None and LIBRARY.is_file()


@needs_cache
def test_freed_blocks_are_reused_without_faults_within_the_high_water_mark():
    out = _run("""
        assert hm.block_cache_stats() == {"mapped": 0, "reused": 0, "unmapped": 0, "spare_bytes": 0, "in_use": 0, "high_water_bytes": 0}
        a = alloc(100 * MiB)
        ctypes.memset(a, 1, 100 * MiB)
        assert a % (2 * MiB) == 0 and libc.malloc_usable_size(a) == 100 * MiB
        libc.free(a)
        assert hm.block_cache_stats()["spare_bytes"] == 100 * MiB
        f0 = faults()
        b = alloc(80 * MiB)  # fits in the spare: the same block, already faulted in
        ctypes.memset(b, 2, 80 * MiB)
        assert b == a and faults() - f0 < 100, faults() - f0
        libc.free(b)
        c = alloc(150 * MiB)  # the spare cannot hold it, and 100 + 150 > 150 in use at most: it goes first
        s = hm.block_cache_stats()
        assert (s["mapped"], s["reused"], s["unmapped"], s["spare_bytes"]) == (2, 1, 1, 0), s
        d = alloc(120 * MiB)  # nothing spare: a third block (270 MiB in use at once)
        assert hm.block_cache_stats()["in_use"] == 2
        libc.free(d); libc.free(c)  # both kept: 270 MiB is what was in use at once
        s = hm.block_cache_stats()
        assert (s["mapped"], s["unmapped"], s["spare_bytes"], s["high_water_bytes"]) == (3, 1, 270 * MiB, 270 * MiB), s
        e = alloc(64 * MiB)   # the smallest request that is ours takes the smallest spare that holds it
        f = alloc(140 * MiB)  # and this one the other: a step with two buffers finds both again
        assert (e, f) == (d, c) and hm.block_cache_stats()["reused"] == 3, (e, f, d, c, hm.block_cache_stats())
        libc.free(e); libc.free(f)
        g = alloc(200 * MiB)  # 270 + 200 would exceed 270: spares go, largest first, until it fits
        s = hm.block_cache_stats()
        assert (s["mapped"], s["unmapped"], s["spare_bytes"], s["high_water_bytes"]) == (4, 3, 0, 270 * MiB), s
        h = alloc(70 * MiB)   # 200 + 70 is within 270: nothing to give up
        libc.free(h); libc.free(g)
        assert hm.block_cache_stats()["unmapped"] == 3, hm.block_cache_stats()
        released = hm.release_block_cache()
        assert released == 270 * MiB, released
        s = hm.block_cache_stats()
        assert (s["mapped"], s["unmapped"], s["spare_bytes"], s["in_use"]) == (5, 5, 0, 0), s
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_cache
def test_other_requests_stay_glibcs_and_realloc_of_a_block_keeps_its_bytes():
    out = _run("""
        small = [alloc(n) for n in (16, 4096, 32 * MiB, 64 * MiB - 1)]
        plain = libc.malloc(200 * MiB)             # malloc is never ours
        huge_align = alloc(100 * MiB, 4 * MiB)      # alignment above 2 MiB: glibc's
        assert libc.malloc_usable_size(plain) >= 200 * MiB
        for p in small + [plain, huge_align]:
            libc.free(p)
        assert hm.block_cache_stats() == {"mapped": 0, "reused": 0, "unmapped": 0, "spare_bytes": 0, "in_use": 0, "high_water_bytes": 0}
        a = libc.aligned_alloc(4096, 70 * MiB)
        assert hm.block_cache_stats()["mapped"] == 1 and libc.malloc_usable_size(a) == 70 * MiB
        ctypes.memset(a, 7, 70 * MiB)
        assert libc.realloc(a, 10 * MiB) == a      # shrinking stays in place
        b = libc.realloc(a, 90 * MiB)               # growing moves to glibc, bytes kept
        assert b != a and ctypes.string_at(b, 16) == b"\\x07" * 16
        assert ctypes.string_at(b + 70 * MiB - 16, 16) == b"\\x07" * 16
        assert hm.block_cache_stats()["spare_bytes"] == 70 * MiB  # the old block went back
        libc.free(b)
        c = alloc(70 * MiB)
        assert libc.realloc(c, 0) is None and hm.block_cache_stats()["spare_bytes"] == 70 * MiB
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_cache
def test_threads_never_share_a_block():
    """Four threads allocate, stamp, check and free large blocks concurrently (ctypes
    releases the GIL): two live blocks never overlap, and what stays mapped afterwards is
    no more than was in use at once."""
    out = _run("""
        import random, threading
        errors = []
        def worker(tid):
            rng = random.Random(tid)
            for _ in range(150):
                n = rng.randrange(64, 96) * MiB
                p = alloc(n)
                stamp = bytes([tid + 1]) * 64
                ctypes.memmove(p, stamp, 64); ctypes.memmove(p + n - 64, stamp, 64)
                if ctypes.string_at(p, 64) != stamp or ctypes.string_at(p + n - 64, 64) != stamp:
                    errors.append(tid)
                libc.free(p)
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        s = hm.block_cache_stats()
        assert not errors, errors
        assert s["in_use"] == 0 and s["mapped"] + s["reused"] == 600, s
        # what stays mapped is within what was in use at once (sizes round up to 2 MiB)
        assert s["spare_bytes"] <= s["high_water_bytes"] <= 4 * 96 * MiB, s
        assert s["mapped"] - s["unmapped"] <= 4 and s["reused"] > 300, s
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_cache
def test_settle_waits_for_a_block_freed_by_another_thread():
    out = _run("""
        import threading, time
        assert hm.settle_block_cache(0, 1.0) == 0       # nothing in use: returns at once
        held = alloc(100 * MiB)                         # long-lived, stays in use throughout
        assert hm.blocks_in_use() == 1
        p = alloc(70 * MiB)
        t0 = time.perf_counter()
        assert hm.settle_block_cache(1, 0.02) == 2      # not back: gives up after the timeout
        assert 0.015 < time.perf_counter() - t0 < 1.0
        timer = threading.Timer(0.1, libc.free, args=(p,))
        t0 = time.perf_counter(); timer.start()
        assert hm.settle_block_cache(1, 5.0) == 1       # woken when it comes back
        waited = time.perf_counter() - t0
        assert 0.08 < waited < 2.0, waited
        assert hm.block_cache_stats()["spare_bytes"] == 70 * MiB
        print("ok")
    """)
    assert out.strip() == "ok"
    code = "print(hm.settle_block_cache(0, 1.0), hm.blocks_in_use(), hm.release_block_cache())"
    assert _run(code, preload=False).strip() == "0 0 0"


@needs_cache
def test_jax_computes_the_same_with_the_cache():
    """An XLA:CPU computation with two large buffers (the input's copy, 128 MiB, and the
    temporaries, 256 MiB) runs three times on the same two blocks."""
    code = """
        import jax, jax.numpy as jnp, numpy as np
        x = np.random.default_rng(0).random((32, 1024, 1024), np.float32)
        f = jax.jit(lambda x: jnp.cumsum(x * 2.0 + 1.0, axis=0)[::7, ::5, ::3].sum(axis=(1, 2)))
        def call():  # as the training loop does: wait for the step, then for its memory
            before = hm.blocks_in_use()
            out = np.asarray(f(x))
            hm.settle_block_cache(before, 1.0)
            return out
        outs = [call() for _ in range(3)]
        assert all(np.array_equal(o, outs[0]) for o in outs)
        print(np.asarray(outs[0]).tobytes().hex())
        print(hm.block_cache_stats())
    """
    cached = _run(code).splitlines()
    plain = _run(code, preload=False).splitlines()
    assert cached[0] == plain[0]
    assert plain[1] == "None"
    stats = eval(cached[1])  # each call: the input's copy and the temporaries, found again
    assert (stats["mapped"], stats["reused"], stats["unmapped"], stats["in_use"]) == (2, 4, 0, 0), stats


@needs_cache
def test_events_are_logged_on_request():
    proc = subprocess.run([sys.executable, "-c", PRELUDE + "libc.free(alloc(70 * MiB)); libc.free(alloc(70 * MiB))"],
                          env={**os.environ, "LD_PRELOAD": str(LIBRARY), "CRNET_BLOCK_CACHE_LOG": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("[crnet block cache]")]
    assert lines == ["[crnet block cache] mapped 70 MiB (request 70 MiB)",
                     "[crnet block cache] reused 70 MiB (request 70 MiB)"], proc.stderr


@needs_cache
def test_the_training_entry_point_runs_on_one_block(tmp_path):
    """`python -m crnet_jax.train` preloads the cache itself (crnet_jax.host_memory) and keeps
    one step in flight on CPU, so training and validation run on the one block mapped for
    the first step (a step queued behind a running one would map a second)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "XLA_FLAGS", hm.BLOCK_CACHE_OPT_OUT_ENV)}
    env["CRNET_BLOCK_CACHE_LOG"] = "1"
    cmd = [sys.executable, "-m", "crnet_jax.train", "--workdir", str(tmp_path / "run"), "--no-progress",
           "--set", "num_steps=6", "--set", "eval_every=3", "--set", "data.num_train=32", "--set", "data.num_val=16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [l.split()[3] for l in proc.stderr.splitlines() if l.startswith("[crnet block cache]")]
    # 64 x 64, batch 8: the step's temporaries are ~110 MiB, above the cache's 64 MiB floor
    assert events.count("mapped") == 1 and events.count("reused") >= 5, proc.stderr[-3000:]
