// The 1x1 weight-gradient kernel of wgrad.cc, for cpu_blas.cc's resattn_matmul_tn.

#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace resattn {

// out[K, N] = a[M, K]^T b[M, N] over XLA's threads (wgrad.cc); false, with nothing written, when N
// is not a multiple of 8.
bool MatmulTnRows(xla::ffi::ThreadPool& pool, const float* a, const float* b, int64_t m, int64_t k, int64_t n,
                  float* out);

}  // namespace resattn
