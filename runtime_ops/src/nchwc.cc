// nchwc.cc: the driver for MLAS's direct-convolution kernels (see nchwc.h). The argument conventions
// (byte strides, padding counts, the effective kernel height at the top/bottom edges, the kernel
// flags) follow MLAS's own driver, lib/snchwc.cpp, of onnxruntime 1.21.
#include "nchwc.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>
#include <new>
#include <thread>

#ifdef ONNXZERO_HAVE_MLAS
extern "C" {
// lib/x86_64/SconvKernelFma3.S: one output row of up to 4 filter blocks (8 channels each).
void MlasConvNchwcFloatKernelFma3(const float* Input, const float* Filter, float* Output, size_t StrideWidth,
                                  size_t DilationWidth, size_t FilterCount, size_t InputStride, size_t FilterStride,
                                  size_t OutputStride, size_t KernelHeight, size_t KernelWidth, const float* InputBase,
                                  size_t InputWidth, size_t DilatedInputWidth, size_t OutputCountLeftPad,
                                  size_t OutputCount, size_t OutputCountRightPad, const float* Bias, unsigned KernelFlags);
void MlasConvNchwFloatKernelFma3(const float* Input, const float* Filter, float* Output, size_t StrideWidth,
                                 size_t DilationWidth, size_t FilterCount, size_t InputStride, size_t FilterStride,
                                 size_t OutputStride, size_t KernelHeight, size_t KernelWidth, const float* InputBase,
                                 size_t InputWidth, size_t DilatedInputWidth, size_t OutputCountLeftPad,
                                 size_t OutputCount, size_t OutputCountRightPad, const float* Bias, unsigned KernelFlags);
}
#endif

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

inline void Transpose8x8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// 8 channel planes (plane stride `plane`) at pixels [p0, p1) -> blocked dst[(p - p0) * 8 + c].
void ToBlocked(const float* src, int64_t plane, int64_t p0, int64_t p1, float* dst) {
  int64_t p = p0;
  for (; p + 8 <= p1; p += 8) {
    __m256 r[8];
    for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(src + c * plane + p);
    Transpose8x8(r);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (p - p0 + j) * 8, r[j]);
  }
  for (; p < p1; ++p)
    for (int c = 0; c < 8; ++c) dst[(p - p0) * 8 + c] = src[c * plane + p];
}

// Blocked src[(p - p0) * 8 + c] -> 8 channel planes of dst at pixels [p0, p1), adding the residual
// planes (same layout as dst) and applying ReLU when asked.
template <bool RES, bool RELU>
void FromBlocked(const float* src, int64_t p0, int64_t p1, float* dst, const float* res, int64_t plane) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t p = p0;
  for (; p + 8 <= p1; p += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + (p - p0 + j) * 8);
    Transpose8x8(r);
    for (int c = 0; c < 8; ++c) {
      __m256 v = r[c];
      if constexpr (RES) v = _mm256_add_ps(v, _mm256_loadu_ps(res + c * plane + p));
      if constexpr (RELU) v = _mm256_max_ps(v, zero);
      _mm256_storeu_ps(dst + c * plane + p, v);
    }
  }
  for (; p < p1; ++p)
    for (int c = 0; c < 8; ++c) {
      float v = src[(p - p0) * 8 + c];
      if constexpr (RES) v += res[c * plane + p];
      if constexpr (RELU) v = std::max(v, 0.f);
      dst[c * plane + p] = v;
    }
}

// Per calling thread, reused across runs: the blocked input and output of a run (tasks on the pool
// get the pointers, so concurrent runs from different threads never share a buffer).
struct Scratch {
  gemm::AlignedFloats buf;
  size_t cap = 0;
  float* Floats(size_t n) {
    if (n > cap) {
      buf = gemm::AllocFloats(n);
      cap = n;
    }
    return buf.get();
  }
};
Scratch& TlsScratch() {
  static thread_local Scratch s;
  return s;
}

}  // namespace

bool Built() {
#ifdef ONNXZERO_HAVE_MLAS
  return true;
#else
  return false;
#endif
}

Filters::Filters(const float* w, const float* bias, int64_t K, int64_t C, int64_t KH, int64_t KW, int64_t group) {
  if (!Built() || group != 1 || K % kBlock != 0 || !(C % kBlock == 0 || C < kBlock) || K <= 0 || C <= 0) return;
  K_ = K, C_ = C, KH_ = KH, KW_ = KW;
  const int64_t KS = KH * KW, B = kBlock;
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
  bias_ = gemm::AllocFloats(static_cast<size_t>(K));
  has_bias_ = bias != nullptr;
  for (int64_t k = 0; k < K; ++k) bias_[k] = bias ? bias[k] : 0.f;
}

int64_t RunConv(OrtKernelContext* ctx, const ConvGeom& g, const Filters& f, const float* X, int64_t N, float* Y,
                const float* residual, bool relu) {
#ifndef ONNXZERO_HAVE_MLAS
  (void)ctx, (void)g, (void)f, (void)X, (void)N, (void)Y, (void)residual, (void)relu;
  throw std::logic_error("onnxzero: nchwc::RunConv without MLAS");
#else
  const int64_t B = kBlock, C = g.C, K = g.K, H = g.H, W = g.W, OH = g.OH, OW = g.OW, HW = H * W, P = OH * OW;
  const int64_t KS = g.KH * g.KW, Kb = K / B, sets = (Kb + kFilterSet - 1) / kFilterSet;
  if (N <= 0 || P <= 0) return 0;
  const bool nchw = f.NchwInput();
  const Span sx = PadCounts(W, OW, g.KW, g.SW, g.DW, g.PL);
  const Span sy = PadCounts(H, OH, g.KH, g.SH, g.DH, g.PT);

  Scratch& sc = TlsScratch();
  const size_t in_floats = nchw ? 0 : static_cast<size_t>(N * C * HW);
  float* base = sc.Floats(in_floats + static_cast<size_t>(N * K * P));
  float* xin = base;
  float* yout = base + in_floats;

  // --- input to NCHWc: tasks over (image, channel block, pixel chunk)
  if (!nchw) {
    const int64_t Cb = C / B, units = N * Cb;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(TaskCount(static_cast<size_t>(units * 8))) / units, HW / 64));
    const int64_t csize = (HW + chunks - 1) / chunks;
    ParallelFor(ctx, static_cast<size_t>(units * chunks), [&](size_t t) {
      const int64_t u = static_cast<int64_t>(t) / chunks, ch = static_cast<int64_t>(t) % chunks;
      const int64_t p0 = ch * csize, p1 = std::min(HW, p0 + csize);
      if (p0 < p1) ToBlocked(X + u * B * HW, HW, p0, p1, xin + u * B * HW + p0 * B);
    });
  }

  // --- convolution: tasks over (image, filter set, band of output rows); each task then writes its
  // band of its filter blocks back to NCHW (+ residual, ReLU) while it is still in cache.
  const int64_t units = N * sets;
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(OH, (static_cast<int64_t>(TaskCount(static_cast<size_t>(units * OH))) + units - 1) / units));
  const int64_t band = (OH + bands - 1) / bands;
  const size_t F = sizeof(float);
  const size_t stride_w = static_cast<size_t>((nchw ? 1 : B) * g.SW) * F;
  const size_t dil_w = static_cast<size_t>((nchw ? 1 : B) * g.DW) * F;
  const size_t in_w = static_cast<size_t>((nchw ? 1 : B) * W) * F;
  const size_t dil_in_w = static_cast<size_t>((nchw ? 1 : B) * g.DH * W) * F;
  const size_t in_stride = dil_in_w - static_cast<size_t>(g.KW) * dil_w;
  const size_t filter_stride = static_cast<size_t>(B * C * KS) * F;
  const size_t out_stride = static_cast<size_t>(B * P) * F;
  const bool fuse_relu = relu && residual == nullptr;
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
  auto PaddingRow = [&](float* out, int64_t nb, bool first, bool last) {
    const int64_t ob0 = (out - yout) / (B * P) % Kb;  // first filter block of the row
    for (int64_t b = 0; b < nb; ++b) {
      float* o = out + b * B * P;
      for (int64_t i = 0; i < OW * B; ++i) {
        float v = first ? 0.f : o[i];
        if (last && f.HasBias()) v += f.Bias()[(ob0 + b) * B + i % B];
        if (last && fuse_relu) v = std::max(v, 0.f);
        o[i] = v;
      }
    }
  };

  ParallelFor(ctx, static_cast<size_t>(units * bands), [&](size_t t) {
    const int64_t u = static_cast<int64_t>(t) / bands, bnd = static_cast<int64_t>(t) % bands;
    const int64_t n = u / sets, fs = u % sets;
    const int64_t r0 = bnd * band, r1 = std::min(OH, r0 + band);
    if (r0 >= r1) return;
    const int64_t ob0 = fs * kFilterSet, nb = std::min(kFilterSet, Kb - ob0);
    const float* fset = f.Data() + ob0 * B * C * KS;
    const float* bias = f.Bias() + ob0 * B;
    float* yset = yout + n * K * P + ob0 * B * P;
    if (nchw) {
      const float* xn = X + n * C * HW;
      for (int64_t ph = r0; ph < r1; ++ph) {
        const float* filter = fset;
        size_t ih = 0, kh_eff = 0;
        effective(static_cast<size_t>(ph), static_cast<size_t>(B * g.KW), &filter, &ih, &kh_eff);
        float* out = yset + ph * B * OW;
        if (kh_eff == 0) {  // the whole window is padding (the kernels need >= 1 row)
          PaddingRow(out, nb, true, true);
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          const float* in = xn + c * HW;
          const unsigned flags = (c > 0 ? kAccumulate : 0u) | (c == C - 1 ? last_flags : 0u);
          MlasConvNchwFloatKernelFma3(in + (static_cast<ptrdiff_t>(ih * Ws) - PL), filter + c * B * KS, out, stride_w, dil_w,
                                      static_cast<size_t>(nb), in_stride, filter_stride, out_stride, kh_eff,
                                      static_cast<size_t>(g.KW), in + ih * Ws, in_w, dil_in_w, sx.left, sx.mid,
                                      sx.right, bias, flags);
        }
      }
    } else {
      const int64_t Cb = C / B;
      for (int64_t ib = 0; ib < Cb; ++ib) {
        const float* in = xin + n * C * HW + ib * B * HW;
        const unsigned flags = (ib > 0 ? kAccumulate : 0u) | (ib == Cb - 1 ? last_flags : 0u);
        for (int64_t ph = r0; ph < r1; ++ph) {
          const float* filter = fset + ib * B * B * KS;
          size_t ih = 0, kh_eff = 0;
          effective(static_cast<size_t>(ph), static_cast<size_t>(B * B * g.KW), &filter, &ih, &kh_eff);
          if (kh_eff == 0) {
            PaddingRow(yset + ph * B * OW, nb, ib == 0, ib == Cb - 1);
            continue;
          }
          MlasConvNchwcFloatKernelFma3(in + B * (static_cast<ptrdiff_t>(ih * Ws) - PL), filter, yset + ph * B * OW, stride_w, dil_w,
                                       static_cast<size_t>(nb), in_stride, filter_stride, out_stride, kh_eff,
                                       static_cast<size_t>(g.KW), in + B * ih * Ws, in_w, dil_in_w, sx.left, sx.mid,
                                       sx.right, bias, flags);
        }
      }
    }
    // this band of the set's filter blocks back to NCHW
    const int64_t p0 = r0 * OW, p1 = r1 * OW;
    for (int64_t ob = ob0; ob < ob0 + nb; ++ob) {
      const float* src = yout + n * K * P + ob * B * P + p0 * B;
      float* dst = Y + n * K * P + ob * B * P;
      if (residual) {
        const float* res = residual + n * K * P + ob * B * P;
        if (relu)
          FromBlocked<true, true>(src, p0, p1, dst, res, P);
        else
          FromBlocked<true, false>(src, p0, p1, dst, res, P);
      } else {
        FromBlocked<false, false>(src, p0, p1, dst, nullptr, P);
      }
    }
  });
  return N * g.Macs();
#endif
}

}  // namespace nchwc
}  // namespace oz
