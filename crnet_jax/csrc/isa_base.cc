// Baseline build of the kernels: the compiler's default target (SSE2 on x86-64, NEON on
// arm64), runs everywhere.
#include "isa_common.h"

namespace crnet_dw {
namespace base {
#define CRNET_VL 4
#define CRNET_NREG 16
#if defined(__SSE__)
#define CRNET_STREAM(p, v) _mm_stream_ps((p), (__m128)(v))
#else
#define CRNET_STREAM(p, v) __builtin_memcpy((p), &(v), sizeof(v))
#endif
#include "depthwise_impl.inc"
}  // namespace base
}  // namespace crnet_dw
