// Run-time dispatch of the depthwise kernels over instruction sets.
//
// depthwise_impl.inc is compiled three times (isa_avx512.cc, isa_avx2.cc, isa_base.cc)
// into separate namespaces under `#pragma GCC target`, so one shared library runs on any
// x86-64 CPU and picks AVX-512 / AVX2+FMA / SSE2 at run time (no -march flag at build
// time). With other compilers or architectures only the baseline is built.
#include "isa_common.h"

namespace crnet_dw {

#if defined(CRNET_X86)
CRNET_DECLARE_ISA(avx512)
CRNET_DECLARE_ISA(avx2)
#endif
CRNET_DECLARE_ISA(base)

int best_isa() {
#if defined(CRNET_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
#endif
  return kIsaBase;
}

int resolve_isa(int requested) {
  const int best = best_isa();
  if (requested <= 0 || requested > best) return best;
  return requested;
}

#if defined(CRNET_X86)
#define CRNET_ISA_CALL(FN, ...)                                   \
  do {                                                            \
    if (isa == kIsaAvx512) return avx512::FN(__VA_ARGS__);        \
    if (isa == kIsaAvx2) return avx2::FN(__VA_ARGS__);            \
    return base::FN(__VA_ARGS__);                                 \
  } while (0)
#else
#define CRNET_ISA_CALL(FN, ...) \
  do {                          \
    (void)isa;                  \
    return base::FN(__VA_ARGS__); \
  } while (0)
#endif

void fwd_band(int isa, const float* x, const float* w, float* y, int64_t H, int64_t W,
              int64_t C, int64_t k, int64_t d, int64_t i0, int64_t i1, bool nt) {
  CRNET_ISA_CALL(fwd_band, x, w, y, H, W, C, k, d, i0, i1, nt);
}

void bwd_band(int isa, const float* x, const float* dy, const float* wflip, float* dx,
              float* part, int64_t H, int64_t W, int64_t C, int64_t k, int64_t d, int64_t i0,
              int64_t i1, bool nt) {
  CRNET_ISA_CALL(bwd_band, x, dy, wflip, dx, part, H, W, C, k, d, i0, i1, nt);
}

void sep_fwd_band(int isa, const float* x, const Prologue& pre, const SepIO& io, const float* wdw,
                  const float* wpw, const float* bias, float* out, int64_t H, int64_t W,
                  int64_t C, int64_t Co, int64_t k, int64_t d, int64_t i0, int64_t i1, bool nt) {
  CRNET_ISA_CALL(sep_fwd_band, x, pre, io, wdw, wpw, bias, out, H, W, C, Co, k, d, i0, i1, nt);
}

void sep_bwd_band(int isa, const float* x, const Prologue& pre, const SepIO& io, const float* wdw,
                  const float* wflip, const float* wpwT, const float* dout, float* dx,
                  float* part_dw, float* part_pw, float* part_b, float* part_sa, float* part_sb,
                  int64_t H, int64_t W, int64_t C, int64_t Co, int64_t k, int64_t d, int64_t i0,
                  int64_t i1, bool nt) {
  CRNET_ISA_CALL(sep_bwd_band, x, pre, io, wdw, wflip, wpwT, dout, dx, part_dw, part_pw, part_b,
                 part_sa, part_sb, H, W, C, Co, k, d, i0, i1, nt);
}

void block_fwd_unit(int isa, const float* x, const BlockParams& p, float* out, int64_t H,
                    int64_t W, int64_t i0, int64_t i1, int64_t jb, int64_t je, bool nt) {
  CRNET_ISA_CALL(block_fwd_unit, x, p, out, H, W, i0, i1, jb, je, nt);
}

void fanout_fwd_unit(int isa, const float* x, const FanoutParams& p, int64_t H, int64_t W,
                     int64_t i0, int64_t i1, int64_t jb, int64_t je) {
  CRNET_ISA_CALL(fanout_fwd_unit, x, p, H, W, i0, i1, jb, je);
}

void pw_bn_sums(int isa, const float* x, const float* g, int64_t n, int64_t C, int64_t L, float* xg,
                float* gs, float* xx, float* xs) {
  CRNET_ISA_CALL(pw_bn_sums, x, g, n, C, L, xg, gs, xx, xs);
}

void pw_bn_dx(int isa, const float* g, const float* a, const float* x, const float* m, const float* c,
              float* out, int64_t n, int64_t C, int64_t L) {
  CRNET_ISA_CALL(pw_bn_dx, g, a, x, m, c, out, n, C, L);
}

void pw_bwd(int isa, const float* x, const float* g, const float* kT, int64_t n, int64_t C, int64_t L,
            float* dx, float* xg, float* gs, bool nt) {
  CRNET_ISA_CALL(pw_bwd, x, g, kT, n, C, L, dx, xg, gs, nt);
}

void sfence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

}  // namespace crnet_dw
