// Weight gradients of bias-free 1x1 and 3x3 (stride 1, padding 1) convolutions, NHWC, float32:
//
//   1x1:  dw[K, N]       = a[M, K]^T dy[M, N]                        (a: the layer's input rows)
//   3x3:  dw[3, 3, K, N] = sum over n, h, w of x[n, s h + kh - 1, s w + kw - 1, :]^T dy[n, h, w, :]
//         (padding 1, stride s)
//
// Both contract over the long batch-spatial axis into a small matrix, the shape general GEMM
// libraries run worst: OpenBLAS packs both operands on every call (its copies took more time than
// its kernel at CIFAR sizes, docs/benchmarks.md), and XLA:CPU transposes the 3x3 operands. Here each
// row of both operands is read where it lies: a register block of R x 16V entries of dw (R rows of
// the input's channels, 16V of the output's) accumulates, row by row, R broadcast input values
// times V vectors of dy (wgrad_kernels.inc). The rows are taken in chunks of about 256 KiB, which
// stay in the core's L2 cache while every block of dw passes over them; the 3x3 taps read shifted
// runs of the same image rows, so no padded or transposed copy is made. Rows (1x1) or images (3x3)
// are split over XLA's threads, each summing into its own partial dw; the partials are added at the
// end. Float32 accumulation, as in the GEMM libraries.
//
// The kernels are compiled for AVX-512, AVX2 + FMA and plain x86-64 and chosen once at run time.
// They need N (the output channels) to be a multiple of 8; the caller uses another path otherwise.

#include "wgrad.h"

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

using Accumulate = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, float*);

Accumulate Kernel() {
  static const Accumulate kernel = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return &avx512::AccumulateTn;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &avx2::AccumulateTn;
    return &generic::AccumulateTn;
  }();
  return kernel;
}

constexpr int64_t kChunkFloats = 1 << 16;  // 256 KiB of operand rows per chunk

// Runs piece(i, partial_i) for i < pieces over the pool, each partial [size] zeroed, and writes their
// sum to out.
template <typename Piece>
void SumOfPartials(ffi::ThreadPool& pool, int64_t pieces, int64_t size, float* out, Piece piece) {
  std::vector<float> partials(static_cast<size_t>((pieces - 1) * size), 0.0f);
  std::fill(out, out + size, 0.0f);
  float* extra = partials.data();
  ParallelFor(pool, pieces, [=](int64_t i) { piece(i, i == 0 ? out : extra + (i - 1) * size); });
  for (int64_t i = 1; i < pieces; ++i) {
    const float* p = extra + (i - 1) * size;
    for (int64_t j = 0; j < size; ++j) out[j] += p[j];
  }
}

ffi::Error Wgrad3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> out, int64_t stride) {
  const auto xd = x.dimensions(), gd = dy.dimensions();
  if (stride < 1 || xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || gd[1] != (xd[1] - 1) / stride + 1 ||
      gd[2] != (xd[2] - 1) / stride + 1 || gd[3] % 8 != 0 || out->element_count() != 9 * xd[3] * gd[3])
    return ffi::Error::InvalidArgument(
        "resattn_wgrad3x3: expected x [N, H, W, K], dy [N, Ho, Wo, C] (padding 1, the given stride) with C a "
        "multiple of 8, and a [3, 3, K, C] result");
  const int64_t images = xd[0], height = xd[1], width = xd[2], k = xd[3];
  const int64_t out_h = gd[1], out_w = gd[2], n = gd[3], s = stride;
  const float *px = x.typed_data(), *pg = dy.typed_data();
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(Threads(pool), images));
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkFloats / std::max<int64_t>(1, out_w * (s * s * k + n)));
  const Accumulate accumulate = Kernel();
  // The first output index i whose input index s * i + offset is not negative.
  auto first_valid = [s](int64_t offset) { return offset >= 0 ? 0 : (-offset + s - 1) / s; };
  SumOfPartials(pool, pieces, 9 * k * n, out->typed_data(), [=](int64_t piece, float* dw) {
    for (int64_t img = images * piece / pieces; img < images * (piece + 1) / pieces; ++img) {
      for (int64_t h0 = 0; h0 < out_h; h0 += chunk_rows) {
        const int64_t h1 = std::min(out_h, h0 + chunk_rows);
        for (int64_t kh = 0; kh < 3; ++kh) {
          // Output rows h whose input row s * h + kh - 1 lies in [0, height).
          const int64_t lo = std::max(h0, first_valid(kh - 1));
          const int64_t hi = std::min(h1, (height - kh + s) / s);
          if (hi <= lo) continue;
          for (int64_t kw = 0; kw < 3; ++kw) {
            const int64_t w0 = first_valid(kw - 1), w1 = std::min(out_w, (width - kw + s) / s);
            if (w1 <= w0) continue;
            const float* a = px + ((img * height + s * lo + kh - 1) * width + s * w0 + kw - 1) * k;
            const float* b = pg + ((img * out_h + lo) * out_w + w0) * n;
            accumulate(a, s * k, s * width * k, b, n, out_w * n, w1 - w0, hi - lo, k, n, dw + (kh * 3 + kw) * k * n);
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

namespace resattn {

bool MatmulTnRows(ffi::ThreadPool& pool, const float* a, const float* b, int64_t m, int64_t k, int64_t n, float* out) {
  // The wider of K and N is the vector axis (fewer loads per multiply-add): out^T = b^T a when K is.
  const bool swap = k > n && k % 16 == 0;
  if (swap) std::swap(a, b), std::swap(k, n);
  if (n % 8 != 0) return false;
  std::vector<float> transposed(swap ? k * n : 0);
  float* c = swap ? transposed.data() : out;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(Threads(pool), m / 256));
  const int64_t chunk = std::max<int64_t>(16, kChunkFloats / std::max<int64_t>(1, k + n));
  const Accumulate accumulate = Kernel();
  SumOfPartials(pool, pieces, k * n, c, [=](int64_t piece, float* dw) {
    const int64_t r1 = m * (piece + 1) / pieces;
    for (int64_t r = m * piece / pieces; r < r1; r += chunk) {
      const int64_t rows = std::min(chunk, r1 - r);
      accumulate(a + r * k, k, 0, b + r * n, n, 0, rows, 1, k, n, dw);
    }
  });
  if (swap)  // c is [k, n] = [N, K] of the caller's names: out [K, N] is its transpose
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < n; ++j) out[j * k + i] = c[i * n + j];
  return true;
}

}  // namespace resattn

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnWgrad3x3, Wgrad3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));
