"""Builds the optional C++ XLA FFI extension crnet_jax._depthwise_ffi (CPU kernels for the
depthwise atrous convolution) and, on Linux, the optional preload library
crnet_jax._block_cache (csrc/block_cache.c: keeps XLA's step-sized memory block mapped
between steps; crnet_jax/host_memory.py). All metadata lives in pyproject.toml.

The extension is optional: if the compiler or the XLA FFI headers (shipped with jaxlib,
found through `jax.ffi.include_dir()`) are missing, the install still succeeds and
crnet_jax falls back to its pure-JAX implementation with a one-time warning.
Set CRNET_NO_EXTENSION=1 to skip the build on purpose.

No -march flag: the kernels are compiled for AVX-512, AVX2+FMA and the baseline in
separate translation units and chosen at run time, so wheels and shared installs run on
any x86-64 CPU.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "crnet_jax/csrc"
BLOCK_CACHE = "crnet_jax._block_cache"


def _source_digest() -> str:
    """crnet_jax.csrc_digest.source_digest(CSRC), loaded by path (nothing is installed yet)."""
    spec = importlib.util.spec_from_file_location("csrc_digest", "crnet_jax/csrc_digest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source_digest(CSRC)


class OptionalBuildExt(build_ext):
    """build_ext that compiles in parallel and never fails the install."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extension(self, ext):
        if os.environ.get("CRNET_NO_EXTENSION", "") not in ("", "0"):
            self._skip(ext, "CRNET_NO_EXTENSION is set")
            return
        if ext.name != BLOCK_CACHE:  # the FFI extension needs XLA's headers (the cache is plain C)
            try:
                import jax.ffi

                ext.include_dirs.append(jax.ffi.include_dir())
            except Exception as e:  # jax/jaxlib not importable in the build environment
                self._skip(ext, f"the XLA FFI headers are unavailable ({type(e).__name__}: {e})")
                return
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args = ["/O2", "/std:c++17", "/EHsc"]
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler missing or failing: the package works without it
            self._skip(ext, f"compilation failed ({type(e).__name__}: {e})")

    def _skip(self, ext, why):
        fallback = (
            "without the block cache (each training step maps its memory afresh)"
            if ext.name == BLOCK_CACHE
            else "with the slower pure-JAX depthwise convolution on CPU"
        )
        msg = f"\n*** crnet_jax: not building {ext.name}: {why}.\n*** The package still works, {fallback}.\n"
        print(msg, file=sys.stderr)


ext = Extension(
    "crnet_jax._depthwise_ffi",
    sources=[
        f"{CSRC}/depthwise_ffi.cc",
        f"{CSRC}/depthwise_kernels.cc",
        f"{CSRC}/isa_avx512.cc",
        f"{CSRC}/isa_avx2.cc",
        f"{CSRC}/isa_base.cc",
    ],
    depends=[
        f"{CSRC}/depthwise_impl.inc",
        f"{CSRC}/depthwise_kernels.h",
        f"{CSRC}/isa_common.h",
    ],
    include_dirs=[CSRC],
    # reported by crnet_jax._ffi when the checkout's sources have changed since this build
    define_macros=[("CRNET_SOURCE_DIGEST", f'"{_source_digest()}"')],
    language="c++",
    extra_compile_args=[
        "-std=c++17",
        "-O3",
        "-g0",
        "-ffp-contract=fast",
        "-fno-math-errno",
        "-fvisibility=hidden",
        "-Wno-psabi",
        "-Wno-sign-compare",
        "-Wno-attributes",
        "-Wno-return-type",
        # The channel-specialised instances (C = 48 or 16 known at compile time) keep the
        # scalar channel-remainder loops, dead there; GCC warns about them spuriously.
        "-Wno-aggressive-loop-optimizations",
    ],
    optional=True,
)

# Loaded with LD_PRELOAD, never imported: a shared library with no Python in it. Linux with
# glibc only (it forwards to glibc's __libc_memalign and friends).
block_cache = Extension(
    BLOCK_CACHE,
    sources=[f"{CSRC}/block_cache.c"],
    language="c",
    extra_compile_args=["-std=gnu11", "-O2", "-g0", "-fvisibility=hidden"],
    libraries=["dl", "pthread"],
    optional=True,
)

extensions = [ext, block_cache] if sys.platform.startswith("linux") else [ext]
setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
