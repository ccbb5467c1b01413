// AVX-512 build of the kernels (runs only where the CPU supports it; see best_isa()).
#include "isa_common.h"

namespace crnet_dw {
#if defined(CRNET_X86)
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi,bmi2,popcnt,prefer-vector-width=512")
#define CRNET_VL 16
#define CRNET_NREG 32
#define CRNET_STREAM(p, v) _mm512_stream_ps((p), (__m512)(v))
#include "depthwise_impl.inc"
#pragma GCC pop_options
}  // namespace avx512
#endif
}  // namespace crnet_dw
