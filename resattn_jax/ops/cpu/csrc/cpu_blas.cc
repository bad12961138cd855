// XLA FFI custom calls (CPU, float32) for the matrix products XLA:CPU's own kernels run slowly:
// the weight gradient of a 1x1 convolution (a^T b, contracting over the long batch-spatial axis)
// and Winograd's batched products of small matrices. Each product runs through single-threaded
// OpenBLAS sgemm calls spread over XLA's intra-op thread pool, so that the library adds no
// threads of its own. Built and loaded by resattn_jax/cpu_blas.py.

#include <dlfcn.h>

#include <cstdint>

#include "parallel_for.h"
#include "wgrad.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm with 64-bit integers (OpenBLAS ILP64), row-major.
using Sgemm = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                       int64_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
Sgemm sgemm = nullptr;

// out[K, N] = a[M, K]^T b[M, N]: wgrad.cc's kernel where N is a multiple of 8, else OpenBLAS split
// over the longer of K and N (no partial sums).
ffi::Error MatmulTn(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> out) {
  if (a.dimensions().size() != 2 || b.dimensions().size() != 2 || a.dimensions()[0] != b.dimensions()[0])
    return ffi::Error::InvalidArgument("resattn_matmul_tn: expected a [M, K] and b [M, N]");
  const int64_t m = a.dimensions()[0], k = a.dimensions()[1], n = b.dimensions()[1];
  const float *pa = a.typed_data(), *pb = b.typed_data();
  float* pc = out->typed_data();
  if (resattn::MatmulTnRows(pool, pa, pb, m, k, n, pc)) return ffi::Error::Success();
  const bool split_n = n >= k;
  const int64_t pieces = Threads(pool), total = split_n ? n : k;
  ParallelFor(pool, pieces, [=](int64_t i) {
    const int64_t lo = total * i / pieces, hi = total * (i + 1) / pieces;
    if (hi == lo) return;
    if (split_n)
      sgemm(kRowMajor, kTrans, kNoTrans, k, hi - lo, m, 1.0f, pa, k, pb + lo, n, 0.0f, pc + lo, n);
    else
      sgemm(kRowMajor, kTrans, kNoTrans, hi - lo, n, m, 1.0f, pa + lo, k, pb, n, 0.0f, pc + lo * n, n);
  });
  return ffi::Error::Success();
}

// out[i] = a[i] @ b[i] for a [B, T, K], b [B, K, N]; one product per piece.
ffi::Error BatchedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                         ffi::ResultBuffer<ffi::F32> out) {
  if (a.dimensions().size() != 3 || b.dimensions().size() != 3 || a.dimensions()[0] != b.dimensions()[0] ||
      a.dimensions()[2] != b.dimensions()[1])
    return ffi::Error::InvalidArgument("resattn_batched_matmul: expected a [B, T, K] and b [B, K, N]");
  const int64_t batch = a.dimensions()[0], t = a.dimensions()[1], k = a.dimensions()[2], n = b.dimensions()[2];
  const float *pa = a.typed_data(), *pb = b.typed_data();
  float* pc = out->typed_data();
  ParallelFor(pool, batch, [=](int64_t i) {
    sgemm(kRowMajor, kNoTrans, kNoTrans, t, n, k, 1.0f, pa + i * t * k, k, pb + i * k * n, n, 0.0f, pc + i * t * n, n);
  });
  return ffi::Error::Success();
}

}  // namespace

// Resolves `symbol` (an ILP64 cblas_sgemm) in the shared library at `path`; 0 on success.
extern "C" int resattn_cpu_blas_load(const char* path, const char* symbol) {
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return 1;
  sgemm = reinterpret_cast<Sgemm>(dlsym(handle, symbol));
  return sgemm == nullptr ? 2 : 0;
}

// Both custom calls: XLA's thread pool, two float32 operands, one float32 result.
static auto Product() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnMatmulTn, MatmulTn, Product());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnBatchedMatmul, BatchedMatmul, Product());
