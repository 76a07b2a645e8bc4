// nchwc.cc: the driver for MLAS's direct-convolution kernels (see nchwc.h). The argument conventions
// (byte strides, padding counts, the effective kernel height at the top/bottom edges, the kernel
// flags) follow MLAS's own driver, lib/snchwc.cpp, of onnxruntime 1.21.
#include "nchwc.h"
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cmath>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <vector>
#include <string>
#include <new>
#include <thread>

namespace oz {
namespace nchwc {

namespace {


// 8 channel planes (plane stride `plane`) at pixels [p0, p1) -> blocked dst[(p - p0) * bs + c]
// (bs: the block size; a 16-block is filled 8 channels at a time).
// With abs (8 doubles): also the channels' sums of |x| over the pixels (the lazy strengths, for free
// while the input passes through registers).
template <bool ABS>
void ToBlocked(const float* src, int64_t plane, int64_t p0, int64_t p1, float* dst, int64_t bs, double* abs) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 acc[8];
  for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
  int64_t p = p0;
  for (; p + 8 <= p1; p += 8) {
    __m256 r[8];
    for (int c = 0; c < 8; ++c) {
      r[c] = _mm256_loadu_ps(src + c * plane + p);
      if constexpr (ABS) acc[c] = _mm256_add_ps(acc[c], _mm256_and_ps(mask, r[c]));
    }
    Transpose8(r);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (p - p0 + j) * bs, r[j]);
  }
  if constexpr (ABS) {
    // 8 channels' lane sums at once: transpose, then add the 8 rows.
    Transpose8(acc);
    __m256 t = acc[0];
    for (int j = 1; j < 8; ++j) t = _mm256_add_ps(t, acc[j]);
    alignas(32) float v[8];
    _mm256_store_ps(v, t);
    for (int c = 0; c < 8; ++c) abs[c] = v[c];
  }
  for (; p < p1; ++p)
    for (int c = 0; c < 8; ++c) {
      const float x = src[c * plane + p];
      dst[(p - p0) * bs + c] = x;
      if constexpr (ABS) abs[c] += std::fabs(x);
    }
}

// Blocked src[(p - p0) * bs + c] -> 8 channel planes dst[c] (nullptr: a padding lane, dropped) at
// pixels [p0, p1), adding the residual planes res[c] and applying ReLU when asked.
template <bool RES, bool RELU>
void FromBlocked(const float* src, int64_t bs, int64_t p0, int64_t p1, float* const* dst, const float* const* res) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t p = p0;
  for (; p + 8 <= p1; p += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + (p - p0 + j) * bs);
    Transpose8(r);
    for (int c = 0; c < 8; ++c) {
      if (!dst[c]) continue;
      __m256 v = r[c];
      if constexpr (RES) v = _mm256_add_ps(v, _mm256_loadu_ps(res[c] + p));
      if constexpr (RELU) v = _mm256_max_ps(zero, v);  // NaN stays NaN, as onnxruntime's Relu
      _mm256_storeu_ps(dst[c] + p, v);
    }
  }
  for (; p < p1; ++p)
    for (int c = 0; c < 8; ++c) {
      if (!dst[c]) continue;
      float v = src[(p - p0) * bs + c];
      if constexpr (RES) v += res[c][p];
      if constexpr (RELU) v = std::max(v, 0.f);
      dst[c][p] = v;
    }
}

// AVX-512F in the CPU and ZMM/opmask state saved by the OS (XCR0 bits 1, 2, 5, 6, 7).
bool CpuHasAvx512F() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1u), "c"(0u));
  if (!(c & (1u << 27))) return false;  // OSXSAVE
  unsigned xlo = 0, xhi = 0;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0u));
  if ((xlo & 0xE6u) != 0xE6u) return false;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7u), "c"(0u));
  return b & (1u << 16);
}

}  // namespace

int64_t CpuBlock() {
  static const int64_t b = [] {
    const char* e = std::getenv("OZ_DENSE");
    return CpuHasAvx512F() && !(e != nullptr && std::string(e) == "fma3") ? 16 : 8;
  }();
  return b;
}

BlockedIo BlockedIoFor(int64_t K, int64_t C, int64_t group) {
  BlockedIo io;
  if (group != 1 || K <= 0 || C <= 0 || K % 16 != 0) return io;
  io.x = C % 16 == 0;
  io.other = io.y = io.x || C < 8;
  return io;
}

void NchwToBlocked(const float* src, int64_t C, int64_t P, int64_t B, float* dst) {
  for (int64_t cb = 0; cb < C / B; ++cb)
    for (int64_t h = 0; h < B; h += 8) ToBlocked<false>(src + (cb * B + h) * P, P, 0, P, dst + cb * B * P + h, B, nullptr);
}

void BlockedToNchw(const float* src, int64_t C, int64_t P, int64_t B, float* dst) {
  for (int64_t cb = 0; cb < C / B; ++cb)
    for (int64_t h = 0; h < B; h += 8) {
      float* planes[8];
      for (int c = 0; c < 8; ++c) planes[c] = dst + (cb * B + h + c) * P;
      FromBlocked<false, false>(src + cb * B * P + h, B, 0, P, planes, nullptr);
    }
}

void BlockAbsSums(const float* blk, int64_t P, int64_t B, double* out) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t h = 0; h < B; h += 8) {
    double total[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    // float partial sums of at most 1024 pixels, added in double (as the NCHW path's AbsSum)
    for (int64_t p0 = 0; p0 < P; p0 += 1024) {
      const int64_t p1 = std::min(P, p0 + 1024);
      __m256 a = _mm256_setzero_ps();
      for (int64_t p = p0; p < p1; ++p) a = _mm256_add_ps(a, _mm256_and_ps(mask, _mm256_loadu_ps(blk + p * B + h)));
      alignas(32) float v[8];
      _mm256_store_ps(v, a);
      for (int c = 0; c < 8; ++c) total[c] += v[c];
    }
    for (int c = 0; c < 8; ++c) out[h + c] = total[c];
  }
}

Layouts ReadLayouts(const OrtKernelInfo* info, const char* op, int64_t K, int64_t C, int64_t group) {
  Layouts lay;
  const BlockedIo io = BlockedIoFor(K, C, group);
  auto read = [&](const char* name, bool allowed, const char* needs) {
    const int64_t v = AttrInt(info, name, 0);
    if (v != 0 && v != 1) Fail(op, Msg("attribute '", name, "' is ", v, ", expected 0 or 1"));
    if (v && !allowed)
      Fail(op, Msg("attribute '", name, "' is 1, but weights of ", K, " filters x ", C, " input channels, group ",
                   group, " cannot ", needs, " (needs group 1, K % 16 == 0, C % 16 == 0",
                   std::string(name) == "x_blocked" ? ")" : " or C < 8)"));
    return v == 1;
  };
  lay.x = read("x_blocked", io.x, "read a blocked X");
  lay.other = read("other_blocked", io.other, "read a blocked 'other'");
  lay.y = read("y_blocked", io.y, "write a blocked Y");
  return lay;
}

std::vector<int64_t> BlockedShape(const std::vector<int64_t>& s) {
  const int64_t B = CpuBlock();
  return {s[0], s[1] / B, s[2], s[3], B};
}

std::vector<int64_t> NchwShapeOfX(const std::vector<int64_t>& xs, bool blocked, const char* op) {
  if (!blocked) return xs;
  const int64_t B = CpuBlock();
  if (xs.size() != 5 || xs[4] != B)
    Fail(op, Msg("input 'X' has shape ", ShapeStr(xs), ", expected a blocked tensor (N, C/", B, ", H, W, ", B,
                 ") (attribute x_blocked=1, block ", B, " on this CPU)"));
  return {xs[0], xs[1] * B, xs[2], xs[3]};
}

const float* OtherInputIn(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& yshape, bool blocked,
                          const char* op) {
  if (!blocked) return OtherInput(ctx, index, yshape, op);
  if (index >= ctx.GetInputCount() || !ctx.GetInput(index)) return nullptr;
  const std::vector<int64_t> expected = BlockedShape(yshape);
  const auto got = ctx.GetInput(index).GetTensorTypeAndShapeInfo().GetShape();
  if (got != expected)
    Fail(op, Msg("input 'other' has shape ", ShapeStr(got), ", expected the blocked ", ShapeStr(expected),
                 " (attribute other_blocked=1, block ", CpuBlock(), " on this CPU)"));
  return OtherInput(ctx, index, expected, op);
}

int64_t WithNchw(OrtKernelContext* ctx, const Layouts& lay, const float* X, const std::vector<int64_t>& xs,
                 const float* residual, const std::vector<int64_t>& yshape, float* Y,
                 const std::function<int64_t(const float*, const float*, float*)>& run) {
  const int64_t B = CpuBlock(), N = xs[0];
  auto convert = [&](const float* src, const std::vector<int64_t>& s, bool to_blocked, float* dst) {
    const int64_t C = s[1], P = s[2] * s[3];
    ParallelFor(ctx, static_cast<size_t>(N), [&](size_t n) {
      if (to_blocked)
        NchwToBlocked(src + n * C * P, C, P, B, dst + n * C * P);
      else
        BlockedToNchw(src + n * C * P, C, P, B, dst + n * C * P);
    });
  };
  auto count = [](const std::vector<int64_t>& s) { return static_cast<size_t>(s[0] * s[1] * s[2] * s[3]); };
  gemm::AlignedFloats xn, rn, yn;
  if (lay.x) {
    xn = gemm::AllocFloats(count(xs));
    convert(X, xs, false, xn.get());
    X = xn.get();
  }
  if (lay.other && residual) {
    rn = gemm::AllocFloats(count(yshape));
    convert(residual, yshape, false, rn.get());
    residual = rn.get();
  }
  float* Yn = Y;
  if (lay.y) {
    yn = gemm::AllocFloats(count(yshape));
    Yn = yn.get();
  }
  const int64_t macs = run(X, residual, Yn);
  if (lay.y) convert(Yn, yshape, true, Y);
  return macs;
}

}  // namespace nchwc
}  // namespace oz

#ifdef ONNXZERO_HAVE_MLAS

extern "C" {
// lib/x86_64/SconvKernelFma3.S: one output row of up to 4 filter blocks (8 channels each).
void MlasConvNchwcFloatKernelFma3(const float* Input, const float* Filter, float* Output, size_t StrideWidth,
                                  size_t DilationWidth, size_t FilterCount, size_t InputStride, size_t FilterStride,
                                  size_t OutputStride, size_t KernelHeight, size_t KernelWidth, const float* InputBase,
                                  size_t InputWidth, size_t DilatedInputWidth, size_t OutputCountLeftPad,
                                  size_t OutputCount, size_t OutputCountRightPad, const float* Bias, unsigned KernelFlags);
void MlasConvNchwcFloatKernelAvx512F(const float* Input, const float* Filter, float* Output, size_t StrideWidth,
                                     size_t DilationWidth, size_t FilterCount, size_t InputStride, size_t FilterStride,
                                     size_t OutputStride, size_t KernelHeight, size_t KernelWidth,
                                     const float* InputBase, size_t InputWidth, size_t DilatedInputWidth,
                                     size_t OutputCountLeftPad, size_t OutputCount, size_t OutputCountRightPad,
                                     const float* Bias, unsigned KernelFlags);
void MlasConvNchwFloatKernelAvx512F(const float* Input, const float* Filter, float* Output, size_t StrideWidth,
                                    size_t DilationWidth, size_t FilterCount, size_t InputStride, size_t FilterStride,
                                    size_t OutputStride, size_t KernelHeight, size_t KernelWidth, const float* InputBase,
                                    size_t InputWidth, size_t DilatedInputWidth, size_t OutputCountLeftPad,
                                    size_t OutputCount, size_t OutputCountRightPad, const float* Bias,
                                    unsigned KernelFlags);
// The pointwise (1x1) kernels: up to 4 filter blocks over InputChannels blocks of input for OutputCount
// pixels, the accumulators held in registers across the input blocks.
void MlasConvPointwiseFloatKernelFma3(const float* Input, const float* Filter, float* Output, size_t StrideWidth,
                                      size_t InputChannels, size_t FilterCount, size_t InputStride,
                                      size_t FilterStride, size_t OutputStride, size_t OutputCount, const float* Bias,
                                      unsigned KernelFlags);
void MlasConvPointwiseFloatKernelAvx512F(const float* Input, const float* Filter, float* Output, size_t StrideWidth,
                                         size_t InputChannels, size_t FilterCount, size_t InputStride,
                                         size_t FilterStride, size_t OutputStride, size_t OutputCount,
                                         const float* Bias, unsigned KernelFlags);
void MlasConvNchwFloatKernelFma3(const float* Input, const float* Filter, float* Output, size_t StrideWidth,
                                 size_t DilationWidth, size_t FilterCount, size_t InputStride, size_t FilterStride,
                                 size_t OutputStride, size_t KernelHeight, size_t KernelWidth, const float* InputBase,
                                 size_t InputWidth, size_t DilatedInputWidth, size_t OutputCountLeftPad,
                                 size_t OutputCount, size_t OutputCountRightPad, const float* Bias, unsigned KernelFlags);
}

namespace oz {
namespace nchwc {

namespace {

constexpr unsigned kAccumulate = 1, kAddBias = 2, kRelu = 4;  // MLAS_CONV_KERNEL_FLAG_*
constexpr int64_t kFilterSet = 4;  // filter blocks per kernel call (the kernels' maximum)

// Output positions along one dimension whose window starts in the left padding, lies inside, or
// reaches into the right padding (MLAS's OutputCountLeftPad / OutputCount / OutputCountRightPad).
struct Span {
  size_t left = 0, mid = 0, right = 0;
};
Span PadCounts(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t dil, int64_t pad_left) {
  const int64_t span = dil * (k - 1) + 1;
  const int64_t with_left = in + pad_left >= span ? (in + pad_left - span) / stride + 1 : 0;
  const int64_t left = std::min((pad_left + stride - 1) / stride, with_left);
  return Span{static_cast<size_t>(left), static_cast<size_t>(with_left - left), static_cast<size_t>(out - with_left)};
}

// Filter rows (B = 8 or 16 rows of R floats each; nullptr: zeros) -> one blocked filter block
// dst[r * B + lane]. Both 8-lane halves of a 16-lane block are transposed before anything is stored,
// so each 64-byte line of dst is written whole, once (storing the halves in two passes over R wrote
// every line twice, half at a time).
void GatherBlock(const float* const* rows, int64_t B, int64_t R, float* dst) {
  int64_t r = 0;
  for (; r + 8 <= R; r += 8) {
    __m256 v[2][8];
    for (int64_t h = 0; h < B / 8; ++h) {
      for (int o = 0; o < 8; ++o) v[h][o] = rows[h * 8 + o] ? _mm256_loadu_ps(rows[h * 8 + o] + r) : _mm256_setzero_ps();
      Transpose8(v[h]);
    }
    for (int j = 0; j < 8; ++j)
      for (int64_t h = 0; h < B / 8; ++h) _mm256_storeu_ps(dst + (r + j) * B + h * 8, v[h][j]);
  }
  for (; r < R; ++r)
    for (int64_t o = 0; o < B; ++o) dst[r * B + o] = rows[o] ? rows[o][r] : 0.f;
}

// Per calling thread, reused across runs: the blocked input and output of a run (tasks on the pool
// get the pointers, so concurrent runs from different threads never share a buffer).
using Scratch = gemm::GrowableFloats;
Scratch& TlsScratch() {
  static thread_local Scratch s;
  return s;
}

// Tasks for `work` units: one per hardware thread, as MLAS partitions its own convolutions. The C API
// (up to 1.21's API 21) does not expose the session pool's size, and KernelContext_ParallelFor with
// num_batch 0 schedules every task on its own: with spinning off each extra task is a wake-up, which
// cost 9 % of a three-conv blocked ConvRelu chain at 64@28 with 4 tasks per thread (1.08 -> 0.99 of
// onnxruntime's chain with 1 or 2, quiet machine; docs/design-kernels.md section 8).
int64_t PoolTasks(int64_t work) {
  constexpr int64_t kPerThread = 1;
  const int64_t hw = static_cast<int64_t>(HardwareThreads());
  return std::max<int64_t>(1, std::min<int64_t>(work, hw * kPerThread));
}

}  // namespace

bool Built() { return true; }

Filters::Filters(const float* w, const float* bias, int64_t K, int64_t C, int64_t KH, int64_t KW, int64_t group,
                 bool gatherable) {
  const bool avx512 = CpuBlock() == 16;
  int64_t B = avx512 && K % 16 == 0 && (C % 16 == 0 || C < 16) ? 16 : 8;
  if (group != 1 || K <= 0 || C <= 0 || K % B != 0 || !(C % B == 0 || C < B)) return;
  K_ = K, C_ = C, KH_ = KH, KW_ = KW, B_ = B;
  if (B == 16)
    kernel_ = NchwInput() ? MlasConvNchwFloatKernelAvx512F : MlasConvNchwcFloatKernelAvx512F;
  else
    kernel_ = NchwInput() ? MlasConvNchwFloatKernelFma3 : MlasConvNchwcFloatKernelFma3;
  if (KH == 1 && KW == 1 && !NchwInput())
    pointwise_ = B == 16 ? MlasConvPointwiseFloatKernelAvx512F : MlasConvPointwiseFloatKernelFma3;
  const int64_t KS = KH * KW;
  data_ = gemm::AllocFloats(static_cast<size_t>(K * C * KS));
  float* d = data_.get();
  if (NchwInput()) {  // OIHWBo: [K/8][C][KH][KW][8 outputs]
    for (int64_t ob = 0; ob < K / B; ++ob)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t kk = 0; kk < KS; ++kk)
          for (int64_t o = 0; o < B; ++o) *d++ = w[((ob * B + o) * C + c) * KS + kk];
  } else {  // OIHWBiBo: [K/8][C/8][KH][KW][8 inputs][8 outputs]
    for (int64_t ob = 0; ob < K / B; ++ob)
      for (int64_t ib = 0; ib < C / B; ++ib)
        for (int64_t kk = 0; kk < KS; ++kk)
          for (int64_t i = 0; i < B; ++i)
            for (int64_t o = 0; o < B; ++o) *d++ = w[((ob * B + o) * C + ib * B + i) * KS + kk];
  }
  if (gatherable) {  // row k: filter k in a block's reduction order (r = ((ib * KS + kk) * B + i) or c * KS + kk)
    rows_ = gemm::AllocFloats(static_cast<size_t>(K * C * KS));
    float* r = rows_.get();
    for (int64_t k = 0; k < K; ++k) {
      const float* wk = w + k * C * KS;
      if (NchwInput()) {
        std::copy(wk, wk + C * KS, r);
        r += C * KS;
      } else {
        for (int64_t ib = 0; ib < C / B; ++ib)
          for (int64_t kk = 0; kk < KS; ++kk)
            for (int64_t i = 0; i < B; ++i) *r++ = wk[(ib * B + i) * KS + kk];
      }
    }
  }
  bias_ = gemm::AllocFloats(static_cast<size_t>(K));
  has_bias_ = bias != nullptr;
  for (int64_t k = 0; k < K; ++k) bias_[k] = bias ? bias[k] : 0.f;
}

int64_t RunConv(OrtKernelContext* ctx, const ConvGeom& g, const Filters& f, const float* X, int64_t N, float* Y,
                const RunOptions& opt) {
  const int64_t B = f.Block(), C = g.C, K = g.K, H = g.H, W = g.W, OH = g.OH, OW = g.OW, HW = H * W, P = OH * OW;
  const int64_t KS = g.KH * g.KW, R = C * KS;
  if (N <= 0 || P <= 0) return 0;
  const bool lazy = opt.nsel >= 0 && opt.nsel < K;
  if (lazy && (!f.Row(0) || !opt.select || opt.nsel < 1)) throw std::logic_error("onnxzero: nchwc lazy run misconfigured");
  const int64_t nsel = lazy ? opt.nsel : K;
  const int64_t Kb = (nsel + B - 1) / B;  // filter blocks computed per image
  const int64_t sets = (Kb + kFilterSet - 1) / kFilterSet;
  const int64_t Kp = Kb * B;               // computed channels, padded to whole blocks
  const bool nchw = f.NchwInput();
  const Filters::KernelFn kernel = f.Kernel();
  // 1x1 filters without padding run on MLAS's pointwise kernel (as onnxruntime's own Conv does).
  const Filters::PointwiseFn pointwise =
      f.Pointwise() && g.PT == 0 && g.PL == 0 && g.PB == 0 && g.PR == 0 ? f.Pointwise() : nullptr;
  const Span sx = PadCounts(W, OW, g.KW, g.SW, g.DW, g.PL);
  const Span sy = PadCounts(H, OH, g.KH, g.SH, g.DH, g.PT);

  Scratch& sc = TlsScratch();
  const size_t in_floats = nchw || opt.x_blocked ? 0 : static_cast<size_t>(N * C * HW);
  const size_t out_floats = opt.y_blocked && !lazy ? 0 : static_cast<size_t>(N * Kp * P);
  const size_t gf_floats = lazy ? static_cast<size_t>(N * Kp * R + N * Kp) : 0;
  float* base = sc.Floats(in_floats + out_floats + gf_floats);
  float* xin = base;
  float* yout = base + in_floats;
  float* gfilt = yout + out_floats;        // lazy: per image, the selected filters' blocks
  float* gbias = gfilt + (lazy ? N * Kp * R : 0);  // lazy: per image, their biases

  // A whole run below kMinParallelMacs stays on the calling thread: with the pool's spinning off (as
  // onnxzero's sessions run), waking a worker costs more than it saves (the stem 1->64 at 28x28:
  // 32 us on one thread, 40 us on two; onnxruntime's own Conv: 31 us).
  constexpr int64_t kMinParallelMacs = 1500000;
  const bool tiny = N * nsel * P * R < kMinParallelMacs;
  auto parallel = [&](size_t n, auto&& fn) {
    if (tiny)
      for (size_t i = 0; i < n; ++i) fn(i);
    else
      ParallelFor(ctx, n, fn);
  };
  // Memory-bound passes (the blocked input's strengths, the lazy blocked write-back) over fewer than
  // kMinParallelFloats floats stay on the calling thread too: with spinning off, a pool dispatch costs
  // about as much as streaming 1 MB through one core.
  constexpr int64_t kMinParallelFloats = 1 << 18;
  auto stream = [&](size_t n, int64_t floats, auto&& fn) {
    if (floats < kMinParallelFloats)
      for (size_t i = 0; i < n; ++i) fn(i);
    else
      parallel(n, fn);
  };

  // --- input to NCHWc (tasks over image, channel block, pixel chunk), with the lazy strengths
  std::vector<double> strengths;
  if (opt.x_blocked && (nchw || B != CpuBlock())) throw std::logic_error("onnxzero: nchwc blocked input on a non-NCHWc kernel");
  if ((opt.y_blocked || opt.residual_blocked) && B != CpuBlock())
    throw std::logic_error("onnxzero: nchwc blocked output with a block size not the CPU's");
  if (opt.x_blocked) {
    if (lazy) {  // the strengths: one pass over the blocked input
      const int64_t units = N * (C / B);
      strengths.assign(static_cast<size_t>(N * C), 0.0);
      stream(static_cast<size_t>(units), N * C * HW,
             [&](size_t u) { BlockAbsSums(X + u * B * HW, HW, B, strengths.data() + u * B); });
    }
  } else if (!nchw) {
    const int64_t Cb = C / B, units = N * Cb;
    const int64_t chunks = tiny ? 1 : std::max<int64_t>(1, std::min<int64_t>(PoolTasks(units * 8) / units, HW / 64));
    const int64_t csize = (HW + chunks - 1) / chunks;
    std::vector<double> partial(lazy ? static_cast<size_t>(units * chunks * B) : 0);
    parallel(static_cast<size_t>(units * chunks), [&](size_t t) {
      const int64_t u = static_cast<int64_t>(t) / chunks, ch = static_cast<int64_t>(t) % chunks;
      const int64_t p0 = std::min(HW, ch * csize), p1 = std::min(HW, p0 + csize);
      for (int64_t h = 0; h < B; h += 8) {
        const float* src = X + (u * B + h) * HW;
        float* dst = xin + u * B * HW + p0 * B + h;
        if (lazy)
          ToBlocked<true>(src, HW, p0, p1, dst, B, partial.data() + (u * chunks + ch) * B + h);
        else
          ToBlocked<false>(src, HW, p0, p1, dst, B, nullptr);
      }
    });
    if (lazy) {
      strengths.assign(static_cast<size_t>(N * C), 0.0);
      for (int64_t u = 0; u < units; ++u)
        for (int64_t ch = 0; ch < chunks; ++ch)
          for (int64_t c = 0; c < B; ++c) strengths[u * B + c] += partial[(u * chunks + ch) * B + c];
    }
  } else if (lazy) {  // few channels (C < B): a plain pass
    strengths.assign(static_cast<size_t>(N * C), 0.0);
    for (int64_t i = 0; i < N * C; ++i) {
      double sum = 0;
      for (int64_t p = 0; p < HW; ++p) sum += std::fabs(X[i * HW + p]);
      strengths[i] = sum;
    }
  }

  // --- lazy: the selection, its filters gathered into blocks per image, and the channels left out
  const int32_t* sel = nullptr;
  std::vector<int32_t> others;
  std::vector<int32_t> pos;  // lazy, blocked Y: per image and channel, its lane among the computed, or -1
  if (lazy) {
    sel = opt.select(strengths.data());
    others.reserve(static_cast<size_t>(N * (K - nsel)));
    std::vector<char> mark(static_cast<size_t>(K));
    if (opt.y_blocked) pos.assign(static_cast<size_t>(N * K), -1);
    for (int64_t n = 0; n < N; ++n) {
      std::fill(mark.begin(), mark.end(), 0);
      for (int64_t j = 0; j < nsel; ++j) mark[sel[n * nsel + j]] = 1;
      if (opt.y_blocked)
        for (int64_t j = 0; j < nsel; ++j) pos[n * K + sel[n * nsel + j]] = static_cast<int32_t>(j);
      for (int64_t k = 0; k < K; ++k)
        if (!mark[k]) others.push_back(static_cast<int32_t>(k));
    }
    parallel(static_cast<size_t>(N * Kb), [&](size_t t) {
      const int64_t n = static_cast<int64_t>(t) / Kb, ob = static_cast<int64_t>(t) % Kb;
      float* dst = gfilt + (n * Kb + ob) * B * R;
      const float* rows[16];
      for (int64_t o = 0; o < B; ++o) {
        const int64_t j = ob * B + o;
        rows[o] = j < nsel ? f.Row(sel[n * nsel + j]) : nullptr;
        gbias[n * Kp + j] = j < nsel ? f.Bias()[sel[n * nsel + j]] : 0.f;
      }
      GatherBlock(rows, B, R, dst);
    });
  }

  // --- convolution: tasks over (image, filter set, band of output rows); each task then writes its
  // band of its filter blocks back to NCHW (+ residual, ReLU) while it is still in cache.
  // Bands: enough tasks for the pool (PoolTasks), but none below kMinTaskMacs: waking a thread and
  // handing it a task costs a few microseconds, which small layers (the stem: 0.45 M MACs) cannot repay.
  constexpr int64_t kMinTaskMacs = 250000;
  const int64_t units = N * sets;
  const int64_t macs_per_row = std::max<int64_t>(1, std::min<int64_t>(nsel, kFilterSet * B) * OW * R);
  const int64_t rows_min = std::max<int64_t>(1, kMinTaskMacs / macs_per_row);
  int64_t bands = std::max<int64_t>(1, std::min<int64_t>((OH + rows_min - 1) / rows_min,
      (PoolTasks(units * OH) + units - 1) / units));
  if (tiny) bands = 1;
  const int64_t band = (OH + bands - 1) / bands;
  const size_t F = sizeof(float);
  const size_t stride_w = static_cast<size_t>((nchw ? 1 : B) * g.SW) * F;
  const size_t dil_w = static_cast<size_t>((nchw ? 1 : B) * g.DW) * F;
  const size_t in_w = static_cast<size_t>((nchw ? 1 : B) * W) * F;
  const size_t dil_in_w = static_cast<size_t>((nchw ? 1 : B) * g.DH * W) * F;
  const size_t in_stride = dil_in_w - static_cast<size_t>(g.KW) * dil_w;
  const size_t filter_stride = static_cast<size_t>(B * R) * F;
  const size_t out_stride = static_cast<size_t>(B * P) * F;
  const float* residual = opt.residual;
  const bool relu = opt.relu;
  const bool direct = opt.y_blocked && !lazy;
  const bool rblk = residual && opt.residual_blocked;
  // Channel k of image n of the residual: base pointer and pixel stride (1 in NCHW, B blocked).
  auto rplane = [&](int64_t n, int64_t k) {
    return rblk ? residual + n * K * P + (k / B) * B * P + k % B : residual + (n * K + k) * P;
  };
  const int64_t rstep = rblk ? B : 1;
  // The lane gathers below index one image's K * P floats with int32.
  if ((rblk || (lazy && opt.y_blocked)) && K * P > INT32_MAX) throw std::length_error("onnxzero: image too large");
  // A dense run with blocked Y and blocked residual starts each band from the residual (copied into Y)
  // and accumulates the conv onto it, as onnxruntime's fused NCHWc Conv+Add does: the activation is
  // then fused in the kernel's last call and no pass over Y follows.
  const bool acc_residual = direct && rblk;
  const bool fuse_relu = relu && (residual == nullptr || acc_residual);
  const unsigned last_flags = (f.HasBias() ? kAddBias : 0u) | (fuse_relu ? kRelu : 0u);
  const size_t PT = static_cast<size_t>(g.PT);
  const ptrdiff_t PL = static_cast<ptrdiff_t>(g.PL);
  const size_t SH = static_cast<size_t>(g.SH), DH = static_cast<size_t>(g.DH), KH = static_cast<size_t>(g.KH);
  const size_t Hs = static_cast<size_t>(H), Ws = static_cast<size_t>(W);

  // First input row and kernel rows of output row ph: rows of the window in the top or bottom padding
  // are dropped (the filter pointer skips the leading ones), as MLAS's ComputeEffectiveKernel does.
  auto effective = [&](size_t ph, size_t filter_row, const float** filter, size_t* ih, size_t* kh_eff) {
    *ih = ph * SH - PT;  // wraps below 0 like MLAS's size_t arithmetic; fixed up below
    *kh_eff = KH;
    if (ph - sy.left >= sy.mid) {
      size_t step = *ih;
      for (size_t kh = 0; kh < KH; ++kh) {
        if (step >= Hs) {
          if (step == *ih) {
            *ih += DH;
            *filter += filter_row;
          }
          *kh_eff -= 1;
        }
        step += DH;
      }
    }
  };

  // An output row whose window lies entirely in the padding: its conv term is 0 (first input block:
  // start from 0), the last block adds the bias and the fused ReLU, as the kernel would.
  auto padding_row = [&](float* out, int64_t nb, const float* bias, bool first, bool last) {
    for (int64_t b = 0; b < nb; ++b) {
      float* o = out + b * B * P;
      for (int64_t i = 0; i < OW * B; ++i) {
        float v = first ? 0.f : o[i];
        if (last && f.HasBias()) v += bias[b * B + i % B];
        if (last && fuse_relu) v = std::max(v, 0.f);
        o[i] = v;
      }
    }
  };

  // Lazy run with a blocked Y: output block ob, pixels [p0, p1), from the computed blocks. Lane c of
  // an output group of 8 is computed lane pos[k] (k = its channel) or a channel left out (0, or
  // act(residual)). The selection is ascending, so a group's computed lanes are a run of at most 8
  // consecutive js: at most two aligned groups of 8 computed lanes, each one load and one permute per
  // pixel (a per-lane gather measured 4-7 % of resnet-mnist's time: docs/design-kernels.md section 6).
  auto lazy_blocked_out = [&](int64_t n, int64_t ob, int64_t p0, int64_t p1) {
    const __m256 zero = _mm256_setzero_ps();
    const float* src = yout + n * Kp * P;
    float* dst = Y + n * K * P + ob * B * P;
    for (int64_t h = 0; h < B; h += 8) {
      int32_t jmin = -1;
      for (int64_t c = 0; c < 8 && jmin < 0; ++c) jmin = pos[n * K + ob * B + h + c];
      alignas(32) int32_t idx[8], m0[8], m1[8], ri[8];
      const int32_t g0 = jmin >= 0 ? jmin / 8 : 0;
      bool any1 = false;
      for (int64_t c = 0; c < 8; ++c) {
        const int32_t j = pos[n * K + ob * B + h + c];
        idx[c] = j >= 0 ? j % 8 : 0;
        m0[c] = j >= 0 && j / 8 == g0 ? -1 : 0;
        m1[c] = j >= 0 && j / 8 == g0 + 1 ? -1 : 0;
        any1 |= m1[c] != 0;
        ri[c] = static_cast<int32_t>(c * P);
      }
      auto at = [&](int64_t grp) { return src + (grp * 8 / B) * B * P + (grp * 8) % B; };
      const float* s0 = at(g0);
      const float* s1 = any1 ? at(g0 + 1) : s0;
      const __m256i vidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
      const __m256 vm0 = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(m0)));
      const __m256 vm1 = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(m1)));
      const __m256i vri = _mm256_load_si256(reinterpret_cast<const __m256i*>(ri));
      const float* rb = residual ? residual + n * K * P + ob * B * P + h : nullptr;  // blocked
      const float* rn = residual ? residual + (n * K + ob * B + h) * P : nullptr;    // NCHW
      for (int64_t p = p0; p < p1; ++p) {
        __m256 v = zero;
        if (jmin >= 0) {
          v = _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(s0 + p * B), vidx), vm0);
          if (any1)
            v = _mm256_or_ps(v, _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(s1 + p * B), vidx), vm1));
        }
        if (residual) {
          v = _mm256_add_ps(v, rblk ? _mm256_loadu_ps(rb + p * B) : _mm256_i32gather_ps(rn + p, vri, 4));
          if (relu) v = _mm256_max_ps(zero, v);
        }
        _mm256_storeu_ps(dst + p * B + h, v);
      }
    }
  };
  // With one filter set a task holds every computed block of its band: it writes its band of Y while
  // the band is in cache, on the pool; with more sets a second pass does.
  const bool lazy_blocked_in_task = lazy && opt.y_blocked && sets == 1;

  parallel(static_cast<size_t>(units * bands), [&](size_t t) {
    const int64_t u = static_cast<int64_t>(t) / bands, bnd = static_cast<int64_t>(t) % bands;
    const int64_t n = u / sets, fs = u % sets;
    const int64_t r0 = bnd * band, r1 = std::min(OH, r0 + band);
    if (r0 >= r1) return;
    const int64_t ob0 = fs * kFilterSet, nb = std::min(kFilterSet, Kb - ob0);
    const float* fset = lazy ? gfilt + (n * Kb + ob0) * B * R : f.Data() + ob0 * B * R;
    const float* bias = lazy ? gbias + n * Kp + ob0 * B : f.Bias() + ob0 * B;
    // A dense run with a blocked Y: the kernels write straight into Y (same layout, Kp == K).
    float* yset = (direct ? Y + n * K * P : yout + n * Kp * P) + ob0 * B * P;
    if (acc_residual)
      for (int64_t ob = ob0; ob < ob0 + nb; ++ob)
        std::copy(residual + n * K * P + ob * B * P + r0 * OW * B, residual + n * K * P + ob * B * P + r1 * OW * B,
                  Y + n * K * P + ob * B * P + r0 * OW * B);
    if (nchw) {
      const float* xn = X + n * C * HW;
      for (int64_t ph = r0; ph < r1; ++ph) {
        const float* filter = fset;
        size_t ih = 0, kh_eff = 0;
        effective(static_cast<size_t>(ph), static_cast<size_t>(B * g.KW), &filter, &ih, &kh_eff);
        float* out = yset + ph * B * OW;
        if (kh_eff == 0) {  // the whole window is padding (the kernels need >= 1 row)
          padding_row(out, nb, bias, !acc_residual, true);
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          const float* in = xn + c * HW;
          const unsigned flags = (c > 0 || acc_residual ? kAccumulate : 0u) | (c == C - 1 ? last_flags : 0u);
          kernel(in + (static_cast<ptrdiff_t>(ih * Ws) - PL), filter + c * B * KS, out, stride_w, dil_w,
                 static_cast<size_t>(nb), in_stride, filter_stride, out_stride, kh_eff, static_cast<size_t>(g.KW),
                 in + ih * Ws, in_w, dil_in_w, sx.left, sx.mid, sx.right, bias, flags);
        }
      }
    } else if (pointwise) {
      // MLAS's pointwise algorithm (snchwc.cpp): batches of up to 128 input channels per call; an
      // unstrided band is one line of (r1 - r0) * OW pixels, a strided one a call per output row.
      const int64_t Cb = C / B, batch = 128 / B;
      const float* xn = (opt.x_blocked ? X : xin) + n * C * HW;
      for (int64_t ib = 0; ib < Cb; ib += batch) {
        const int64_t nib = std::min(batch, Cb - ib);
        const unsigned flags = (ib > 0 || acc_residual ? kAccumulate : 0u) | (ib + nib == Cb ? last_flags : 0u);
        const float* in = xn + ib * B * HW;
        const float* filter = fset + ib * B * B;
        if (g.SH == 1 && g.SW == 1)
          pointwise(in + B * r0 * W, filter, yset + B * r0 * OW, stride_w, static_cast<size_t>(nib),
                    static_cast<size_t>(nb), static_cast<size_t>(B * HW) * F, filter_stride, out_stride,
                    static_cast<size_t>((r1 - r0) * OW), bias, flags);
        else
          for (int64_t ph = r0; ph < r1; ++ph)
            pointwise(in + B * ph * g.SH * W, filter, yset + B * ph * OW, stride_w, static_cast<size_t>(nib),
                      static_cast<size_t>(nb), static_cast<size_t>(B * HW) * F, filter_stride, out_stride,
                      static_cast<size_t>(OW), bias, flags);
      }
    } else {
      const int64_t Cb = C / B;
      for (int64_t ib = 0; ib < Cb; ++ib) {
        const float* in = (opt.x_blocked ? X : xin) + n * C * HW + ib * B * HW;
        const unsigned flags = (ib > 0 || acc_residual ? kAccumulate : 0u) | (ib == Cb - 1 ? last_flags : 0u);
        for (int64_t ph = r0; ph < r1; ++ph) {
          const float* filter = fset + ib * B * B * KS;
          size_t ih = 0, kh_eff = 0;
          effective(static_cast<size_t>(ph), static_cast<size_t>(B * B * g.KW), &filter, &ih, &kh_eff);
          if (kh_eff == 0) {
            padding_row(yset + ph * B * OW, nb, bias, ib == 0 && !acc_residual, ib == Cb - 1);
            continue;
          }
          kernel(in + B * (static_cast<ptrdiff_t>(ih * Ws) - PL), filter, yset + ph * B * OW, stride_w, dil_w,
                 static_cast<size_t>(nb), in_stride, filter_stride, out_stride, kh_eff, static_cast<size_t>(g.KW),
                 in + B * ih * Ws, in_w, dil_in_w, sx.left, sx.mid, sx.right, bias, flags);
        }
      }
    }
    // this band of the set's filter blocks to Y (+ residual, activation)
    const int64_t p0 = r0 * OW, p1 = r1 * OW;
    if (direct) {
      if (residual && !acc_residual) {  // the ReLU waited for the residual (not fused)
        const __m256 zero = _mm256_setzero_ps();
        for (int64_t ob = ob0; ob < ob0 + nb; ++ob) {
          float* yb = Y + n * K * P + ob * B * P;
          if (rblk) {
            const float* rb = residual + n * K * P + ob * B * P;
            for (int64_t i = p0 * B; i < p1 * B; i += 8) {
              __m256 v = _mm256_add_ps(_mm256_loadu_ps(yb + i), _mm256_loadu_ps(rb + i));
              if (relu) v = _mm256_max_ps(zero, v);
              _mm256_storeu_ps(yb + i, v);
            }
          } else {
            for (int64_t c = 0; c < B; ++c) {
              const float* rr = rplane(n, ob * B + c);
              for (int64_t p = p0; p < p1; ++p) {
                const float v = yb[p * B + c] + rr[p];
                yb[p * B + c] = relu ? std::max(v, 0.f) : v;
              }
            }
          }
        }
      }
    } else if (lazy && opt.y_blocked) {
      if (lazy_blocked_in_task)
        for (int64_t ob = 0; ob < K / B; ++ob) lazy_blocked_out(n, ob, p0, p1);
    } else {
      if (rblk) {  // add the blocked residual into the computed blocks first, then to NCHW as without
        const __m256 zero = _mm256_setzero_ps();
        for (int64_t ob = ob0; ob < ob0 + nb; ++ob)
          for (int64_t h = 0; h < B; h += 8) {
            float* src = yout + n * Kp * P + ob * B * P + h;
            alignas(32) int32_t ri[8];
            int32_t live = 0;
            for (int64_t c = 0; c < 8; ++c) {
              const int64_t j = ob * B + h + c;
              const int64_t k = lazy ? (j < nsel ? sel[n * nsel + j] : -1) : j;
              ri[c] = k >= 0 ? static_cast<int32_t>((k / B) * B * P + k % B) : 0;
              live |= k >= 0 ? 1 << c : 0;
            }
            const __m256i vri = _mm256_load_si256(reinterpret_cast<const __m256i*>(ri));
            const float* rn = residual + n * K * P;
            if (!lazy) {  // the lanes are the block's own channels: contiguous, no gather
              const float* rb = rn + ob * B * P + h;
              for (int64_t p = p0; p < p1; ++p) {
                __m256 v = _mm256_add_ps(_mm256_loadu_ps(src + p * B), _mm256_loadu_ps(rb + p * B));
                if (relu) v = _mm256_max_ps(zero, v);
                _mm256_storeu_ps(src + p * B, v);
              }
              continue;
            }
            for (int64_t p = p0; p < p1; ++p) {
              if (!live) break;
              __m256 v = _mm256_add_ps(_mm256_loadu_ps(src + p * B), _mm256_i32gather_ps(rn + p * B, vri, 4));
              if (relu) v = _mm256_max_ps(zero, v);
              _mm256_storeu_ps(src + p * B, v);
            }
          }
      }
      float* yn = Y + n * K * P;
      const float* rn = residual ? residual + n * K * P : nullptr;
      for (int64_t ob = ob0; ob < ob0 + nb; ++ob)
        for (int64_t h = 0; h < B; h += 8) {
          const float* src = yout + n * Kp * P + ob * B * P + p0 * B + h;
          float* dst[8];
          const float* res[8];
          for (int64_t c = 0; c < 8; ++c) {
            const int64_t j = ob * B + h + c;
            const int64_t k = lazy ? (j < nsel ? sel[n * nsel + j] : -1) : j;
            dst[c] = k >= 0 ? yn + k * P : nullptr;
            res[c] = rn && k >= 0 ? rn + k * P : nullptr;
          }
          if (residual && !rblk) {
            if (relu)
              FromBlocked<true, true>(src, B, p0, p1, dst, res);
            else
              FromBlocked<true, false>(src, B, p0, p1, dst, res);
          } else {
            FromBlocked<false, false>(src, B, p0, p1, dst, res);
          }
        }
    }
    // the channels left out (lazy), for this band: 0, or act(residual). Dealt out over the filter sets'
    // tasks: with one task per thread, set 0 writing them all made its task the run's long pole.
    if (lazy && !opt.y_blocked) {
      const __m256 zero = _mm256_setzero_ps();
      for (int64_t i = fs; i < K - nsel; i += sets) {
        const int64_t k = others[n * (K - nsel) + i];
        float* yr = Y + (n * K + k) * P;
        const float* rr = residual ? rplane(n, k) : nullptr;
        if (!rr) {
          std::fill(yr + p0, yr + p1, 0.f);
        } else if (rstep == 1) {
          int64_t p = p0;
          for (; p + 8 <= p1; p += 8) {
            const __m256 v = _mm256_loadu_ps(rr + p);
            _mm256_storeu_ps(yr + p, relu ? _mm256_max_ps(zero, v) : v);
          }
          for (; p < p1; ++p) yr[p] = relu ? std::max(rr[p], 0.f) : rr[p];
        } else {
          for (int64_t p = p0; p < p1; ++p) yr[p] = relu ? std::max(rr[p * rstep], 0.f) : rr[p * rstep];
        }
      }
    }
  });
  if (lazy && opt.y_blocked && !lazy_blocked_in_task) {
    const int64_t KB = K / B;
    stream(static_cast<size_t>(N * KB), N * K * P, [&](size_t t) {
      lazy_blocked_out(static_cast<int64_t>(t) / KB, static_cast<int64_t>(t) % KB, 0, P);
    });
  }
  return N * nsel * P * R;
}

}  // namespace nchwc
}  // namespace oz

#else  // built without MLAS (cmake/Mlas.cmake): no shape is served, callers take the GEMM core

namespace oz {
namespace nchwc {

bool Built() { return false; }

Filters::Filters(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, bool) {}

int64_t RunConv(OrtKernelContext*, const ConvGeom&, const Filters&, const float*, int64_t, float*, const RunOptions&) {
  throw std::logic_error("onnxzero: nchwc::RunConv in a library built without MLAS");
}

}  // namespace nchwc
}  // namespace oz

#endif
