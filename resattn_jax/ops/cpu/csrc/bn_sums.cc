// XLA FFI custom calls (CPU, float32): the two per-channel sums of a batch norm layer in one pass
// over memory, where XLA's reduction kernels read the activation once per sum. Built with
// cpu_blas.cc into one library (resattn_jax.ops.cpu._native) by setup.py.
//
//   resattn_bn_sums(x [M, C])                         -> [2, C]: sum d, sum d^2 with d = x - x[0]
//   resattn_bn_grad_sums(dy, x [M, C], mean, mul, bias [C]; relu)
//                                                     -> [2, C]: sum dz, sum dz * (x - mean)
// with dz = dy where (x - mean) * mul + bias > 0 (relu), else dz = dy. Rows are split over XLA's
// threads; each piece sums blocks of rows in float32 and the blocks in float64.
//
// The forward sums are shifted by the first row, x[0] (a sample of each channel, so |mean - x[0]|
// is a few standard deviations): var = E[d^2] - E[d]^2 then loses no precision when |mean| >> std,
// where E[x^2] - E[x]^2 in float32 cancels catastrophically (relative error 0.18 at |mean|/std = 1000).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 16;  // rows summed in float32 before they are added in float64

// out[0:C] += sum_r a_r, out[C:2C] += sum_r b_r over rows r0..r1, where row(r, a, b) adds row r's
// terms into the float32 accumulators a, b [C].
template <typename Row>
inline void BlockedSums(int64_t c, int64_t r0, int64_t r1, double* out, Row row) {
  std::vector<float> s(c), q(c);
  for (int64_t b = r0; b < r1; b += kRows) {
    std::fill(s.begin(), s.end(), 0.0f);
    std::fill(q.begin(), q.end(), 0.0f);
    for (int64_t r = b, e = std::min(r1, b + kRows); r < e; ++r) row(r, s.data(), q.data());
    for (int64_t k = 0; k < c; ++k) out[k] += s[k], out[c + k] += q[k];
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void SumsRange(const float* x, const float* shift, int64_t c, int64_t r0, int64_t r1, double* out) {
  BlockedSums(c, r0, r1, out, [=](int64_t r, float* __restrict ps, float* __restrict pq) {
    const float* __restrict v = x + r * c;
    const float* __restrict h = shift;
    for (int64_t k = 0; k < c; ++k) {
      const float d = v[k] - h[k];
      ps[k] += d, pq[k] += d * d;
    }
  });
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void GradSumsRange(const float* dy, const float* x, const float* mean, const float* mul, const float* bias,
                   bool relu, int64_t c, int64_t r0, int64_t r1, double* out) {
  BlockedSums(c, r0, r1, out, [=](int64_t r, float* __restrict ps, float* __restrict pq) {
    const float* __restrict g = dy + r * c;
    const float* __restrict v = x + r * c;
    for (int64_t k = 0; k < c; ++k) {
      const float centred = v[k] - mean[k];
      const float dz = (!relu || centred * mul[k] + bias[k] > 0.0f) ? g[k] : 0.0f;
      ps[k] += dz, pq[k] += dz * centred;
    }
  });
}

// Runs range(r0, r1, partial) over row pieces and adds the float64 partials into out [2, C].
template <typename Range>
void OverRows(ffi::ThreadPool& pool, int64_t m, int64_t c, float* out, Range range) {
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(Threads(pool), m / 256));
  std::vector<double> partial(pieces * 2 * c, 0.0);
  double* p = partial.data();
  ParallelFor(pool, pieces, [=](int64_t i) { range(m * i / pieces, m * (i + 1) / pieces, p + i * 2 * c); });
  for (int64_t k = 0; k < 2 * c; ++k) {
    double total = 0.0;
    for (int64_t i = 0; i < pieces; ++i) total += p[i * 2 * c + k];
    out[k] = static_cast<float>(total);
  }
}

bool Matrix(const ffi::Buffer<ffi::F32>& a, int64_t& m, int64_t& c) {
  if (a.dimensions().size() != 2) return false;
  m = a.dimensions()[0], c = a.dimensions()[1];
  return true;
}

ffi::Error BnSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  int64_t m, c;
  if (!Matrix(x, m, c) || out->element_count() != 2 * c)
    return ffi::Error::InvalidArgument("resattn_bn_sums: expected x [M, C] and a [2, C] result");
  const float* px = x.typed_data();
  OverRows(pool, m, c, out->typed_data(),  // shift: the first row (never read when m == 0)
           [=](int64_t r0, int64_t r1, double* p) { SumsRange(px, px, c, r0, r1, p); });
  return ffi::Error::Success();
}

ffi::Error BnGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias,
                      ffi::ResultBuffer<ffi::F32> out, bool relu) {
  int64_t m, c, m2, c2;
  if (!Matrix(dy, m, c) || !Matrix(x, m2, c2) || m != m2 || c != c2 || mean.element_count() != c ||
      mul.element_count() != c || bias.element_count() != c || out->element_count() != 2 * c)
    return ffi::Error::InvalidArgument("resattn_bn_grad_sums: expected dy, x [M, C], mean, mul, bias [C]");
  const float *pg = dy.typed_data(), *px = x.typed_data(), *pm = mean.typed_data(), *pk = mul.typed_data(),
              *pb = bias.typed_data();
  OverRows(pool, m, c, out->typed_data(),
           [=](int64_t r0, int64_t r1, double* p) { GradSumsRange(pg, px, pm, pk, pb, relu, c, r0, r1, p); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnBnSums, BnSums,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnBnGradSums, BnGradSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("relu"));
