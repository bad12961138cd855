// Stride-1, padding-1 3x3 convolutions, NHWC, float32, for the channel counts where XLA:CPU's
// convolution (Eigen: an im2col copy of every patch, then a GEMM with its own packing) runs worst
// and Winograd does not pay (fewer than 64 input channels), optionally reading a batch norm (+ ReLU)
// of its input on the fly:
//
//   resattn_conv3x3(x [N, H, W, K], center, mul, bias [K] (or [0]), w [3, 3, K, C]) -> y [N, H, W, C]
//       y = conv(prologue(x), w), prologue(x) = relu?((x - center) * mul + bias), or x itself.
//
// Each image is copied once into a zero-padded buffer (through the prologue) that stays in the
// core's L2 cache; then register blocks of R neighbouring output pixels x 16V output channels
// accumulate all 9 taps (wgrad_kernels.inc: ConvBlock). C must be a multiple of 8. Images are split
// over XLA's threads. The input gradient of such a convolution is the same convolution of dy with
// the flipped, transposed kernel (the caller's VJP).

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
  decltype(&avx512::Conv3x3Image) image;
  decltype(&avx512::PadImage) pad;
};

const Kernels& Pick() {
  static const Kernels kernels = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Kernels{&avx512::Conv3x3Image, &avx512::PadImage};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Kernels{&avx2::Conv3x3Image, &avx2::PadImage};
    return Kernels{&generic::Conv3x3Image, &generic::PadImage};
  }();
  return kernels;
}

ffi::Error Conv3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> center,
                   ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, bool relu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const bool prologue = center.element_count() != 0;
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3] || wd[3] % 8 != 0 ||
      yd.size() != 4 || yd[0] != xd[0] || yd[1] != xd[1] || yd[2] != xd[2] || yd[3] != wd[3] ||
      (prologue && (center.element_count() != xd[3] || mul.element_count() != xd[3] || bias.element_count() != xd[3])))
    return ffi::Error::InvalidArgument(
        "resattn_conv3x3: expected x [N, H, W, K], center, mul, bias [K] or [0], w [3, 3, K, C] with C a multiple of 8");
  const int64_t images = xd[0], h = xd[1], width = xd[2], k = xd[3], n = wd[3];
  const float *px = x.typed_data(), *pw = w.typed_data();
  const float *pc = prologue ? center.typed_data() : nullptr, *pm = mul.typed_data(), *pb = bias.typed_data();
  float* py = y->typed_data();
  const Kernels& kern = Pick();
  ParallelFor(pool, images, [=, &kern](int64_t img) {
    thread_local std::vector<float> padded;
    padded.resize((h + 2) * (width + 2) * k);
    kern.pad(px + img * h * width * k, h, width, k, pc, pm, pb, relu, padded.data());
    kern.image(padded.data(), h, width, k, pw, n, py + img * h * width * n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResattnConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("relu"));
