// Dot-product micro-kernels for SpatialConv (see spatial_conv.h for the layout).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <array>
#include <type_traits>

#include "spatial_conv.h"

namespace oz {
namespace spatial {
namespace {

// Horizontal sums of four vectors -> one __m128 {sum(a), sum(b), sum(c), sum(d)}.
inline __m128 HSum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t0 = _mm256_hadd_ps(a, b);
  const __m256 t1 = _mm256_hadd_ps(c, d);
  const __m256 t2 = _mm256_hadd_ps(t0, t1);
  return _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
}

// TAIL: segments end in a partial chunk (len % 8 != 0). A separate instantiation keeps the lane mask
// out of the common case, where 12 accumulators + 3 pixels + 1 weight already use all 16 registers.
template <int MF, int MP, bool TAIL>
void DotTile(const DotJob& job, const int32_t* ks, const float* const* x, const int64_t* ycol, uint8_t* flags,
             const int64_t* fcol, const SegLayout& L) noexcept {
  constexpr int NA = MF * MP;
  constexpr int U = NA <= 6 ? 2 : 1;  // small tiles: two accumulator sets cover the FMA latency
  __m256 acc[U][MF][MP];
  for (int u = 0; u < U; ++u)
    for (int f = 0; f < MF; ++f)
      for (int j = 0; j < MP; ++j) acc[u][f][j] = _mm256_setzero_ps();
  const float* wp[MF];
  for (int f = 0; f < MF; ++f) wp[f] = job.w0 + ks[f] * job.wrow;
  const int64_t lpad = L.lpad, nseg = L.nseg;

  // X loads of the segment's last chunk are masked to the real floats (see spatial_conv.h: what lies
  // past a segment is the next pixel, and 0 * Inf there would be NaN here)
  const int64_t len = L.len, lfull = TAIL ? len / 8 * 8 : lpad;
  const __m256i tail = TAIL ? _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len - lfull)),
                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
                            : _mm256_setzero_si256();
  auto step = [&](int u, const float* const* xp, const float* const* wq, int64_t i, auto masked)
      __attribute__((always_inline)) {
    auto ldx = [&](const float* q) __attribute__((always_inline)) {
      if constexpr (decltype(masked)::value) return _mm256_maskload_ps(q, tail);
      else return _mm256_loadu_ps(q);
    };
    if constexpr (MP <= MF) {
      __m256 xv[MP];
      for (int j = 0; j < MP; ++j) xv[j] = ldx(xp[j] + i);
      for (int f = 0; f < MF; ++f) {
        const __m256 wv = _mm256_loadu_ps(wq[f] + i);
        for (int j = 0; j < MP; ++j) acc[u][f][j] = _mm256_fmadd_ps(wv, xv[j], acc[u][f][j]);
      }
    } else {
      __m256 wv[MF];
      for (int f = 0; f < MF; ++f) wv[f] = _mm256_loadu_ps(wq[f] + i);
      for (int j = 0; j < MP; ++j) {
        const __m256 xv = ldx(xp[j] + i);
        for (int f = 0; f < MF; ++f) acc[u][f][j] = _mm256_fmadd_ps(wv[f], xv, acc[u][f][j]);
      }
    }
  };
  constexpr std::false_type kFull{};
  constexpr std::true_type kTail{};

  for (int64_t s = 0; s < nseg; ++s) {
    const float* xp[MP];
    const int64_t o = L.off[s];
    for (int j = 0; j < MP; ++j) xp[j] = x[j] + o;
    int64_t i = 0;
    if constexpr (U == 2) {
      for (; i + 16 <= lfull; i += 16) {
        step(0, xp, wp, i, kFull);
        step(1, xp, wp, i + 8, kFull);
      }
    }
    for (; i < lfull; i += 8) step(0, xp, wp, i, kFull);
    if constexpr (TAIL) step(0, xp, wp, lfull, kTail);
    for (int f = 0; f < MF; ++f) wp[f] += lpad;
  }

  alignas(32) __m256 flat[(NA + 3) / 4 * 4];
  for (int f = 0; f < MF; ++f)
    for (int j = 0; j < MP; ++j) {
      __m256 a = acc[0][f][j];
      if constexpr (U == 2) a = _mm256_add_ps(a, acc[U - 1][f][j]);
      flat[f * MP + j] = a;
    }
  for (int q = NA; q < (NA + 3) / 4 * 4; ++q) flat[q] = _mm256_setzero_ps();
  alignas(16) float sums[(NA + 3) / 4 * 4];
  for (int q = 0; q < NA; q += 4) _mm_store_ps(sums + q, HSum4(flat[q], flat[q + 1], flat[q + 2], flat[q + 3]));
  // sum + bias (+ residual), then ReLU; NaN stays NaN (std::max keeps its first argument)
  for (int f = 0; f < MF; ++f) {
    const float b = job.bias[ks[f]];
    const int64_t ro = job.kblock ? (ks[f] / job.kblock) * job.ystride + ks[f] % job.kblock : ks[f] * job.ystride;
    const float* orow = job.o0 ? job.o0 + ro : nullptr;
    float* yr = job.y0 + ro;
    for (int j = 0; j < MP; ++j) {
      float v = sums[f * MP + j] + b;
      if (orow) v += orow[ycol[j]];
      sums[f * MP + j] = v;
      yr[ycol[j]] = std::max(v, 0.f);
    }
  }
  if (flags) {
    for (int j = 0; j < MP; ++j) {
      uint8_t* fl = flags + fcol[j];
      for (int f = 0; f < MF; ++f) fl[f] |= static_cast<uint8_t>(sums[f * MP + j] > 0.f);
    }
  }
}

using TileFn = void (*)(const DotJob&, const int32_t*, const float* const*, const int64_t*, uint8_t*, const int64_t*,
                        const SegLayout&) noexcept;

constexpr int kMaxMP = 6;
constexpr int kMaxMF[kMaxMP + 1] = {0, 8, 6, 4, 3, 2, 2};

template <int MP, bool TAIL>
constexpr std::array<TileFn, 9> MakeRow() {
  std::array<TileFn, 9> r{};
  auto one = [&](auto mf_c) {
    constexpr int MF = decltype(mf_c)::value;
    if constexpr (MF <= kMaxMF[MP]) r[MF] = &DotTile<MF, MP, TAIL>;
  };
  one(std::integral_constant<int, 1>{});
  one(std::integral_constant<int, 2>{});
  one(std::integral_constant<int, 3>{});
  one(std::integral_constant<int, 4>{});
  one(std::integral_constant<int, 5>{});
  one(std::integral_constant<int, 6>{});
  one(std::integral_constant<int, 7>{});
  one(std::integral_constant<int, 8>{});
  return r;
}

using TileTable = std::array<std::array<TileFn, 9>, kMaxMP + 1>;
const TileTable kTilesFull = {{std::array<TileFn, 9>{}, MakeRow<1, false>(), MakeRow<2, false>(), MakeRow<3, false>(),
                               MakeRow<4, false>(), MakeRow<5, false>(), MakeRow<6, false>()}};
const TileTable kTilesTail = {{std::array<TileFn, 9>{}, MakeRow<1, true>(), MakeRow<2, true>(), MakeRow<3, true>(),
                               MakeRow<4, true>(), MakeRow<5, true>(), MakeRow<6, true>()}};


// Pixel chunks: 3 at a time; a remainder of 1 (when there are >= 4) becomes 2 + 2.
inline int64_t ChunkAt(int64_t j0, int64_t np) {
  const int64_t rem = np - j0;
  if (rem >= 5 || rem == 3) return 3;
  if (rem == 4) return 2;
  return rem;  // 1 or 2
}

}  // namespace

void DotBlock(const DotJob& job, const SegLayout& L, bool filters_outer) noexcept {
  if (job.nf <= 0 || job.np <= 0) return;
  const TileTable& kTiles = L.len % 8 ? kTilesTail : kTilesFull;
  if (filters_outer) {
    constexpr int64_t MF = 4;
    for (int64_t f0 = 0; f0 < job.nf; f0 += MF) {
      const int64_t mf = std::min<int64_t>(MF, job.nf - f0);
      for (int64_t j0 = 0; j0 < job.np;) {
        const int64_t mp = ChunkAt(j0, job.np);
        kTiles[mp][mf](job, job.k + f0, job.x + j0, job.ycol + j0, job.flags ? job.flags + f0 : nullptr,
                       job.fcol ? job.fcol + j0 : nullptr, L);
        j0 += mp;
      }
    }
  } else {
    for (int64_t j0 = 0; j0 < job.np;) {
      const int64_t mp = ChunkAt(j0, job.np);
      const int64_t MF = kMaxMF[mp];
      for (int64_t f0 = 0; f0 < job.nf; f0 += MF) {
        const int64_t mf = std::min<int64_t>(MF, job.nf - f0);
        kTiles[mp][mf](job, job.k + f0, job.x + j0, job.ycol + j0, job.flags ? job.flags + f0 : nullptr,
                       job.fcol ? job.fcol + j0 : nullptr, L);
      }
      j0 += mp;
    }
  }
}

namespace {

// MP pixels x 16 channels: 2*MP ymm accumulators, W panel rows loaded, pixels broadcast.
template <int MP>
void PanelTile(const float* wp, const float* const* x, const SegLayout& L, const float* bias, float* const* y,
               const float* const* o, int nvalid, const int64_t* ycol, uint8_t* flags, const int64_t* fcol) noexcept {
  __m256 acc[MP][2];
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
  for (int j = 0; j < MP; ++j) {
    acc[j][0] = b0;
    acc[j][1] = b1;
  }
  const int64_t len = L.len, xs = L.xstep;
  for (int64_t s = 0; s < L.nseg; ++s) {
    const float* xp[MP];
    for (int j = 0; j < MP; ++j) xp[j] = x[j] + L.off[s];
    for (int64_t i = 0, o = 0; i < len; ++i, o += xs) {
      const __m256 w0 = _mm256_loadu_ps(wp), w1 = _mm256_loadu_ps(wp + 8);
      wp += 16;
#pragma GCC unroll 8
      for (int j = 0; j < MP; ++j) {
        const __m256 xv = _mm256_broadcast_ss(xp[j] + o);
        acc[j][0] = _mm256_fmadd_ps(w0, xv, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(w1, xv, acc[j][1]);
      }
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) float out[MP][16];
  if (o) {  // residual: added per output before the ReLU
#pragma GCC unroll 8
    for (int j = 0; j < MP; ++j) {
      _mm256_store_ps(out[j], acc[j][0]);
      _mm256_store_ps(out[j] + 8, acc[j][1]);
    }
    for (int f = 0; f < nvalid; ++f) {
      const float* orow = o[f];
      for (int j = 0; j < MP; ++j) out[j][f] += orow[ycol[j]];
    }
#pragma GCC unroll 8
    for (int j = 0; j < MP; ++j) {
      acc[j][0] = _mm256_load_ps(out[j]);
      acc[j][1] = _mm256_load_ps(out[j] + 8);
    }
  }
  // max(0, v) with v second: NaN propagates like onnxruntime's Relu
#pragma GCC unroll 8
  for (int j = 0; j < MP; ++j) {
    _mm256_store_ps(out[j], _mm256_max_ps(zero, acc[j][0]));
    _mm256_store_ps(out[j] + 8, _mm256_max_ps(zero, acc[j][1]));
  }
  if (flags) {
    for (int j = 0; j < MP; ++j) {  // 16 channel flags: (v > 0) as bytes, OR-ed into flags[fcol[j] ...]
      const __m256i m0 = _mm256_castps_si256(_mm256_cmp_ps(_mm256_load_ps(out[j]), zero, _CMP_GT_OQ));
      const __m256i m1 = _mm256_castps_si256(_mm256_cmp_ps(_mm256_load_ps(out[j] + 8), zero, _CMP_GT_OQ));
      const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(m0, m1), 0xD8);  // 16 x int16 in order
      const __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
      const __m128i one = _mm_and_si128(b8, _mm_set1_epi8(1));
      uint8_t* fl = flags + fcol[j];
      if (nvalid == 16) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(fl),
                         _mm_or_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(fl)), one));
      } else {
        alignas(16) uint8_t tmp[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp), one);
        for (int f = 0; f < nvalid; ++f) fl[f] |= tmp[f];
      }
    }
  }
  for (int f = 0; f < nvalid; ++f) {
    float* yr = y[f];
    for (int j = 0; j < MP; ++j) yr[ycol[j]] = out[j][f];
  }
}

using PanelFn = void (*)(const float*, const float* const*, const SegLayout&, const float*, float* const*,
                         const float* const*, int,
                         const int64_t*, uint8_t*, const int64_t*) noexcept;
const PanelFn kPanel[7] = {nullptr,        &PanelTile<1>, &PanelTile<2>, &PanelTile<3>,
                           &PanelTile<4>, &PanelTile<5>, &PanelTile<6>};

}  // namespace

void PanelBlock(const PanelJob& job, const SegLayout& L) noexcept {
  const int64_t prow = L.nseg * L.len * 16;
  for (int64_t f0 = 0; f0 < job.nf; f0 += 16) {
    const int nvalid = static_cast<int>(std::min<int64_t>(16, job.nf - f0));
    const float* wp = job.wpan + (f0 / 16) * prow;
    for (int64_t j0 = 0; j0 < job.np; j0 += 6) {
      const int mp = static_cast<int>(std::min<int64_t>(6, job.np - j0));
      kPanel[mp](wp, job.x + j0, L, job.bias + f0, job.y + f0, job.o ? job.o + f0 : nullptr, nvalid, job.ycol + j0,
                 job.flags ? job.flags + f0 : nullptr, job.fcol ? job.fcol + j0 : nullptr);
    }
  }
}

}  // namespace spatial
}  // namespace oz
