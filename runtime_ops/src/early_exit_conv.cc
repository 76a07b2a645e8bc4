// EarlyExitConv kernel: see early_exit_conv.h.
#include "early_exit_conv.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
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

// The stop kernel's vectors per task (one image, one group): 32 x 8 output positions.
constexpr int kStopVecs = 32;
// Live lanes below this share of the active vectors' lanes: re-pack them (RunStop).
constexpr float kCompactBelow = 0.6f;

// One period of L <= 8 terms (weights w, input offsets off) for the active vectors act[0..nact) of
// the stop kernel: acc[8*i..] += sum_e w[e] * x(i, e), four vectors at a time (four independent
// FMA chains; the L broadcasts are shared by every vector of the period). Load: how vector i's 8
// inputs of term e are read (contiguous from xg + vbase[i] + off[e], or gathered per lane).
template <int L, class Load>
OZ_SR_INLINE void Period(const float* w, const int* act, int nact, float* acc, const Load& load) {
  __m256 wb[L];
  OZ_SR_UNROLL for (int e = 0; e < L; ++e) wb[e] = _mm256_broadcast_ss(w + e);
  int j = 0;
  for (; j + 4 <= nact; j += 4) {
    const int i0 = act[j], i1 = act[j + 1], i2 = act[j + 2], i3 = act[j + 3];
    __m256 a0 = _mm256_load_ps(acc + 8 * i0), a1 = _mm256_load_ps(acc + 8 * i1);
    __m256 a2 = _mm256_load_ps(acc + 8 * i2), a3 = _mm256_load_ps(acc + 8 * i3);
    OZ_SR_UNROLL for (int e = 0; e < L; ++e) {
      a0 = _mm256_fmadd_ps(wb[e], load(i0, e), a0);
      a1 = _mm256_fmadd_ps(wb[e], load(i1, e), a1);
      a2 = _mm256_fmadd_ps(wb[e], load(i2, e), a2);
      a3 = _mm256_fmadd_ps(wb[e], load(i3, e), a3);
    }
    _mm256_store_ps(acc + 8 * i0, a0), _mm256_store_ps(acc + 8 * i1, a1);
    _mm256_store_ps(acc + 8 * i2, a2), _mm256_store_ps(acc + 8 * i3, a3);
  }
  for (; j < nact; ++j) {
    const int i = act[j];
    __m256 a = _mm256_load_ps(acc + 8 * i), c = _mm256_setzero_ps();
    OZ_SR_UNROLL for (int e = 0; e < L; e += 2) {
      a = _mm256_fmadd_ps(wb[e], load(i, e), a);
      if (e + 1 < L) c = _mm256_fmadd_ps(wb[e + 1], load(i, e + 1), c);
    }
    _mm256_store_ps(acc + 8 * i, _mm256_add_ps(a, c));
  }
}
template <int L>
void StopPeriod(const float* w, const int64_t* off, const float* xg, const int64_t* vbase, const int* act, int nact,
                float* acc) {
  Period<L>(w, act, nact, acc, [&](int i, int e) { return _mm256_loadu_ps(xg + vbase[i] + off[e]); });
}
template <int L>
void GatherPeriod(const float* w, const int64_t* off, const float* xg, const int32_t* loff, const int* act, int nact,
                  float* acc) {
  Period<L>(w, act, nact, acc, [&](int i, int e) {
    return _mm256_i32gather_ps(xg + off[e], _mm256_load_si256(reinterpret_cast<const __m256i*>(loff + 8 * i)), 4);
  });
}
using StopFn = void (*)(const float*, const int64_t*, const float*, const int64_t*, const int*, int, float*);
using GatherFn = void (*)(const float*, const int64_t*, const float*, const int32_t*, const int*, int, float*);
constexpr StopFn kStopPeriod[9] = {nullptr, StopPeriod<1>, StopPeriod<2>, StopPeriod<3>, StopPeriod<4>,
                                   StopPeriod<5>, StopPeriod<6>, StopPeriod<7>, StopPeriod<8>};
constexpr GatherFn kGatherPeriod[9] = {nullptr, GatherPeriod<1>, GatherPeriod<2>, GatherPeriod<3>, GatherPeriod<4>,
                                       GatherPeriod<5>, GatherPeriod<6>, GatherPeriod<7>, GatherPeriod<8>};

using sr::RowOffsets;

struct EarlyExitKernel {
  ConvAttrs attrs;
  std::vector<int64_t> w_shape;
  int64_t K = 0, CRS = 0;
  bool predictive = false;
  int nonneg = 1;
  // exact mode: 1 sparse path (zero inputs skipped), 2 stop path (each 8-output vector stops on its own
  // once its sign-ordered partial sums prove ReLU = 0), 0 dense path, -1 by the cost model (SparsePays)
  int skip_zeros = -1;
  bool no_compaction = false;  // OZ_EE_NO_COMPACTION=1 (read once): the stop kernel without lane re-packing, to measure it
  bool has_other = false;  // input 5 `other`: a residual site, ReLU(conv + bias + other)
  std::vector<float> bias;
  // Terms of the stop kernel (reduction row, weight), filter by filter in the op's order (BuildTerms);
  // tptr: prefix sums of the filters' term counts (T_k = tptr[k+1] - tptr[k]); npos: positives.
  std::vector<int32_t> rows;
  std::vector<float> wts;
  std::vector<int64_t> tptr;   // (K+1)
  std::vector<int64_t> npos;   // positives per filter
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
    if (sz < -1 || sz > 2) Fail(kOp, Msg("attribute 'skip_zeros' is ", sz, ", expected -1 (auto), 0, 1 or 2"));
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
    static const bool no_compact_env = [] {
      const char* e = std::getenv("OZ_EE_NO_COMPACTION");
      return e && e[0] == '1';
    }();
    no_compaction = no_compact_env;

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

  // Term lists of the stop kernel (exact mode's stop path and predictive mode), from the dense
  // weights (K, C/group, KH, KW): each filter's nonzero weights in the op's order (`term_order` in
  // early_exit.py): the positives in row order, then the negatives by decreasing magnitude in
  // bands (kBandEdges), each band in row order. With x >= 0 a term's sign is its weight's sign, so
  // this one order serves every output position of the filter.
  void BuildTerms(const float* W) {
    tptr.assign(K + 1, 0);
    npos.assign(K, 0);
    rows.reserve(static_cast<size_t>(K * CRS));
    wts.reserve(static_cast<size_t>(K * CRS));
    std::vector<int32_t> neg, band;
    const size_t nb = std::size(kBandEdges);
    for (int64_t k = 0; k < K; ++k) {
      const float* wk = W + k * CRS;
      for (int64_t r = 0; r < CRS; ++r)
        if (wk[r] > 0.f) rows.push_back(static_cast<int32_t>(r)), wts.push_back(wk[r]);
      npos[k] = static_cast<int64_t>(rows.size()) - tptr[k];
      neg.clear();
      for (int64_t r = 0; r < CRS; ++r)
        if (wk[r] < 0.f) neg.push_back(static_cast<int32_t>(r));
      std::stable_sort(neg.begin(), neg.end(), [&](int32_t a, int32_t b) { return wk[a] < wk[b]; });
      const int64_t nn = static_cast<int64_t>(neg.size());
      for (size_t bi = 0; bi + 1 < nb; ++bi) {
        const int64_t lo = static_cast<int64_t>(std::floor(kBandEdges[bi] * double(nn) + 0.5));
        const int64_t hi = static_cast<int64_t>(std::floor(kBandEdges[bi + 1] * double(nn) + 0.5));
        band.assign(neg.begin() + lo, neg.begin() + hi);
        std::sort(band.begin(), band.end());
        for (int32_t r : band) rows.push_back(r), wts.push_back(wk[r]);
      }
      tptr[k + 1] = static_cast<int64_t>(rows.size());
    }
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
          // the stop path multiplies nonzero weights only: an inf / NaN input takes the sparse path, where
          // zero weights meet it as in Conv
          rp.exits = sc.neg_at < 0;
          total = sparse ? RunExact(context, g, rp, X, Y, N)
                  : skip_zeros == 2 ? RunStop(context, g, rp, X, Y, N)
                                    : RunDense(context, g, rp, X, Y, N);
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
      const int64_t total_macs = (N > 0 && P > 0) ? RunStop(context, g, rp, X, Y, N) : 0;
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
    const std::vector<int64_t> roff = RowOffsets(g, pi);
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

  // The stop kernel (exact mode's stop path, predictive mode; inputs already validated). Outputs in
  // lanes: a task takes up to kStopVecs vectors of 8 consecutive output columns of one output row
  // (one image, one group; one unaligned load of the padded, stride-phase-split input per term, at
  // base + roff[row]) and runs a block of filters over them, one filter at a time, in the filter's
  // own term order (BuildTerms). Terms go in periods of <= 8 (weights broadcast once per period, 4
  // vectors interleaved: 4 FMA chains). Once the positives are done every period ends with a check:
  // a lane is done when its sum is <= 0 (exact: only negative terms remain, x >= 0) or the threshold
  // cut it (predictive, at N = n_terms[k], where a period always ends). A vector whose lanes are all
  // done stops (dropped from the active list). When the live lanes fill less than kCompactBelow of
  // the active vectors, they are re-packed into full vectors whose loads are gathers (per-lane input
  // offsets), so one slow lane no longer holds 7 done ones. Returns the MACs done: per lane, the
  // terms computed while it sat in a vector.
  int64_t RunStop(OrtKernelContext* context, const ConvGeom& g, const RunParams& rp, const float* X, float* Y,
                  int64_t N) const {
    const int64_t P = g.P(), G = g.G, Kg = g.Kg();
    sr::PaddedInput pi;
    if (!sr::BuildPaddedInput(context, g, X, N, &pi, false)) Fail(kOp, "out of memory for the padded input copy");
    const std::vector<int64_t> roff = RowOffsets(g, pi);
    const int64_t gw = (g.OW + 7) / 8, nvt = g.OH * gw, nvb = (nvt + kStopVecs - 1) / kStopVecs;
    const int64_t base = N * G * nvb;
    const int64_t hw = static_cast<int64_t>(HardwareThreads());
    int64_t nkb = std::max<int64_t>(1, std::min<int64_t>(Kg, (4 * hw + base - 1) / base));
    const int64_t kbs = (Kg + nkb - 1) / nkb;
    nkb = (Kg + kbs - 1) / kbs;
    const size_t items = static_cast<size_t>(base * nkb);
    const size_t tasks = sr::PartitionTasks(items);
    std::vector<int64_t> task_macs(tasks, 0);
    // lane offsets are int32 from one image group's first input
    const bool compact = rp.exits && !no_compaction && g.Cg() * pi.chan < (int64_t{1} << 31) && P < (int64_t{1} << 31);
    sr::ForTasks(context, tasks, [&](size_t t) {
      constexpr int kL = kStopVecs * 8;
      alignas(32) float acc[kL];
      alignas(32) float cut[kL];       // lanes cut by the threshold, or not holding a position
      alignas(32) int32_t loff[kL];    // per lane: its first input, relative to xg
      int32_t yof[kL];                 // per lane: its output position
      int64_t vbase[kStopVecs];        // contiguous vectors: the first lane's input offset
      int act[kStopVecs];
      int64_t macs = 0;
      for (size_t it = t * items / tasks; it < (t + 1) * items / tasks; ++it) {
        int64_t rem = static_cast<int64_t>(it);
        const int64_t kb = rem % nkb; rem /= nkb;
        const int64_t vb = rem % nvb; rem /= nvb;
        const int64_t grp = rem % G, n = rem / G;
        const float* xg = pi.data + (n * g.C + grp * g.Cg()) * pi.chan;
        const int64_t v0 = vb * kStopVecs, nv = std::min<int64_t>(kStopVecs, nvt - v0);
        const int64_t k0 = grp * Kg + kb * kbs, k1 = std::min(grp * Kg + Kg, k0 + kbs);
        for (int64_t k = k0; k < k1; ++k) {
          const float* oth = rp.other ? rp.other + (n * g.K + k) * P : nullptr;
          float* yk = Y + (n * g.K + k) * P;
          const __m256 b = _mm256_set1_ps(bias[static_cast<size_t>(k)]);
          for (int64_t i = 0; i < nv; ++i) {
            const int64_t oh = (v0 + i) / gw, ow0 = (v0 + i) % gw * 8;
            const int nl = static_cast<int>(std::min<int64_t>(8, g.OW - ow0));
            vbase[i] = oh * g.SH * pi.row + ow0;
            for (int l = 0; l < 8; ++l) yof[8 * i + l] = l < nl ? static_cast<int32_t>(oh * g.OW + ow0 + l) : -1;
            const __m256i lanes = sr::LaneMask(nl);
            __m256 a = b;
            if (oth) a = _mm256_add_ps(a, _mm256_maskload_ps(oth + oh * g.OW + ow0, lanes));
            _mm256_store_ps(acc + 8 * i, a);
            _mm256_store_ps(cut + 8 * i, _mm256_xor_ps(_mm256_castsi256_ps(lanes), _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
            act[i] = static_cast<int>(i);
          }
          int nact = static_cast<int>(nv);
          bool gathered = false;
          const int32_t* tr = rows.data() + tptr[k];
          const float* tw = wts.data() + tptr[k];
          const int64_t T = tptr[k + 1] - tptr[k], np = npos[k];
          const int64_t nn = rp.predictive ? std::min(rp.n_terms[k], T) : -1;
          const __m256 th = _mm256_set1_ps(rp.predictive ? rp.threshold[k] : 0.f);
          int64_t done = 0;
          auto lanes_of = [&](int i) {
            int c = 0;
            for (int l = 0; l < 8; ++l) c += yof[8 * i + l] >= 0;
            return c;
          };
          for (;;) {
            const bool at_thr = done == nn, at_exit = rp.exits && done >= np;
            if (at_thr || at_exit) {
              int live = 0;
              for (int j = 0; j < nact;) {
                const int i = act[j];
                const __m256 a = _mm256_load_ps(acc + 8 * i);
                __m256 c = _mm256_load_ps(cut + 8 * i);
                if (at_thr) {
                  c = _mm256_or_ps(c, _mm256_cmp_ps(a, th, _CMP_LT_OQ));
                  _mm256_store_ps(cut + 8 * i, c);
                }
                if (at_exit) c = _mm256_or_ps(c, _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LE_OQ));
                const int m = _mm256_movemask_ps(c);
                if (m == 0xff) {  // every lane's output is 0: stop here
                  for (int l = 0; l < 8; ++l)
                    if (yof[8 * i + l] >= 0) yk[yof[8 * i + l]] = 0.f, macs += done;
                  act[j] = act[--nact];
                } else {
                  live += 8 - __builtin_popcount(static_cast<unsigned>(m));
                  ++j;
                }
              }
              if (compact && at_exit && nact > 0 && live < kCompactBelow * 8 * nact) {
                // re-pack the live lanes (in place: lanes only move to lower slots) into full gathered
                // vectors; the lanes dropped are done (output 0)
                int w = 0;
                std::sort(act, act + nact);
                for (int j = 0; j < nact; ++j) {
                  const int i = act[j];
                  const __m256 a = _mm256_load_ps(acc + 8 * i);
                  const __m256 c = _mm256_or_ps(_mm256_load_ps(cut + 8 * i), _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LE_OQ));
                  const int m = _mm256_movemask_ps(c);
                  for (int l = 0; l < 8; ++l) {
                    const int s = 8 * i + l;
                    if (yof[s] < 0) continue;
                    if (m >> l & 1) {
                      yk[yof[s]] = 0.f;
                      macs += done;
                      continue;
                    }
                    const int32_t off = gathered ? loff[s] : static_cast<int32_t>(vbase[i] + l);
                    acc[w] = acc[s], loff[w] = off, yof[w] = yof[s], cut[w] = 0.f;
                    ++w;
                  }
                }
                nact = (w + 7) / 8;
                for (; w < 8 * nact; ++w) {  // tail lanes: no position, read a valid input, never stored
                  acc[w] = 0.f, loff[w] = 0, yof[w] = -1;
                  std::memset(&cut[w], 0xff, sizeof(float));
                }
                for (int j = 0; j < nact; ++j) act[j] = j;
                gathered = true;
              }
            }
            if (done >= T || nact == 0) break;
            int64_t end = std::min(T, done + 8);
            if (done < np && end > np) end = np;
            if (done < nn && end > nn) end = nn;
            int64_t off[8];
            for (int64_t e = done; e < end; ++e) off[e - done] = roff[static_cast<size_t>(tr[e])];
            if (gathered)
              kGatherPeriod[end - done](tw + done, off, xg, loff, act, nact, acc);
            else
              kStopPeriod[end - done](tw + done, off, xg, vbase, act, nact, acc);
            done = end;
          }
          for (int j = 0; j < nact; ++j) {  // ran to the end: ReLU, lanes cut by the threshold 0
            const int i = act[j];
            alignas(32) float y[8];
            _mm256_store_ps(y, _mm256_andnot_ps(_mm256_load_ps(cut + 8 * i), sr::Relu(_mm256_load_ps(acc + 8 * i))));
            for (int l = 0; l < 8; ++l)
              if (yof[8 * i + l] >= 0) yk[yof[8 * i + l]] = y[l];
            macs += T * lanes_of(i);
          }
        }
      }
      task_macs[t] = macs;
    });
    return std::accumulate(task_macs.begin(), task_macs.end(), int64_t{0});
  }

};

}  // namespace

const OrtCustomOp* EarlyExitConvOp() {
  static ConvOpDef<EarlyExitKernel> op(S::kName, S::kInputs);
  return &op;
}

}  // namespace oz
