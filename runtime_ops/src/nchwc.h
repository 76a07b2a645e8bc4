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
// Block size B: 16 channels (AVX-512F kernels) when the CPU and OS support AVX-512F and K % 16 == 0,
// else 8 (FMA3 kernels), as onnxruntime picks; OZ_DENSE=fma3 (read once) forces 8.
// Supported: group 1, K % 8 == 0, and C % B == 0 (NCHWc kernel) or C < B (NCHW-input kernel, the stem
// convs: no input reorder); any kernel size, stride, dilation, padding. Filters::ok() says whether a
// weight shape is served (and the library was built with MLAS).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace oz {
namespace nchwc {


// Whether the library was built with MLAS's kernels (cmake/Mlas.cmake found or fetched them).
bool Built();

// --- Blocked tensors passed between onnxzero ops (x_blocked / other_blocked / y_blocked attributes).
// A blocked tensor is (N, C/B, H, W, B) float32: channel c of pixel p at [n][c / B][p][c % B], exactly
// the kernels' NCHWc layout, so a chain of ops skips the reorders at every boundary but its edges.
// B = CpuBlock(): 16 where the AVX-512F kernels run (CPU and OS support, OZ_DENSE != fma3), else 8.
int64_t CpuBlock();

// Which blocked tensors an op with weights (K, C/group, KH, KW) and `group` may take: X (C channels),
// `other` and Y (both K channels). The rule: group 1 and K % 16 == 0 for any of them, and for X also
// C % 16 == 0; an op with C % 16 != 0 serves `other` and Y only when C < 8 (a stem conv reading NCHW).
// Then the op's kernel block (Filters::Block()) is CpuBlock() on every CPU, every blocked tensor's
// channel count is a whole number of blocks (no padding lanes), and the decision does not depend on
// the machine the model is built on. The Python mirror is onnxzero/ops/conv_relu.py blocked_io();
// the two must stay the same rule.
struct BlockedIo {
  bool x = false, other = false, y = false;
};
BlockedIo BlockedIoFor(int64_t K, int64_t C, int64_t group);

// Layout conversions (paths that do not run on the NCHWc kernels: the GEMM core, OZ_DENSE=gemm, a
// library built without MLAS). C % B == 0. Single-threaded; callers split the work over images.
void NchwToBlocked(const float* src, int64_t C, int64_t P, int64_t B, float* dst);  // one image
void BlockedToNchw(const float* src, int64_t C, int64_t P, int64_t B, float* dst);  // one image
// Per-channel sums of |x| over the P pixels of one block of B channels (the lazy strengths).
void BlockAbsSums(const float* blk, int64_t P, int64_t B, double* out);

// An op's layout attributes x_blocked / other_blocked / y_blocked (int, 0 or 1, default 0), read at
// session creation and refused (naming op and attribute) where BlockedIoFor does not allow them.
struct Layouts {
  bool x = false, other = false, y = false;
  bool Any() const { return x || other || y; }
};
Layouts ReadLayouts(const OrtKernelInfo* info, const char* op, int64_t K, int64_t C, int64_t group);
// (N, C, H, W) -> (N, C/B, H, W, B), B = CpuBlock().
std::vector<int64_t> BlockedShape(const std::vector<int64_t>& nchw);
// Input X's shape as NCHW; a blocked X must be (N, C/B, H, W, B) with this CPU's B.
std::vector<int64_t> NchwShapeOfX(const std::vector<int64_t>& xs, bool blocked, const char* op);
// The residual input `other` (index `index`, nullptr when absent) checked against the conv output's
// shape (N, K, OH, OW), or its blocked form when `blocked`.
const float* OtherInputIn(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& yshape, bool blocked,
                          const char* op);
// Runs `run(X, residual, Y)` on NCHW tensors, converting the blocked ones (per `lay`) in and out:
// the paths that do not run on the NCHWc kernels. xs, yshape: NCHW shapes. Returns run's value.
int64_t WithNchw(OrtKernelContext* ctx, const Layouts& lay, const float* X, const std::vector<int64_t>& xs,
                 const float* residual, const std::vector<int64_t>& yshape, float* Y,
                 const std::function<int64_t(const float*, const float*, float*)>& run);

// Filters reordered for the kernels, prepared once at session creation (immutable afterwards).
class Filters {
 public:
  Filters() = default;
  // w: (K, C, KH, KW) row-major, bias (K,) or nullptr. ok() is false when the shape is not served.
  // gatherable: also keep each filter as one row in the blocked reduction order, so RunConv can gather
  // any subset of filters into blocks per image (LazyConv).
  Filters(const float* w, const float* bias, int64_t K, int64_t C, int64_t KH, int64_t KW, int64_t group,
          bool gatherable = false);
  // MLAS's kernel signature (MLAS_CONV_FLOAT_KERNEL).
  using KernelFn = void (*)(const float*, const float*, float*, size_t, size_t, size_t, size_t, size_t, size_t, size_t,
                            size_t, const float*, size_t, size_t, size_t, size_t, size_t, const float*, unsigned);
  // MLAS's pointwise kernel (MLAS_CONV_POINTWISE_FLOAT_KERNEL): 1x1 filters over up to 128 input
  // channels per call, the output accumulated in registers across them.
  using PointwiseFn = void (*)(const float*, const float*, float*, size_t, size_t, size_t, size_t, size_t, size_t,
                               size_t, const float*, unsigned);
  bool ok() const { return data_ != nullptr; }
  int64_t Block() const { return B_; }
  bool NchwInput() const { return C_ < B_; }  // the stem kernel: input read in NCHW
  KernelFn Kernel() const { return kernel_; }
  PointwiseFn Pointwise() const { return pointwise_; }  // 1x1 filters on blocked input, else nullptr
  int64_t K() const { return K_; }
  int64_t C() const { return C_; }
  const float* Data() const { return data_.get(); }
  const float* Bias() const { return bias_.get(); }
  bool HasBias() const { return has_bias_; }
  int64_t R() const { return C_ * KH_ * KW_; }  // floats of one filter
  // Filter k in the order of one output lane of a block (nullptr unless gatherable).
  const float* Row(int64_t k) const { return rows_ ? rows_.get() + k * R() : nullptr; }

 private:
  int64_t K_ = 0, C_ = 0, KH_ = 0, KW_ = 0, B_ = 8;
  KernelFn kernel_ = nullptr;
  PointwiseFn pointwise_ = nullptr;
  gemm::AlignedFloats data_, bias_, rows_;
  bool has_bias_ = false;
};

// What a run computes besides the dense Conv+ReLU.
struct RunOptions {
  const float* residual = nullptr;  // (N, K, OH, OW) added before the activation, or nullptr
  bool relu = true;
  // Filter subsets (LazyConv): nsel in [1, K) output channels per image, chosen by `select` once the
  // input pass has measured the input's per-channel strengths (N x C doubles, sum over H, W of |x|;
  // fused into the NCHWc reorder). select returns N*nsel channel ids, ascending per image; it runs on
  // the calling thread and may throw. Unselected channels get 0, or act(residual) with a residual.
  // Needs a gatherable Filters.
  int64_t nsel = -1;
  std::function<const int32_t*(const double* strengths)> select;
  // Layouts (see CpuBlock): X, residual and Y blocked instead of NCHW. Blocked X or Y need
  // f.Block() == CpuBlock() and the NCHWc (not the stem's NCHW-input) kernel for X.
  bool x_blocked = false, residual_blocked = false, y_blocked = false;
};

// Y = act(conv(X) + B [+ residual]) for the batch X (N, C, H, W) -> Y (N, K, OH, OW) on the session's
// pool; act = ReLU when relu. Returns the MACs (N * computed channels * OH*OW * C*KH*KW).
// Requires f.ok() and g's channels matching f. Throws std::bad_alloc when scratch cannot be allocated.
int64_t RunConv(OrtKernelContext* ctx, const ConvGeom& g, const Filters& f, const float* X, int64_t N, float* Y,
                const RunOptions& opt);

}  // namespace nchwc
}  // namespace oz
