// One core's throughput of the pointwise (1 x 1) kernels of crnet_jax/csrc, AVX-512, on 128
// pixels held in L1 (Res-CR-Net's channel counts), with and without the output moments.
//   g++ -O3 -std=c++17 -ffp-contract=fast -Icrnet_jax/csrc benchmarks/micro/pointwise.cc \
//       -o /tmp/pointwise && /tmp/pointwise
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "isa_common.h"

namespace crnet_dw {
namespace micro {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi,bmi2,popcnt,prefer-vector-width=512")
#define CRNET_VL 16
#define CRNET_NREG 32
#define CRNET_STREAM(p, v) _mm512_stream_ps((p), (__m512)(v))
#include "depthwise_impl.inc"
#pragma GCC pop_options
}  // namespace micro
}  // namespace crnet_dw

template <class F>
static double gflops(F f, double flop) {
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < 2000; ++it) f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return flop * 2000 / best / 1e9;
}

template <int C, int CO>
static void run() {
  using crnet_dw::micro::pw_seg;
  const int n = 128;
  std::vector<float> y(n * C), w(C * CO), b(CO), out(n * CO), s1(CO), s2(CO);
  for (auto& v : y) v = (std::rand() % 1000) / 1000.f;
  for (auto& v : w) v = (std::rand() % 1000) / 1000.f - 0.5f;
  const double flop = 2.0 * n * C * CO;
  const double plain = gflops([&] { pw_seg<false, C, CO>(y.data(), n, w.data(), b.data(), out.data(), C, CO, CO, false); }, flop);
  const double stats = gflops([&] {
    pw_seg<false, C, CO>(y.data(), n, w.data(), b.data(), out.data(), C, CO, CO, false, s1.data(), s2.data());
  }, flop);
  std::printf("%2d -> %2d channels: %.1f GFLOP/s, with moments %.1f\n", C, CO, plain, stats);
}

int main() {
  run<48, 16>();
  run<48, 48>();
  run<16, 16>();
}
