// gemm.cc: packed AVX2/FMA SGEMM core for convolution (see gemm.h for the design).
#include "gemm.h"

#include <immintrin.h>

#include <cstdint>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

namespace oz {
namespace gemm {

namespace {
#ifndef OZ_KC_MAX
#define OZ_KC_MAX 320
#endif
#ifndef OZ_BBLOCK_KB
#define OZ_BBLOCK_KB 160
#endif
constexpr int64_t kKcMax = OZ_KC_MAX;                 // reduction block
constexpr int64_t kBBlockBytes = OZ_BBLOCK_KB << 10;  // packed B block (kc x nc) budget in L2
constexpr int64_t kFlatDirectRows = 24;  // direct mode for 1x1 tiles of at most this many rows
constexpr double kPackCycles = 0.3;
constexpr double kDirectPenalty = 0.08;  // direct mode's slower B reads (unaligned, L2), as a waste fraction   // cost of packing one B float (cycles), for the mode choice
constexpr int64_t kSlack = 64;  // zero floats before/after a slab: windowed loads stay inside
}  // namespace

void AlignedFree::operator()(float* p) const noexcept { std::free(p); }

AlignedFloats AllocFloats(size_t n) {
  size_t bytes = ((std::max<size_t>(n, 1) * sizeof(float)) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return AlignedFloats(static_cast<float*>(p));
}

// ---------------------------------------------------------------------------------------------
// Weights

ConvWeights::ConvWeights(const float* w, const float* bias, int64_t K, int64_t Cg, int64_t KH, int64_t KW,
                         int64_t group)
    : K_(K), G_(group), CRS_(Cg * KH * KW) {
  const int64_t nkb = (CRS_ + kKcMax - 1) / kKcMax;
  kc_ = (CRS_ + nkb - 1) / nkb;
  ld_ = (CRS_ + 15) / 16 * 16;  // rows start on a cache line
  data_ = AllocFloats(static_cast<size_t>(K_ * ld_ + 16));  // +16: vector reads may run past the last row
  for (int64_t k = 0; k < K_; ++k) {
    float* dst = data_.get() + k * ld_;
    std::memcpy(dst, w + k * CRS_, sizeof(float) * CRS_);
    std::fill(dst + CRS_, dst + ld_, 0.f);
  }
  std::fill(data_.get() + K_ * ld_, data_.get() + K_ * ld_ + 16, 0.f);
  has_bias_ = bias != nullptr;
  bias_.assign(static_cast<size_t>(K_), 0.f);
  if (bias) std::copy(bias, bias + K_, bias_.begin());
  iota_.resize(static_cast<size_t>(K_));
  for (int64_t k = 0; k < K_; ++k) iota_[k] = static_cast<int32_t>(k);
}

// ---------------------------------------------------------------------------------------------
// Plan


ConvPlan::ConvPlan(const ConvGeom& geom, const ConvWeights& w) : g(geom) {
  flat = g.KH == 1 && g.KW == 1 && g.SH == 1 && g.SW == 1 && g.PT == 0 && g.PL == 0 && g.PB == 0 && g.PR == 0;
  kc = w.kc();
  int64_t max_panels = std::max<int64_t>(1, kBBlockBytes / (kc * kNR * 4));
  const int64_t panels = (g.P() + kNR - 1) / kNR;
  const int64_t nblocks = (panels + max_panels - 1) / max_panels;
  nc = (panels + nblocks - 1) / nblocks * kNR;
  direct_ok = g.SH <= 4 && g.SW <= 4;
  const int64_t wph = flat ? g.P() : g.OW + (g.KW - 1) * g.DW / g.SW;
  direct_waste = flat ? 0.0 : static_cast<double>(wph - g.OW) / static_cast<double>(wph);
}

// OZ_GEMM_MODE=packed|direct forces a mode (benchmarks of the mode choice); unset: the cost model.
static int ForcedMode() {
  static const int mode = [] {
    const char* e = std::getenv("OZ_GEMM_MODE");
    if (!e) return 0;
    return std::strcmp(e, "packed") == 0 ? 1 : std::strcmp(e, "direct") == 0 ? 2 : 0;
  }();
  return mode;
}

bool ConvPlan::UseDirect(int64_t rows) const {
  if (ForcedMode() == 1) return false;
  if (ForcedMode() == 2 && direct_ok) return true;
  // Packing costs ~kPackCycles per B float, i.e. per column and reduction index; the waste costs
  // rows / 16 cycles (16 MACs per cycle) per wasted column and reduction index, plus a penalty for
  // direct mode's unaligned B reads from L2 (measured: dense 7x7/2 stem and 3x3 56x56 layers run
  // as fast or faster packed; 7..32 rows run faster direct). A flat (1x1) conv
  // wastes nothing but reads B rows a channel plane apart (no prefetch stream, a page per row):
  // worth it only when few rows reuse B.
  if (flat) return rows <= kFlatDirectRows;
  return direct_ok && static_cast<double>(rows) * (direct_waste + kDirectPenalty) < 16.0 * kPackCycles;
}

// ---------------------------------------------------------------------------------------------
// Micro-kernel: M rows (1..6) x 8*NV columns (NV = 1 or 2), A broadcast from row pointers,
// B from a packed panel with a row stride of kNR floats.

namespace {

struct KernelArgs {
  int64_t kc;
  const float* const* a;  // M row pointers at the block's first reduction index
  const float* b;         // packed block: ceil(ncols / kNR) panels of kc rows x kNR floats, or (qoff
                          // set) the source at the block's first column: row k of panel jp at
                          // b + qoff[k] + jp*kNR (pack-free mode)
  const int64_t* qoff;    // nullptr: packed B
  float* const* c;        // M output pointers at the block's first column
  int64_t ncols;          // valid columns in the block
  const float* bias;      // M biases (added on the first block) or nullptr
  bool first, last, relu;
};

template <int M, int NV>
inline void StoreTile(const KernelArgs& p, int64_t coff, int ncol, __m256 (&acc)[M][NV]) {
  const __m256 zero = _mm256_setzero_ps();
  if (ncol == 8 * NV) {
    for (int i = 0; i < M; ++i) {
      float* c = p.c[i] + coff;
      for (int v = 0; v < NV; ++v) {
        __m256 x = acc[i][v];
        if (!p.first) x = _mm256_add_ps(x, _mm256_loadu_ps(c + 8 * v));
        else if (p.bias) x = _mm256_add_ps(x, _mm256_broadcast_ss(p.bias + i));
        if (p.last && p.relu) x = _mm256_max_ps(x, zero);
        _mm256_storeu_ps(c + 8 * v, x);
      }
    }
    return;
  }
  alignas(32) float tmp[8 * NV] = {};
  for (int i = 0; i < M; ++i) {
    float* c = p.c[i] + coff;
    if (!p.first) std::memcpy(tmp, c, sizeof(float) * ncol);
    for (int v = 0; v < NV; ++v) {
      __m256 x = acc[i][v];
      if (!p.first) x = _mm256_add_ps(x, _mm256_load_ps(tmp + 8 * v));
      else if (p.bias) x = _mm256_add_ps(x, _mm256_broadcast_ss(p.bias + i));
      if (p.last && p.relu) x = _mm256_max_ps(x, zero);
      _mm256_store_ps(tmp + 8 * v, x);
    }
    std::memcpy(c, tmp, sizeof(float) * ncol);
  }
}

// One M x (8*NV) micro-tile over the whole reduction block.
template <int M, int NV, bool IND>
__attribute__((always_inline)) inline void MicroTile(const KernelArgs& p, const float* b, int64_t coff, int ncol) {
  // Named accumulators (not an array) so the compiler keeps all 12 in ymm registers.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* a0 = p.a[0];
  const float* a1 = M > 1 ? p.a[1] : a0;
  const float* a2 = M > 2 ? p.a[2] : a0;
  const float* a3 = M > 3 ? p.a[3] : a0;
  const float* a4 = M > 4 ? p.a[4] : a0;
  const float* a5 = M > 5 ? p.a[5] : a0;
  const int64_t kc = p.kc;
#define OZ_ROW(I)                                                     \
  if constexpr (M > I) {                                              \
    const __m256 av = _mm256_broadcast_ss(a##I + k);                  \
    c##I##0 = _mm256_fmadd_ps(av, b0, c##I##0);                       \
    if constexpr (NV > 1) c##I##1 = _mm256_fmadd_ps(av, b1, c##I##1); \
  }
  if constexpr (IND) {
    const int64_t* qoff = p.qoff;
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
      const float* bk = b + qoff[k];
      const __m256 b0 = _mm256_loadu_ps(bk);
      const __m256 b1 = NV > 1 ? _mm256_loadu_ps(bk + 8) : b0;
      OZ_ROW(0) OZ_ROW(1) OZ_ROW(2) OZ_ROW(3) OZ_ROW(4) OZ_ROW(5)
    }
  } else {
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
      const __m256 b0 = _mm256_load_ps(b);
      const __m256 b1 = NV > 1 ? _mm256_load_ps(b + 8) : b0;
      OZ_ROW(0) OZ_ROW(1) OZ_ROW(2) OZ_ROW(3) OZ_ROW(4) OZ_ROW(5)
      b += kNR;
    }
  }
#undef OZ_ROW
  __m256 acc[M][NV];
  const __m256 all[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = all[i][v];
  StoreTile<M, NV>(p, coff, ncol, acc);
}

// Short row panels (M <= 3) are latency-bound with 2 vectors per row (2M FMA chains < 8 needed to
// cover the FMA latency), so they take NV = 4 (M = 2, 3) or 8 (M = 1) vectors: 2 or 4 kNR panels
// per micro-tile. B vectors come from memory operands, M broadcasts stay in registers.
template <int M, int NV, bool IND>
__attribute__((always_inline)) inline void MicroTileWide(const KernelArgs& p, const float* b, int64_t coff, int ncol) {
  static_assert((M == 1 && NV == 8) || ((M == 2 || M == 3 || M == 1) && NV == 4), "wide tiles: 1x8, 1x4, 2x4, 3x4");
  // Named accumulators (row r, vector v) so they stay in registers: at most 12.
  __m256 z = _mm256_setzero_ps();
  __m256 r0v0 = z, r0v1 = z, r0v2 = z, r0v3 = z, r0v4 = z, r0v5 = z, r0v6 = z, r0v7 = z;
  __m256 r1v0 = z, r1v1 = z, r1v2 = z, r1v3 = z, r2v0 = z, r2v1 = z, r2v2 = z, r2v3 = z;
  const float* a0 = p.a[0];
  const float* a1 = M > 1 ? p.a[1] : a0;
  const float* a2 = M > 2 ? p.a[2] : a0;
  const int64_t kc = p.kc;
  const int64_t ps = IND ? kNR : kc * kNR;  // floats between consecutive kNR panels
  const int64_t* qoff = p.qoff;
#define OZ_BV(V) _mm256_loadu_ps(bk + ((V) / 2) * ps + ((V) % 2) * 8)
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = IND ? b + qoff[k] : b + k * kNR;
    const __m256 x0 = _mm256_broadcast_ss(a0 + k);
    const __m256 x1 = M > 1 ? _mm256_broadcast_ss(a1 + k) : x0;
    const __m256 x2 = M > 2 ? _mm256_broadcast_ss(a2 + k) : x0;
    {
      const __m256 bv = OZ_BV(0);
      r0v0 = _mm256_fmadd_ps(x0, bv, r0v0);
      if constexpr (M > 1) r1v0 = _mm256_fmadd_ps(x1, bv, r1v0);
      if constexpr (M > 2) r2v0 = _mm256_fmadd_ps(x2, bv, r2v0);
    }
    {
      const __m256 bv = OZ_BV(1);
      r0v1 = _mm256_fmadd_ps(x0, bv, r0v1);
      if constexpr (M > 1) r1v1 = _mm256_fmadd_ps(x1, bv, r1v1);
      if constexpr (M > 2) r2v1 = _mm256_fmadd_ps(x2, bv, r2v1);
    }
    {
      const __m256 bv = OZ_BV(2);
      r0v2 = _mm256_fmadd_ps(x0, bv, r0v2);
      if constexpr (M > 1) r1v2 = _mm256_fmadd_ps(x1, bv, r1v2);
      if constexpr (M > 2) r2v2 = _mm256_fmadd_ps(x2, bv, r2v2);
    }
    {
      const __m256 bv = OZ_BV(3);
      r0v3 = _mm256_fmadd_ps(x0, bv, r0v3);
      if constexpr (M > 1) r1v3 = _mm256_fmadd_ps(x1, bv, r1v3);
      if constexpr (M > 2) r2v3 = _mm256_fmadd_ps(x2, bv, r2v3);
    }
    if constexpr (NV == 8) {
      r0v4 = _mm256_fmadd_ps(x0, OZ_BV(4), r0v4);
      r0v5 = _mm256_fmadd_ps(x0, OZ_BV(5), r0v5);
      r0v6 = _mm256_fmadd_ps(x0, OZ_BV(6), r0v6);
      r0v7 = _mm256_fmadd_ps(x0, OZ_BV(7), r0v7);
    }
  }
#undef OZ_BV
  __m256 acc[M][NV];
  const __m256 all[3][8] = {{r0v0, r0v1, r0v2, r0v3, r0v4, r0v5, r0v6, r0v7},
                            {r1v0, r1v1, r1v2, r1v3, z, z, z, z},
                            {r2v0, r2v1, r2v2, r2v3, z, z, z, z}};
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = all[i][v];
  StoreTile<M, NV>(p, coff, ncol, acc);
}

// M rows (1..6) x every panel of the block: A's M x kc slice stays in L1, B panels stream from L2.
template <int M>
__attribute__((noinline)) void Kernel(const KernelArgs& p) {
  const int64_t npanels = (p.ncols + kNR - 1) / kNR;
  int64_t jp = 0;
  // Wide tiles only over whole existing panels (packed panels are zero-padded to kNR columns; direct
  // sources have slack), so the last panel may be partial but never missing.
  if constexpr (M == 1) {
    for (; jp + 4 <= npanels; jp += 4) {
      const int ncol = static_cast<int>(std::min<int64_t>(4 * kNR, p.ncols - jp * kNR));
      if (p.qoff)
        MicroTileWide<1, 8, true>(p, p.b + jp * kNR, jp * kNR, ncol);
      else
        MicroTileWide<1, 8, false>(p, p.b + jp * p.kc * kNR, jp * kNR, ncol);
    }
  }
  if constexpr (M <= 3) {
    for (; jp + 2 <= npanels; jp += 2) {
      const int ncol = static_cast<int>(std::min<int64_t>(2 * kNR, p.ncols - jp * kNR));
      if (p.qoff)
        MicroTileWide<M, 4, true>(p, p.b + jp * kNR, jp * kNR, ncol);
      else
        MicroTileWide<M, 4, false>(p, p.b + jp * p.kc * kNR, jp * kNR, ncol);
    }
  }
  for (; jp < npanels; ++jp) {
    const int ncol = static_cast<int>(std::min<int64_t>(kNR, p.ncols - jp * kNR));
    if (p.qoff) {
      const float* b = p.b + jp * kNR;
      if (ncol > 8)
        MicroTile<M, 2, true>(p, b, jp * kNR, ncol);
      else
        MicroTile<M, 1, true>(p, b, jp * kNR, ncol);
    } else {
      const float* b = p.b + jp * p.kc * kNR;
      if (ncol > 8)
        MicroTile<M, 2, false>(p, b, jp * kNR, ncol);
      else
        MicroTile<M, 1, false>(p, b, jp * kNR, ncol);
    }
  }
}

// Narrow tails (1..4 columns left after the 16-column panels, e.g. 49 = 3*16 + 1 on 7x7 maps):
// dot products along the reduction instead of a mostly empty 16-wide panel. bt: the tail columns,
// each kcb (rounded up to 8, zero padded) floats along q. Rows of A are q-contiguous, so each step
// loads 8 reduction values of R rows and NT columns for R*NT FMAs.
inline float HSum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

template <int R, int NT>
inline void DotTile(const KernelArgs& p, int r0, const float* bt, int64_t ldbt, int64_t coff) {
  static_assert(R * NT <= 12, "registers");
  constexpr int U = R * NT <= 6 ? 2 : 1;  // two accumulators per dot when there are few dots
  __m256 acc[U][R][NT];
#pragma GCC unroll 12
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 12
      for (int j = 0; j < NT; ++j) acc[u][i][j] = _mm256_setzero_ps();
  const int64_t k8 = (p.kc + 7) / 8 * 8;
  for (int64_t k = 0; k < k8; k += 8 * U) {
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      const int64_t kk = k + 8 * u;
      if (U > 1 && kk >= k8) break;
      __m256 bv[NT];
#pragma GCC unroll 4
      for (int j = 0; j < NT; ++j) bv[j] = _mm256_load_ps(bt + j * ldbt + kk);
#pragma GCC unroll 6
      for (int i = 0; i < R; ++i) {
        const __m256 av = _mm256_loadu_ps(p.a[r0 + i] + kk);
#pragma GCC unroll 4
        for (int j = 0; j < NT; ++j) acc[u][i][j] = _mm256_fmadd_ps(av, bv[j], acc[u][i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    float* c = p.c[r0 + i] + coff;
    for (int j = 0; j < NT; ++j) {
      __m256 v = acc[0][i][j];
      if constexpr (U > 1) v = _mm256_add_ps(v, acc[U - 1][i][j]);
      float x = HSum(v);
      if (!p.first) x += c[j];
      else if (p.bias) x += p.bias[r0 + i];
      if (p.last && p.relu) x = std::max(x, 0.f);
      c[j] = x;
    }
  }
}

// m rows (1..6) x nt tail columns (1..4); p.ncols unused, columns at coff.
template <int NT>
void DotKernel(const KernelArgs& p, int m, const float* bt, int64_t ldbt, int64_t coff) {
  constexpr int R = NT == 1 ? 6 : NT == 2 ? 6 : NT == 3 ? 4 : 3;
  int r0 = 0;
  for (; r0 + R <= m; r0 += R) DotTile<R, NT>(p, r0, bt, ldbt, coff);
  for (; r0 < m; ++r0) DotTile<1, NT>(p, r0, bt, ldbt, coff);
}

using DotFn = void (*)(const KernelArgs&, int, const float*, int64_t, int64_t);
const DotFn kDotKernels[4] = {DotKernel<1>, DotKernel<2>, DotKernel<3>, DotKernel<4>};

using KernelFn = void (*)(const KernelArgs&);
const KernelFn kKernels[kMR] = {Kernel<1>, Kernel<2>, Kernel<3>, Kernel<4>, Kernel<5>, Kernel<6>};

// ---------------------------------------------------------------------------------------------
// B packing: segments of consecutive output pixels in one output row, read from a source whose
// channel planes are `plane` floats apart and rows `row` floats apart.

// Short copies/fills inline (libc's memcpy/memset cost more in call overhead than in work at these
// sizes: slab rows and output rows of a few dozen floats).
inline void CopyFloats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
    _mm256_storeu_ps(dst + i + 8, _mm256_loadu_ps(src + i + 8));
  }
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// Zeroes n floats with non-temporal stores for the aligned middle (no read-for-ownership of lines
// nobody reads back: the rows a skipping op leaves at 0). Caller fences (_mm_sfence) before handing
// the memory to other threads.
inline void StreamZeroFloats(float* dst, int64_t n) {
  int64_t i = 0;
  while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0) dst[i++] = 0.f;
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_setzero_ps());
  for (; i < n; ++i) dst[i] = 0.f;
}

inline void ZeroFloats(float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_setzero_ps());
  for (; i < n; ++i) dst[i] = 0.f;
}

struct Seg {
  int64_t off;  // source offset of the segment's first pixel for q = (c=0, r=0, s=0)
  int32_t d;    // first panel column
  int32_t len;  // columns
  alignas(32) int32_t mask[kNR];  // -1 on columns [d, d+len)
};

struct Panel {
  int32_t first, nseg;
  bool simple;  // one segment covering all kNR columns
};

struct Source {
  const float* base;  // channel 0 of the group, (padded) row 0 of the slab
  bool windowed;      // slack around the data: vector loads may overrun a segment's ends
  int64_t sw;         // source stride between consecutive pixels of a segment
};

inline void Deinterleave2(const float* p, __m256* e0, __m256* e1) {
  const __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
  const __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
  *e0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(v0, v1, 0x88)), 0xD8));
  *e1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(v2, v3, 0x88)), 0xD8));
}

// Packs q in [q0, q0+kcb) for every panel: dst panel jp at Bp + jp*kcb*kNR, row (q-q0) of kNR floats.
template <int SW>  // 1, 2, or 0 = any stride, element by element
void PackB(const Source& src, const int64_t* qoff, int64_t q0, int64_t kcb, const Panel* panels, int64_t npanels,
           const Seg* segs, float* Bp) {
  const int64_t sw = SW ? SW : src.sw;
  for (int64_t jp = 0; jp < npanels; ++jp) {
    const Panel& pn = panels[jp];
    float* dst = Bp + jp * kcb * kNR;
    if (pn.simple && (SW == 1 || (SW == 2 && src.windowed))) {
      const float* s0 = src.base + segs[pn.first].off;
      for (int64_t q = 0; q < kcb; ++q) {
        const float* s = s0 + qoff[q0 + q];
        if (SW == 1) {
          _mm256_store_ps(dst, _mm256_loadu_ps(s));
          _mm256_store_ps(dst + 8, _mm256_loadu_ps(s + 8));
        } else {
          __m256 e0, e1;
          Deinterleave2(s, &e0, &e1);
          _mm256_store_ps(dst, e0);
          _mm256_store_ps(dst + 8, e1);
        }
        dst += kNR;
      }
    } else if (src.windowed && (SW == 1 || SW == 2)) {
      const Seg* sg = segs + pn.first;
      for (int64_t q = 0; q < kcb; ++q) {
        const float* s0 = src.base + qoff[q0 + q];
        __m256 r0 = _mm256_setzero_ps(), r1 = _mm256_setzero_ps();
        for (int32_t i = 0; i < pn.nseg; ++i) {
          const Seg& g = sg[i];
          const float* s = s0 + g.off - static_cast<int64_t>(g.d) * SW;
          __m256 e0, e1;
          if (SW == 1) {
            e0 = _mm256_loadu_ps(s);
            e1 = _mm256_loadu_ps(s + 8);
          } else {
            Deinterleave2(s, &e0, &e1);
          }
          r0 = _mm256_blendv_ps(r0, e0, _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)g.mask)));
          r1 = _mm256_blendv_ps(r1, e1, _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)(g.mask + 8))));
        }
        _mm256_store_ps(dst, r0);
        _mm256_store_ps(dst + 8, r1);
        dst += kNR;
      }
    } else {  // element by element, reading only valid source elements
      const Seg* sg = segs + pn.first;
      for (int64_t q = 0; q < kcb; ++q) {
        const float* s0 = src.base + qoff[q0 + q];
        _mm256_store_ps(dst, _mm256_setzero_ps());
        _mm256_store_ps(dst + 8, _mm256_setzero_ps());
        for (int32_t i = 0; i < pn.nseg; ++i) {
          const Seg& g = sg[i];
          const float* s = s0 + g.off;
          for (int32_t j = 0; j < g.len; ++j) dst[g.d + j] = s[j * sw];
        }
        dst += kNR;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Thread-local scratch, reused across runs (no allocation in steady state).

struct Scratch {
  AlignedFloats buf;
  size_t cap = 0;
  std::vector<int64_t> qoff;
  std::vector<Seg> segs;
  std::vector<Panel> panels;
  float* Floats(size_t n) {
    if (n > cap) {
      buf.reset();
      cap = 0;
      buf = AllocFloats(n);
      cap = n;
    }
    return buf.get();
  }
};

Scratch& TlsScratch() {
  thread_local Scratch s;
  return s;
}

inline size_t RoundUp(size_t n, size_t m) { return (n + m - 1) / m * m; }

// Column j of the tile -> output pixel.
struct Cols {
  const int32_t* list;  // nullptr: the range p0 + j
  int64_t p0;
  int64_t n;
  int64_t at(int64_t j) const { return list ? list[j] : p0 + j; }
};

template <int SW>
void PackDispatch(const Source& src, const int64_t* qoff, int64_t q0, int64_t kcb, const Panel* panels,
                  int64_t npanels, const Seg* segs, float* Bp) {
  PackB<SW>(src, qoff, q0, kcb, panels, npanels, segs, Bp);
}

// Prefetch (into L2) the A slices [q0, q0+n) of rows[i0 .. i0+m): the next row panel's weights,
// requested a whole kernel call ahead (large layers' weights do not stay in cache between runs).
inline void PrefetchRows(const ConvWeights& w, const int32_t* rows, int64_t i0, int64_t m, int64_t q0, int64_t n) {
  for (int64_t i = i0; i < i0 + m; ++i) {
    const char* p = reinterpret_cast<const char*>(w.Slice(rows[i], q0));
    for (int64_t off = 0; off < n * 4; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
  }
}

void ComputePacked(const ConvPlan& plan, const ConvWeights& w, const float* x_image, float* y_image, int64_t grp,
                   const int32_t* rows, int64_t nrows, const Cols& cols, Epilogue ep) {
  const ConvGeom& g = plan.g;
  if (nrows <= 0 || cols.n <= 0) return;
  Scratch& sc = TlsScratch();
  const int64_t Cg = g.Cg(), CRS = g.CRS(), P = g.P();
  const int64_t nc = plan.nc, kc = plan.kc;

  // --- source: X directly (flat) or a zero-padded slab of the rows this tile needs
  Source src{};
  int64_t row_len = 0, oh_min = 0;
  size_t slab_floats = 0;
  int64_t slab_rows = 0, Wp = 0;
  if (plan.flat) {
    src.base = x_image + grp * Cg * g.H * g.W;
    src.windowed = false;
    src.sw = 1;
    row_len = P;
  } else {
    int64_t oh_max = 0;
    if (cols.list) {
      oh_min = P;
      for (int64_t j = 0; j < cols.n; ++j) {
        const int64_t oh = cols.list[j] / g.OW;
        oh_min = std::min(oh_min, oh);
        oh_max = std::max(oh_max, oh);
      }
    } else {
      oh_min = cols.p0 / g.OW;
      oh_max = (cols.p0 + cols.n - 1) / g.OW;
    }
    Wp = g.W + g.PL + g.PR;
    slab_rows = (oh_max - oh_min) * g.SH + (g.KH - 1) * g.DH + 1;
    slab_floats = static_cast<size_t>(Cg * slab_rows * Wp + 2 * kSlack);
    src.windowed = true;
    src.sw = g.SW;
    row_len = Wp;
  }
  const size_t bp_floats = static_cast<size_t>(kc * nc + 4 * (kc + 8));  // + transposed tail columns
  const size_t c_floats = cols.list ? static_cast<size_t>(RoundUp(nrows, kMR) * nc) : 0;
  float* base = sc.Floats(RoundUp(slab_floats, 16) + bp_floats + c_floats);
  float* Bp = base + RoundUp(slab_floats, 16);
  float* Ct = Bp + bp_floats;

  if (!plan.flat) {
    float* slab = base;
    std::fill(slab, slab + kSlack, 0.f);
    std::fill(slab + slab_floats - kSlack, slab + slab_floats, 0.f);
    float* s = slab + kSlack;
    const float* xg = x_image + grp * Cg * g.H * g.W;
    for (int64_t c = 0; c < Cg; ++c) {
      const float* xc = xg + c * g.H * g.W;
      for (int64_t i = 0; i < slab_rows; ++i, s += Wp) {
        const int64_t ih = oh_min * g.SH + i - g.PT;
        if (ih < 0 || ih >= g.H) {
          ZeroFloats(s, Wp);
        } else {
          ZeroFloats(s, g.PL);
          CopyFloats(s + g.PL, xc + ih * g.W, g.W);
          ZeroFloats(s + g.PL + g.W, g.PR);
        }
      }
    }
    src.base = slab + kSlack;
  }

  // --- q = (c, r, s) -> source offset
  sc.qoff.resize(static_cast<size_t>(CRS));
  {
    const int64_t plane = plan.flat ? g.H * g.W : slab_rows * Wp;
    int64_t q = 0;
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t r = 0; r < g.KH; ++r)
        for (int64_t s = 0; s < g.KW; ++s) sc.qoff[q++] = c * plane + r * g.DH * row_len + s * g.DW;
  }

  const int64_t sw = plan.flat ? 1 : g.SW;
  auto pack = sw == 1 ? PackDispatch<1> : sw == 2 ? PackDispatch<2> : PackDispatch<0>;
  const float* bias = w.Bias();

  for (int64_t j0 = 0; j0 < cols.n; j0 += nc) {
    const int64_t jn = std::min(nc, cols.n - j0);
    const int64_t npanels = (jn + kNR - 1) / kNR;
    // --- segments of each panel
    sc.segs.clear();
    sc.panels.clear();
    for (int64_t jp = 0; jp < npanels; ++jp) {
      Panel pn{static_cast<int32_t>(sc.segs.size()), 0, false};
      const int64_t jb = j0 + jp * kNR, je = std::min(jb + kNR, j0 + jn);
      int64_t prev_p = -2, prev_oh = -1;
      for (int64_t j = jb; j < je; ++j) {
        const int64_t p = cols.at(j);
        const int64_t oh = plan.flat ? 0 : p / g.OW, ow = plan.flat ? p : p % g.OW;
        if (p == prev_p + 1 && oh == prev_oh) {
          sc.segs.back().len++;
        } else {
          Seg sg{};
          sg.off = plan.flat ? p : (oh - oh_min) * g.SH * Wp + ow * g.SW;
          sg.d = static_cast<int32_t>(j - jb);
          sg.len = 1;
          sc.segs.push_back(sg);
          pn.nseg++;
        }
        prev_p = p;
        prev_oh = oh;
      }
      for (int32_t i = 0; i < pn.nseg; ++i) {
        Seg& sg = sc.segs[pn.first + i];
        for (int c = 0; c < kNR; ++c) sg.mask[c] = (c >= sg.d && c < sg.d + sg.len) ? -1 : 0;
      }
      pn.simple = pn.nseg == 1 && sc.segs[pn.first].len == kNR;
      sc.panels.push_back(pn);
    }

    for (int64_t q0 = 0; q0 < CRS; q0 += kc) {
      const int64_t kcb = std::min(kc, CRS - q0);
      const bool first = q0 == 0, last = q0 + kcb >= CRS;
      if (plan.flat && !cols.list) {
        // 1x1 / stride 1: B row q is a contiguous run of X's channel q: read it sequentially.
        const int64_t nfull = jn / kNR, tail = jn - nfull * kNR;
        for (int64_t q = 0; q < kcb; ++q) {
          const float* s0 = src.base + (q0 + q) * P + cols.p0 + j0;
          float* d = Bp + q * kNR;
          for (int64_t jp = 0; jp < nfull; ++jp) {
            _mm256_store_ps(d + jp * kcb * kNR, _mm256_loadu_ps(s0 + jp * kNR));
            _mm256_store_ps(d + jp * kcb * kNR + 8, _mm256_loadu_ps(s0 + jp * kNR + 8));
          }
          if (tail) {
            float* dt = d + nfull * kcb * kNR;
            for (int64_t j = 0; j < kNR; ++j) dt[j] = j < tail ? s0[nfull * kNR + j] : 0.f;
          }
        }
      } else {
        pack(src, sc.qoff.data(), q0, kcb, sc.panels.data(), npanels, sc.segs.data(), Bp);
      }
      // A tail of 1..4 columns goes to the dot-product kernel: its columns transposed to q-contiguous.
      const int64_t jtail = (jn % kNR) <= 4 ? jn % kNR : 0, jmain = jn - jtail;
      const int64_t ldbt = (kcb + 7) / 8 * 8;
      float* Bt = Bp + kc * nc;
      if (jtail > 0) {
        const float* lastp = Bp + (npanels - 1) * kcb * kNR;
        for (int64_t j = 0; j < jtail; ++j) {
          float* d = Bt + j * ldbt;
          for (int64_t q = 0; q < kcb; ++q) d[q] = lastp[q * kNR + j];
          for (int64_t q = kcb; q < ldbt; ++q) d[q] = 0.f;
        }
      }
      // Row panels outer: kMR rows x kcb of A stay in L1 while the block's B panels stream from L2.
      // A short last panel (rows % 6) runs wide tiles (see Kernel), so it keeps the FMA rate.
      for (int64_t i0 = 0; i0 < nrows;) {
        const int m = static_cast<int>(std::min<int64_t>(kMR, nrows - i0));
        const int64_t i_begin = i0;
        i0 += m;
        const float* a[kMR];
        float* c[kMR];
        float biasv[kMR];
        for (int i = 0; i < m; ++i) {
          const int64_t k = rows[i_begin + i];
          a[i] = w.Slice(k, q0);
          biasv[i] = bias[k];
          c[i] = cols.list ? Ct + (i_begin + i) * nc : y_image + k * P + cols.p0 + j0;
        }
        PrefetchRows(w, rows, i0, std::min<int64_t>(kMR, nrows - i0), q0, kcb);
        KernelArgs ka{kcb, a, Bp, nullptr, c, jmain, ep.bias ? biasv : nullptr, first, last, ep.relu};
        if (jmain > 0) kKernels[m - 1](ka);
        if (jtail > 0) kDotKernels[jtail - 1](ka, m, Bt, ldbt, jmain);
      }
    }
    if (cols.list) {  // scatter the block's columns
      for (int64_t i = 0; i < nrows; ++i) {
        float* yr = y_image + rows[i] * P;
        const float* cr = Ct + i * nc;
        for (int64_t j = 0; j < jn; ++j) yr[cols.list[j0 + j]] = cr[j];
      }
    }
  }
}


// Copies padded input row `pr` (padded coordinates) of channel plane xc into the sw phase rows
// dst[pw * phase_stride + j] = Xpad[pr][j*sw + pw], j < wph. `tmp` holds wph*sw + 32 floats.
void FillPhaseRows(const ConvGeom& g, const float* xc, int64_t pr, int64_t sw, int64_t wph, float* dst,
                   int64_t phase_stride, float* tmp) {
  const int64_t ih = pr - g.PT;
  if (ih < 0 || ih >= g.H) {
    for (int64_t pw = 0; pw < sw; ++pw) ZeroFloats(dst + pw * phase_stride, wph);
    return;
  }
  const float* xr = xc + ih * g.W;
  const int64_t width = wph * sw;  // padded columns [0, width) are needed
  // valid padded columns: iw = pc - PL in [0, W)
  const int64_t lo = std::min(width, g.PL), hi = std::max(lo, std::min(width, g.PL + g.W));
  float* row = sw == 1 ? dst : tmp;
  ZeroFloats(row, lo);
  CopyFloats(row + lo, xr + (lo - g.PL), hi - lo);
  ZeroFloats(row + hi, width - hi);
  if (sw == 1) return;
  if (sw == 2) {
    float* d0 = dst;
    float* d1 = dst + phase_stride;
    int64_t j = 0;
    for (; j + 8 <= wph; j += 8) {  // reads tmp[2j .. 2j+16), within width
      const __m256 v0 = _mm256_loadu_ps(tmp + 2 * j), v1 = _mm256_loadu_ps(tmp + 2 * j + 8);
      const __m256 ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(v0, v1, 0x88)), 0xD8));
      const __m256 od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(v0, v1, 0xDD)), 0xD8));
      _mm256_storeu_ps(d0 + j, ev);
      _mm256_storeu_ps(d1 + j, od);
    }
    for (; j < wph; ++j) {
      d0[j] = tmp[2 * j];
      d1[j] = tmp[2 * j + 1];
    }
    return;
  }
  for (int64_t pw = 0; pw < sw; ++pw)
    for (int64_t j = 0; j < wph; ++j) dst[pw * phase_stride + j] = tmp[j * sw + pw];
}

// Pack-free tile (ConvPlan::UseDirect): B row q of output column p' is src[qoff[q] + p'].
void ComputeDirect(const ConvPlan& plan, const ConvWeights& w, const float* x_image, float* y_image, int64_t grp,
                   const int32_t* rows, int64_t nrows, int64_t p0, int64_t p1, Epilogue ep) {
  const ConvGeom& g = plan.g;
  Scratch& sc = TlsScratch();
  const int64_t Cg = g.Cg(), CRS = g.CRS(), P = g.P(), OW = g.OW;
  const int64_t kc = plan.kc;
  const float* bias = w.Bias();
  sc.qoff.resize(static_cast<size_t>(CRS));
  int64_t* qoff = sc.qoff.data();

  if (plan.flat) {  // B row c is X's channel c: columns p' = p; Y written in place
    const float* src = x_image + grp * Cg * P;
    for (int64_t q = 0; q < CRS; ++q) qoff[q] = q * P;
    float* Bt = sc.Floats(static_cast<size_t>(kc * kNR));
    // Column chunks keep the chunk's B rows (kc x 128 floats) in L2 across the row panels.
    constexpr int64_t kFlatChunk = 128;
    for (int64_t cc0 = p0; cc0 < p1; cc0 += kFlatChunk) {
      const int64_t n = std::min(kFlatChunk, p1 - cc0), nfull = n / kNR * kNR, tail = n - nfull;
      for (int64_t q0 = 0; q0 < CRS; q0 += kc) {
        const int64_t kcb = std::min(kc, CRS - q0);
        const bool first = q0 == 0, last = q0 + kcb >= CRS;
        if (tail) {  // the last partial panel is packed: reading 16 columns could run past X
          for (int64_t q = 0; q < kcb; ++q) {
            float* d = Bt + q * kNR;
            const float* s0 = src + (q0 + q) * P + cc0 + nfull;
            for (int64_t j = 0; j < kNR; ++j) d[j] = j < tail ? s0[j] : 0.f;
          }
        }
        for (int64_t i0 = 0; i0 < nrows;) {
          const int m = static_cast<int>(std::min<int64_t>(kMR, nrows - i0));
          const float* a[kMR];
          float* c[kMR];
          float biasv[kMR];
          for (int i = 0; i < m; ++i) {
            const int64_t k = rows[i0 + i];
            a[i] = w.Slice(k, q0);
            biasv[i] = bias[k];
            c[i] = y_image + k * P + cc0;
          }
          i0 += m;
          const float* bp = ep.bias ? biasv : nullptr;
          PrefetchRows(w, rows, i0, std::min<int64_t>(kMR, nrows - i0), q0, kcb);
          if (nfull) {
            KernelArgs ka{kcb, a, src + cc0, qoff + q0, c, nfull, bp, first, last, ep.relu};
            kKernels[m - 1](ka);
          }
          if (tail) {
            float* ct[kMR];
            for (int i = 0; i < m; ++i) ct[i] = c[i] + nfull;
            KernelArgs kt{kcb, a, Bt, nullptr, ct, tail, bp, first, last, ep.relu};
            kKernels[m - 1](kt);
          }
        }
      }
    }
    return;
  }

  // --- phase slab: for each channel, SH x SW phase planes of rows_ph x wph floats
  const int64_t sh = g.SH, sw = g.SW;
  const int64_t oh_min = p0 / OW, oh_max = (p1 - 1) / OW;
  const int64_t wph = OW + (g.KW - 1) * g.DW / sw;
  const int64_t rows_ph = (oh_max - oh_min) + (g.KH - 1) * g.DH / sh + 1;
  const int64_t ph_plane = rows_ph * wph, cstride = sh * sw * ph_plane;
  const int64_t pp0 = (p0 / OW - oh_min) * wph + p0 % OW;
  const int64_t pp1 = ((p1 - 1) / OW - oh_min) * wph + (p1 - 1) % OW + 1;
  constexpr int64_t kChunk = 256;  // columns (p') per Ct block
  const int64_t chunk = std::min<int64_t>(kChunk, (pp1 - pp0 + kNR - 1) / kNR * kNR);
  const size_t slab_floats = static_cast<size_t>(Cg * cstride + kSlack);
  const size_t tmp_floats = static_cast<size_t>(wph * sw + 64);
  const size_t ct_floats = static_cast<size_t>(nrows * chunk);
  float* base = sc.Floats(RoundUp(slab_floats, 16) + RoundUp(tmp_floats, 16) + ct_floats);
  float* slab = base;
  float* tmp = base + RoundUp(slab_floats, 16);
  float* Ct = tmp + RoundUp(tmp_floats, 16);
  std::memset(slab + Cg * cstride, 0, sizeof(float) * kSlack);
  const float* xg = x_image + grp * Cg * g.H * g.W;
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t ph = 0; ph < sh; ++ph)
      for (int64_t i = 0; i < rows_ph; ++i)
        FillPhaseRows(g, xg + c * g.H * g.W, (oh_min + i) * sh + ph, sw, wph,
                      slab + c * cstride + ph * sw * ph_plane + i * wph, ph_plane, tmp);
  {
    const int64_t taps = g.KH * g.KW;
    for (int64_t r = 0; r < g.KH; ++r)
      for (int64_t s = 0; s < g.KW; ++s) {
        const int64_t rr = r * g.DH, ss = s * g.DW;
        qoff[r * g.KW + s] = ((rr % sh) * sw + ss % sw) * ph_plane + (rr / sh) * wph + ss / sw;
      }
    for (int64_t c = 1; c < Cg; ++c)
      for (int64_t t = 0; t < taps; ++t) qoff[c * taps + t] = qoff[t] + c * cstride;
  }

  for (int64_t cc0 = pp0; cc0 < pp1; cc0 += chunk) {
    const int64_t cn = std::min(chunk, pp1 - cc0);
    for (int64_t q0 = 0; q0 < CRS; q0 += kc) {
      const int64_t kcb = std::min(kc, CRS - q0);
      const bool first = q0 == 0, last = q0 + kcb >= CRS;
      for (int64_t i0 = 0; i0 < nrows;) {
        const int m = static_cast<int>(std::min<int64_t>(kMR, nrows - i0));
        const float* a[kMR];
        float* c[kMR];
        float biasv[kMR];
        for (int i = 0; i < m; ++i) {
          const int64_t k = rows[i0 + i];
          a[i] = w.Slice(k, q0);
          biasv[i] = bias[k];
          c[i] = Ct + (i0 + i) * chunk;
        }
        i0 += m;
        PrefetchRows(w, rows, i0, std::min<int64_t>(kMR, nrows - i0), q0, kcb);
        KernelArgs ka{kcb, a, slab + cc0, qoff + q0, c, cn, ep.bias ? biasv : nullptr, first, last, ep.relu};
        kKernels[m - 1](ka);
      }
    }
    // scatter the valid columns of this chunk: p' = (oh - oh_min) * wph + ow, ow < OW
    for (int64_t pr = (cc0 / wph); pr * wph < cc0 + cn; ++pr) {
      const int64_t row_lo = std::max(cc0, pr * wph), row_hi = std::min({cc0 + cn, pr * wph + OW, pp1});
      if (row_hi <= row_lo) continue;
      const int64_t ydst = (oh_min + pr) * OW + (row_lo - pr * wph);
      for (int64_t i = 0; i < nrows; ++i)
        CopyFloats(y_image + rows[i] * P + ydst, Ct + i * chunk + (row_lo - cc0), row_hi - row_lo);
    }
  }
}

// y = act(y + r) over n floats; act = ReLU when relu.
inline void AddResidual(float* y, const float* r, int64_t n, bool relu) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  if (relu) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(r + i)), zero));
    for (; i < n; ++i) y[i] = std::max(y[i] + r[i], 0.f);
  } else {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(r + i)));
    for (; i < n; ++i) y[i] += r[i];
  }
}

void ComputeTileImpl(const ConvPlan& plan, const ConvWeights& w, const float* x_image, float* y_image, int64_t grp,
                     const int32_t* rows, int64_t nrows, const Cols& cols, Epilogue ep) {
  if (nrows <= 0 || cols.n <= 0) return;
  // A residual is added in a second pass over the tile while it is still in cache: the micro-kernels'
  // stores stay the same for every op, and the pass costs one load per output (no MACs).
  const float* res = ep.residual;
  Epilogue inner = ep;
  inner.residual = nullptr;
  if (res) inner.relu = false;
  if (!cols.list && plan.UseDirect(nrows))
    ComputeDirect(plan, w, x_image, y_image, grp, rows, nrows, cols.p0, cols.p0 + cols.n, inner);
  else
    ComputePacked(plan, w, x_image, y_image, grp, rows, nrows, cols, inner);
  if (!res) return;
  const int64_t P = plan.g.P();
  for (int64_t i = 0; i < nrows; ++i) {
    float* yr = y_image + rows[i] * P;
    const float* rr = res + rows[i] * P;
    if (cols.list) {
      for (int64_t j = 0; j < cols.n; ++j) {
        const int64_t p = cols.list[j];
        const float v = yr[p] + rr[p];
        yr[p] = ep.relu ? std::max(v, 0.f) : v;
      }
    } else {
      AddResidual(yr + cols.p0, rr + cols.p0, cols.n, ep.relu);
    }
  }
}

}  // namespace

bool ComputeTile(const ConvPlan& plan, const ConvWeights& w, const float* x_image, float* y_image, int64_t grp,
                 const int32_t* rows, int64_t nrows, int64_t p0, int64_t p1, Epilogue ep) noexcept {
  try {
    ComputeTileImpl(plan, w, x_image, y_image, grp, rows, nrows, Cols{nullptr, p0, p1 - p0}, ep);
    return true;
  } catch (...) {
    return false;
  }
}

bool ComputeTileCols(const ConvPlan& plan, const ConvWeights& w, const float* x_image, float* y_image, int64_t grp,
                     const int32_t* rows, int64_t nrows, const int32_t* cols, int64_t ncols, Epilogue ep) noexcept {
  try {
    ComputeTileImpl(plan, w, x_image, y_image, grp, rows, nrows, Cols{cols, 0, ncols}, ep);
    return true;
  } catch (...) {
    return false;
  }
}

namespace {

struct Split {
  int64_t col_blocks, col_width, row_blocks, row_block;
};

// Tiles per (image, group): row blocks x column blocks (whole kNR panels; in packed mode at most
// ppb_max so the packed B block stays in L2). A rough cycle model picks the split: every column block
// re-reads the rows' A (weights) from L3, every row block packs its own B (packed mode) or copies its
// own input slab with a halo of kernel rows (direct mode); the makespan on T threads counts the largest
// task ceil(tasks / T) + 0.1 times.
Split ChooseSplit(const ConvPlan& plan, int64_t ng, int64_t M) {
  const ConvGeom& g = plan.g;
  const int64_t P = g.P(), CRS = g.CRS();
  const bool direct = plan.UseDirect(M);
  const int64_t panels = (P + kNR - 1) / kNR;
  // Tasks may be wider than a packed block (nc): ComputePacked walks the task's blocks over one slab,
  // re-reading the rows' A slice per block from L2 (kAlphaL2), while the slab halo is paid once.
  const int64_t ppb_max = panels;
  const double T = static_cast<double>(HardwareThreads());
  // cycles per A float read from L3 / from L2, per slab float copied, per task
  // (measured on the bench layers: repacking B / refilling the slab per extra row block costs about
  // 0.5 cycle per packed float and 1 cycle per slab float plus ~20 per slab row)
  constexpr double kAlpha = 0.3, kAlphaL2 = 0.05, kCopy = 1.0, kRow = 20, kPack = 0.5, kTask = 3000;
  const double waste = direct ? plan.direct_waste : 0.0;
  const double halo = plan.flat ? 0.0 : static_cast<double>((g.KH - 1) * g.DH / g.SH + 1);
  const double slab_row = plan.flat ? 0.0 : static_cast<double>(g.Cg() * g.SH * g.SW) *
                                                 (kCopy * static_cast<double>(g.OW + (g.KW - 1) * g.DW / g.SW) + kRow);
  Split best{1, panels * kNR, 1, std::max<int64_t>(kMR, (M + kMR - 1) / kMR * kMR)};
  double best_t = 1e300;
  const int64_t cb_min = (panels + ppb_max - 1) / ppb_max;
  const int64_t rb_max = std::min<int64_t>(32, std::max<int64_t>(1, (M + kMR - 1) / kMR));
  for (int64_t rb = 1; rb <= rb_max; ++rb) {
    const int64_t rblock = std::max<int64_t>(kMR, ((M + rb - 1) / rb + kMR - 1) / kMR * kMR);
    const int64_t rbs = std::max<int64_t>(1, (M + rblock - 1) / rblock);
    if (rbs != rb) continue;
    for (int64_t cb = cb_min; cb <= std::min(panels, cb_min + 64); ++cb) {
      const int64_t ppb = (panels + cb - 1) / cb;
      const int64_t cbs = (panels + ppb - 1) / ppb;
      if (cbs != cb) continue;
      const double rows = static_cast<double>(std::min(rblock, std::max<int64_t>(M, 1)));
      const double cols = static_cast<double>(std::min(ppb * kNR, P));
      double task = rows * cols * (1.0 + waste) * CRS / 16.0 + kAlpha * rows * CRS + kTask;
      if (direct)
        task += slab_row * (cols / static_cast<double>(g.OW) + halo);
      else
        task += kPack * CRS * cols + slab_row * (cols / static_cast<double>(g.OW) + halo) / g.SH / g.SW +
                kAlphaL2 * rows * CRS * std::ceil(cols / static_cast<double>(plan.nc));
      const double ntasks = static_cast<double>(ng * rb * cb);
      // + a tenth of a task: on a shared machine threads run at uneven speeds, so the run waits on average
      // a part of a task for the last one (few big tasks cannot be balanced dynamically).
      const double t = (std::ceil(ntasks / T) + 0.1) * task;
      if (t < best_t * 0.999) {
        best_t = t;
        best = Split{cb, ppb * kNR, rb, rblock};
      }
    }
  }
  return best;
}

}  // namespace

int64_t RunConv(OrtKernelContext* ctx, const ConvPlan& plan, const ConvWeights& w, const float* X, int64_t N,
                float* Y, Epilogue ep, RowSelectFn select, const void* user, bool zero_unselected) {
  const ConvGeom& g = plan.g;
  const int64_t G = g.G, P = g.P(), Kg = g.Kg();
  const int64_t img_in = g.C * g.H * g.W, img_out = g.K * P;
  if (N <= 0 || P <= 0) return 0;
  int64_t max_rows = 0, macs = 0;
  std::vector<RowSet> sets(static_cast<size_t>(N * G));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t grp = 0; grp < G; ++grp) {
      RowSet rs = select ? select(user, n, grp) : RowSet{nullptr, -1};
      if (rs.count < 0) rs = RowSet{w.GroupRows(grp), Kg};
      sets[n * G + grp] = rs;
      max_rows = std::max(max_rows, rs.count);
      macs += rs.count * P * g.CRS();
    }
  // Rows to zero: the complement of each selection (only when asked).
  std::vector<std::vector<int32_t>> others;
  if (zero_unselected && select) {
    others.resize(sets.size());
    std::vector<char> mark(static_cast<size_t>(Kg));
    for (size_t i = 0; i < sets.size(); ++i) {
      const int64_t grp = static_cast<int64_t>(i) % G;
      std::fill(mark.begin(), mark.end(), 0);
      for (int64_t j = 0; j < sets[i].count; ++j) mark[sets[i].rows[j] - grp * Kg] = 1;
      for (int64_t k = 0; k < Kg; ++k)
        if (!mark[k]) others[i].push_back(static_cast<int32_t>(grp * Kg + k));
    }
  }
  if (max_rows == 0 && others.empty()) return 0;
  const Split sp = ChooseSplit(plan, N * G, max_rows);
  const int64_t ncb = sp.col_blocks, cwidth = sp.col_width, rb = sp.row_blocks, rblock = sp.row_block;
  static const bool trace = std::getenv("OZ_GEMM_TRACE") != nullptr;  // debugging aid: the tiling chosen
  if (trace)
    std::fprintf(stderr, "oz::gemm::RunConv K=%ld CRS=%ld P=%ld rows<=%ld %s: %ld col blocks of %ld x %ld row blocks of %ld\n",
                 static_cast<long>(g.K), static_cast<long>(g.CRS()), static_cast<long>(P), static_cast<long>(max_rows),
                 plan.UseDirect(max_rows) ? "direct" : "packed", static_cast<long>(ncb), static_cast<long>(cwidth),
                 static_cast<long>(rb), static_cast<long>(rblock));
  const int64_t base = N * G * ncb;
  std::atomic<bool> failed{false};
  const size_t ntasks = static_cast<size_t>(base * rb);
  ParallelFor(ctx, ntasks, [&](size_t t) {
    const int64_t cb = static_cast<int64_t>(t) % ncb;
    const int64_t r = static_cast<int64_t>(t) / ncb % rb;
    const int64_t ng = static_cast<int64_t>(t) / (ncb * rb);
    const int64_t n = ng / G, grp = ng % G;
    const RowSet& rs = sets[ng];
    const int64_t p0 = cb * cwidth, p1 = std::min(P, p0 + cwidth);
    float* y = Y + n * img_out;
    Epilogue epn = ep;
    if (ep.residual) epn.residual = ep.residual + n * img_out;
    if (r == 0 && !others.empty()) {
      if (epn.residual) {  // a skipped channel's output is act(residual): its conv term counts as 0
        for (int32_t k : others[ng]) {
          const float* rr = epn.residual + k * P;
          float* yr = y + k * P;
          if (ep.relu)
            for (int64_t p = p0; p < p1; ++p) yr[p] = std::max(rr[p], 0.f);
          else
            CopyFloats(yr + p0, rr + p0, p1 - p0);
        }
      } else {
        for (int32_t k : others[ng]) StreamZeroFloats(y + k * P + p0, p1 - p0);
        _mm_sfence();
      }
    }
    const int64_t r0 = r * rblock, r1 = std::min(rs.count, r0 + rblock);
    if (r0 >= r1) return;
    if (!ComputeTile(plan, w, X + n * img_in, y, grp, rs.rows + r0, r1 - r0, p0, p1, epn))
      failed.store(true, std::memory_order_relaxed);
  });
  if (failed.load()) throw std::bad_alloc();
  return macs;
}

}  // namespace gemm
}  // namespace oz
