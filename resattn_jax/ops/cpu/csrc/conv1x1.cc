// A batch norm (+ ReLU) fused into the 1x1 convolution that reads it, NHWC rows, float32:
//
//   resattn_conv1x1(x [M, K], center, mul, bias [K], w [K, N], residual [M, N] or [0, N]; relu)
//       -> y [M, N] = prologue(x) @ w (+ residual),  prologue(x) = relu?((x - center) * mul + bias)
//   resattn_conv1x1_grad(x, center, mul, bias, w, dy [M, N]; relu)
//       -> dz [M, K], sums [2, K], dw [K, N]:  a = prologue(x), da = dy @ w^T, dz = da * [a > 0] (relu),
//          sums = (sum dz, sum dz * (x - center)) over rows, dw = a^T dy
//
// XLA:CPU would write the normalised activation out, read it back for the product and again for the
// weight gradient, write the product's input gradient and read it twice more for the batch norm's
// sums and input gradient. Here the rows pass through in chunks that stay in the core's L2 cache:
// the forward normalises a chunk into a buffer and multiplies it (the residual added in the same
// pass); the backward normalises the chunk again, multiplies dy by w^T, masks it, adds up the sums
// and the chunk's share of dw, and writes dz, from which the caller's one elementwise pass makes dx.
// Row chunks are split over XLA's threads (each its own partial sums and dw, added at the end). K
// and N must be multiples of 8 (the caller uses XLA's formula otherwise). Kernels:
// wgrad_kernels.inc, compiled for AVX-512, AVX2 + FMA and plain x86-64 and chosen at run time.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
namespace avx512 {
#include "wgrad_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "wgrad_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options

namespace generic {
#include "wgrad_kernels.inc"
}  // namespace generic

namespace {

struct Kernels {
  decltype(&avx512::MatmulRows) matmul;
  decltype(&avx512::Prologue) prologue;
  decltype(&avx512::MaskAndSums) mask_and_sums;
  decltype(&avx512::AccumulateTn) accumulate_tn;
};

const Kernels& Pick() {
  static const Kernels kernels = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
      return Kernels{&avx512::MatmulRows, &avx512::Prologue, &avx512::MaskAndSums, &avx512::AccumulateTn};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Kernels{&avx2::MatmulRows, &avx2::Prologue, &avx2::MaskAndSums, &avx2::AccumulateTn};
    return Kernels{&generic::MatmulRows, &generic::Prologue, &generic::MaskAndSums, &generic::AccumulateTn};
  }();
  return kernels;
}

constexpr int64_t kChunkFloats = 1 << 15;  // 128 KiB per operand chunk: four of them stay in L2

int64_t ChunkRows(int64_t k, int64_t n) { return std::max<int64_t>(16, kChunkFloats / std::max(k, n)); }

// Pieces of rows for the pool: more than threads, so that a thread that finds the other busy with
// another op of the step still shares the work.
int64_t Pieces(ffi::ThreadPool& pool, int64_t m, int64_t chunk) {
  return std::max<int64_t>(1, std::min<int64_t>(4 * Threads(pool), (m + chunk - 1) / chunk));
}

bool Vector(const ffi::Buffer<ffi::F32>& v, int64_t k) { return v.element_count() == k; }

ffi::Error Conv1x1(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> center,
                   ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y, bool relu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), rd = residual.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[0] != xd[1] || xd[1] % 8 || wd[1] % 8 || !Vector(center, xd[1]) ||
      !Vector(mul, xd[1]) || !Vector(bias, xd[1]) || rd.size() != 2 || rd[1] != wd[1] || (rd[0] != 0 && rd[0] != xd[0]))
    return ffi::Error::InvalidArgument(
        "resattn_conv1x1: expected x [M, K], center, mul, bias [K], w [K, N], residual [M or 0, N], K and N multiples of 8");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  const float *px = x.typed_data(), *pc = center.typed_data(), *pm = mul.typed_data(), *pb = bias.typed_data(),
              *pw = w.typed_data(), *pr = rd[0] ? residual.typed_data() : nullptr;
  float* py = y->typed_data();
  const int64_t chunk = ChunkRows(k, n), pieces = Pieces(pool, m, chunk);
  const Kernels& kern = Pick();
  ParallelFor(pool, pieces, [=, &kern](int64_t piece) {
    std::vector<float> buffer(chunk * k);
    const int64_t r1 = m * (piece + 1) / pieces;
    for (int64_t r = m * piece / pieces; r < r1; r += chunk) {
      const int64_t rows = std::min(chunk, r1 - r);
      kern.prologue(px + r * k, rows, k, pc, pm, pb, relu, buffer.data());
      kern.matmul(buffer.data(), k, rows, pw, k, n, pr ? pr + r * n : nullptr, py + r * n);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Conv1x1Grad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> center,
                       ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> sums,
                       ffi::ResultBuffer<ffi::F32> dw, bool relu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), gd = dy.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || gd.size() != 2 || wd[0] != xd[1] || gd[0] != xd[0] || gd[1] != wd[1] ||
      xd[1] % 8 || wd[1] % 8 || !Vector(center, xd[1]) || !Vector(mul, xd[1]) || !Vector(bias, xd[1]) ||
      dz->element_count() != xd[0] * xd[1] || sums->element_count() != 2 * xd[1] || dw->element_count() != wd[0] * wd[1])
    return ffi::Error::InvalidArgument(
        "resattn_conv1x1_grad: expected x [M, K], center, mul, bias [K], w [K, N], dy [M, N], K and N multiples of 8");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  const float *px = x.typed_data(), *pc = center.typed_data(), *pm = mul.typed_data(), *pb = bias.typed_data(),
              *pw = w.typed_data(), *pg = dy.typed_data();
  float *pz = dz->typed_data(), *ps = sums->typed_data(), *pdw = dw->typed_data();
  std::vector<float> wt(n * k);  // w^T [N, K], for da = dy @ w^T
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < n; ++j) wt[j * k + i] = pw[i * n + j];
  const float* pwt = wt.data();
  const int64_t chunk = ChunkRows(k, n), pieces = Pieces(pool, m, chunk);
  // Per piece: dw [K, N] then the sums (float per chunk, double per piece).
  std::vector<float> partial_dw(pieces * k * n, 0.0f);
  std::vector<double> partial_sums(pieces * 2 * k, 0.0);
  float* pdwp = partial_dw.data();
  double* psp = partial_sums.data();
  const Kernels& kern = Pick();
  ParallelFor(pool, pieces, [=, &kern](int64_t piece) {
    std::vector<float> a(chunk * k), s(2 * k);
    const int64_t r1 = m * (piece + 1) / pieces;
    for (int64_t r = m * piece / pieces; r < r1; r += chunk) {
      const int64_t rows = std::min(chunk, r1 - r);
      kern.prologue(px + r * k, rows, k, pc, pm, pb, relu, a.data());
      kern.matmul(pg + r * n, n, rows, pwt, n, k, nullptr, pz + r * k);  // da, masked in place below
      std::fill(s.begin(), s.end(), 0.0f);
      kern.mask_and_sums(px + r * k, a.data(), pz + r * k, rows, k, pc, relu, s.data(), s.data() + k);
      double* out = psp + piece * 2 * k;
      for (int64_t j = 0; j < 2 * k; ++j) out[j] += s[j];
      kern.accumulate_tn(a.data(), k, 0, pg + r * n, n, 0, rows, 1, k, n, pdwp + piece * k * n);
    }
  });
  for (int64_t j = 0; j < k * n; ++j) {
    float total = 0.0f;
    for (int64_t p = 0; p < pieces; ++p) total += pdwp[p * k * n + j];
    pdw[j] = total;
  }
  for (int64_t j = 0; j < 2 * k; ++j) {
    double total = 0.0;
    for (int64_t p = 0; p < pieces; ++p) total += psp[p * 2 * k + j];
    ps[j] = static_cast<float>(total);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnConv1x1, Conv1x1,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnConv1x1Grad, Conv1x1Grad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("relu"));
