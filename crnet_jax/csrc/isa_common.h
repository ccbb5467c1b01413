// Shared prelude of the per-instruction-set translation units.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "depthwise_kernels.h"

// `#pragma GCC target` is a GCC feature; other compilers only get the baseline build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CRNET_X86 1
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Entry points every instruction-set namespace defines (see depthwise_impl.inc).
#define CRNET_DECLARE_ISA(NS)                                                                \
  namespace NS {                                                                             \
  void fwd_band(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,      \
                int64_t, int64_t, int64_t, bool);                                            \
  void bwd_band(const float*, const float*, const float*, float*, float*, int64_t, int64_t,  \
                int64_t, int64_t, int64_t, int64_t, int64_t, bool);                          \
  void sep_fwd_band(const float*, const Prologue&, const SepIO&, const float*, const float*,  \
                    const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,       \
                    int64_t, int64_t, int64_t, bool);                                        \
  void sep_bwd_band(const float*, const Prologue&, const SepIO&, const float*, const float*,  \
                    const float*, const float*, float*, float*, float*, float*, float*,      \
                    float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                    int64_t, bool);                                                          \
  void block_fwd_unit(const float*, const BlockParams&, float*, int64_t, int64_t, int64_t,  \
                      int64_t, int64_t, int64_t, bool);                                      \
  void fanout_fwd_unit(const float*, const FanoutParams&, int64_t, int64_t, int64_t,         \
                       int64_t, int64_t, int64_t);                                           \
  void pw_bn_sums(const float*, const float*, int64_t, int64_t, int64_t, float*, float*,     \
                  float*, float*);                                                           \
  void pw_bn_dx(const float*, const float*, const float*, const float*, const float*,        \
                float*, int64_t, int64_t, int64_t);                                          \
  void pw_bwd(const float*, const float*, const float*, int64_t, int64_t, int64_t, float*,   \
              float*, float*, bool);                                                         \
  }
