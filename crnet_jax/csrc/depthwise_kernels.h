// Depthwise atrous convolution kernels (float32, NHWC), dispatched by instruction set.
//
// All functions work on one image (H, W, C) and a band of output rows [i0, i1), so the
// caller can spread (image, band) units over threads. `nt` requests non-temporal
// (streaming) stores for the big output; it requires the output pointer to be 64-byte
// aligned and its channel count to be a multiple of 16; call sfence() before handing
// the output to another thread.
#pragma once
#include <cstdint>

namespace crnet_dw {

enum Isa : int { kIsaAuto = 0, kIsaBase = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };

// Best instruction set supported by this CPU (and compiled in).
int best_isa();
// `requested` if supported, else the best available one; 0 means best.
int resolve_isa(int requested);

// y (H, W, C) = depthwise(x (H, W, C), w (k, k, C)), dilation d, zero 'same' padding:
//   y[i, j, c] = sum_{u, v} x[i + d(u - k/2), j + d(v - k/2), c] * w[u, v, c]
void fwd_band(int isa, const float* x, const float* w, float* y, int64_t H, int64_t W,
              int64_t C, int64_t k, int64_t d, int64_t i0, int64_t i1, bool nt);

// Both gradients in one pass: dx = depthwise(dy, wflip) (wflip = w flipped in u and v;
// skipped when dx is null) and part (k, k, C) += sum over rows [i0, i1) of
// x[i + d(u - k/2), j + d(v - k/2), c] * dy[i, j, c].
void bwd_band(int isa, const float* x, const float* dy, const float* wflip, float* dx,
              float* part, int64_t H, int64_t W, int64_t C, int64_t k, int64_t d, int64_t i0,
              int64_t i1, bool nt);

// Optional prologue of the separable convolution: the convolution reads
//   x0[i, j, c] = LeakyReLU(a[c] * x[i, j, c] + b[c], slope)
// instead of x (a BatchNorm with given scale/shift and the LeakyReLU that follows it,
// folded into the kernel so x0 never goes through main memory). a == nullptr: none.
struct Prologue {
  const float* a = nullptr;
  const float* b = nullptr;
  float slope = 1.f;
};

// Where the separable kernels put their Co-channel side and how: `ldo` is the number of
// channels between consecutive pixels of out (forward) and dout (backward), 0 meaning Co,
// so a kernel can write or read a channel slice [o, o + Co) of a wider tensor (the caller
// offsets the pointer by o); `accumulate` adds the forward result to out, and the backward
// input gradient to dx, instead of overwriting them (no non-temporal stores then).
// Forward only: with out_sum / out_sumsq set, (Co) += the sums over the band of the
// convolution's output and of its square, per output channel (BatchNorm moments of the
// output without another pass over it).
struct SepIO {
  int64_t ldo = 0;
  bool accumulate = false;
  float* out_sum = nullptr;
  float* out_sumsq = nullptr;
};

// Fused separable convolution: out (H, W, Co) = depthwise(x0, wdw) @ wpw (C, Co) + bias
// (bias may be null), x0 = x or its prologue.
void sep_fwd_band(int isa, const float* x, const Prologue& pre, const SepIO& io, const float* wdw, const float* wpw,
                  const float* bias, float* out, int64_t H, int64_t W, int64_t C, int64_t Co,
                  int64_t k, int64_t d, int64_t i0, int64_t i1, bool nt);

// Fused separable backward (see depthwise_impl.inc): dx (skipped when null) and partial
// sums part_dw (k, k, C), part_pw (C, Co), part_b (Co) for output rows [i0, i1).
// wpwT is wpw transposed (Co, C); wflip the flipped depthwise kernel. With a prologue,
// dx is the gradient with respect to the raw x and, with dz = d(a x + b),
// part_sa (C) += sum dz * x and part_sb (C) += sum dz over rows [i0, i1) (the gradients
// of a and b); without one part_sa / part_sb are untouched (may be null).
void sep_bwd_band(int isa, const float* x, const Prologue& pre, const SepIO& io, const float* wdw, const float* wflip,
                  const float* wpwT, const float* dout, float* dx, float* part_dw,
                  float* part_pw, float* part_b, float* part_sa, float* part_sb,
                  int64_t H, int64_t W, int64_t C, int64_t Co,
                  int64_t k, int64_t d, int64_t i0, int64_t i1, bool nt);

// Store fence after non-temporal stores (no-op where not needed).
void sfence();

}  // namespace crnet_dw
