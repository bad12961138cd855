// XLA FFI custom calls (CPU, float32, NHWC) for the soft mask's resampling, where XLA:CPU's own
// programs do far more work than the arithmetic needs (docs/benchmarks.md):
//
//   resattn_max_pool_grad(first s8 [N, Ho, Wo, C], grad [N, Ho, Wo, C]; h, w, pad_h, pad_w)
//       -> [N, h, w, C]: the gradient of the 3x3 / stride-2 max-pool, each output's gradient routed to
//       the input pixel (2i + a - pad_h, 2j + b - pad_w) of its first maximum, k = first = 3a + b.
//       XLA fuses the producers of `first` and `grad` into its 9 shifted reads and computes them 9
//       times over (42 ms against 3 ms here for 128x32x32x64).
//   resattn_upsample(x [N, H, W, C]; ho, wo) -> [N, ho, wo, C]: bilinear, align_corners=True;
//   resattn_upsample_grad(g [N, ho, wo, C]; h, w) -> [N, h, w, C]: its transpose (the gradient).
//       XLA runs the gathers of the separable version through transposed copies of the whole map.
//
// The interpolation weights are those of resattn_jax.ops.upsample.interpolation_matrix (computed in
// double, as there, then rounded to float). Images are split over XLA's threads; within an image
// the loops run over channel vectors.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Output pixel o of an align_corners=True resize samples (1 - frac) * src[lo] + frac * src[hi].
struct Tap {
  int64_t lo, hi;
  float w_lo, w_hi;
};

std::vector<Tap> Taps(int64_t size_in, int64_t size_out) {
  std::vector<Tap> taps(size_out);
  const double scale = size_out > 1 ? static_cast<double>(size_in - 1) / static_cast<double>(size_out - 1) : 0.0;
  for (int64_t o = 0; o < size_out; ++o) {
    const double src = static_cast<double>(o) * scale;
    const int64_t lo = std::min<int64_t>(static_cast<int64_t>(std::floor(src)), size_in - 1);
    const int64_t hi = std::min<int64_t>(lo + 1, size_in - 1);
    const double frac = src - static_cast<double>(lo);
    if (hi == lo)  // one source pixel: its matrix entry is the sum of both weights
      taps[o] = {lo, hi, static_cast<float>((1.0 - frac) + frac), 0.0f};
    else
      taps[o] = {lo, hi, static_cast<float>(1.0 - frac), static_cast<float>(frac)};
  }
  return taps;
}

// out[c] += w * in[c] for c < n.
__attribute__((target_clones("avx512f", "avx2", "default")))
void Axpy(float* __restrict out, const float* __restrict in, float w, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] += w * in[c];
}

// out[c] += (first[c] == k) ? in[c] : 0 for c < n.
__attribute__((target_clones("avx512f", "avx2", "default")))
void RouteAdd(float* __restrict out, const float* __restrict in, const int8_t* __restrict first, int8_t k, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] += first[c] == k ? in[c] : 0.0f;
}

bool Nhwc(const ffi::AnyBuffer::Dimensions& d) { return d.size() == 4; }

ffi::Error MaxPoolGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> first, ffi::Buffer<ffi::F32> grad,
                       ffi::ResultBuffer<ffi::F32> out, int64_t h, int64_t w, int64_t pad_h, int64_t pad_w) {
  const auto fd = first.dimensions(), gd = grad.dimensions(), od = out->dimensions();
  if (!Nhwc(fd) || !Nhwc(gd) || !Nhwc(od) || !std::equal(fd.begin(), fd.end(), gd.begin()) || od[0] != gd[0] ||
      od[1] != h || od[2] != w || od[3] != gd[3])
    return ffi::Error::InvalidArgument("resattn_max_pool_grad: expected first, grad [N, Ho, Wo, C] and a [N, h, w, C] result");
  const int64_t images = gd[0], ho = gd[1], wo = gd[2], c = gd[3];
  const int8_t* pf = first.typed_data();
  const float* pg = grad.typed_data();
  float* po = out->typed_data();
  ParallelFor(pool, images, [=](int64_t n) {
    float* dx = po + n * h * w * c;
    std::memset(dx, 0, sizeof(float) * h * w * c);
    for (int64_t i = 0; i < ho; ++i)
      for (int64_t j = 0; j < wo; ++j) {
        const int64_t at = ((n * ho + i) * wo + j) * c;
        for (int8_t k = 0; k < 9; ++k) {
          const int64_t y = 2 * i + k / 3 - pad_h, x = 2 * j + k % 3 - pad_w;
          if (y < 0 || y >= h || x < 0 || x >= w) continue;  // padding: never the maximum
          RouteAdd(dx + (y * w + x) * c, pg + at, pf + at, k, c);
        }
      }
  });
  return ffi::Error::Success();
}

ffi::Error Upsample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out, int64_t ho,
                    int64_t wo) {
  const auto xd = x.dimensions(), od = out->dimensions();
  if (!Nhwc(xd) || !Nhwc(od) || od[0] != xd[0] || od[1] != ho || od[2] != wo || od[3] != xd[3])
    return ffi::Error::InvalidArgument("resattn_upsample: expected x [N, H, W, C] and a [N, ho, wo, C] result");
  const int64_t images = xd[0], h = xd[1], w = xd[2], c = xd[3];
  const std::vector<Tap> rows = Taps(h, ho), cols = Taps(w, wo);
  const Tap *tr = rows.data(), *tc = cols.data();
  const float* px = x.typed_data();
  float* po = out->typed_data();
  ParallelFor(pool, images, [=](int64_t n) {
    const float* src = px + n * h * w * c;
    for (int64_t o = 0; o < ho; ++o)
      for (int64_t p = 0; p < wo; ++p) {
        float* dst = po + ((n * ho + o) * wo + p) * c;
        std::memset(dst, 0, sizeof(float) * c);
        const Tap r = tr[o], q = tc[p];
        Axpy(dst, src + (r.lo * w + q.lo) * c, r.w_lo * q.w_lo, c);
        if (q.w_hi != 0.0f) Axpy(dst, src + (r.lo * w + q.hi) * c, r.w_lo * q.w_hi, c);
        if (r.w_hi != 0.0f) {
          Axpy(dst, src + (r.hi * w + q.lo) * c, r.w_hi * q.w_lo, c);
          if (q.w_hi != 0.0f) Axpy(dst, src + (r.hi * w + q.hi) * c, r.w_hi * q.w_hi, c);
        }
      }
  });
  return ffi::Error::Success();
}

ffi::Error UpsampleGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> out, int64_t h,
                        int64_t w) {
  const auto gd = g.dimensions(), od = out->dimensions();
  if (!Nhwc(gd) || !Nhwc(od) || od[0] != gd[0] || od[1] != h || od[2] != w || od[3] != gd[3])
    return ffi::Error::InvalidArgument("resattn_upsample_grad: expected g [N, ho, wo, C] and a [N, h, w, C] result");
  const int64_t images = gd[0], ho = gd[1], wo = gd[2], c = gd[3];
  const std::vector<Tap> rows = Taps(h, ho), cols = Taps(w, wo);
  const Tap *tr = rows.data(), *tc = cols.data();
  const float* pg = g.typed_data();
  float* po = out->typed_data();
  ParallelFor(pool, images, [=](int64_t n) {
    float* dx = po + n * h * w * c;
    std::memset(dx, 0, sizeof(float) * h * w * c);
    for (int64_t o = 0; o < ho; ++o)
      for (int64_t p = 0; p < wo; ++p) {
        const float* src = pg + ((n * ho + o) * wo + p) * c;
        const Tap r = tr[o], q = tc[p];
        Axpy(dx + (r.lo * w + q.lo) * c, src, r.w_lo * q.w_lo, c);
        if (q.w_hi != 0.0f) Axpy(dx + (r.lo * w + q.hi) * c, src, r.w_lo * q.w_hi, c);
        if (r.w_hi != 0.0f) {
          Axpy(dx + (r.hi * w + q.lo) * c, src, r.w_hi * q.w_lo, c);
          if (q.w_hi != 0.0f) Axpy(dx + (r.hi * w + q.hi) * c, src, r.w_hi * q.w_hi, c);
        }
      }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnMaxPoolGrad, MaxPoolGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("h")
                                  .Attr<int64_t>("w")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnUpsample, Upsample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ho")
                                  .Attr<int64_t>("wo"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnUpsampleGrad, UpsampleGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("h")
                                  .Attr<int64_t>("w"));
