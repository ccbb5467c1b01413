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
// output without another pass over it); with sums_of_result and accumulate as well, the
// sums are of the values written (out + the convolution: the moments of a block's output).
// Backward only: with bn_y set, the output gradient read is dout + bn_c1 + bn_c2 * bn_y
// (bn_y (H, W, Co) contiguous, bn_c1 / bn_c2 (Co)): the cotangent of a BatchNorm's batch
// moments that reads this convolution's output y = bn_y, added as dout is read instead
// of in a separate pass over it.
struct SepIO {
  int64_t ldo = 0;
  bool accumulate = false;
  float* out_sum = nullptr;
  float* out_sumsq = nullptr;
  bool sums_of_result = false;
  const float* acc_scale = nullptr;  // forward, accumulating: out = acc_scale * out + conv
  const float* bn_y = nullptr;
  const float* bn_c1 = nullptr;
  const float* bn_c2 = nullptr;
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

// Fused residual block for inference (a Res-CR-Net STEM or CONV RES block with its
// BatchNorms at their running statistics):
//   out (H, W, L) = x @ wsc + bsc  +  concat over branches b of
//                   sep2_b(LeakyReLU(mid_a_b * sep1_b(x0) + mid_b_b, mid_slope))
// where x0 = x or its prologue (the block's pre-activation), sep = depthwise (k_b, d_b,
// zero 'same' padding) -> pointwise -> bias, sep1_b: C -> F, sep2_b: F -> F, and branch b
// fills channels [b F, (b + 1) F) of L = nb F. One call computes output rows [i0, i1) x
// columns [jb, je) of one image, streaming rows through rings in scratch memory: x0
// (2R + 1 rows, R = max_b R_b, R_b = (k_b / 2) d_b) and each branch's activated middle
// (2 R_b + 1 rows), with the column halo they need, so that per pixel only x is read and
// out is written once; no intermediate goes through main memory.
constexpr int kMaxBranches = 4;
struct BlockBranch {
  const float* wdw1;   // (k, k, C)
  const float* wpw1;   // (C, F)
  const float* b1;     // (F)
  const float* mid_a;  // (F) the middle BatchNorm's scale
  const float* mid_b;  // (F) and shift
  const float* wdw2;   // (k, k, F)
  const float* wpw2;   // (F, F)
  const float* b2;     // (F)
  int64_t k, d;
};
struct BlockParams {
  Prologue pre;     // the branches' input: LeakyReLU(a x + b) (CONV RES); a == nullptr: x (STEM)
  float mid_slope;  // LeakyReLU slope after the middle BatchNorms
  const float* wsc; // (C, L) shortcut kernel, its BatchNorm folded in
  const float* bsc; // (L)
  int nb;
  BlockBranch br[kMaxBranches];
  int64_t C, F, L;
};

// Floats of scratch block_fwd_unit needs for a strip of `ws` output columns (its rings and
// row buffers); callers pick the strip width so that this stays in the L2 cache.
inline int64_t block_scratch_floats(const BlockParams& p, int64_t ws) {
  auto up = [](int64_t n) { return (n + 15) / 16 * 16; };
  int64_t R = 0;
  for (int b = 0; b < p.nb; ++b) R = R > (p.br[b].k / 2) * p.br[b].d ? R : (p.br[b].k / 2) * p.br[b].d;
  int64_t n = up((2 * R + 1) * (ws + 4 * R) * p.C);  // x0 ring
  for (int b = 0; b < p.nb; ++b) {
    const int64_t Rb = (p.br[b].k / 2) * p.br[b].d;
    n += up((2 * Rb + 1) * (ws + 2 * Rb) * p.F);     // middle ring of branch b
  }
  n += up((ws + 2 * R) * p.C) + up((ws + 2 * R) * p.F) + up(ws * p.F) + up(ws * p.L);  // row buffers
  return n + 16;
}

// The fused block on output rows [i0, i1) x columns [jb, je) of one image: x (H, W, C),
// out (H, W, L). nt: non-temporal stores (out 64-byte aligned, L a multiple of 16).
void block_fwd_unit(int isa, const float* x, const BlockParams& p, float* out, int64_t H,
                    int64_t W, int64_t i0, int64_t i1, int64_t jb, int64_t je, bool nt);

// Several convolutions of one input in one pass over it, each output with its BatchNorm
// moments (training's fan-out of a residual block): separable convolutions of x0 = x or
// its prologue (the branches' first convolutions) and 1 x 1 convolutions of the raw x
// (wdw == nullptr: the block's shortcut). Rows of x0 stream through a ring of 2R + 1 rows
// (R the widest reach) in column strips, so x is read once for all of them.
struct FanoutConv {
  const float* wdw = nullptr;  // (k, k, C); nullptr: a 1 x 1 convolution of the raw x
  const float* wpw = nullptr;  // (C, Co)
  const float* bias = nullptr; // (Co)
  int64_t k = 1, d = 1, Co = 0;
  float* out = nullptr;        // (H, W, Co) of the image
  float* sum = nullptr;        // (Co) += sums over the unit of out
  float* sumsq = nullptr;      // (Co) += sums over the unit of out^2
  bool nt = false;             // non-temporal stores (out 64-byte aligned, Co % 16 == 0)
};
struct FanoutParams {
  Prologue pre;
  int n = 0;
  FanoutConv conv[kMaxBranches + 1];
  int64_t C = 0;
};

inline int64_t fanout_reach(const FanoutParams& p) {
  int64_t R = 0;
  for (int i = 0; i < p.n; ++i)
    if (p.conv[i].wdw) R = R > (p.conv[i].k / 2) * p.conv[i].d ? R : (p.conv[i].k / 2) * p.conv[i].d;
  return R;
}

// Floats of scratch fanout_fwd_unit needs for a strip of `ws` columns.
inline int64_t fanout_scratch_floats(const FanoutParams& p, int64_t ws) {
  const int64_t R = fanout_reach(p);
  return ((2 * R + 1) * (ws + 2 * R) * p.C + 15) / 16 * 16 + (ws * p.C + 15) / 16 * 16 + 32;
}

// The fan-out on output rows [i0, i1) x columns [jb, je) of one image x (H, W, C).
void fanout_fwd_unit(int isa, const float* x, const FanoutParams& p, int64_t H, int64_t W,
                     int64_t i0, int64_t i1, int64_t jb, int64_t je);

// The backward of out = BatchNorm(x @ w + bias) on batch statistics without the
// convolution's output (crnet_jax/pointwise_bn.py), over n pixels of rows x (n, C) and
// g (n, L) (the output gradient), both contiguous. Sums: xg (C, L) += x^T g,
// gs (L) += sum g, xx (C, C) += x^T x, xs (C) += sum x.
void pw_bn_sums(int isa, const float* x, const float* g, int64_t n, int64_t C, int64_t L, float* xg,
                float* gs, float* xx, float* xs);
// The input gradient: out (n, C) = g @ a (L, C) + x @ m (C, C) + c (C).
void pw_bn_dx(int isa, const float* g, const float* a, const float* x, const float* m, const float* c,
              float* out, int64_t n, int64_t C, int64_t L);

// The backward of a 1 x 1 convolution with few output channels (the head) over n pixels:
// dx (n, C) = g (n, L) @ kT (L, C), xg (C, L) += x^T g, gs (L) += sum g. nt: dx rows are
// 64-byte aligned and may be written with non-temporal stores.
void pw_bwd(int isa, const float* x, const float* g, const float* kT, int64_t n, int64_t C, int64_t L,
            float* dx, float* xg, float* gs, bool nt);

// Store fence after non-temporal stores (no-op where not needed).
void sfence();

}  // namespace crnet_dw
