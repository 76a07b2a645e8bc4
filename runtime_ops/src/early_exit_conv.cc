// EarlyExitConv kernel: see early_exit_conv.h.
#include "early_exit_conv.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <thread>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "nchwc.h"
#include "op_def.h"
#include "sparse_rows.h"

namespace oz {
namespace {

namespace S = spec::EarlyExitConv;
constexpr const char* kOp = S::kName;
constexpr int64_t kChunkRows = 96;    // rows of Col swept across the filters of a block at a time (measured: 64-128 alike)
// Negative terms by decreasing magnitude, cut into bands at these fractions of a
// filter's negative terms; inside a band, row order (so the band can be swept
// chunk by chunk over Col, which then stays in L1).
constexpr const auto& kBandEdges = spec::constants::kEarlyExitNegBandEdges;

struct RunParams {
  bool exits = false;         // X >= 0: exact stop enabled
  bool predictive = false;
  const int64_t* n_terms = nullptr;
  const float* threshold = nullptr;
  const float* other = nullptr;  // residual input (N, K, OH, OW) or nullptr
};

// A block's Col built chunk by chunk just before the first sweep reads it (so that
// sweep finds it in L1), or already complete (shared Col: cb == nullptr).
struct LazyCol {
  const sr::ColBuilder* cb = nullptr;
  float* col = nullptr;
  int64_t ld = 0, rows_per_chunk = 0, CRS = 0;
  int64_t* built = nullptr;  // rows built so far
  void Ensure(int64_t chunk_end) const {
    if (!cb) return;
    const int64_t r1 = std::min(CRS, chunk_end * rows_per_chunk);
    if (r1 > *built) {
      cb->Build(*built, r1, col + *built * ld);
      *built = r1;
    }
  }
};

// Exact mode: acc[0..8*NV) += sum_e val[e] * W[idx[e]][0..8*NV) for one output position (its
// nonzero inputs val at rows idx) and one chunk of 8*NV filters (wc: rows of 8*NV floats). S
// accumulator sets take alternate entries so that small chunks still have >= 4 FMA chains.
template <int NV, int S>
OZ_SR_INLINE void DotLanes(const float* wc, const float* val, const int32_t* idx, int32_t n, float* acc) {
  constexpr size_t FCP = 8 * NV;
  __m256 a[S][NV];
  OZ_SR_UNROLL for (int v = 0; v < NV; ++v) a[0][v] = _mm256_loadu_ps(acc + 8 * v);
  OZ_SR_UNROLL for (int s = 1; s < S; ++s) OZ_SR_UNROLL for (int v = 0; v < NV; ++v) a[s][v] = _mm256_setzero_ps();
  int32_t e = 0;
  for (; e + S <= n; e += S) {
    OZ_SR_UNROLL for (int s = 0; s < S; ++s) {
      const __m256 x = _mm256_broadcast_ss(val + e + s);
      const float* w = wc + static_cast<size_t>(idx[e + s]) * FCP;
      OZ_SR_UNROLL for (int v = 0; v < NV; ++v) a[s][v] = _mm256_fmadd_ps(x, _mm256_loadu_ps(w + 8 * v), a[s][v]);
    }
  }
  for (; e < n; ++e) {
    const __m256 x = _mm256_broadcast_ss(val + e);
    const float* w = wc + static_cast<size_t>(idx[e]) * FCP;
    OZ_SR_UNROLL for (int v = 0; v < NV; ++v) a[0][v] = _mm256_fmadd_ps(x, _mm256_loadu_ps(w + 8 * v), a[0][v]);
  }
  OZ_SR_UNROLL for (int s = 1; s < S; ++s) OZ_SR_UNROLL for (int v = 0; v < NV; ++v) a[0][v] = _mm256_add_ps(a[0][v], a[s][v]);
  OZ_SR_UNROLL for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + 8 * v, a[0][v]);
}

template <int NV>
void DotLanesFor(const float* wc, const float* val, const int32_t* idx, int32_t n, float* acc) {
  DotLanes<NV, (NV >= 6 ? 1 : NV >= 3 ? 2 : 4)>(wc, val, idx, n, acc);
}
using DotFn = void (*)(const float*, const float*, const int32_t*, int32_t, float*);
constexpr int kMaxNV = 12;  // 12 accumulators + a broadcast + a weight load: 14 of the 16 ymm
constexpr DotFn kDot[kMaxNV + 1] = {nullptr, DotLanesFor<1>, DotLanesFor<2>, DotLanesFor<3>, DotLanesFor<4>,
                                    DotLanesFor<5>, DotLanesFor<6>, DotLanesFor<7>, DotLanesFor<8>,
                                    DotLanesFor<9>, DotLanesFor<10>, DotLanesFor<11>, DotLanesFor<12>};
// Rows of a filter chunk's weights swept at a time: at most this many bytes (they stay in L1
// while the 8 positions of a group read them).
constexpr int64_t kChunkWeightBytes = 24 << 10;

// One pass over X for exact mode: its zeros (what the sparse path skips), the first negative value
// (refused when nonneg_input=1) and whether any value is inf or NaN (then only the sparse path,
// which multiplies them by every weight as Conv does and keeps a NaN through the ReLU, is used).
struct InputScan {
  int64_t zeros = 0, neg_at = -1;
  bool nonfinite = false;
};
InputScan ScanRange(const float* X, int64_t n) {
  InputScan s;
  const __m256 z = _mm256_setzero_ps();
  __m256 neg = z, bad = z;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(X + i), d = _mm256_sub_ps(v, v);  // d: 0, or NaN for inf / NaN
    neg = _mm256_or_ps(neg, _mm256_cmp_ps(v, z, _CMP_LT_OQ));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(d, d, _CMP_UNORD_Q));
    s.zeros += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, z, _CMP_EQ_OQ))));
  }
  bool any_neg = !_mm256_testz_ps(neg, neg);
  s.nonfinite = !_mm256_testz_ps(bad, bad);
  for (; i < n; ++i) {
    any_neg |= X[i] < 0.f;
    s.nonfinite |= !std::isfinite(X[i]);
    s.zeros += X[i] == 0.f;
  }
  if (any_neg)
    for (int64_t j = 0; j < n; ++j)
      if (X[j] < 0.f) {
        s.neg_at = j;
        break;
      }
  return s;
}
// The same over the session's pool (X may be megabytes: a serial pass would cost a visible share).
InputScan ScanInput(OrtKernelContext* ctx, const float* X, int64_t n) {
  const size_t tasks = sr::PartitionTasks(static_cast<size_t>((n + 16383) / 16384));
  std::vector<InputScan> part(tasks);
  sr::ForTasks(ctx, tasks, [&](size_t t) {
    const int64_t T = static_cast<int64_t>(tasks), ti = static_cast<int64_t>(t);
    const int64_t i0 = n * ti / T, i1 = n * (ti + 1) / T;
    part[t] = ScanRange(X + i0, i1 - i0);
    if (part[t].neg_at >= 0) part[t].neg_at += i0;
  });
  InputScan s;
  for (const InputScan& p : part) {
    s.zeros += p.zeros;
    s.nonfinite |= p.nonfinite;
    if (s.neg_at < 0) s.neg_at = p.neg_at;
  }
  return s;
}

struct EarlyExitKernel {
  ConvAttrs attrs;
  std::vector<int64_t> w_shape;
  int64_t K = 0, CRS = 0, nch = 1, kce = kChunkRows;
  bool predictive = false;
  int nonneg = 1;
  int skip_zeros = -1;  // exact mode: 1 sparse path, 0 dense path, -1 by the cost model (SparsePays)
  bool has_other = false;  // input 5 `other`: a residual site, ReLU(conv + bias + other)
  std::vector<float> bias;
  // Terms (uint16 Col row, float weight), stored in sweep order (see BuildTerms);
  // tptr: prefix sums of the filters' term counts (T_k = tptr[k+1] - tptr[k]).
  std::vector<uint16_t> rows;
  std::vector<float> wts;
  std::vector<int64_t> tptr;   // (K+1)
  std::vector<int64_t> npos;   // positives per filter
  // cp[(b*(nch+1) + c)*K + k]: first term (index in filter k's order) of band b
  // with a Col row in chunk c or later; c = nch: the end of band b. Band 0: positives.
  std::vector<uint32_t> cp;
  std::vector<double> edges;  // negative band edges (fractions)
  std::vector<int64_t> bstep; // chunks per piece of each band: small bands take several chunks at once
  std::vector<int64_t> pbase; // first piece of each band
  std::vector<size_t> soff;   // storage offset of (piece, filter); see BuildTerms
  int nbands = 1;             // bands incl. the positive one
  // Exact mode: weights packed per (group, filter chunk) as CRS rows of fcp = 8*nv floats (filters
  // past the group's end are zero), wpack[((grp*nfc + chunk)*CRS + r)*fcp + l].
  int64_t nv = 1, fcp = 8, nfc = 1;
  gemm::AlignedFloats wpack;  // 64-byte aligned: no weight load of the dot straddles two cache lines
  // exact mode's dense path: MLAS's direct convolution where it serves the shape (what
  // onnxruntime's own Conv runs), else the packed GEMM core; bias included
  nchwc::Filters direct;
  gemm::ConvWeights dense;

  EarlyExitKernel() = default;  // for the standalone benchmark harness
  explicit EarlyExitKernel(const OrtKernelInfo* info) {
    attrs = ReadConvAttrs(info, kOp);
    const std::string mode = AttrString(info, "mode", S::kModeDefault);
    if (mode != "exact" && mode != "predictive")
      Fail(kOp, Msg("attribute 'mode' is '", mode, "', expected 'exact' or 'predictive'"));
    predictive = mode == "predictive";
    const int64_t nn = AttrInt(info, "nonneg_input", predictive ? 0 : 1);
    if (nn != 0 && nn != 1) Fail(kOp, Msg("attribute 'nonneg_input' is ", nn, ", expected 0 or 1"));
    nonneg = static_cast<int>(nn);
    const int64_t sz = AttrInt(info, "skip_zeros", S::kSkipZerosDefault);
    if (sz < -1 || sz > 1) Fail(kOp, Msg("attribute 'skip_zeros' is ", sz, ", expected -1 (auto), 0 or 1"));
    skip_zeros = static_cast<int>(sz);
    const bool has_n = sr::InputPresent(info, S::kNTerms), has_t = sr::InputPresent(info, S::kThreshold);
    if (predictive && !(has_n && has_t))
      Fail(kOp, Msg("mode 'predictive' needs inputs 'n_terms' (3) and 'threshold' (4), expected both, got ",
                    has_n ? "'n_terms' only" : has_t ? "'threshold' only" : "neither"));
    if (!predictive && (has_n || has_t))
      Fail(kOp, "inputs 'n_terms' / 'threshold' are only used in mode 'predictive', expected none in mode 'exact'");

    ConstTensor w = RequireConstInput(info, S::kW, kOp, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    CheckWeightShape(attrs, w.shape, kOp);
    w_shape = w.shape;
    K = w.shape[0];
    CRS = w.shape[1] * w.shape[2] * w.shape[3];
    if (CRS > 65536)
      Fail(kOp, Msg("input 'W' has a reduction length C/group*KH*KW = ", CRS, ", expected at most 65536"));
    bias.assign(K, 0.f);
    if (sr::InputPresent(info, S::kB)) {
      ConstTensor b = RequireConstInput(info, S::kB, kOp, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (b.shape.size() != 1 || b.shape[0] != K) Fail(kOp, Msg("input 'B' has shape ", ShapeStr(b.shape), ", expected (", K, ",)"));
      std::copy(b.as<float>(), b.as<float>() + K, bias.begin());
    }

    has_other = sr::InputPresent(info, S::kOther);

    BuildTerms(w.as<float>());
    PackWeights(w.as<float>());
    direct = nchwc::Filters(w.as<float>(), bias.data(), K, w.shape[1] * attrs.group, w.shape[2], w.shape[3], attrs.group);
    if (!direct.ok())
      dense = gemm::ConvWeights(w.as<float>(), bias.data(), K, w.shape[1], w.shape[2], w.shape[3], attrs.group);
  }

  // Filter chunks of at most 12 ymm, fewer when a chunk's weights would not stay in L2 (every
  // position of a block re-reads them).
  void PackWeights(const float* W) {
    const int64_t G = attrs.group, Kg = K / G, kg8 = (Kg + 7) / 8;
    const int64_t l2_floats = (int64_t{512} << 10) / 4;
    const int64_t nv_max = std::max<int64_t>(1, std::min<int64_t>(kMaxNV, l2_floats / std::max<int64_t>(1, CRS * 8)));
    nfc = (kg8 + nv_max - 1) / nv_max;
    nv = (kg8 + nfc - 1) / nfc;
    fcp = 8 * nv;
    const size_t wn = static_cast<size_t>(G * nfc * CRS * fcp);
    wpack = gemm::AllocFloats(wn);
    std::fill(wpack.get(), wpack.get() + wn, 0.f);
    for (int64_t grp = 0; grp < G; ++grp)
      for (int64_t c = 0; c < nfc; ++c)
        for (int64_t l = 0; l < fcp && c * fcp + l < Kg; ++l) {
          const float* wk = W + (grp * Kg + c * fcp + l) * CRS;
          float* dst = wpack.get() + static_cast<size_t>((grp * nfc + c) * CRS) * fcp + l;
          for (int64_t r = 0; r < CRS; ++r) dst[r * fcp] = wk[r];
        }
  }

  // The term lists and band / chunk offsets, from the dense weights (K, C/group, KH, KW).
  void BuildTerms(const float* W) {
    // Term lists: positives in row order, then the negative bands (decreasing
    // magnitude), each in row order; chunk offsets of every band.
    kce = kChunkRows;
    nch = (CRS + kce - 1) / kce;
    tptr.assign(K + 1, 0);
    npos.assign(K, 0);
    edges.assign(std::begin(kBandEdges), std::end(kBandEdges));
    nbands = static_cast<int>(edges.size());  // (edges-1) negative bands + the positive band
    cp.assign(static_cast<size_t>(nbands * (nch + 1) * K), 0);
    rows.reserve(static_cast<size_t>(K * CRS) + 2);
    wts.reserve(static_cast<size_t>(K * CRS) + 2);
    std::vector<int64_t> neg, band;
    for (int64_t k = 0; k < K; ++k) {
      const float* wk = W + k * CRS;
      const int64_t start = static_cast<int64_t>(rows.size());
      auto emit = [&](int bi, const std::vector<int64_t>& rs) {  // rs sorted by row
        auto at = [&](int64_t ci) -> uint32_t& { return cp[static_cast<size_t>((bi * (nch + 1) + ci) * K + k)]; };
        int64_t ci = 0;
        for (int64_t r : rs) {
          while (ci <= r / kce) at(ci++) = static_cast<uint32_t>(rows.size() - start);
          rows.push_back(static_cast<uint16_t>(r));
          wts.push_back(wk[r]);
        }
        while (ci <= nch) at(ci++) = static_cast<uint32_t>(rows.size() - start);
      };
      band.clear();
      for (int64_t r = 0; r < CRS; ++r)
        if (wk[r] > 0.f) band.push_back(r);
      npos[k] = static_cast<int64_t>(band.size());
      emit(0, band);
      neg.clear();
      for (int64_t r = 0; r < CRS; ++r)
        if (wk[r] < 0.f) neg.push_back(r);
      std::stable_sort(neg.begin(), neg.end(), [&](int64_t a, int64_t b) { return wk[a] < wk[b]; });
      const int64_t nn = static_cast<int64_t>(neg.size());
      for (int bi = 0; bi + 1 < nbands; ++bi) {
        const int64_t lo = static_cast<int64_t>(std::floor(edges[bi] * nn + 0.5));
        const int64_t hi = static_cast<int64_t>(std::floor(edges[bi + 1] * nn + 0.5));
        band.assign(neg.begin() + lo, neg.begin() + hi);
        std::sort(band.begin(), band.end());
        emit(bi + 1, band);
      }
      tptr[k + 1] = static_cast<int64_t>(rows.size());
    }
    // A band with few terms per chunk is swept several chunks at a time, so that a
    // filter's piece has ~32 terms (the per-piece cost is then small).
    bstep.assign(nbands, 1);
    for (int bi = 0; bi < nbands; ++bi) {
      const uint32_t* first = cp.data() + static_cast<size_t>(bi * (nch + 1)) * K;
      const uint32_t* last = first + static_cast<size_t>(nch) * K;
      double terms = 0;
      for (int64_t k = 0; k < K; ++k) terms += double(last[k]) - double(first[k]);
      const double per_chunk = terms / double(K * nch);
      bstep[bi] = std::max<int64_t>(1, std::min<int64_t>(nch, static_cast<int64_t>(std::ceil(32.0 / std::max(per_chunk, 1e-9)))));
    }
    // Store the terms in the order the kernel reads them: band by band, piece by
    // piece (bstep chunks), filter by filter inside a piece, so that every task
    // streams them sequentially. soff[(pbase[b] + piece)*K + k]: where filter k's
    // terms of that piece start; tptr / cp keep indices in each filter's own order.
    pbase.assign(nbands + 1, 0);
    for (int bi = 0; bi < nbands; ++bi) pbase[bi + 1] = pbase[bi] + (nch + bstep[bi] - 1) / bstep[bi];
    soff.assign(static_cast<size_t>(pbase[nbands] * K + 1), 0);
    std::vector<uint16_t> srows(rows.size() + 2, 0);
    std::vector<float> swts(wts.size() + 2, 0.f);
    size_t at = 0;
    for (int bi = 0; bi < nbands; ++bi) {
      const int64_t step = bstep[bi];
      for (int64_t c = 0, pc = pbase[bi]; c < nch; c += step, ++pc) {
        const uint32_t* cp0 = cp.data() + static_cast<size_t>((bi * (nch + 1) + c) * K);
        const uint32_t* cp1 = cp.data() + static_cast<size_t>((bi * (nch + 1) + std::min(nch, c + step)) * K);
        for (int64_t k = 0; k < K; ++k) {
          soff[static_cast<size_t>(pc * K + k)] = at;
          for (uint32_t j = cp0[k]; j < cp1[k]; ++j, ++at) {
            srows[at] = rows[static_cast<size_t>(tptr[k] + j)];
            swts[at] = wts[static_cast<size_t>(tptr[k] + j)];
          }
        }
      }
    }
    soff.back() = at;
    rows.swap(srows);  // + 2 entries of slack: the 2-term loads never read past a piece, kept for safety
    wts.swap(swts);
  }

  // Whether any lane is still running: valid, not killed, and (if `exit_check`) > 0.
  template <int NA>
  static OZ_SR_INLINE bool AnyAlive(const __m256 (&a)[NA], const __m256 (&live)[NA], bool exit_check) {
    __m256 any = _mm256_setzero_ps();
    const __m256 z = _mm256_setzero_ps();
    OZ_SR_UNROLL for (int i = 0; i < NA; ++i) {
      const __m256 m = exit_check ? _mm256_and_ps(live[i], _mm256_cmp_ps(a[i], z, _CMP_NLE_UQ)) : live[i];
      any = _mm256_or_ps(any, m);
    }
    return !_mm256_testz_ps(any, any);
  }

  // One block of positions x filters [k0, k1): every band swept chunk by chunk over
  // Col (chunk-outer, filter-inner); a filter's accumulators and live-lane masks sit
  // in tile / livebuf between its pieces. Returns the MACs done.
  template <int NA>
  int64_t Item(const ConvGeom& g, const RunParams& rp, float* Y, int64_t n, int64_t p0, int np, int64_t k0,
               int64_t k1, const float* colp, const LazyCol& lazy, float* tile, float* livebuf, int64_t* state) const {
    constexpr int LD = 8 * NA;
    const sr::StridedRows col{colp, LD};  // row stride a compile-time constant: a shift
    const int64_t Kb = k1 - k0, P = g.P();
    const size_t cstride = static_cast<size_t>(nch + 1);
    // state per filter: [0] terms done (-1 = still running), [1] threshold point N (or -1: none / done)
    int64_t* done = state;
    int64_t* thr_at = state + Kb;
    __m256 valid[NA];
    sr::ValidMask(valid, np);
    int64_t running = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = k - k0;
      sr::FillBias<NA>(tile + i * LD, bias[k], rp.other ? rp.other + (n * g.K + k) * P + p0 : nullptr, np);
      float* lv = livebuf + i * LD;
      OZ_SR_UNROLL for (int v = 0; v < NA; ++v) _mm256_store_ps(lv + 8 * v, valid[v]);
      done[i] = -1;
      thr_at[i] = rp.predictive ? std::min(rp.n_terms[k], tptr[k + 1] - tptr[k]) : -1;
      ++running;
    }
    // Applies the threshold (at thr_at) and/or the exact stop check to filter i with
    // `j` terms done; returns true when the filter stops.
    auto checks = [&](int64_t i, int64_t k, int64_t j, __m256 (&a)[NA], __m256 (&live)[NA], bool exit_check) {
      if (thr_at[i] == j) {
        thr_at[i] = -1;
        const __m256 th = _mm256_set1_ps(rp.threshold[k]);
        OZ_SR_UNROLL for (int v = 0; v < NA; ++v)
          live[v] = _mm256_andnot_ps(_mm256_cmp_ps(a[v], th, _CMP_LT_OQ), live[v]);
        if (!AnyAlive(a, live, false)) return true;
      }
      return exit_check && !AnyAlive(a, live, true);
    };
    auto stop = [&](int64_t i, int64_t j) {
      done[i] = j;
      --running;
    };
    // Threshold at N = 0: before any term.
    for (int64_t k = k0; k < k1 && rp.predictive; ++k) {
      const int64_t i = k - k0;
      if (thr_at[i] != 0) continue;
      __m256 a[NA], live[NA];
      OZ_SR_UNROLL for (int v = 0; v < NA; ++v) a[v] = _mm256_load_ps(tile + i * LD + 8 * v), live[v] = _mm256_load_ps(livebuf + i * LD + 8 * v);
      if (checks(i, k, 0, a, live, false)) stop(i, 0);
      OZ_SR_UNROLL for (int v = 0; v < NA; ++v) _mm256_store_ps(livebuf + i * LD + 8 * v, live[v]);
    }
    for (int bi = 0; bi < nbands && running > 0; ++bi) {
      const bool exit_band = rp.exits && bi > 0;
      if (exit_band && bi == 1) {
        // all positives done: the first point where the exact stop may apply
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t i = k - k0;
          if (done[i] >= 0) continue;
          __m256 a[NA], live[NA];
          OZ_SR_UNROLL for (int v = 0; v < NA; ++v) a[v] = _mm256_load_ps(tile + i * LD + 8 * v), live[v] = _mm256_load_ps(livebuf + i * LD + 8 * v);
          if (!AnyAlive(a, live, true)) stop(i, npos[k]);
        }
      }
      const int64_t step = bstep[bi];
      for (int64_t c = 0; c < nch && running > 0; c += step) {
        const uint32_t* cp0 = cp.data() + static_cast<size_t>((bi * cstride + c) * K);
        const uint32_t* cp1 = cp.data() + static_cast<size_t>((bi * cstride + std::min(nch, c + step)) * K);
        lazy.Ensure(c + step);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t i = k - k0;
          if (done[i] >= 0) continue;
          int64_t lo = cp0[k];
          const int64_t hi = cp1[k];
          if (hi <= lo) continue;
          // term j of filter k (lo <= j < hi) is stored at soff + (j - lo)
          const size_t so = soff[static_cast<size_t>((pbase[bi] + c / step) * K + k)];
          const uint16_t* rk = rows.data() + so - lo;
          const float* wk = wts.data() + so - lo;
          float* acc = tile + i * LD;
          float* lv = livebuf + i * LD;
          const int64_t N = thr_at[i];
          const bool thr_here = N > lo && N <= hi;  // the threshold point falls in (or at the end of) this piece
          __m256 a[NA], live[NA];
          OZ_SR_UNROLL for (int v = 0; v < NA; ++v) a[v] = _mm256_load_ps(acc + 8 * v);
          if (!thr_here && !exit_band) {
            sr::FmaRowsF<NA>(a, col, rk + lo, wk + lo, static_cast<size_t>(hi - lo));
            OZ_SR_UNROLL for (int v = 0; v < NA; ++v) _mm256_store_ps(acc + 8 * v, a[v]);
            continue;
          }
          if (rp.predictive) {  // live lanes change only at a threshold; else they are the valid ones
            OZ_SR_UNROLL for (int v = 0; v < NA; ++v) live[v] = _mm256_load_ps(lv + 8 * v);
          } else {
            OZ_SR_UNROLL for (int v = 0; v < NA; ++v) live[v] = valid[v];
          }
          bool stopped = false;
          if (thr_here) {
            sr::FmaRowsF<NA>(a, col, rk + lo, wk + lo, static_cast<size_t>(N - lo));
            lo = N;
            stopped = checks(i, k, N, a, live, exit_band);
            if (stopped) stop(i, N);
            OZ_SR_UNROLL for (int v = 0; v < NA; ++v) _mm256_store_ps(lv + 8 * v, live[v]);
          }
          if (!stopped && hi > lo) {
            sr::FmaRowsF<NA>(a, col, rk + lo, wk + lo, static_cast<size_t>(hi - lo));
            if (exit_band && checks(i, k, hi, a, live, true)) stop(i, hi);
          }
          OZ_SR_UNROLL for (int v = 0; v < NA; ++v) _mm256_store_ps(acc + 8 * v, a[v]);
        }
      }
    }
    int64_t macs = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = k - k0;
      float* out = Y + (n * g.K + k) * P + p0;
      if (done[i] >= 0) {  // stopped: the output is 0
        macs += done[i] * np;
        std::fill(out, out + np, 0.f);
        continue;
      }
      const int64_t T = tptr[k + 1] - tptr[k];
      macs += T * np;
      float* acc = tile + i * LD;
      const float* lv = livebuf + i * LD;
      __m256 a[NA];
      OZ_SR_UNROLL for (int v = 0; v < NA; ++v) a[v] = _mm256_load_ps(acc + 8 * v);
      if (thr_at[i] == T && T > 0) {  // N = T: the threshold applies to the full sum
        __m256 live[NA];
        OZ_SR_UNROLL for (int v = 0; v < NA; ++v) live[v] = _mm256_load_ps(lv + 8 * v);
        const __m256 th = _mm256_set1_ps(rp.threshold[k]);
        OZ_SR_UNROLL for (int v = 0; v < NA; ++v) live[v] = _mm256_andnot_ps(_mm256_cmp_ps(a[v], th, _CMP_LT_OQ), live[v]);
        OZ_SR_UNROLL for (int v = 0; v < NA; ++v) _mm256_store_ps(acc + 8 * v, _mm256_and_ps(sr::Relu(a[v]), live[v]));
      } else {
        OZ_SR_UNROLL for (int v = 0; v < NA; ++v) _mm256_store_ps(acc + 8 * v, _mm256_and_ps(sr::Relu(a[v]), _mm256_load_ps(lv + 8 * v)));
      }
      std::copy(acc, acc + np, out);
    }
    return macs;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return Guard([&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(S::kX);
      auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
      ConvGeom g = ResolveConv(attrs, w_shape, xs, kOp);
      const int64_t N = xs[0], P = g.P();
      const float* X = x.GetTensorData<float>();
      const int64_t xnum = N * g.C * g.H * g.W;

      RunParams rp;
      rp.predictive = predictive;
      if (!predictive) {
        const InputScan sc = ScanInput(context, X, xnum);
        if (nonneg && sc.neg_at >= 0)
          Fail(kOp, Msg("input 'X' has a negative value (", X[sc.neg_at], " at flat index ", sc.neg_at,
                        "), expected a non-negative input: attribute nonneg_input=1 declares this site's input non-negative"));
        rp.other = sr::OtherInput(context, 5, has_other, g, N, kOp);
        auto y = ctx.GetOutput(0, {N, g.K, g.OH, g.OW});
        float* Y = y.GetTensorMutableData<float>();
        int64_t total = 0;
        if (N > 0 && P > 0) {
          const double zf = xnum > 0 ? double(sc.zeros) / double(xnum) : 0.0;
          const bool sparse = sc.nonfinite || skip_zeros == 1 || (skip_zeros == -1 && SparsePays(zf, g.Kg(), CRS, K * CRS));
          total = sparse ? RunExact(context, g, rp, X, Y, N) : RunDense(context, g, rp, X, Y, N);
        }
        if (ctx.GetOutputCount() > 1) *ctx.GetOutput(1, std::vector<int64_t>{}).GetTensorMutableData<int64_t>() = total;
        return;
      }
      // Non-negative input? exits need every X >= 0 (a NaN disables them); only a
      // value < 0 breaks the nonneg_input=1 declaration.
      int64_t bad_at = -1, neg_at = -1;
      {
        const __m256 z = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= xnum; i += 32) {
          __m256 m = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(X + i), z, _CMP_NGE_UQ),
                                               _mm256_cmp_ps(_mm256_loadu_ps(X + i + 8), z, _CMP_NGE_UQ)),
                                  _mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(X + i + 16), z, _CMP_NGE_UQ),
                                               _mm256_cmp_ps(_mm256_loadu_ps(X + i + 24), z, _CMP_NGE_UQ)));
          if (!_mm256_testz_ps(m, m)) break;
        }
        for (; i < xnum; ++i) {
          if (!(X[i] >= 0.f) && bad_at < 0) bad_at = i;
          if (X[i] < 0.f) { neg_at = i; break; }
          if (bad_at >= 0 && !nonneg) break;
        }
      }
      rp.exits = bad_at < 0;
      if (nonneg && neg_at >= 0)
        Fail(kOp, Msg("input 'X' has a negative value (", X[neg_at], " at flat index ", neg_at,
                      "), expected a non-negative input: attribute nonneg_input=1 declares this site's input non-negative"));
      if (predictive) {
        auto nt = ctx.GetInput(S::kNTerms);
        auto th = ctx.GetInput(S::kThreshold);
        if (!nt || !th) Fail(kOp, "mode 'predictive' needs inputs 'n_terms' and 'threshold', expected both at run time");
        auto nti = nt.GetTensorTypeAndShapeInfo();
        auto thi = th.GetTensorTypeAndShapeInfo();
        if (nti.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
          Fail(kOp, Msg("input 'n_terms' has element type ", nti.GetElementType(), ", expected int64"));
        if (thi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
          Fail(kOp, Msg("input 'threshold' has element type ", thi.GetElementType(), ", expected float"));
        if (nti.GetShape() != std::vector<int64_t>{K})
          Fail(kOp, Msg("input 'n_terms' has shape ", ShapeStr(nti.GetShape()), ", expected (", K, ",)"));
        if (thi.GetShape() != std::vector<int64_t>{K})
          Fail(kOp, Msg("input 'threshold' has shape ", ShapeStr(thi.GetShape()), ", expected (", K, ",)"));
        rp.n_terms = nt.GetTensorData<int64_t>();
        rp.threshold = th.GetTensorData<float>();
        for (int64_t k = 0; k < K; ++k) {
          if (rp.n_terms[k] < 0 || rp.n_terms[k] > CRS)
            Fail(kOp, Msg("input 'n_terms' entry ", k, " is ", rp.n_terms[k], ", expected a value in [0, ", CRS,
                          "] (C/group*KH*KW)"));
          if (std::isnan(rp.threshold[k]))
            Fail(kOp, Msg("input 'threshold' entry ", k, " is NaN, expected a number (+-inf allowed)"));
        }
      }

      rp.other = sr::OtherInput(context, 5, has_other, g, N, kOp);
      auto y = ctx.GetOutput(0, {N, g.K, g.OH, g.OW});
      float* Y = y.GetTensorMutableData<float>();
      const int64_t total_macs = (N > 0 && P > 0) ? Run(context, g, rp, X, Y, N) : 0;
      if (ctx.GetOutputCount() > 1) {
        auto m = ctx.GetOutput(1, std::vector<int64_t>{});
        *m.GetTensorMutableData<int64_t>() = total_macs;
      }
    });
  }

  // The sparse path's time relative to the dense path's, fitted on CPU-time measurements (one
  // thread, 3x3 layers with 16-256 filters at 50-95 % zeros, against MLAS's direct convolution;
  // docs/design-early-exit.md): about 1.65 x the nonzero fraction for the multiply-adds, plus
  // 0.15 + 15/Kg for listing the nonzero inputs (shared by fewer filters when Kg is small), plus
  // 16/CRS for starting and storing each output (a 1x1 conv on 32 channels: 3.2x onnxruntime on
  // the sparse path, 1.6x on the dense one). Weights past ~768 KiB do not stay in L2 while the
  // sparse path sweeps them once per 8 positions (3.0x onnxruntime on 256x14x14): dense then.
  static bool SparsePays(double zero_fraction, int64_t Kg, int64_t CRS, int64_t weights) {
    if (weights * 4 > (int64_t{768} << 10)) return false;
    return 1.65 * (1.0 - zero_fraction) + 0.15 + 15.0 / double(Kg) + 16.0 / double(CRS) < 1.0;
  }

  // Exact mode, dense path: every term of every output. At a residual site the shortcut is added
  // and the ReLU applied in a second pass (sr::AddRelu keeps a NaN of `other`, as onnxruntime's
  // Add+Relu do; the fused ReLUs would turn it into 0). Returns the MACs done.
  int64_t RunDense(OrtKernelContext* context, const ConvGeom& g, const RunParams& rp, const float* X, float* Y,
                   int64_t N) const {
    int64_t macs;
    if (direct.ok()) {
      nchwc::RunOptions opt;
      opt.relu = rp.other == nullptr;
      macs = nchwc::RunConv(context, g, direct, X, N, Y, opt);
    } else {
      const gemm::ConvPlan plan(g, dense);
      gemm::Epilogue ep;
      ep.relu = rp.other == nullptr;
      macs = gemm::RunConv(context, plan, dense, X, N, Y, ep);
    }
    if (rp.other) sr::AddRelu(context, Y, rp.other, N * g.K * g.P());
    return macs;
  }

  // Exact mode (see the header): per block of 8 output positions, the nonzero inputs of each
  // position are listed once; every filter chunk then multiplies only those. Returns the MACs done.
  int64_t RunExact(OrtKernelContext* context, const ConvGeom& g, const RunParams& rp, const float* X, float* Y,
                   int64_t N) const {
    const int64_t P = g.P(), G = g.G, Kg = g.Kg();
    sr::PaddedInput pi;  // always the padded copy: 8 lanes are read at once past a row's end
    if (!sr::BuildPaddedInput(context, g, X, N, &pi, false)) Fail(kOp, "out of memory for the padded input copy");
    const int64_t R8 = (CRS + 7) / 8 * 8;
    // Offset of reduction row r = (c, kh, kw) in the padded, stride-phase-split input: output
    // columns ow0..ow0+7 of output row oh read 8 consecutive floats at base(oh, ow0) + roff[r].
    std::vector<int64_t> roff(static_cast<size_t>(CRS));
    for (int64_t r = 0; r < CRS; ++r) {
      const int64_t c = r / (g.KH * g.KW), kh = r / g.KW % g.KH, tap = r % g.KW * g.DW;
      roff[static_cast<size_t>(r)] = c * pi.chan + kh * g.DH * pi.row + tap % pi.SW * pi.Wq + tap / pi.SW;
    }
    const int64_t rc = std::max<int64_t>(8, std::min<int64_t>(R8, kChunkWeightBytes / 4 / fcp / 8 * 8));
    const int64_t nrc = (R8 + rc - 1) / rc;
    const int64_t gw = (g.OW + 7) / 8, ngr = g.OH * gw;  // groups of <= 8 positions in one output row
    const size_t items = static_cast<size_t>(N * G * ngr);
    const size_t tasks = sr::PartitionTasks(items);
    std::vector<int64_t> task_macs(tasks, 0);
    std::atomic<bool> oom{false};
    const DotFn dot = kDot[nv];
    sr::ForTasks(context, tasks, [&](size_t t) {
      float* val = sr::Scratch(0, static_cast<size_t>(8 * R8));
      int32_t* idx = reinterpret_cast<int32_t*>(sr::Scratch(1, static_cast<size_t>(8 * R8)));
      float* tile = sr::Scratch(2, static_cast<size_t>(8 * fcp + 8 * (nrc + 1)));  // [j][fcp] sums, then bnd
      if (!val || !idx || !tile) {
        oom = true;
        return;
      }
      int32_t* bnd = reinterpret_cast<int32_t*>(tile + 8 * fcp);
      int64_t macs = 0;
      for (size_t it = t * items / tasks; it < (t + 1) * items / tasks; ++it) {
        const int64_t gi = static_cast<int64_t>(it) % ngr, grp = static_cast<int64_t>(it) / ngr % G;
        const int64_t n = static_cast<int64_t>(it) / ngr / G;
        const int64_t oh = gi / gw, ow0 = gi % gw * 8, p0 = oh * g.OW + ow0;
        const int n8 = static_cast<int>(std::min<int64_t>(8, g.OW - ow0));
        const __m256i lanes = sr::LaneMask(n8);
        const float* base = pi.data + (n * g.C + grp * g.Cg()) * pi.chan + oh * g.SH * pi.row + ow0;
        int32_t cnt[8];
        sr::CompactLanes8([&](int64_t r) { return base + roff[static_cast<size_t>(r)]; }, CRS, n8, rc, val, idx, R8,
                          cnt, bnd);
        for (int j = 0; j < n8; ++j) macs += int64_t{cnt[j]} * Kg;
        for (int64_t c = 0; c < nfc; ++c) {
          const int64_t k0 = grp * Kg + c * fcp, kn = std::min(fcp, Kg - c * fcp);
          const float* wc = wpack.get() + static_cast<size_t>((grp * nfc + c) * CRS) * fcp;
          // tile[j][l] = bias + other of filter k0+l at position j: 8x8 blocks of `other`
          // (8 filters x the group's 8 positions) transposed into the position-major tile
          for (int64_t v = 0; v < fcp; v += 8) {
            __m256 t[8];
            for (int l = 0; l < 8; ++l)
              t[l] = (rp.other && v + l < kn)
                         ? _mm256_maskload_ps(rp.other + (n * g.K + k0 + v + l) * P + p0, lanes)
                         : _mm256_setzero_ps();
            Transpose8(t);
            __m256 b = _mm256_setzero_ps();
            if (v < kn) b = _mm256_maskload_ps(bias.data() + k0 + v, sr::LaneMask(static_cast<int>(std::min<int64_t>(8, kn - v))));
            for (int j = 0; j < 8; ++j) _mm256_store_ps(tile + j * fcp + v, _mm256_add_ps(t[j], b));
          }
          for (int64_t q = 0; q < nrc; ++q)
            for (int j = 0; j < n8; ++j) {
              const int32_t e0 = bnd[j * (nrc + 1) + q], e1 = bnd[j * (nrc + 1) + q + 1];
              if (e1 > e0) dot(wc, val + j * R8 + e0, idx + j * R8 + e0, e1 - e0, tile + j * fcp);
            }
          for (int64_t v = 0; v < kn; v += 8) {  // back to filter-major: 8x8 transposes
            __m256 t[8];
            for (int j = 0; j < 8; ++j) t[j] = _mm256_load_ps(tile + j * fcp + v);
            Transpose8(t);
            for (int l = 0; l < 8 && v + l < kn; ++l)
              _mm256_maskstore_ps(Y + (n * g.K + k0 + v + l) * P + p0, lanes, sr::Relu(t[l]));
          }
        }
      }
      task_macs[t] = macs;
    });
    if (oom) Fail(kOp, "out of memory for the per-thread scratch buffers");
    return std::accumulate(task_macs.begin(), task_macs.end(), int64_t{0});
  }

  // Predictive mode's kernel (inputs already validated); returns the MACs done.
  int64_t Run(OrtKernelContext* context, const ConvGeom& g, const RunParams& rp, const float* X, float* Y,
              int64_t N) const {
    const int64_t P = g.P(), G = g.G, Kg = g.Kg();
    // The block's full Col is built once (it stays in L2) and swept once per band.
    sr::PaddedInput pi;
    if (!sr::BuildPaddedInput(context, g, X, N, &pi)) Fail(kOp, "out of memory for the padded input copy");
    // Blocks of up to 64 positions; a block's Col (CRS rows) is swept chunk by chunk.
    const int64_t max_bs = sr::kMaxTP;
    const sr::PosBlocks pb = sr::ChoosePosBlocks(P, max_bs);
    const int64_t base = N * G * pb.count;
    const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
    // Filter blocks of at most 256 filters (tile + live masks: 2 x 64 KiB, in L2); enough
    // of them for two tasks per thread when there are few position blocks (every filter
    // block sweeps the block's Col once per band: more blocks, more Col traffic).
    const int64_t per_thread = 2;
    int64_t nkb = std::max<int64_t>((Kg + 255) / 256, std::min<int64_t>((Kg + 15) / 16, (per_thread * hw + base - 1) / base));
    nkb = std::max<int64_t>(1, std::min(nkb, Kg));
    const int64_t kbs = (Kg + nkb - 1) / nkb;
    nkb = (Kg + kbs - 1) / kbs;
    const size_t blk_floats = static_cast<size_t>(CRS) * 8 * ((pb.bs + 7) / 8) + 8;
    // Few position blocks split over filter blocks: build their Col once, shared.
    float* shared = nullptr;
    if (nkb > 1 && static_cast<size_t>(base) * blk_floats <= (size_t{64} << 20) / sizeof(float)) {
      shared = sr::Scratch(2, static_cast<size_t>(base) * blk_floats);
      if (!shared) Fail(kOp, "out of memory for the im2col buffer");
      const int64_t rc = 256, nrc = (CRS + rc - 1) / rc;
      const size_t citems = static_cast<size_t>(base * nrc);
      const size_t ctasks = sr::PartitionTasks(citems);
      sr::ForTasks(context, ctasks, [&](size_t t) {
        for (size_t it = t * citems / ctasks; it < (t + 1) * citems / ctasks; ++it) {
          const int64_t bi = static_cast<int64_t>(it) / nrc, rci = static_cast<int64_t>(it) % nrc;
          const int64_t b = bi % pb.count, grp = (bi / pb.count) % G, n = bi / pb.count / G;
          const int np = pb.size(b), ld = 8 * ((np + 7) / 8);
          sr::ColBuilder cb(g, pi, pi.data + (n * g.C + grp * g.Cg()) * pi.chan, pb.begin(b), np, ld);
          const int64_t r0 = rci * rc, r1 = std::min(CRS, r0 + rc);
          cb.Build(r0, r1, shared + bi * blk_floats + r0 * ld);
        }
      });
    }
    const size_t items = static_cast<size_t>(base * nkb);
    const size_t tasks = sr::PartitionTasks(items);
    std::vector<int64_t> task_macs(tasks, 0);
    std::atomic<bool> oom{false};
    sr::ForTasks(context, tasks, [&](size_t t) {
      const size_t i0 = t * items / tasks, i1 = (t + 1) * items / tasks;
      float* tile = sr::Scratch(0, static_cast<size_t>(kbs) * sr::kMaxTP);
      float* livebuf = sr::Scratch(1, static_cast<size_t>(kbs) * sr::kMaxTP + 4 * static_cast<size_t>(kbs));
      float* own = shared ? nullptr : sr::Scratch(2, blk_floats);
      if (!tile || !livebuf || (!shared && !own)) {
        oom = true;
        return;
      }
      int64_t built = -1, built_rows = 0, macs = 0;
      for (size_t it = i0; it < i1; ++it) {
        int64_t rem = static_cast<int64_t>(it);
        const int64_t kbi = rem % nkb; rem /= nkb;
        const int64_t bi = rem;  // (n*G + grp)*count + b
        const int64_t b = rem % pb.count; rem /= pb.count;
        const int64_t grp = rem % G, n = rem / G;
        const int64_t k0 = grp * Kg + kbi * kbs, k1 = std::min(grp * Kg + Kg, k0 + kbs);
        const int64_t p0 = pb.begin(b);
        const int np = pb.size(b), LD = 8 * ((np + 7) / 8);
        int64_t* state = reinterpret_cast<int64_t*>(livebuf + kbs * sr::kMaxTP);
        // Own Col: built lazily, chunk by chunk, by the first item of this block
        // (kept for the following items of the same block in this task).
        const sr::ColBuilder cb(g, pi, pi.data + (n * g.C + grp * g.Cg()) * pi.chan, p0, np, LD);
        LazyCol lazy;
        const float* col;
        if (shared) {
          col = shared + bi * blk_floats;
        } else {
          if (built != bi) {
            built = bi;
            built_rows = 0;
          }
          lazy = LazyCol{&cb, own, LD, kce, CRS, &built_rows};
          col = own;
        }
        switch (LD / 8) {
#define OZ_EE_CASE(na) \
  case na: macs += Item<na>(g, rp, Y, n, p0, np, k0, k1, col, lazy, tile, livebuf, state); break;
          OZ_EE_CASE(1) OZ_EE_CASE(2) OZ_EE_CASE(3) OZ_EE_CASE(4)
          OZ_EE_CASE(5) OZ_EE_CASE(6) OZ_EE_CASE(7) OZ_EE_CASE(8)
#undef OZ_EE_CASE
          default: break;
        }
      }
      task_macs[t] = macs;
    });
    if (oom) Fail(kOp, "out of memory for the per-thread scratch buffers");
    return std::accumulate(task_macs.begin(), task_macs.end(), int64_t{0});
  }

};

}  // namespace

const OrtCustomOp* EarlyExitConvOp() {
  static ConvOpDef<EarlyExitKernel> op(S::kName, S::kInputs);
  return &op;
}

}  // namespace oz
