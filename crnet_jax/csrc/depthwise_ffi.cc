// XLA FFI handlers for the depthwise atrous convolution (CPU), and a tiny CPython
// module `crnet_jax._depthwise_ffi` exposing them as PyCapsules for
// jax.ffi.register_ffi_target.
//
// Targets (all float32, NHWC). Weights carry a leading group axis G that divides the
// batch N: image n uses group n / (N / G) and weight gradients of group g sum over its
// images (this is how vmap over the weights is served by a single call).
//   crnet_depthwise_fwd  (x (N,H,W,C), w (G,k,k,C))            -> y (N,H,W,C)
//   crnet_depthwise_bwd  (x, w, dy (N,H,W,C))                   -> dx (N,H,W,C), dw (G,k,k,C)
//   crnet_separable_fwd  (x, a (G,C), b (G,C), wdw (G,k,k,C), wpw (G,C,Co), bias (G,Co))
//                          -> out (N,H,W,Co)
//   crnet_separable_fwd_stats (x, a, b, wdw, wpw, bias)
//                          -> out (N,H,W,Co), sum (G,Co), sumsq (G,Co): per group, the sums
//                             over its images and pixels of out and of out^2 (BatchNorm moments)
//   crnet_separable_fwd_into  (x, a, b, wdw, wpw, bias, acc_scale (G,Co), acc (N,H,W,ld))
//                          -> out (N,H,W,ld) = acc with channels [offset, offset + Co)
//                             scaled by acc_scale and increased by the convolution (out
//                             aliases acc)
//   crnet_separable_fwd_into_sums (x, a, b, wdw, wpw, bias, acc_scale, acc)
//                          -> out as crnet_separable_fwd_into, sum (N,Co), sumsq (N,Co): per
//                             image, the sums of the channels written and of their squares
//   crnet_separable_bwd  (x, a, b, wdw, wpw, dout (N,H,W,ld))
//                          -> dx (N,H,W,C), da (G,C), db (G,C), dwdw (G,k,k,C),
//                             dwpw (G,C,Co), dbias (G,Co); the output gradient is read from
//                             channels [offset, offset + Co) of dout
//   crnet_separable_bwd_acc   (x, a, b, wdw, wpw, dout (N,H,W,ld), dx_in (N,H,W,C))
//                          -> as crnet_separable_bwd with dx = dx_in + the input gradient
//                             (dx aliases dx_in), so branches sharing an input sum in place
//   crnet_separable_bwd_bn[_acc] (x, a, b, wdw, wpw, dout, y (N,H,W,Co), c1 (Co), c2 (Co)
//                          [, dx_in]) -> as crnet_separable_bwd[_acc] for the output gradient
//                             dout + c1 + c2 y (the cotangent of BatchNorm moments of y),
//                             formed as dout is read
//   crnet_block_infer    a whole residual block in inference mode, fused (BlockInferImpl)
//   crnet_fanout_fwd_stats  several convolutions of one input with their moments, one pass
//                          over it (FanoutFwdImpl): a training block's first convolutions
//                          and shortcut
//   crnet_pointwise_bn_sums (x (N,H,W,C), g (N,H,W,L)) -> x^T g (C,L), sum g (L),
//                          x^T x (C,C), sum x (C): the sums of the backward of a 1 x 1
//                          convolution followed by a BatchNorm on batch statistics
//   crnet_pointwise_bn_dx   (g, a (L,C), x, m (C,C), c (C)) -> dx (N,H,W,C) =
//                          g @ a + x @ m + c: that backward's input gradient
//   crnet_pointwise_bwd     (x (N,H,W,C), g (N,H,W,L), kT (L,C)) -> dx (N,H,W,C) = g @ kT,
//                          x^T g (C,L), sum g (L): the backward of a 1 x 1 convolution
//                          (the head's, L = 2) in one pass
// The separable targets fuse depthwise + pointwise + bias and, with preact = 1, a
// prologue x0 = LeakyReLU(a x + b, slope) on their input (a BatchNorm + LeakyReLU); the
// backward recomputes x0, the depthwise output and dout @ wpw^T on the fly instead of
// storing them, so no C-channel intermediate goes through main memory. With preact = 0,
// a and b are ignored and da, db are zero.
// Attributes: dilation (i64), isa (i64: 0 best, 1 baseline, 2 AVX2, 3 AVX-512),
//             threads (i64: 0 = all of XLA's intra-op pool); separable targets also
//             preact (i64: 0 or 1) and slope (f32); the _into, _bwd and _bwd_acc
//             targets also offset (i64: first channel of the Co-channel slice).
// The Python side (crnet_jax/_ffi.py) refuses a build that lacks any of these targets.
//
// Threading: work is cut into (image, band of rows) units. The calling thread and up
// to (pool size - 1) tasks scheduled on XLA's intra-op thread pool (ffi::ThreadPool)
// claim units from an atomic counter; the caller only ever waits for units that
// another thread has already started, so nothing can deadlock when the pool is busy
// or absent. Kernel-gradient partial sums are per unit and reduced in a fixed order,
// so results do not depend on the thread count or on scheduling.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "depthwise_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> body;
  std::mutex mu;
  std::condition_variable cv;
};

void drain(const std::shared_ptr<ParallelState>& st) {
  for (;;) {
    const int64_t u = st->next.fetch_add(1, std::memory_order_relaxed);
    if (u >= st->total) return;
    st->body(u);
    if (st->done.fetch_add(1, std::memory_order_acq_rel) + 1 == st->total) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  }
}

// Runs body(0..total-1), on the calling thread plus up to `threads - 1` pool tasks.
void parallel_for(ffi::ThreadPool& pool, int64_t threads, int64_t total,
                  std::function<void(int64_t)> body) {
  if (total <= 0) return;
  int64_t helpers = std::min<int64_t>(threads - 1, total - 1);
  if (helpers <= 0) {
    for (int64_t u = 0; u < total; ++u) body(u);
    return;
  }
  auto st = std::make_shared<ParallelState>();
  st->total = total;
  st->body = std::move(body);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([st] { drain(st); });
  drain(st);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load(std::memory_order_acquire) >= st->total; });
}

int64_t env_threads() {
  static const int64_t n = [] {
    const char* s = std::getenv("CRNET_DEPTHWISE_THREADS");
    return s ? std::max<int64_t>(0, std::atoll(s)) : int64_t{0};
  }();
  return n;
}

int64_t num_threads(ffi::ThreadPool& pool, int64_t requested, double work) {
  int64_t n = requested > 0 ? requested : env_threads();
  if (n <= 0) n = std::max<int64_t>(1, pool.num_threads());
  // Tiny problems: threading overhead (~10 us) is not worth it.
  if (work < 2e5) n = 1;
  return n;
}

ffi::Error check_common(ffi::Span<const int64_t> xd, int64_t k, int64_t C, int64_t G,
                        int64_t dilation) {
  if (xd.size() != 4) return ffi::Error::InvalidArgument("x must have rank 4 (N, H, W, C)");
  if (dilation < 1) return ffi::Error::InvalidArgument("dilation must be >= 1");
  if (k < 1 || k % 2 == 0 || k > 15)
    return ffi::Error::InvalidArgument("kernel size must be odd and <= 15");
  if (xd[3] != C) return ffi::Error::InvalidArgument("channel mismatch between x and kernel");
  if (G < 1 || xd[0] % G != 0)
    return ffi::Error::InvalidArgument("kernel groups must divide the batch");
  return ffi::Error::Success();
}

ffi::Error check_kernel(ffi::Span<const int64_t> wd, const char* what) {
  if (wd.size() != 4 || wd[1] != wd[2])
    return ffi::Error::InvalidArgument(std::string(what) + " must have shape (G, k, k, C)");
  return ffi::Error::Success();
}

// Non-temporal stores pay off only for outputs far bigger than the caches (measured in
// XLA at 300x340x8: a win for the 157 MB 48-channel outputs, a loss for the 52 MB 16-channel
// ones, whose freshly faulted pages are still partly cached), and need 64-byte aligned
// rows of whole vectors. CRNET_DEPTHWISE_STREAM_MB sets the threshold (default 64).
bool use_streaming(const void* out, int64_t elements, int64_t channels) {
  static const int64_t threshold = [] {
    const char* s = std::getenv("CRNET_DEPTHWISE_STREAM_MB");
    return (s ? std::atoll(s) : int64_t{64}) << 20;
  }();
  return threshold >= 0 && elements * 4 >= threshold && channels % 16 == 0 &&
         (reinterpret_cast<uintptr_t>(out) % 64) == 0;
}

struct Plan {
  int isa;
  int64_t threads, rows, bands;
};

// The (image, band) decomposition depends only on the shapes, never on the thread
// count, so weight gradients (summed per unit, then in unit order) are bitwise the same
// on every machine and for every CRNET_DEPTHWISE_THREADS.
Plan make_plan(ffi::ThreadPool& pool, int64_t isa, int64_t threads, int64_t N, int64_t H,
               double work, int64_t target_units) {
  Plan p;
  p.isa = crnet_dw::resolve_isa(static_cast<int>(isa));
  p.threads = num_threads(pool, threads, work);
  if (N <= 0 || H <= 0) {  // no pixels: no units (outputs empty, sums zero)
    p.rows = 1;
    p.bands = 0;
    return p;
  }
  int64_t bands = (target_units + N - 1) / N;
  bands = std::max<int64_t>(1, std::min<int64_t>(bands, (H + 31) / 32));
  p.rows = (H + bands - 1) / bands;
  p.bands = (H + p.rows - 1) / p.rows;
  return p;
}

// Flip a (G, k, k, C) kernel in u and v.
std::vector<float> flip_kernel(const float* w, int64_t G, int64_t k, int64_t C) {
  std::vector<float> f(static_cast<size_t>(G * k * k * C));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t u = 0; u < k; ++u)
      for (int64_t v = 0; v < k; ++v)
        std::memcpy(&f[((g * k + u) * k + v) * C], w + ((g * k + (k - 1 - u)) * k + (k - 1 - v)) * C,
                    sizeof(float) * C);
  return f;
}

// Sum per-unit partials (units, n) into out (G, n): group g owns a contiguous range of
// units. Fixed order, so the result does not depend on threading.
void reduce_partials(const float* part, int64_t units, int64_t n, int64_t G, float* out) {
  const int64_t per = units / G;
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + g * n;
    std::fill(o, o + n, 0.f);
    for (int64_t u = g * per; u < (g + 1) * per; ++u) {
      const float* p = part + u * n;
      for (int64_t t = 0; t < n; ++t) o[t] += p[t];
    }
  }
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t dilation, int64_t isa,
                   int64_t threads) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (auto e = check_kernel(wd, "kernel"); e.failure()) return e;
  const int64_t G = wd[0], k = wd[1], C = wd[3];
  if (auto e = check_common(xd, k, C, G, dilation); e.failure()) return e;
  const int64_t N = xd[0], H = xd[1], W = xd[2];
  const Plan pl = make_plan(pool, isa, threads, N, H, double(N) * H * W * C * k * k, 32);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const bool nt = use_streaming(yp, N * H * W * C, C);
  const int64_t per_group = N / G;
  parallel_for(pool, pl.threads, N * pl.bands, [=](int64_t unit) {
    const int64_t n = unit / pl.bands, b = unit % pl.bands;
    const int64_t i0 = b * pl.rows, i1 = std::min(H, i0 + pl.rows);
    crnet_dw::fwd_band(pl.isa, xp + n * H * W * C, wp + (n / per_group) * k * k * C,
                       yp + n * H * W * C, H, W, C, k, dilation, i0, i1, nt);
    if (nt) crnet_dw::sfence();
  });
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                   ffi::ResultBuffer<ffi::F32> dw, int64_t dilation, int64_t isa,
                   int64_t threads) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto gd = dy.dimensions();
  if (auto e = check_kernel(wd, "kernel"); e.failure()) return e;
  const int64_t G = wd[0], k = wd[1], C = wd[3];
  if (auto e = check_common(xd, k, C, G, dilation); e.failure()) return e;
  if (gd.size() != 4 || !std::equal(xd.begin(), xd.end(), gd.begin()))
    return ffi::Error::InvalidArgument("x and dy must have the same shape");
  const int64_t N = xd[0], H = xd[1], W = xd[2];
  const Plan pl = make_plan(pool, isa, threads, N, H, 2.0 * N * H * W * C * k * k, 32);
  const int64_t kkc = k * k * C;
  const int64_t units = N * pl.bands;
  std::vector<float> part(static_cast<size_t>(units * kkc), 0.f);
  std::vector<float> wflip = flip_kernel(w.typed_data(), G, k, C);
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  const float* wf = wflip.data();
  float* dxp = dx->typed_data();
  float* pp = part.data();
  const bool nt = use_streaming(dxp, N * H * W * C, C);
  const int64_t per_group = N / G;
  parallel_for(pool, pl.threads, units, [=](int64_t unit) {
    const int64_t n = unit / pl.bands, b = unit % pl.bands;
    const int64_t i0 = b * pl.rows, i1 = std::min(H, i0 + pl.rows);
    const int64_t off = n * H * W * C;
    crnet_dw::bwd_band(pl.isa, xp + off, gp + off, wf + (n / per_group) * kkc, dxp + off,
                       pp + unit * kkc, H, W, C, k, dilation, i0, i1, nt);
    if (nt) crnet_dw::sfence();
  });
  reduce_partials(pp, units, kkc, G, dw->typed_data());
  return ffi::Error::Success();
}

// Shapes of the separable targets: x (N,H,W,C), wdw (G,k,k,C), wpw (G,C,Co), and the
// prologue's a, b (G,C).
struct SepShape {
  int64_t N, H, W, C, Co, G, k;
};

ffi::Error check_separable(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                           ffi::Span<const int64_t> pd, ffi::Span<const int64_t> ad,
                           ffi::Span<const int64_t> bd, int64_t dilation, SepShape& sh) {
  if (auto e = check_kernel(wd, "depthwise kernel"); e.failure()) return e;
  sh.G = wd[0];
  sh.k = wd[1];
  sh.C = wd[3];
  if (auto e = check_common(xd, sh.k, sh.C, sh.G, dilation); e.failure()) return e;
  if (pd.size() != 3 || pd[0] != sh.G || pd[1] != sh.C)
    return ffi::Error::InvalidArgument("pointwise kernel must have shape (G, C, Co)");
  for (auto* v : {&ad, &bd})
    if (v->size() != 2 || (*v)[0] != sh.G || (*v)[1] != sh.C)
      return ffi::Error::InvalidArgument("prologue scale and shift must have shape (G, C)");
  sh.Co = pd[2];
  sh.N = xd[0];
  sh.H = xd[1];
  sh.W = xd[2];
  return ffi::Error::Success();
}

// Prologue of the images of group g (none when preact == 0).
crnet_dw::Prologue prologue(bool preact, const float* a, const float* b, float slope, int64_t g,
                            int64_t C) {
  crnet_dw::Prologue p;
  if (preact) {
    p.a = a + g * C;
    p.b = b + g * C;
    p.slope = slope;
  }
  return p;
}

// The Co-channel side of a separable call: a tensor (N, H, W, ld) of which channels
// [offset, offset + Co) are the convolution's output (forward) or its gradient (backward).
ffi::Error check_slice(ffi::Span<const int64_t> od, const SepShape& sh, int64_t offset,
                       const char* what) {
  if (od.size() != 4 || od[0] != sh.N || od[1] != sh.H || od[2] != sh.W || offset < 0 ||
      od[3] < offset + sh.Co)
    return ffi::Error::InvalidArgument(std::string(what) +
                                       " must have shape (N, H, W, >= offset + Co)");
  return ffi::Error::Success();
}

// An accumulating target's starting values: out = in, where the caller aliased them (a
// copy is made if it did not). `what` names the error when their shapes differ.
ffi::Error start_from(ffi::Buffer<ffi::F32>& in, ffi::ResultBuffer<ffi::F32>& out, const char* what) {
  const auto id = in.dimensions(), od = out->dimensions();
  if (id.size() != od.size() || !std::equal(id.begin(), id.end(), od.begin()))
    return ffi::Error::InvalidArgument(what);
  if (in.typed_data() != out->typed_data()) std::memcpy(out->typed_data(), in.typed_data(), in.size_bytes());
  return ffi::Error::Success();
}

// Forward into channels [offset, offset + Co) of out (N, H, W, ld); accumulate: out holds
// the values to add to (the caller aliased it to an input). With sum and sumsq (G, Co)
// given, they receive per group the sums over its images and pixels of the convolution's
// output and of its square; with per_image, sum and sumsq are (N, Co): per image, the sums
// of the values written (accumulate: out + the convolution).
ffi::Error SepFwdCommon(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& a,
                        ffi::Buffer<ffi::F32>& b, ffi::Buffer<ffi::F32>& wdw,
                        ffi::Buffer<ffi::F32>& wpw, ffi::Buffer<ffi::F32>& bias,
                        ffi::ResultBuffer<ffi::F32>& out, int64_t offset, bool accumulate,
                        int64_t dilation, int64_t isa, int64_t threads, int64_t preact,
                        float slope, float* sum = nullptr, float* sumsq = nullptr,
                        bool per_image = false, ffi::Buffer<ffi::F32>* acc_scale = nullptr) {
  SepShape sh;
  if (auto e = check_separable(x.dimensions(), wdw.dimensions(), wpw.dimensions(),
                               a.dimensions(), b.dimensions(), dilation, sh);
      e.failure())
    return e;
  const auto bd = bias.dimensions();
  if (bd.size() != 2 || bd[0] != sh.G || bd[1] != sh.Co)
    return ffi::Error::InvalidArgument("bias must have shape (G, Co)");
  if (auto e = check_slice(out->dimensions(), sh, offset, "out"); e.failure()) return e;
  if (acc_scale) {
    const auto sd = acc_scale->dimensions();
    if (sd.size() != 2 || sd[0] != sh.G || sd[1] != sh.Co)
      return ffi::Error::InvalidArgument("acc_scale must have shape (G, Co)");
  }
  const float* scp = acc_scale ? acc_scale->typed_data() : nullptr;
  const int64_t N = sh.N, H = sh.H, W = sh.W, C = sh.C, Co = sh.Co, G = sh.G, k = sh.k;
  const int64_t ldo = out->dimensions()[3];
  crnet_dw::SepIO io{ldo, accumulate};
  io.sums_of_result = per_image;
  const Plan pl = make_plan(pool, isa, threads, N, H, double(N) * H * W * C * (k * k + Co), 32);
  const float* xp = x.typed_data();
  const float* ap = a.typed_data();
  const float* bp_ = b.typed_data();
  const float* wdp = wdw.typed_data();
  const float* wpp = wpw.typed_data();
  const float* bp = bias.typed_data();
  float* op = out->typed_data();
  const bool nt = !accumulate && ldo == Co && use_streaming(op, N * H * W * Co, Co);
  const int64_t per_group = N / G;
  const int64_t units = N * pl.bands;
  std::vector<float> part_s(sum ? static_cast<size_t>(2 * units * Co) : 0, 0.f);
  float* ps = part_s.data();
  parallel_for(pool, pl.threads, units, [=](int64_t unit) {
    const int64_t n = unit / pl.bands, bnd = unit % pl.bands, g = n / per_group;
    const int64_t i0 = bnd * pl.rows, i1 = std::min(H, i0 + pl.rows);
    crnet_dw::SepIO unit_io = io;
    if (scp) unit_io.acc_scale = scp + g * Co;
    if (sum) {
      unit_io.out_sum = ps + unit * Co;
      unit_io.out_sumsq = ps + (units + unit) * Co;
    }
    crnet_dw::sep_fwd_band(pl.isa, xp + n * H * W * C, prologue(preact, ap, bp_, slope, g, C),
                           unit_io, wdp + g * k * k * C, wpp + g * C * Co, bp + g * Co,
                           op + n * H * W * ldo + offset, H, W, C, Co, k, dilation, i0, i1, nt);
    if (nt) crnet_dw::sfence();
  });
  if (sum && (per_image ? N : G) > 0) {  // no images: no groups (and no division by zero)
    const int64_t groups = per_image ? N : G;  // units are image-major: N groups of bands
    reduce_partials(ps, units, Co, groups, sum);
    reduce_partials(ps + units * Co, units, Co, groups, sumsq);
  }
  return ffi::Error::Success();
}

// The forward and, per group, the sums of its output and of its square (G, Co) each.
ffi::Error SepFwdStatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                           ffi::Buffer<ffi::F32> wdw, ffi::Buffer<ffi::F32> wpw,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> sum, ffi::ResultBuffer<ffi::F32> sumsq,
                           int64_t dilation, int64_t isa, int64_t threads, int64_t preact,
                           float slope) {
  const auto pd = wpw.dimensions();
  for (auto* r : {&sum, &sumsq}) {
    const auto rd = (*r)->dimensions();
    if (pd.size() != 3 || rd.size() != 2 || rd[0] != pd[0] || rd[1] != pd[2])
      return ffi::Error::InvalidArgument("sum and sumsq must have shape (G, Co)");
  }
  return SepFwdCommon(pool, x, a, b, wdw, wpw, bias, out, 0, false, dilation, isa, threads,
                      preact, slope, sum->typed_data(), sumsq->typed_data());
}

ffi::Error SepFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                      ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wdw,
                      ffi::Buffer<ffi::F32> wpw, ffi::Buffer<ffi::F32> bias,
                      ffi::ResultBuffer<ffi::F32> out, int64_t dilation, int64_t isa,
                      int64_t threads, int64_t preact, float slope) {
  return SepFwdCommon(pool, x, a, b, wdw, wpw, bias, out, 0, false, dilation, isa, threads,
                      preact, slope);
}

// out = acc with channels [offset, offset + Co) scaled by acc_scale (G, Co) and increased by
// the separable convolution; out is aliased to acc by the caller (a copy is made here if it
// is not).
ffi::Error SepFwdIntoImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                          ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wdw,
                          ffi::Buffer<ffi::F32> wpw, ffi::Buffer<ffi::F32> bias,
                          ffi::Buffer<ffi::F32> acc_scale,
                          ffi::Buffer<ffi::F32> acc, ffi::ResultBuffer<ffi::F32> out,
                          int64_t dilation, int64_t isa, int64_t threads, int64_t preact,
                          float slope, int64_t offset) {
  if (auto e = start_from(acc, out, "acc and out must have the same shape"); e.failure()) return e;
  return SepFwdCommon(pool, x, a, b, wdw, wpw, bias, out, offset, true, dilation, isa, threads,
                      preact, slope, nullptr, nullptr, false, &acc_scale);
}

// As SepFwdIntoImpl, and per image the sums of the channels [offset, offset + Co) of out as
// written and of their squares, sum and sumsq (N, Co): where this call finishes those
// channels of a block's output, the batch moments of the next block's BatchNorm without a
// pass of their own over it.
ffi::Error SepFwdIntoSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                              ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wdw,
                              ffi::Buffer<ffi::F32> wpw, ffi::Buffer<ffi::F32> bias,
                              ffi::Buffer<ffi::F32> acc_scale,
                              ffi::Buffer<ffi::F32> acc, ffi::ResultBuffer<ffi::F32> out,
                              ffi::ResultBuffer<ffi::F32> sum, ffi::ResultBuffer<ffi::F32> sumsq,
                              int64_t dilation, int64_t isa, int64_t threads, int64_t preact,
                              float slope, int64_t offset) {
  const auto ad = acc.dimensions(), pd = wpw.dimensions();
  for (auto* r : {&sum, &sumsq}) {
    const auto rd = (*r)->dimensions();
    if (ad.size() != 4 || pd.size() != 3 || rd.size() != 2 || rd[0] != ad[0] || rd[1] != pd[2])
      return ffi::Error::InvalidArgument("sum and sumsq must have shape (N, Co)");
  }
  if (auto e = start_from(acc, out, "acc and out must have the same shape"); e.failure()) return e;
  return SepFwdCommon(pool, x, a, b, wdw, wpw, bias, out, offset, true, dilation, isa, threads,
                      preact, slope, sum->typed_data(), sumsq->typed_data(), true, &acc_scale);
}

// Backward reading the output gradient from channels [offset, offset + Co) of dout
// (N, H, W, ld); accumulate: dx holds the values to add the input gradient to.
ffi::Error SepBwdCommon(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& a,
                        ffi::Buffer<ffi::F32>& b, ffi::Buffer<ffi::F32>& wdw,
                        ffi::Buffer<ffi::F32>& wpw, ffi::Buffer<ffi::F32>& dout,
                        ffi::ResultBuffer<ffi::F32>& dx, ffi::ResultBuffer<ffi::F32>& da,
                        ffi::ResultBuffer<ffi::F32>& db_pre, ffi::ResultBuffer<ffi::F32>& dwdw,
                        ffi::ResultBuffer<ffi::F32>& dwpw, ffi::ResultBuffer<ffi::F32>& db,
                        int64_t offset, bool accumulate, int64_t dilation, int64_t isa,
                        int64_t threads, int64_t preact, float slope,
                        ffi::Buffer<ffi::F32>* bn_y = nullptr, ffi::Buffer<ffi::F32>* bn_c1 = nullptr,
                        ffi::Buffer<ffi::F32>* bn_c2 = nullptr) {
  SepShape sh;
  if (auto e = check_separable(x.dimensions(), wdw.dimensions(), wpw.dimensions(),
                               a.dimensions(), b.dimensions(), dilation, sh);
      e.failure())
    return e;
  const int64_t N = sh.N, H = sh.H, W = sh.W, C = sh.C, Co = sh.Co, G = sh.G, k = sh.k;
  if (auto e = check_slice(dout.dimensions(), sh, offset, "dout"); e.failure()) return e;
  const int64_t ldo = dout.dimensions()[3];
  crnet_dw::SepIO io{ldo, accumulate};
  if (bn_y) {
    const auto yd = bn_y->dimensions(), c1d = bn_c1->dimensions(), c2d = bn_c2->dimensions();
    if (yd.size() != 4 || yd[0] != sh.N || yd[1] != sh.H || yd[2] != sh.W || yd[3] != sh.Co ||
        c1d.size() != 1 || c1d[0] != sh.Co || c2d.size() != 1 || c2d[0] != sh.Co)
      return ffi::Error::InvalidArgument("y, c1, c2 must be (N, H, W, Co), (Co,), (Co,)");
    io.bn_c1 = bn_c1->typed_data();
    io.bn_c2 = bn_c2->typed_data();
  }
  const float* byp = bn_y ? bn_y->typed_data() : nullptr;
  // Fewer, taller bands here: each band recomputes k - 1 halo rows of dout @ wpw^T.
  const Plan pl = make_plan(pool, isa, threads, N, H,
                            double(N) * H * W * C * (3 * k * k + 2 * Co), 16);
  const int64_t kkc = k * k * C, cco = C * Co;
  const int64_t units = N * pl.bands;
  std::vector<float> part_dw(static_cast<size_t>(units * kkc), 0.f);
  std::vector<float> part_pw(static_cast<size_t>(units * cco), 0.f);
  std::vector<float> part_b(static_cast<size_t>(units * Co), 0.f);
  std::vector<float> part_sa(static_cast<size_t>(units * C), 0.f);
  std::vector<float> part_sb(static_cast<size_t>(units * C), 0.f);
  std::vector<float> wflip = flip_kernel(wdw.typed_data(), G, k, C);
  std::vector<float> wpwT(static_cast<size_t>(G * cco));
  const float* wpp = wpw.typed_data();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t o = 0; o < Co; ++o) wpwT[(g * Co + o) * C + c] = wpp[(g * C + c) * Co + o];
  const float* xp = x.typed_data();
  const float* ap = a.typed_data();
  const float* bp_ = b.typed_data();
  const float* wdp = wdw.typed_data();
  const float* wfp = wflip.data();
  const float* wtp = wpwT.data();
  const float* gp = dout.typed_data() + offset;
  float* dxp = dx->typed_data();
  float* pdw = part_dw.data();
  float* ppw = part_pw.data();
  float* pb = part_b.data();
  float* psa = part_sa.data();
  float* psb = part_sb.data();
  const bool nt = !accumulate && use_streaming(dxp, N * H * W * C, C);
  const int64_t per_group = N / G;
  parallel_for(pool, pl.threads, units, [=](int64_t unit) {
    const int64_t n = unit / pl.bands, bnd = unit % pl.bands, g = n / per_group;
    const int64_t i0 = bnd * pl.rows, i1 = std::min(H, i0 + pl.rows);
    crnet_dw::SepIO uio = io;
    if (byp) uio.bn_y = byp + n * H * W * Co;
    crnet_dw::sep_bwd_band(pl.isa, xp + n * H * W * C, prologue(preact, ap, bp_, slope, g, C), uio,
                           wdp + g * kkc, wfp + g * kkc, wtp + g * cco, gp + n * H * W * ldo,
                           dxp + n * H * W * C, pdw + unit * kkc, ppw + unit * cco, pb + unit * Co,
                           psa + unit * C, psb + unit * C, H, W, C, Co, k, dilation, i0, i1, nt);
    if (nt) crnet_dw::sfence();
  });
  reduce_partials(psa, units, C, G, da->typed_data());
  reduce_partials(psb, units, C, G, db_pre->typed_data());
  reduce_partials(pdw, units, kkc, G, dwdw->typed_data());
  reduce_partials(ppw, units, cco, G, dwpw->typed_data());
  reduce_partials(pb, units, Co, G, db->typed_data());
  return ffi::Error::Success();
}

ffi::Error SepBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                      ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wdw,
                      ffi::Buffer<ffi::F32> wpw, ffi::Buffer<ffi::F32> dout,
                      ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> da,
                      ffi::ResultBuffer<ffi::F32> db_pre, ffi::ResultBuffer<ffi::F32> dwdw,
                      ffi::ResultBuffer<ffi::F32> dwpw, ffi::ResultBuffer<ffi::F32> db,
                      int64_t dilation, int64_t isa, int64_t threads, int64_t preact,
                      float slope, int64_t offset) {
  return SepBwdCommon(pool, x, a, b, wdw, wpw, dout, dx, da, db_pre, dwdw, dwpw, db, offset,
                      false, dilation, isa, threads, preact, slope);
}

// As SepBwdImpl with dx = dx_in + the input gradient; dx is aliased to dx_in by the caller
// (a copy is made here if it is not).
ffi::Error SepBwdAccImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                         ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wdw,
                         ffi::Buffer<ffi::F32> wpw, ffi::Buffer<ffi::F32> dout,
                         ffi::Buffer<ffi::F32> dx_in, ffi::ResultBuffer<ffi::F32> dx,
                         ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> db_pre,
                         ffi::ResultBuffer<ffi::F32> dwdw, ffi::ResultBuffer<ffi::F32> dwpw,
                         ffi::ResultBuffer<ffi::F32> db, int64_t dilation, int64_t isa,
                         int64_t threads, int64_t preact, float slope, int64_t offset) {
  if (auto e = start_from(dx_in, dx, "dx_in must have the shape of x"); e.failure()) return e;
  return SepBwdCommon(pool, x, a, b, wdw, wpw, dout, dx, da, db_pre, dwdw, dwpw, db, offset,
                      true, dilation, isa, threads, preact, slope);
}

// As SepBwdImpl / SepBwdAccImpl for a convolution whose output y (N, H, W, Co) also feeds
// a BatchNorm's batch moments: the output gradient is dout + c1 + c2 * y (c1, c2 (Co,):
// the moments' cotangents over the pixel count, and twice that for the mean square),
// formed as the kernel reads dout (see crnet_dw::SepIO).
ffi::Error SepBwdBnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                        ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wdw,
                        ffi::Buffer<ffi::F32> wpw, ffi::Buffer<ffi::F32> dout,
                        ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> c1, ffi::Buffer<ffi::F32> c2,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> da,
                        ffi::ResultBuffer<ffi::F32> db_pre, ffi::ResultBuffer<ffi::F32> dwdw,
                        ffi::ResultBuffer<ffi::F32> dwpw, ffi::ResultBuffer<ffi::F32> db,
                        int64_t dilation, int64_t isa, int64_t threads, int64_t preact,
                        float slope, int64_t offset) {
  return SepBwdCommon(pool, x, a, b, wdw, wpw, dout, dx, da, db_pre, dwdw, dwpw, db, offset,
                      false, dilation, isa, threads, preact, slope, &y, &c1, &c2);
}

ffi::Error SepBwdBnAccImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                           ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wdw,
                           ffi::Buffer<ffi::F32> wpw, ffi::Buffer<ffi::F32> dout,
                           ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> c1, ffi::Buffer<ffi::F32> c2,
                           ffi::Buffer<ffi::F32> dx_in, ffi::ResultBuffer<ffi::F32> dx,
                           ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> db_pre,
                           ffi::ResultBuffer<ffi::F32> dwdw, ffi::ResultBuffer<ffi::F32> dwpw,
                           ffi::ResultBuffer<ffi::F32> db, int64_t dilation, int64_t isa,
                           int64_t threads, int64_t preact, float slope, int64_t offset) {
  if (auto e = start_from(dx_in, dx, "dx_in must have the shape of x"); e.failure()) return e;
  return SepBwdCommon(pool, x, a, b, wdw, wpw, dout, dx, da, db_pre, dwdw, dwpw, db, offset,
                      true, dilation, isa, threads, preact, slope, &y, &c1, &c2);
}

// The widest strip of ceil(W / strips) columns whose scratch(ws) floats fit `budget` (or
// 16 columns and less, whatever it takes); at least 1, so W = 0 makes no strips.
template <class F>
int64_t widest_strip(int64_t W, int64_t budget, F&& scratch) {
  for (int64_t strips = 1;; ++strips) {
    const int64_t ws = (W + strips - 1) / strips;
    if (ws <= 16 || scratch(ws) <= budget) return std::max<int64_t>(ws, 1);
  }
}

// Strip width of the fused block: the widest strip whose scratch stays within
// CRNET_BLOCK_SCRATCH_KB. By default 1280 KB where a core has an L2 cache of 2 MB or more
// (measured best on such a machine: the rest of the L2 is left to the input and output
// rows streaming through), else 4096 KB: with a 1 MB L2 (AMD Zen 5) the rings live in
// the L3 cache whatever their width, and wider strips recompute fewer halo columns (at
// 300 x 340: one strip instead of four, inference 7% faster; benchmarks/RESULTS.md,
// "seventh pass").
int64_t default_block_scratch_kb() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // bytes per core (glibc); <= 0 where unknown
  if (l2 > 0 && l2 < (2L << 20)) return 4096;
#endif
  return 1280;
}

int64_t block_strip_width(const crnet_dw::BlockParams& p, int64_t W) {
  static const int64_t budget = [] {
    const char* s = std::getenv("CRNET_BLOCK_SCRATCH_KB");
    return (s ? std::max<int64_t>(64, std::atoll(s)) : default_block_scratch_kb()) * 256;  // floats
  }();
  return widest_strip(W, budget, [&](int64_t ws) { return crnet_dw::block_scratch_floats(p, ws); });
}

// Fused residual block for inference (crnet_dw::BlockParams):
//   x (N,H,W,C), pre_a, pre_b (C), wsc (C,L), bsc (L), then per branch the 8 buffers
//   wdw1 (k,k,C), wpw1 (C,F), b1 (F), mid_a (F), mid_b (F), wdw2 (k,k,F), wpw2 (F,F), b2 (F)
//   -> out (N,H,W,L), L = branches * F.
// Attributes: dilations (i64 array, one per branch), preact, slope (the prologue on x),
// mid_slope, isa, threads.
ffi::Error BlockInferImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> pre_a,
                          ffi::Buffer<ffi::F32> pre_b, ffi::Buffer<ffi::F32> wsc,
                          ffi::Buffer<ffi::F32> bsc, ffi::RemainingArgs rest,
                          ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> dilations,
                          int64_t preact, float slope, float mid_slope, int64_t isa,
                          int64_t threads) {
  const auto xd = x.dimensions();
  if (xd.size() != 4) return ffi::Error::InvalidArgument("x must have rank 4 (N, H, W, C)");
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3];
  const int64_t nb = static_cast<int64_t>(dilations.size());
  if (nb < 1 || nb > crnet_dw::kMaxBranches)
    return ffi::Error::InvalidArgument("the block needs 1 to " + std::to_string(crnet_dw::kMaxBranches) +
                                       " branches");
  if (static_cast<int64_t>(rest.size()) != 8 * nb)
    return ffi::Error::InvalidArgument("the block takes 8 buffers per branch after the shortcut's");
  auto is = [](ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
    return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
  };
  if (!is(pre_a.dimensions(), {C}) || !is(pre_b.dimensions(), {C}))
    return ffi::Error::InvalidArgument("prologue scale and shift must have shape (C,)");
  const auto sd = wsc.dimensions();
  if (sd.size() != 2 || sd[0] != C) return ffi::Error::InvalidArgument("shortcut kernel must be (C, L)");
  const int64_t L = sd[1];
  if (!is(bsc.dimensions(), {L})) return ffi::Error::InvalidArgument("shortcut bias must be (L,)");
  if (L % nb != 0) return ffi::Error::InvalidArgument("L must be the branches' channels summed");
  const int64_t F = L / nb;
  if (!is(out->dimensions(), {N, H, W, L})) return ffi::Error::InvalidArgument("out must be (N, H, W, L)");
  crnet_dw::BlockParams p;
  p.pre = preact ? crnet_dw::Prologue{pre_a.typed_data(), pre_b.typed_data(), slope} : crnet_dw::Prologue{};
  p.mid_slope = mid_slope;
  p.wsc = wsc.typed_data();
  p.bsc = bsc.typed_data();
  p.nb = static_cast<int>(nb);
  p.C = C;
  p.F = F;
  p.L = L;
  double work = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const float* ptr[8];
    for (int64_t i = 0; i < 8; ++i) {
      auto buf = rest.get<ffi::Buffer<ffi::F32>>(8 * b + i);
      if (!buf.has_value()) return buf.error();
      const auto dd = buf->dimensions();
      const int64_t k = (i == 0 || i == 5) && dd.size() == 3 ? dd[0] : 0;
      bool ok;
      switch (i) {
        case 0: ok = dd.size() == 3 && dd[1] == k && dd[2] == C; break;
        case 1: ok = is(dd, {C, F}); break;
        case 5: ok = dd.size() == 3 && dd[1] == k && dd[2] == F && k == p.br[b].k; break;
        case 6: ok = is(dd, {F, F}); break;
        default: ok = is(dd, {F});
      }
      if (!ok)
        return ffi::Error::InvalidArgument("branch " + std::to_string(b) + ", buffer " + std::to_string(i) +
                                           ": wrong shape (see crnet_block_infer)");
      if (i == 0) {
        if (k < 1 || k % 2 == 0 || k > 15)
          return ffi::Error::InvalidArgument("kernel size must be odd and <= 15");
        p.br[b].k = k;
      }
      ptr[i] = buf->typed_data();
    }
    if (dilations[b] < 1) return ffi::Error::InvalidArgument("dilation must be >= 1");
    p.br[b].d = dilations[b];
    p.br[b].wdw1 = ptr[0];
    p.br[b].wpw1 = ptr[1];
    p.br[b].b1 = ptr[2];
    p.br[b].mid_a = ptr[3];
    p.br[b].mid_b = ptr[4];
    p.br[b].wdw2 = ptr[5];
    p.br[b].wpw2 = ptr[6];
    p.br[b].b2 = ptr[7];
    work += double(N) * H * W * ((C + F) * p.br[b].k * p.br[b].k + (C + F) * F);
  }
  if (N * H * W == 0) return ffi::Error::Success();  // no pixels: nothing to write
  const int64_t ws = block_strip_width(p, W);
  const int64_t strips = (W + ws - 1) / ws;
  const int isa_ = crnet_dw::resolve_isa(static_cast<int>(isa));
  const int64_t nthreads = num_threads(pool, threads, work);
  // Bands of rows only where images x strips leave threads idle: each band recomputes
  // 2R rows of x0 and 2 R_b of each middle above and below it.
  int64_t bands = std::max<int64_t>(1, (4 * nthreads + N * strips - 1) / (N * strips));
  bands = std::min<int64_t>(bands, std::max<int64_t>(1, H / 64));
  const int64_t rows = (H + bands - 1) / bands;
  bands = (H + rows - 1) / rows;
  const float* xp = x.typed_data();
  float* op = out->typed_data();
  const bool nt = use_streaming(op, N * H * W * L, L);
  parallel_for(pool, nthreads, N * bands * strips, [=, &p](int64_t unit) {
    const int64_t n = unit / (bands * strips), rest_ = unit % (bands * strips);
    const int64_t bnd = rest_ / strips, s = rest_ % strips;
    const int64_t i0 = bnd * rows, i1 = std::min(H, i0 + rows);
    const int64_t jb = s * ws, je = std::min(W, jb + ws);
    crnet_dw::block_fwd_unit(isa_, xp + n * H * W * C, p, op + n * H * W * L, H, W, i0, i1, jb, je, nt);
    if (nt) crnet_dw::sfence();
  });
  return ffi::Error::Success();
}


// Training's fan-out (crnet_dw::FanoutParams) in one pass over x:
//   x (N,H,W,C), a, b (C) (the prologue of the separable convolutions, preact = 1), then per
//   convolution wdw (k,k,C), wpw (C,Co), bias (Co) -> per convolution y (N,H,W,Co), sum (Co),
//   sumsq (Co) (sums over the batch of y and y^2). Attributes: dilations (one per
//   convolution), raw (one per convolution: 1 = a 1 x 1 convolution of the raw x, its wdw
//   ignored), preact, slope, isa, threads.
ffi::Error FanoutFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                         ffi::Buffer<ffi::F32> b, ffi::RemainingArgs args, ffi::RemainingRets rets,
                         ffi::Span<const int64_t> dilations, ffi::Span<const int64_t> raw,
                         int64_t preact, float slope, int64_t isa, int64_t threads) {
  const auto xd = x.dimensions();
  if (xd.size() != 4) return ffi::Error::InvalidArgument("x must have rank 4 (N, H, W, C)");
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3];
  const int64_t n = static_cast<int64_t>(dilations.size());
  if (n < 1 || n > crnet_dw::kMaxBranches + 1 || static_cast<int64_t>(raw.size()) != n)
    return ffi::Error::InvalidArgument("the fan-out takes 1 to 5 convolutions, one dilation and raw flag each");
  if (static_cast<int64_t>(args.size()) != 3 * n || static_cast<int64_t>(rets.size()) != 3 * n)
    return ffi::Error::InvalidArgument("the fan-out takes 3 buffers and returns 3 per convolution");
  if (a.dimensions().size() != 1 || a.dimensions()[0] != C || b.dimensions().size() != 1 || b.dimensions()[0] != C)
    return ffi::Error::InvalidArgument("prologue scale and shift must have shape (C,)");
  crnet_dw::FanoutParams p;
  p.pre = preact ? crnet_dw::Prologue{a.typed_data(), b.typed_data(), slope} : crnet_dw::Prologue{};
  p.n = static_cast<int>(n);
  p.C = C;
  double work = 0;
  std::vector<float*> outs(n), sums(n), sumsqs(n);
  for (int64_t i = 0; i < n; ++i) {
    auto wdw = args.get<ffi::Buffer<ffi::F32>>(3 * i);
    auto wpw = args.get<ffi::Buffer<ffi::F32>>(3 * i + 1);
    auto bias = args.get<ffi::Buffer<ffi::F32>>(3 * i + 2);
    if (!wdw.has_value()) return wdw.error();
    if (!wpw.has_value()) return wpw.error();
    if (!bias.has_value()) return bias.error();
    const auto wd = wdw->dimensions(), pd = wpw->dimensions(), bd = bias->dimensions();
    if (pd.size() != 2 || pd[0] != C || bd.size() != 1 || bd[0] != pd[1])
      return ffi::Error::InvalidArgument("convolution " + std::to_string(i) + ": wpw must be (C, Co), bias (Co,)");
    crnet_dw::FanoutConv& cv = p.conv[i];
    cv.Co = pd[1];
    cv.wpw = wpw->typed_data();
    cv.bias = bias->typed_data();
    if (!raw[i]) {
      if (wd.size() != 3 || wd[0] != wd[1] || wd[2] != C || wd[0] % 2 == 0 || wd[0] > 15)
        return ffi::Error::InvalidArgument("convolution " + std::to_string(i) + ": wdw must be (k, k, C), k odd <= 15");
      if (dilations[i] < 1) return ffi::Error::InvalidArgument("dilation must be >= 1");
      cv.wdw = wdw->typed_data();
      cv.k = wd[0];
      cv.d = dilations[i];
    }
    auto y = rets.get<ffi::Buffer<ffi::F32>>(3 * i);
    auto s1 = rets.get<ffi::Buffer<ffi::F32>>(3 * i + 1);
    auto s2 = rets.get<ffi::Buffer<ffi::F32>>(3 * i + 2);
    if (!y.has_value()) return y.error();
    if (!s1.has_value()) return s1.error();
    if (!s2.has_value()) return s2.error();
    const auto yd = (*y)->dimensions();
    if (yd.size() != 4 || yd[0] != N || yd[1] != H || yd[2] != W || yd[3] != cv.Co ||
        (*s1)->dimensions().size() != 1 || (*s1)->dimensions()[0] != cv.Co ||
        (*s2)->dimensions().size() != 1 || (*s2)->dimensions()[0] != cv.Co)
      return ffi::Error::InvalidArgument("convolution " + std::to_string(i) + ": results must be (N, H, W, Co), (Co,), (Co,)");
    outs[i] = (*y)->typed_data();
    sums[i] = (*s1)->typed_data();
    sumsqs[i] = (*s2)->typed_data();
    cv.nt = use_streaming(outs[i], N * H * W * cv.Co, cv.Co);
    work += double(N) * H * W * C * (cv.k * cv.k + cv.Co);
  }
  const int64_t budget = 1024 * 256;  // floats: ~1 MB of the 2 MB L2
  const int64_t ws = widest_strip(W, budget, [&](int64_t w) { return crnet_dw::fanout_scratch_floats(p, w); });
  const int64_t strips = (W + ws - 1) / ws;
  const Plan pl = make_plan(pool, isa, threads, N, H, work, 8);
  const int64_t units = N * pl.bands * strips;
  // Per-unit partial moments, reduced in unit order (the decomposition depends on the
  // shapes alone, so the sums do not depend on the thread count).
  int64_t co_total = 0;
  std::vector<int64_t> co_off(n);
  for (int64_t i = 0; i < n; ++i) {
    co_off[i] = co_total;
    co_total += p.conv[i].Co;
  }
  std::vector<float> part(static_cast<size_t>(2 * units * co_total), 0.f);
  float* pp = part.data();
  const float* xp = x.typed_data();
  parallel_for(pool, pl.threads, units, [&](int64_t unit) {
    const int64_t img = unit / (pl.bands * strips), rest = unit % (pl.bands * strips);
    const int64_t bnd = rest / strips, s = rest % strips;
    crnet_dw::FanoutParams up = p;
    bool nt = false;
    for (int64_t i = 0; i < n; ++i) {
      crnet_dw::FanoutConv& cv = up.conv[i];
      cv.out = outs[i] + img * H * W * cv.Co;
      cv.sum = pp + unit * 2 * co_total + co_off[i];
      cv.sumsq = cv.sum + co_total;
      nt = nt || cv.nt;
    }
    const int64_t i0 = bnd * pl.rows, i1 = std::min(H, i0 + pl.rows);
    const int64_t jb = s * ws, je = std::min(W, jb + ws);
    crnet_dw::fanout_fwd_unit(pl.isa, xp + img * H * W * C, up, H, W, i0, i1, jb, je);
    if (nt) crnet_dw::sfence();
  });
  std::vector<float> total(static_cast<size_t>(2 * co_total));
  reduce_partials(pp, units, 2 * co_total, 1, total.data());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t Co = p.conv[i].Co;
    std::copy(total.begin() + co_off[i], total.begin() + co_off[i] + Co, sums[i]);
    std::copy(total.begin() + co_total + co_off[i], total.begin() + co_total + co_off[i] + Co, sumsqs[i]);
  }
  return ffi::Error::Success();
}

// x (N, H, W, C) and g (N, H, W, L): the same pixels, any channel counts.
// Runs fn(unit, p0, n) for the (image, band of rows) units of plan pl over images (H, W):
// p0 is the band's first pixel counted over the whole batch, n its number of pixels. For
// the pointwise targets, whose bands are contiguous pixel runs.
template <class F>
void for_pixel_bands(ffi::ThreadPool& pool, const Plan& pl, int64_t N, int64_t H, int64_t W, F fn) {
  parallel_for(pool, pl.threads, N * pl.bands, [=](int64_t unit) {
    const int64_t img = unit / pl.bands, bnd = unit % pl.bands;
    const int64_t i0 = bnd * pl.rows, i1 = std::min(H, i0 + pl.rows);
    if (i1 > i0) fn(unit, (img * H + i0) * W, (i1 - i0) * W);
  });
}

ffi::Error check_pixel_pair(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> gd) {
  if (xd.size() != 4 || gd.size() != 4 || !std::equal(xd.begin(), xd.end() - 1, gd.begin()))
    return ffi::Error::InvalidArgument("x and g must be (N, H, W, C) and (N, H, W, L)");
  return ffi::Error::Success();
}

// The backward of out = BatchNorm(x @ w + bias) on batch statistics, first pass:
//   x (N,H,W,C), g (N,H,W,L) -> xg (C,L) = x^T g, gs (L) = sum g, xx (C,C) = x^T x,
//   xs (C) = sum x, over every pixel. Attributes: isa, threads.
ffi::Error PointwiseBnSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                               ffi::ResultBuffer<ffi::F32> xg, ffi::ResultBuffer<ffi::F32> gs,
                               ffi::ResultBuffer<ffi::F32> xx, ffi::ResultBuffer<ffi::F32> xs, int64_t isa,
                               int64_t threads) {
  const auto xd = x.dimensions(), gd = g.dimensions();
  if (auto e = check_pixel_pair(xd, gd); e.failure()) return e;
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], L = gd[3];
  const Plan pl = make_plan(pool, isa, threads, N, H, double(N) * H * W * C * (C + L), 8);
  const int64_t units = N * pl.bands;
  const int64_t width = C * L + L + C * C + C;  // one unit's partial sums
  std::vector<float> part(static_cast<size_t>(units * width), 0.f);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  float* pp = part.data();
  for_pixel_bands(pool, pl, N, H, W, [=](int64_t unit, int64_t p0, int64_t n) {
    float* u = pp + unit * width;
    crnet_dw::pw_bn_sums(pl.isa, xp + p0 * C, gp + p0 * L, n, C, L, u, u + C * L, u + C * L + L,
                         u + C * L + L + C * C);
  });
  std::vector<float> total(static_cast<size_t>(width));
  reduce_partials(pp, units, width, 1, total.data());
  std::copy(total.begin(), total.begin() + C * L, xg->typed_data());
  std::copy(total.begin() + C * L, total.begin() + C * L + L, gs->typed_data());
  // x^T x is symmetric and the kernels may accumulate only its upper triangle: mirror it.
  float* xxp = xx->typed_data();
  std::copy(total.begin() + C * L + L, total.begin() + C * L + L + C * C, xxp);
  for (int64_t c = 1; c < C; ++c)
    for (int64_t o = 0; o < c; ++o) xxp[c * C + o] = xxp[o * C + c];
  std::copy(total.begin() + C * L + L + C * C, total.end(), xs->typed_data());
  return ffi::Error::Success();
}

// Second pass: g (N,H,W,L), a (L,C), x (N,H,W,C), m (C,C), c (C) -> dx (N,H,W,C) =
// g @ a + x @ m + c. Attributes: isa, threads.
ffi::Error PointwiseBnDxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> a,
                             ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> c,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t isa, int64_t threads) {
  const auto xd = x.dimensions(), gd = g.dimensions();
  if (auto e = check_pixel_pair(xd, gd); e.failure()) return e;
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], L = gd[3];
  const auto ad = a.dimensions(), md = m.dimensions(), cd = c.dimensions();
  if (ad.size() != 2 || ad[0] != L || ad[1] != C || md.size() != 2 || md[0] != C || md[1] != C ||
      cd.size() != 1 || cd[0] != C)
    return ffi::Error::InvalidArgument("a, m, c must be (L, C), (C, C), (C,)");
  const Plan pl = make_plan(pool, isa, threads, N, H, double(N) * H * W * C * (C + L), 8);
  const float* gp = g.typed_data();
  const float* xp = x.typed_data();
  const float* ap = a.typed_data();
  const float* mp = m.typed_data();
  const float* cp = c.typed_data();
  float* dp = dx->typed_data();
  for_pixel_bands(pool, pl, N, H, W, [=](int64_t, int64_t p0, int64_t n) {
    crnet_dw::pw_bn_dx(pl.isa, gp + p0 * L, ap, xp + p0 * C, mp, cp, dp + p0 * C, n, C, L);
  });
  return ffi::Error::Success();
}

// The backward of y = x @ k + bias (few output channels, the head), one pass:
//   x (N,H,W,C), g (N,H,W,L), kT (L,C) -> dx (N,H,W,C) = g @ kT, xg (C,L) = x^T g,
//   gs (L) = sum g. Attributes: isa, threads.
ffi::Error PointwiseBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                            ffi::Buffer<ffi::F32> kT, ffi::ResultBuffer<ffi::F32> dx,
                            ffi::ResultBuffer<ffi::F32> xg, ffi::ResultBuffer<ffi::F32> gs, int64_t isa,
                            int64_t threads) {
  const auto xd = x.dimensions(), gd = g.dimensions(), kd = kT.dimensions();
  if (auto e = check_pixel_pair(xd, gd); e.failure()) return e;
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], L = gd[3];
  if (kd.size() != 2 || kd[0] != L || kd[1] != C) return ffi::Error::InvalidArgument("kT must be (L, C)");
  const Plan pl = make_plan(pool, isa, threads, N, H, double(N) * H * W * C * L, 8);
  const int64_t units = N * pl.bands;
  const int64_t width = C * L + L;  // one unit's partial sums
  std::vector<float> part(static_cast<size_t>(units * width), 0.f);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  const float* kp = kT.typed_data();
  float* dp = dx->typed_data();
  float* pp = part.data();
  // rows of 64-byte multiples from a 64-byte aligned base: non-temporal stores (dx is
  // large and read only by a later kernel)
  const bool nt = reinterpret_cast<uintptr_t>(dp) % 64 == 0 && (C * sizeof(float)) % 64 == 0;
  for_pixel_bands(pool, pl, N, H, W, [=](int64_t unit, int64_t p0, int64_t n) {
    float* u = pp + unit * width;
    crnet_dw::pw_bwd(pl.isa, xp + p0 * C, gp + p0 * L, kp, n, C, L, dp + p0 * C, u, u + C * L, nt);
    if (nt) crnet_dw::sfence();
  });
  std::vector<float> total(static_cast<size_t>(width));
  reduce_partials(pp, units, width, 1, total.data());
  std::copy(total.begin(), total.begin() + C * L, xg->typed_data());
  std::copy(total.begin() + C * L, total.end(), gs->typed_data());
  return ffi::Error::Success();
}

}  // namespace

#define CRNET_ATTRS .Attr<int64_t>("dilation").Attr<int64_t>("isa").Attr<int64_t>("threads")
using F32Buf = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetDepthwiseFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // w
                                  .Ret<F32Buf>()  // y
                                  CRNET_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetDepthwiseBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // w
                                  .Arg<F32Buf>()  // dy
                                  .Ret<F32Buf>()  // dx
                                  .Ret<F32Buf>()  // dw
                                  CRNET_ATTRS);

#define CRNET_SEP_ATTRS CRNET_ATTRS.Attr<int64_t>("preact").Attr<float>("slope")
#define CRNET_SLICE_ATTRS CRNET_SEP_ATTRS.Attr<int64_t>("offset")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetSeparableFwd, SepFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // a (prologue scale)
                                  .Arg<F32Buf>()  // b (prologue shift)
                                  .Arg<F32Buf>()  // wdw
                                  .Arg<F32Buf>()  // wpw
                                  .Arg<F32Buf>()  // bias
                                  .Ret<F32Buf>()  // out
                                  CRNET_SEP_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetSeparableFwdStats, SepFwdStatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // a (prologue scale)
                                  .Arg<F32Buf>()  // b (prologue shift)
                                  .Arg<F32Buf>()  // wdw
                                  .Arg<F32Buf>()  // wpw
                                  .Arg<F32Buf>()  // bias
                                  .Ret<F32Buf>()  // out
                                  .Ret<F32Buf>()  // sum (G, Co)
                                  .Ret<F32Buf>()  // sumsq (G, Co)
                                  CRNET_SEP_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetSeparableFwdInto, SepFwdIntoImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // a (prologue scale)
                                  .Arg<F32Buf>()  // b (prologue shift)
                                  .Arg<F32Buf>()  // wdw
                                  .Arg<F32Buf>()  // wpw
                                  .Arg<F32Buf>()  // bias
                                  .Arg<F32Buf>()  // acc_scale (G, Co)
                                  .Arg<F32Buf>()  // acc (N, H, W, ld)
                                  .Ret<F32Buf>()  // out (aliases acc)
                                  CRNET_SLICE_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetSeparableFwdIntoSums, SepFwdIntoSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // a (prologue scale)
                                  .Arg<F32Buf>()  // b (prologue shift)
                                  .Arg<F32Buf>()  // wdw
                                  .Arg<F32Buf>()  // wpw
                                  .Arg<F32Buf>()  // bias
                                  .Arg<F32Buf>()  // acc_scale (G, Co)
                                  .Arg<F32Buf>()  // acc (N, H, W, ld)
                                  .Ret<F32Buf>()  // out (aliases acc)
                                  .Ret<F32Buf>()  // sum (N, Co)
                                  .Ret<F32Buf>()  // sumsq (N, Co)
                                  CRNET_SLICE_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetSeparableBwd, SepBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // a
                                  .Arg<F32Buf>()  // b
                                  .Arg<F32Buf>()  // wdw
                                  .Arg<F32Buf>()  // wpw
                                  .Arg<F32Buf>()  // dout
                                  .Ret<F32Buf>()  // dx
                                  .Ret<F32Buf>()  // da
                                  .Ret<F32Buf>()  // db (prologue shift)
                                  .Ret<F32Buf>()  // dwdw
                                  .Ret<F32Buf>()  // dwpw
                                  .Ret<F32Buf>()  // dbias
                                  CRNET_SLICE_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetSeparableBwdAcc, SepBwdAccImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // a
                                  .Arg<F32Buf>()  // b
                                  .Arg<F32Buf>()  // wdw
                                  .Arg<F32Buf>()  // wpw
                                  .Arg<F32Buf>()  // dout (N, H, W, ld)
                                  .Arg<F32Buf>()  // dx_in
                                  .Ret<F32Buf>()  // dx (aliases dx_in)
                                  .Ret<F32Buf>()  // da
                                  .Ret<F32Buf>()  // db (prologue shift)
                                  .Ret<F32Buf>()  // dwdw
                                  .Ret<F32Buf>()  // dwpw
                                  .Ret<F32Buf>()  // dbias
                                  CRNET_SLICE_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetSeparableBwdBn, SepBwdBnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // a
                                  .Arg<F32Buf>()  // b
                                  .Arg<F32Buf>()  // wdw
                                  .Arg<F32Buf>()  // wpw
                                  .Arg<F32Buf>()  // dout (N, H, W, ld)
                                  .Arg<F32Buf>()  // y (N, H, W, Co)
                                  .Arg<F32Buf>()  // c1 (Co)
                                  .Arg<F32Buf>()  // c2 (Co)
                                  .Ret<F32Buf>()  // dx
                                  .Ret<F32Buf>()  // da
                                  .Ret<F32Buf>()  // db (prologue shift)
                                  .Ret<F32Buf>()  // dwdw
                                  .Ret<F32Buf>()  // dwpw
                                  .Ret<F32Buf>()  // dbias
                                  CRNET_SLICE_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetSeparableBwdBnAcc, SepBwdBnAccImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x
                                  .Arg<F32Buf>()  // a
                                  .Arg<F32Buf>()  // b
                                  .Arg<F32Buf>()  // wdw
                                  .Arg<F32Buf>()  // wpw
                                  .Arg<F32Buf>()  // dout (N, H, W, ld)
                                  .Arg<F32Buf>()  // y (N, H, W, Co)
                                  .Arg<F32Buf>()  // c1 (Co)
                                  .Arg<F32Buf>()  // c2 (Co)
                                  .Arg<F32Buf>()  // dx_in
                                  .Ret<F32Buf>()  // dx (aliases dx_in)
                                  .Ret<F32Buf>()  // da
                                  .Ret<F32Buf>()  // db (prologue shift)
                                  .Ret<F32Buf>()  // dwdw
                                  .Ret<F32Buf>()  // dwpw
                                  .Ret<F32Buf>()  // dbias
                                  CRNET_SLICE_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetBlockInfer, BlockInferImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x (N, H, W, C)
                                  .Arg<F32Buf>()  // pre_a (C)
                                  .Arg<F32Buf>()  // pre_b (C)
                                  .Arg<F32Buf>()  // wsc (C, L)
                                  .Arg<F32Buf>()  // bsc (L)
                                  .RemainingArgs()  // 8 buffers per branch
                                  .Ret<F32Buf>()  // out (N, H, W, L)
                                  .Attr<ffi::Span<const int64_t>>("dilations")
                                  .Attr<int64_t>("preact")
                                  .Attr<float>("slope")
                                  .Attr<float>("mid_slope")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetFanoutFwdStats, FanoutFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x (N, H, W, C)
                                  .Arg<F32Buf>()  // a (C)
                                  .Arg<F32Buf>()  // b (C)
                                  .RemainingArgs()  // wdw, wpw, bias per convolution
                                  .RemainingRets()  // y, sum, sumsq per convolution
                                  .Attr<ffi::Span<const int64_t>>("dilations")
                                  .Attr<ffi::Span<const int64_t>>("raw")
                                  .Attr<int64_t>("preact")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetPointwiseBnSums, PointwiseBnSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x (N, H, W, C)
                                  .Arg<F32Buf>()  // g (N, H, W, L)
                                  .Ret<F32Buf>()  // xg (C, L)
                                  .Ret<F32Buf>()  // gs (L)
                                  .Ret<F32Buf>()  // xx (C, C)
                                  .Ret<F32Buf>()  // xs (C)
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetPointwiseBnDx, PointwiseBnDxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // g (N, H, W, L)
                                  .Arg<F32Buf>()  // a (L, C)
                                  .Arg<F32Buf>()  // x (N, H, W, C)
                                  .Arg<F32Buf>()  // m (C, C)
                                  .Arg<F32Buf>()  // c (C)
                                  .Ret<F32Buf>()  // dx (N, H, W, C)
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrnetPointwiseBwd, PointwiseBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buf>()  // x (N, H, W, C)
                                  .Arg<F32Buf>()  // g (N, H, W, L)
                                  .Arg<F32Buf>()  // kT (L, C)
                                  .Ret<F32Buf>()  // dx (N, H, W, C)
                                  .Ret<F32Buf>()  // xg (C, L)
                                  .Ret<F32Buf>()  // gs (L)
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

// ------------------------------------------------------------------------------------
// Python module: registrations() -> {target name: PyCapsule}, abi_version() -> int,
// source_digest() -> str, best_isa() -> int.
// ------------------------------------------------------------------------------------
static PyObject* py_registrations(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  auto add = [&](const char* name, void* fn) {
    PyObject* cap = PyCapsule_New(fn, nullptr, nullptr);
    if (!cap) return false;
    const int rc = PyDict_SetItemString(d, name, cap);
    Py_DECREF(cap);
    return rc == 0;
  };
  if (!add("crnet_depthwise_fwd", reinterpret_cast<void*>(CrnetDepthwiseFwd)) ||
      !add("crnet_depthwise_bwd", reinterpret_cast<void*>(CrnetDepthwiseBwd)) ||
      !add("crnet_separable_fwd", reinterpret_cast<void*>(CrnetSeparableFwd)) ||
      !add("crnet_separable_bwd", reinterpret_cast<void*>(CrnetSeparableBwd)) ||
      !add("crnet_separable_fwd_into", reinterpret_cast<void*>(CrnetSeparableFwdInto)) ||
      !add("crnet_separable_fwd_into_sums", reinterpret_cast<void*>(CrnetSeparableFwdIntoSums)) ||
      !add("crnet_separable_fwd_stats", reinterpret_cast<void*>(CrnetSeparableFwdStats)) ||
      !add("crnet_separable_bwd_acc", reinterpret_cast<void*>(CrnetSeparableBwdAcc)) ||
      !add("crnet_separable_bwd_bn", reinterpret_cast<void*>(CrnetSeparableBwdBn)) ||
      !add("crnet_separable_bwd_bn_acc", reinterpret_cast<void*>(CrnetSeparableBwdBnAcc)) ||
      !add("crnet_block_infer", reinterpret_cast<void*>(CrnetBlockInfer)) ||
      !add("crnet_fanout_fwd_stats", reinterpret_cast<void*>(CrnetFanoutFwdStats)) ||
      !add("crnet_pointwise_bn_sums", reinterpret_cast<void*>(CrnetPointwiseBnSums)) ||
      !add("crnet_pointwise_bn_dx", reinterpret_cast<void*>(CrnetPointwiseBnDx)) ||
      !add("crnet_pointwise_bwd", reinterpret_cast<void*>(CrnetPointwiseBwd))) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

// Version of the targets' calling convention (operands, results, attributes). Raise it
// with every change to them, together with ABI_VERSION in crnet_jax/_ffi.py, so that an
// extension left over from an older build is refused instead of called wrongly.
static constexpr long kAbiVersion = 6;

static PyObject* py_abi_version(PyObject*, PyObject*) { return PyLong_FromLong(kAbiVersion); }

// Digest of crnet_jax/csrc at build time (setup.py, crnet_jax/csrc_digest.py); "" if unknown.
#ifndef CRNET_SOURCE_DIGEST
#define CRNET_SOURCE_DIGEST ""
#endif
static PyObject* py_source_digest(PyObject*, PyObject*) {
  return PyUnicode_FromString(CRNET_SOURCE_DIGEST);
}

static PyObject* py_best_isa(PyObject*, PyObject*) {
  return PyLong_FromLong(crnet_dw::best_isa());
}

static PyMethodDef kMethods[] = {
    {"registrations", py_registrations, METH_NOARGS,
     "Dict of XLA FFI target name -> handler PyCapsule."},
    {"abi_version", py_abi_version, METH_NOARGS,
     "Version of the targets' calling convention (see crnet_jax/_ffi.py ABI_VERSION)."},
    {"source_digest", py_source_digest, METH_NOARGS,
     "Digest of the sources this extension was built from (crnet_jax/csrc_digest.py)."},
    {"best_isa", py_best_isa, METH_NOARGS,
     "Best instruction set compiled in and supported: 1 baseline, 2 AVX2, 3 AVX-512."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_depthwise_ffi",
                              "XLA FFI CPU kernels for depthwise atrous convolution.", -1,
                              kMethods};

PyMODINIT_FUNC PyInit__depthwise_ffi(void) { return PyModule_Create(&kModule); }
