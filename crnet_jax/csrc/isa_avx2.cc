// AVX2 + FMA build of the kernels (runs only where the CPU supports it; see best_isa()).
#include "isa_common.h"

namespace crnet_dw {
#if defined(CRNET_X86)
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#define CRNET_VL 8
#define CRNET_NREG 16
#define CRNET_STREAM(p, v) _mm256_stream_ps((p), (__m256)(v))
#include "depthwise_impl.inc"
#pragma GCC pop_options
}  // namespace avx2
#endif
}  // namespace crnet_dw
