// nchwc.h: dense convolution on MLAS's x86-64 FMA3 direct-convolution kernels (the kernels onnxruntime
// itself runs for Conv on AVX2 machines), driven from onnxzero's side.
//
// Why: onnxruntime's Conv keeps activations in the blocked NCHWc layout (8 channels innermost) and runs
// a direct convolution on it, with no im2col packing; on the ResNet-18/MNIST layer shapes our packed
// GEMM core measured 1.16-1.65x its time (docs/design-kernels.md). The kernels are assembled at build
// time from Debian's onnxruntime source tarball (cmake/Mlas.cmake); MLAS's C++ driver, dispatch table
// and thread pool are not built: RunConv below reorders the input to NCHWc, calls the kernel per
// (output row, set of 4 filter blocks) from oz::ParallelFor tasks, and reorders each task's output
// rows back to NCHW in the same task (with the residual add and ReLU fused there).
//
// Supported: group 1, K % 8 == 0, and C % 8 == 0 (NCHWc kernel) or C < 8 (NCHW-input kernel, the stem
// convs: no input reorder); any kernel size, stride, dilation, padding. Filters::ok() says whether a
// weight shape is served (and the library was built with MLAS).
#pragma once

#include <cstdint>

#include "common.h"
#include "gemm.h"

namespace oz {
namespace nchwc {

constexpr int64_t kBlock = 8;  // channels per NCHWc block (AVX2: one ymm)

// Whether the library was built with MLAS's kernels (cmake/Mlas.cmake found or fetched them).
bool Built();

// Filters reordered for the kernels, prepared once at session creation (immutable afterwards).
class Filters {
 public:
  Filters() = default;
  // w: (K, C, KH, KW) row-major, bias (K,) or nullptr. ok() is false when the shape is not served.
  Filters(const float* w, const float* bias, int64_t K, int64_t C, int64_t KH, int64_t KW, int64_t group);
  bool ok() const { return data_ != nullptr; }
  bool NchwInput() const { return C_ < kBlock; }  // the stem kernel: input read in NCHW
  int64_t K() const { return K_; }
  int64_t C() const { return C_; }
  const float* Data() const { return data_.get(); }
  const float* Bias() const { return bias_.get(); }
  bool HasBias() const { return has_bias_; }

 private:
  int64_t K_ = 0, C_ = 0, KH_ = 0, KW_ = 0;
  gemm::AlignedFloats data_, bias_;
  bool has_bias_ = false;
};

// Y = act(conv(X) + B [+ residual]) for the batch X (N, C, H, W) -> Y (N, K, OH, OW) on the session's
// pool; act = ReLU when relu. residual: (N, K, OH, OW) or nullptr. Returns the MACs (N * g.Macs()).
// Requires f.ok() and g's channels matching f. Throws std::bad_alloc when scratch cannot be allocated.
int64_t RunConv(OrtKernelContext* ctx, const ConvGeom& g, const Filters& f, const float* X, int64_t N, float* Y,
                const float* residual, bool relu);

}  // namespace nchwc
}  // namespace oz
