// SpatialConv on MLAS's NCHWc kernels: see spatial_nchwc.h for the design.
#include "spatial_nchwc.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "simd.h"
#include "spatial_conv.h"

namespace oz {
namespace spatial {
namespace {

constexpr unsigned kAccumulate = 1, kAddBias = 2;  // MLAS_CONV_KERNEL_FLAG_*
constexpr int64_t kFilterSet = 4;                  // filter blocks per kernel call (the kernels' maximum)
// Below these a pool dispatch costs more than it saves (spinning off): the same rules as nchwc.cc.
constexpr int64_t kMinParallelMacs = 1500000;
constexpr int64_t kMinTaskMacs = 250000;
constexpr int64_t kMinParallelFloats = 1 << 18;
// A patch row runs speculatively dense when this share (%) of the previous one's (patch, block) pairs
// qualified for MLAS in phase 2.
constexpr int64_t kSpecPercent = 85;
// RunNchwc declines a run (run.may_decline) when fewer of the probed pairs qualify (see the probe).
constexpr int64_t kProbePercent = 50;

// dst[w][B] (w < W, 8 channels at lane offset h) <- 8 NCHW rows src + c*plane.
void RowToBlocked8(const float* src, int64_t plane, int64_t W, float* dst, int64_t B) {
  int64_t w = 0;
  for (; w + 8 <= W; w += 8) {
    __m256 r[8];
    for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(src + c * plane + w);
    Transpose8(r);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (w + j) * B, r[j]);
  }
  for (; w < W; ++w)
    for (int c = 0; c < 8; ++c) dst[w * B + c] = src[c * plane + w];
}

// 8 rows dst + c*ld (n floats each) <- src[n][B] lanes h..h+7 (the transpose back).
void BlockedToRows8(const float* src, int64_t B, int64_t n, float* dst, int64_t ld) {
  int64_t w = 0;
  for (; w + 8 <= n; w += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + (w + j) * B);
    Transpose8(r);
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(dst + c * ld + w, r[c]);
  }
  for (; w < n; ++w)
    for (int c = 0; c < 8; ++c) dst[c * ld + w] = src[w * B + c];
}

using PadScratch = gemm::GrowableFloats;  // the run's padded NCHWc input, kept by the calling thread

struct Run {
  int64_t j0, j1, b0, b1;  // patches [j0, j1), filter blocks [b0, b1) of the set
};

struct TaskScratch {
  std::vector<Run> runs;
  std::vector<float> F, R, T;
  std::vector<uint32_t> bits;
  std::vector<uint8_t> full, hm;
  std::vector<int32_t> ks;
  std::vector<const float*> xs;
  std::vector<int64_t> cols;
};

}  // namespace

bool NchwcServes(const nchwc::Filters& f, const ConvGeom& g) {
  return f.ok() && !f.NchwInput() && f.Row(0) != nullptr && g.G == 1 && g.C == f.C() && g.K == f.K();
}

int64_t RunNchwc(OrtKernelContext* ctx, const NchwcRun& run) {
  const ConvGeom& g = *run.g;
  const nchwc::Filters& f = *run.f;
  const int p = run.p;
  const int64_t N = run.N, B = f.Block(), C = g.C, K = g.K, Cb = C / B, Kb = K / B;
  const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW, P = OH * OW, KS = g.KH * g.KW, R = C * KS;
  const int64_t Hp = H + g.PT + g.PB, Wp = W + g.PL + g.PR, plane = Hp * Wp * B;
  const int64_t PH = (OH + p - 1) / p, PW = (OW + p - 1) / p;
  const int64_t sets = (Kb + kFilterSet - 1) / kFilterSet;
  const uint8_t* mask = run.mask;
  const bool tiny = N * K * P * R < kMinParallelMacs;
  auto parallel = [&](size_t n, auto&& fn) {
    if (tiny)
      for (size_t i = 0; i < n; ++i) fn(i);
    else
      ParallelFor(ctx, n, fn);
  };

  // --- the padded NCHWc input (from NCHW X by 8x8 transposes, or row copies of a blocked X)
  static thread_local PadScratch pad;
  float* xp = pad.Floats(static_cast<size_t>(N * Cb * plane));
  {
    const int64_t units = N * Cb;
    auto pack = [&](size_t u) {
      const int64_t n = static_cast<int64_t>(u) / Cb, ib = static_cast<int64_t>(u) % Cb;
      float* dst = xp + (n * Cb + ib) * plane;
      std::memset(dst, 0, sizeof(float) * g.PT * Wp * B);
      std::memset(dst + (g.PT + H) * Wp * B, 0, sizeof(float) * g.PB * Wp * B);
      for (int64_t ih = 0; ih < H; ++ih) {
        float* d = dst + (g.PT + ih) * Wp * B;
        std::memset(d, 0, sizeof(float) * g.PL * B);
        std::memset(d + (g.PL + W) * B, 0, sizeof(float) * g.PR * B);
        if (run.x_blocked) {
          std::memcpy(d + g.PL * B, run.X + ((n * Cb + ib) * H + ih) * W * B, sizeof(float) * W * B);
        } else {
          for (int64_t h = 0; h < B; h += 8)
            RowToBlocked8(run.X + ((n * C + ib * B + h) * H + ih) * W, H * W, W, d + g.PL * B + h, B);
        }
      }
    };
    if (N * C * H * W < kMinParallelFloats)
      for (int64_t u = 0; u < units; ++u) pack(static_cast<size_t>(u));
    else
      parallel(static_cast<size_t>(units), pack);
  }

  // A phase-2 block with at least block_min alive lanes runs on MLAS (all B lanes computed, the dead
  // ones discarded), fewer on the dot tiles (alive lanes only). A dot-tile MAC costs ~2.2 MLAS MACs
  // (perf, 64@28: 2 pixels per patch, one W row load per 2 FMAs), hence B * 0.45.
  // OZ_SPATIAL_BLOCK_MIN (lanes, read once) overrides it for measurements.
  static const int64_t block_min_env = [] {
    const char* e = std::getenv("OZ_SPATIAL_BLOCK_MIN");
    return e ? std::atoll(e) : int64_t{-1};
  }();
  const int64_t block_min = block_min_env >= 0 ? block_min_env : (B * 45 + 99) / 100;

  // --- the probe (run.may_decline): phase 1 of image 0's first patch row, first filter set. When
  // fewer than kProbePercent % of its (patch, block) pairs qualify for MLAS, phase 2 would run mostly
  // on the dot tiles, which are faster on the channels-last kernels' long segments: decline.
  if (run.may_decline) {
    const int64_t nb = std::min(kFilterSet, Kb), rows = std::min<int64_t>(p, OH);
    std::vector<float> T(static_cast<size_t>(nb * PW * B));
    std::vector<uint32_t> bits(static_cast<size_t>(PW * nb), 0u);
    std::vector<char> any(static_cast<size_t>(PW), 0);
    const size_t F4 = sizeof(float);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t cp = 0; cp < std::min<int64_t>(p, OW); ++cp) {
        if (!mask[r * p + cp]) continue;
        const int64_t J = (OW - cp + p - 1) / p;
        for (int64_t ib = 0; ib < Cb; ++ib) {
          const float* row = xp + ib * plane + r * g.SH * Wp * B;
          f.Kernel()(row + cp * g.SW * B, f.Data() + ib * B * B * KS, T.data(), static_cast<size_t>(p * g.SW * B) * F4,
                     static_cast<size_t>(g.DW * B) * F4, static_cast<size_t>(nb),
                     static_cast<size_t>(g.DH * Wp * B - g.KW * g.DW * B) * F4, static_cast<size_t>(B * R) * F4,
                     static_cast<size_t>(PW * B) * F4, static_cast<size_t>(g.KH), static_cast<size_t>(g.KW), row,
                     static_cast<size_t>(Wp * B) * F4, static_cast<size_t>(g.DH * Wp * B) * F4, 0,
                     static_cast<size_t>(J), 0, f.Bias(), (ib > 0 ? kAccumulate : 0u) | (ib == Cb - 1 && f.HasBias() ? kAddBias : 0u));
        }
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t j = 0; j < J; ++j) {
            any[j] = 1;
            for (int64_t i = 0; i < B; ++i) {
              const int64_t k = b * B + i, ow = j * p + cp;
              float v = T[(b * PW + j) * B + i];
              if (run.other)
                v += run.other_blocked ? run.other[(b * P + r * OW + ow) * B + i] : run.other[(k * OH + r) * OW + ow];
              if (v > 0.f) bits[j * nb + b] |= 1u << i;
            }
          }
      }
    int64_t qualify = 0;
    for (int64_t j = 0; j < PW; ++j)
      for (int64_t b = 0; b < nb; ++b) qualify += !any[j] || __builtin_popcount(bits[j * nb + b]) >= block_min;
    if (qualify * 100 < kProbePercent * PW * nb) return -1;
  }

  // --- phase 2's dot-tile layout on the padded NCHWc tensor: one segment per (input block, kernel
  // row) of KW*B floats (dilation_w 1), else per (input block, kernel row, kernel column) of B floats;
  // the order of nchwc::Filters::Row(k)
  const bool seg_rows = g.DW == 1;
  std::vector<int64_t> off;
  for (int64_t ib = 0; ib < Cb; ++ib)
    for (int64_t r = 0; r < g.KH; ++r)
      for (int64_t s = 0; s < (seg_rows ? 1 : g.KW); ++s) off.push_back(ib * plane + (r * g.DH * Wp + s * g.DW) * B);
  SegLayout L;
  L.nseg = static_cast<int64_t>(off.size());
  L.len = seg_rows ? g.KW * B : B;
  L.lpad = L.len;
  L.off = off.data();

  // --- tasks: (image, set of up to 4 filter blocks, band of patch rows)
  const int64_t units = N * sets;
  const int64_t macs_per_prow = std::max<int64_t>(1, std::min<int64_t>(K, kFilterSet * B) * p * OW * R);
  const int64_t prows_min = std::max<int64_t>(1, kMinTaskMacs / macs_per_prow);
  int64_t bands = std::max<int64_t>(
      1, std::min<int64_t>((PH + prows_min - 1) / prows_min,
                           (static_cast<int64_t>(TaskCount(static_cast<size_t>(units * PH))) + units - 1) / units));
  if (tiny) bands = 1;
  const int64_t band = (PH + bands - 1) / bands;
  const nchwc::Filters::KernelFn kernel = f.Kernel();
  const size_t F4 = sizeof(float);
  const size_t stride_w = static_cast<size_t>(p * g.SW * B) * F4, dil_w = static_cast<size_t>(g.DW * B) * F4;
  const size_t in_w = static_cast<size_t>(Wp * B) * F4, dil_in_w = static_cast<size_t>(g.DH * Wp * B) * F4;
  const size_t in_stride = dil_in_w - static_cast<size_t>(g.KW) * dil_w;
  const size_t stride_w1 = static_cast<size_t>(g.SW * B) * F4;  // speculative rows: every column
  const size_t filter_stride = static_cast<size_t>(B * R) * F4, out_stride = static_cast<size_t>(PW * B) * F4;
  const unsigned last = f.HasBias() ? kAddBias : 0u;
  std::vector<int64_t> done(static_cast<size_t>(units * bands), 0);
  std::atomic<int> dense_hint{-1};  // -1: no patch row finished yet; 1: the last one would run dense

  parallel(static_cast<size_t>(units * bands), [&](size_t t) {
    const int64_t u = static_cast<int64_t>(t) / bands, bnd = static_cast<int64_t>(t) % bands;
    const int64_t n = u / sets, fs = u % sets;
    const int64_t pi0 = bnd * band, pi1 = std::min(PH, pi0 + band);
    if (pi0 >= pi1) return;
    const int64_t ob0 = fs * kFilterSet, nb = std::min(kFilterSet, Kb - ob0), KF = nb * B, k0 = ob0 * B;
    const float* fset = f.Data() + ob0 * B * R;
    const float* bias = f.Bias() + k0;
    const float* xn = xp + n * Cb * plane;
    static thread_local TaskScratch sc;
    // F, R: this patch row of the set's channels, blocked: [b][r][OW][B] (r < p)
    const int64_t tile = KF * p * OW, brow = OW * B;
    auto fat = [&](int64_t b, int64_t r) { return (b * p + r) * brow; };
    sc.F.resize(static_cast<size_t>(tile));
    sc.T.resize(static_cast<size_t>(nb * PW * B));
    if (run.other) sc.R.resize(static_cast<size_t>(tile));
    sc.bits.resize(static_cast<size_t>(PW * nb));
    sc.full.resize(static_cast<size_t>(PW));
    sc.hm.resize(static_cast<size_t>(PW));
    float* Fp = sc.F.data();
    float* T = sc.T.data();
    float* Rp = run.other ? sc.R.data() : nullptr;
    uint32_t* bits = sc.bits.data();  // per (patch, block): the alive lanes
    int64_t count = 0;
    const __m256 zero = _mm256_setzero_ps();
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);

    // MLAS: output row oh, columns cp + p*j for j in [j0, j0 + cnt), filter blocks [b0, b0 + nbc) of
    // the set -> T[b][j][B] (+ bias)
    auto mlas = [&](int64_t oh, int64_t cp, int64_t j0, int64_t cnt, int64_t b0, int64_t nbc) {
      for (int64_t ib = 0; ib < Cb; ++ib) {
        const float* row = xn + ib * plane + oh * g.SH * Wp * B;
        kernel(row + (j0 * p + cp) * g.SW * B, fset + b0 * B * R + ib * B * B * KS, T + (b0 * PW + j0) * B, stride_w,
               dil_w, static_cast<size_t>(nbc), in_stride, filter_stride, out_stride, static_cast<size_t>(g.KH),
               static_cast<size_t>(g.KW), row, in_w, dil_in_w, 0, static_cast<size_t>(cnt), 0, bias + b0 * B,
               (ib > 0 ? kAccumulate : 0u) | (ib == Cb - 1 ? last : 0u));
      }
    };
    // T's (b, j) of row r / column phase cp -> F (+ residual, then ReLU as max(0, v): NaN stays NaN).
    // Phase 1 (flag) takes every lane and sets the alive bits; phase 2 keeps the alive lanes only (the
    // dead ones stay 0). Returns the outputs taken.
    // The source of (b, j): T (split) or D (speculative rows, below).
    const float* src = T;
    int64_t sstep = B, sblock = PW * B;
    auto take = [&](int64_t r, int64_t cp, int64_t j0, int64_t cnt, int64_t b0, int64_t nbc, bool flag) {
      int64_t taken = 0;
      for (int64_t b = b0; b < b0 + nbc; ++b)
        for (int64_t j = j0; j < j0 + cnt; ++j) {
          const float* v = src + b * sblock + j * sstep;
          const int64_t at = fat(b, r) + (j * p + cp) * B;
          uint32_t& al = bits[j * nb + b];
          const uint32_t keep = flag ? ~0u : al;
          for (int64_t h = 0; h < B; h += 8) {
            __m256 s = _mm256_loadu_ps(v + h);
            if (Rp) s = _mm256_add_ps(s, _mm256_loadu_ps(Rp + at + h));
            __m256 y = _mm256_max_ps(zero, s);
            if (flag) {
              al |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, zero, _CMP_GT_OQ))) << h;
            } else {
              const __m256i kb = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(keep >> h)), lane_bit);
              y = _mm256_and_ps(y, _mm256_castsi256_ps(_mm256_cmpeq_epi32(kb, lane_bit)));
            }
            _mm256_storeu_ps(Fp + at + h, y);
          }
          taken += flag ? B : __builtin_popcount(keep);
        }
      return taken;
    };

    const uint32_t all_lanes = B == 32 ? ~0u : (1u << B) - 1;
    // Speculative rows: when nearly every (patch, block) of the previous patch row qualified for MLAS,
    // phase 2 would compute almost all lanes anyway, so the patch row runs as dense rows (one stride-SW
    // call per row over all OW columns: MLAS's full speed, no split calls) and the prediction is applied
    // in the epilogue (the dead lanes of phase-2 positions are left 0): same outputs, same count.
    // On resnet18-mnist 84-100 % of (patch, block) pairs qualify at every site. A task's first patch
    // row follows the last patch row any task of this run finished (run-local hint; split when none
    // has yet): outputs never depend on it, only the time.
    bool spec = dense_hint.load(std::memory_order_relaxed) == 1;
    for (int64_t pi = pi0; pi < pi1; ++pi) {
      const int64_t rows = std::min<int64_t>(p, OH - pi * p), oh0 = pi * p;
      if (!spec) std::fill(Fp, Fp + tile, 0.f);  // speculative rows write every lane of F
      if (Rp) {  // the residual of this patch row, blocked like F
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t b = 0; b < nb; ++b) {
            if (run.other_blocked) {
              std::memcpy(Rp + fat(b, r), run.other + n * K * P + (ob0 + b) * B * P + (oh0 + r) * brow, F4 * brow);
            } else {
              for (int64_t h = 0; h < B; h += 8)
                RowToBlocked8(run.other + ((n * K + k0 + b * B + h) * OH + oh0 + r) * OW, P, OW, Rp + fat(b, r) + h, B);
            }
          }
      }
      std::fill(bits, bits + PW * nb, 0u);
      // a patch with no masked position in range is not predicted: computed in full
      for (int64_t j = 0; j < PW; ++j) {
        const int64_t cols = std::min<int64_t>(p, OW - j * p);
        bool any = false;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) any |= mask[r * p + c] != 0;
        sc.hm[j] = any;
        if (!any) std::fill(bits + j * nb, bits + (j + 1) * nb, all_lanes);
      }
      if (spec) {  // every row of the patch row, all columns, straight into F (take works in place)
        float* D = Fp;
        for (int64_t ib = 0; ib < Cb; ++ib)  // input blocks outside: the block's filters stay in cache
          for (int64_t r = 0; r < rows; ++r) {
            const float* row = xn + ib * plane + (oh0 + r) * g.SH * Wp * B;
            kernel(row, fset + ib * B * B * KS, D + r * brow, stride_w1, dil_w, static_cast<size_t>(nb), in_stride,
                   filter_stride, static_cast<size_t>(p * brow) * F4, static_cast<size_t>(g.KH),
                   static_cast<size_t>(g.KW), row, in_w, dil_in_w, 0, static_cast<size_t>(OW), 0, bias,
                   (ib > 0 ? kAccumulate : 0u) | (ib == Cb - 1 ? last : 0u));
          }
        sstep = p * B, sblock = p * brow;
      } else {
        src = T, sstep = B, sblock = PW * B;
      }
      // phase 1: the masked positions, every channel of the set
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t cp = 0; cp < std::min<int64_t>(p, OW); ++cp) {
          if (!mask[r * p + cp]) continue;
          const int64_t J = (OW - cp + p - 1) / p;
          if (spec)
            src = Fp + r * brow + cp * B;
          else
            mlas(oh0 + r, cp, 0, J, 0, nb);
          count += take(r, cp, 0, J, 0, nb, true);
        }
      // phase 2 on MLAS: a block of a patch qualifies with at least block_min alive lanes. Calls must be
      // long to run at MLAS's speed (one output per call is a quarter of it), so each maximal run of
      // patches with any qualifying block is one call per (row, column phase) over the range of blocks
      // qualifying anywhere in the run; cov[j] is that range (bits), the blocks phase 2 takes from MLAS.
      int64_t qualify = 0;
      for (int64_t j = 0; j < PW; ++j) {
        uint8_t fm = 0;
        for (int64_t b = 0; b < nb; ++b)
          fm |= static_cast<uint8_t>(__builtin_popcount(bits[j * nb + b]) >= block_min) << b;
        sc.full[j] = fm;
        qualify += __builtin_popcount(fm);
      }
      const bool was_spec = spec;
      spec = qualify * 100 >= kSpecPercent * PW * nb;
      dense_hint.store(spec ? 1 : 0, std::memory_order_relaxed);
      if (was_spec) {  // every lane was computed: phase 2 keeps the alive ones
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t cp = 0; cp < std::min<int64_t>(p, OW); ++cp) {
            if (mask[r * p + cp]) continue;
            const int64_t J = (OW - cp + p - 1) / p;
            src = Fp + r * brow + cp * B;
            count += take(r, cp, 0, J, 0, nb, false);
          }
        std::fill(sc.full.begin(), sc.full.begin() + PW, static_cast<uint8_t>((1u << nb) - 1));
      }
      sc.runs.clear();
      if (!was_spec) {
      for (int64_t j = 0; j < PW;) {
        if (!sc.full[j]) {
          ++j;
          continue;
        }
        int64_t j1 = j;
        unsigned any = 0;
        while (j1 < PW && sc.full[j1]) any |= sc.full[j1++];
        const int64_t lo = __builtin_ctz(any), hi = 31 - __builtin_clz(any);
        const uint8_t cov = static_cast<uint8_t>(((1u << (hi + 1)) - 1) & ~((1u << lo) - 1));
        for (int64_t q = j; q < j1; ++q) sc.full[q] = cov;
        sc.runs.push_back({j, j1, lo, hi + 1});
        j = j1;
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t cp = 0; cp < std::min<int64_t>(p, OW); ++cp) {
          if (mask[r * p + cp]) continue;
          const int64_t J = (OW - cp + p - 1) / p;
          for (const Run& rn : sc.runs) {
            const int64_t j1 = std::min(rn.j1, J);
            if (rn.j0 >= j1) continue;
            mlas(oh0 + r, cp, rn.j0, j1 - rn.j0, rn.b0, rn.b1 - rn.b0);
            count += take(r, cp, rn.j0, j1 - rn.j0, rn.b0, rn.b1 - rn.b0, false);
          }
        }
      }
      // phase 2 on the dot tiles: the alive lanes of the other blocks, per patch
      for (int64_t j = 0; j < PW; ++j) {
        sc.ks.clear();
        for (int64_t b = 0; b < nb; ++b) {
          if (sc.full[j] >> b & 1) continue;
          for (uint32_t m = bits[j * nb + b]; m; m &= m - 1)
            sc.ks.push_back(static_cast<int32_t>(b * B + __builtin_ctz(m)));
        }
        if (sc.ks.empty()) continue;
        sc.xs.clear();
        sc.cols.clear();
        const int64_t cols = std::min<int64_t>(p, OW - j * p);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            if (mask[r * p + c] && sc.hm[j]) continue;
            const int64_t oh = oh0 + r, ow = j * p + c;
            sc.xs.push_back(xn + (oh * g.SH * Wp + ow * g.SW) * B);
            sc.cols.push_back((r * OW + ow) * B);
          }
        DotJob job;
        job.k = sc.ks.data();
        job.nf = static_cast<int64_t>(sc.ks.size());
        job.w0 = f.Row(k0);
        job.wrow = R;
        job.y0 = Fp;
        job.ystride = p * brow;
        job.kblock = B;
        job.bias = bias;
        job.o0 = Rp;
        job.x = sc.xs.data();
        job.ycol = sc.cols.data();
        job.np = static_cast<int64_t>(sc.xs.size());
        DotBlock(job, L, false);
        count += job.nf * job.np;
      }
      // the patch row to Y
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t oh = oh0 + r;
        for (int64_t b = 0; b < nb; ++b) {
          if (run.y_blocked) {
            std::memcpy(run.Y + n * K * P + (ob0 + b) * B * P + oh * brow, Fp + fat(b, r), F4 * brow);
          } else {
            for (int64_t h = 0; h < B; h += 8)
              BlockedToRows8(Fp + fat(b, r) + h, B, OW, run.Y + ((n * K + k0 + b * B + h) * OH + oh) * OW, P);
          }
        }
      }
    }
    done[t] = count;
  });
  int64_t total = 0;
  for (int64_t d : done) total += d;
  return total;
}

}  // namespace spatial
}  // namespace oz
