// LazyConv: lazy evaluation of convolutional filters (Leroux et al.). Runs on MLAS's direct-convolution
// kernels (nchwc.h: the selected filters gathered into blocks per image, the input strengths measured
// in the NCHWc reorder) where they serve the shape, else on the packed GEMM core (selected rows).
// OZ_DENSE=gemm (read once) forces the GEMM core.
//
// Per sample n: s_prev[c] = sum_{h,w} |x[n,c,h,w]| (the input's activation strengths),
// s = s_prev . pred_W + pred_b (predicted output strengths, pred_W: (C, K), pred_b: (K,)),
// and only the top n_sel = ceil(ratio * K) filters by s (ties: lower index first; NaN last) are
// computed, as Conv(+B)+ReLU; the other output channels are 0. Grouped / depthwise convs pick the
// top n_sel over all K and compute each group's chosen rows.
//
// Inputs: 0 X, 1 W (const), 2 B (optional const), 3 pred_W (C, K) float const, 4 pred_b (K,) float
// const, 5 ratio (optional runtime float scalar in (0, 1]; absent: attribute `ratio`, default 1),
// 6 other (optional runtime (N, K, OH, OW)): a residual site. Then the strengths of the SUM are
// predicted from the input's and other's per-channel strengths, pred_W is (C + K, K) (rows C.. weigh
// other's strengths), computed channels are ReLU(conv + B + other) and skipped ones ReLU(other).
// 7 pred_V (optional (r, K) float const): a rank-r predictor, pred_W is then (C [+ K], r) and
// s = (s_prev . pred_W) . pred_V + pred_b (a full predictor is read per image and can cost more than
// the conv it serves: onnxzero/ops/lazy.py factor_predictor).
// Outputs: 0 Y, 1 macs (optional int64 scalar) = N * n_sel * OH*OW * (C/group)*KH*KW.
// n_sel = max(1, ceil(ratio * K - 1e-4)) (the tolerance forgives float32 rounding: 0.3 of 10 is 3).
// Attributes x_blocked / other_blocked / y_blocked (0 or 1): X, other, Y in the blocked layout
// (N, C/B, H, W, B) of nchwc.h, for chains of onnxzero ops (passes/chain_layout.py sets them).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>

#include "common.h"
#include "gemm.h"
#include "nchwc.h"
#include "op_def.h"
#include "ops.h"

namespace oz {
namespace {

namespace S = spec::LazyConv;
constexpr const char* kOp = S::kName;

int64_t FiltersComputed(double ratio, int64_t K) {
  const double v = std::ceil(ratio * static_cast<double>(K) - spec::constants::kLazyRatioTolerance);
  return std::clamp<int64_t>(static_cast<int64_t>(v), 1, K);
}

double AbsSum(const float* p, int64_t n) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  double total = 0;
  // Blocks of at most 4096 floats summed in float, blocks summed in double.
  while (i + 32 <= n) {
    const int64_t end = std::min(n - 31, i + 4096);
    for (; i < end; i += 32) {
      a0 = _mm256_add_ps(a0, _mm256_and_ps(mask, _mm256_loadu_ps(p + i)));
      a1 = _mm256_add_ps(a1, _mm256_and_ps(mask, _mm256_loadu_ps(p + i + 8)));
      a2 = _mm256_add_ps(a2, _mm256_and_ps(mask, _mm256_loadu_ps(p + i + 16)));
      a3 = _mm256_add_ps(a3, _mm256_and_ps(mask, _mm256_loadu_ps(p + i + 24)));
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (float v : t) total += v;
    a0 = a1 = a2 = a3 = _mm256_setzero_ps();
  }
  for (; i < n; ++i) total += std::fabs(p[i]);
  return total;
}

struct Selection {
  std::vector<int32_t> rows;     // per (n, g): selected rows, ascending, concatenated
  std::vector<int64_t> start;    // N*G + 1 offsets into rows
  static gemm::RowSet Get(const void* user, int64_t n, int64_t grp);
  int64_t G = 1;
};

gemm::RowSet Selection::Get(const void* user, int64_t n, int64_t grp) {
  const auto* s = static_cast<const Selection*>(user);
  const int64_t i = n * s->G + grp;
  return gemm::RowSet{s->rows.data() + s->start[i], s->start[i + 1] - s->start[i]};
}

struct LazyConvKernel {
  ConvAttrs attrs;
  std::vector<int64_t> w_shape;
  gemm::ConvWeights weights;  // the GEMM core's copy
  nchwc::Filters filters;     // MLAS's direct convolution, selected filters gathered per image
  std::vector<float> pred_w, pred_b;  // (C [+ K], K) or (C [+ K], rank), (K,)
  std::vector<float> pred_v;          // (rank, K) of a rank-r predictor, else empty
  int64_t rank = 0;                   // 0: a full predictor
  float ratio_attr = 1.f;
  bool has_other = false;  // the node has input 6 `other`: pred_W has C + K rows
  nchwc::Layouts lay;

  explicit LazyConvKernel(const OrtKernelInfo* info) {
    attrs = ReadConvAttrs(info, kOp);
    ratio_attr = AttrFloat(info, "ratio", S::kRatioDefault);
    if (!(ratio_attr > 0.f && ratio_attr <= 1.f))
      Fail(kOp, Msg("attribute 'ratio' is ", ratio_attr, ", expected a value in (0, 1]"));
    ConstTensor w = RequireConstInput(info, S::kW, kOp, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    CheckWeightShape(attrs, w.shape, kOp);
    w_shape = w.shape;
    const int64_t K = w.shape[0], C = w.shape[1] * attrs.group;
    Ort::ConstKernelInfo ki(info);
    ConstTensor b;
    const bool has_bias = TryGetConstInput(info, S::kB, &b);
    if (!has_bias && ki.GetInputCount() > S::kB && !ki.GetInputName(S::kB).empty())
      Fail(kOp, "input 'B' (2) must be a constant initializer, got a runtime tensor");
    if (has_bias) {
      if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        Fail(kOp, Msg("input 'B' has element type ", b.type, ", expected float (1)"));
      if (b.shape.size() != 1 || b.shape[0] != K)
        Fail(kOp, Msg("input 'B' has shape ", ShapeStr(b.shape), ", expected (", K, ",)"));
    }
    has_other = ki.GetInputCount() > S::kOther && !ki.GetInputName(S::kOther).empty();
    const int64_t rows = has_other ? C + K : C;
    ConstTensor pv;
    if (TryGetConstInput(info, S::kPredV, &pv)) {
      if (pv.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        Fail(kOp, Msg("input 'pred_V' has element type ", pv.type, ", expected float (1)"));
      if (pv.shape.size() != 2 || pv.shape[0] < 1 || pv.shape[1] != K)
        Fail(kOp, Msg("input 'pred_V' has shape ", ShapeStr(pv.shape), ", expected (rank, ", K, ") (rank x filters)"));
      rank = pv.shape[0];
      pred_v.assign(pv.as<float>(), pv.as<float>() + rank * K);
      for (float v : pred_v)
        if (!std::isfinite(v)) Fail(kOp, "input 'pred_V' has a non-finite value, expected finite floats");
    } else if (ki.GetInputCount() > S::kPredV && !ki.GetInputName(S::kPredV).empty()) {
      Fail(kOp, "input 'pred_V' (7) must be a constant initializer, got a runtime tensor");
    }
    const int64_t cols = rank > 0 ? rank : K;
    ConstTensor pw = RequireConstInput(info, S::kPredW, kOp, "pred_W", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (pw.shape.size() != 2 || pw.shape[0] != rows || pw.shape[1] != cols)
      Fail(kOp, Msg("input 'pred_W' has shape ", ShapeStr(pw.shape), ", expected (", rows, ", ", cols,
                    has_other ? ") (input channels + other's channels x " : ") (input channels x ",
                    rank > 0 ? "rank, with pred_V)" : "filters)"));
    ConstTensor pb = RequireConstInput(info, S::kPredB, kOp, "pred_b", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (pb.shape.size() != 1 || pb.shape[0] != K)
      Fail(kOp, Msg("input 'pred_b' has shape ", ShapeStr(pb.shape), ", expected (", K, ",)"));
    pred_w.assign(pw.as<float>(), pw.as<float>() + rows * cols);
    pred_b.assign(pb.as<float>(), pb.as<float>() + K);
    for (float v : pred_w)
      if (!std::isfinite(v)) Fail(kOp, "input 'pred_W' has a non-finite value, expected finite floats");
    for (float v : pred_b)
      if (!std::isfinite(v)) Fail(kOp, "input 'pred_b' has a non-finite value, expected finite floats");
    const float* bias = has_bias ? b.as<float>() : nullptr;
    static const bool force_gemm = [] {
      const char* e = std::getenv("OZ_DENSE");
      return e != nullptr && std::string(e) == "gemm";
    }();
    if (!force_gemm)
      filters = nchwc::Filters(w.as<float>(), bias, K, C, w.shape[2], w.shape[3], attrs.group, /*gatherable=*/true);
    // The GEMM core is kept beside nchwc: on small maps it runs filter subsets faster (see UseNchwc).
    weights = gemm::ConvWeights(w.as<float>(), bias, K, w.shape[1], w.shape[2], w.shape[3], attrs.group);
    lay = nchwc::ReadLayouts(info, kOp, K, C, attrs.group);
  }

  // out = v . M for M (rows, cols) float, in double: 16 columns at a time held in registers while the
  // rows stream past (M is read once; out is not reloaded per row).
  static void VecMat(const double* v, int64_t rows, const float* M, int64_t cols, double* out) {
    int64_t k0 = 0;
    for (; k0 + 16 <= cols; k0 += 16) {
      __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t c = 0; c < rows; ++c) {
        const __m256d x = _mm256_set1_pd(v[c]);
        const float* m = M + c * cols + k0;
        a0 = _mm256_fmadd_pd(x, _mm256_cvtps_pd(_mm_loadu_ps(m)), a0);
        a1 = _mm256_fmadd_pd(x, _mm256_cvtps_pd(_mm_loadu_ps(m + 4)), a1);
        a2 = _mm256_fmadd_pd(x, _mm256_cvtps_pd(_mm_loadu_ps(m + 8)), a2);
        a3 = _mm256_fmadd_pd(x, _mm256_cvtps_pd(_mm_loadu_ps(m + 12)), a3);
      }
      _mm256_storeu_pd(out + k0, a0);
      _mm256_storeu_pd(out + k0 + 4, a1);
      _mm256_storeu_pd(out + k0 + 8, a2);
      _mm256_storeu_pd(out + k0 + 12, a3);
    }
    for (int64_t k = k0; k < cols; ++k) out[k] = 0;
    for (int64_t c = 0; c < rows && k0 < cols; ++c)
      for (int64_t k = k0; k < cols; ++k) out[k] += v[c] * static_cast<double>(M[c * cols + k]);
  }

  // s = pred_b + sprev . pred_W [. pred_V], in double.
  void Predict(const double* sprev, int64_t R, int64_t K, double* s) const {
    if (rank > 0) {
      std::vector<double> t(static_cast<size_t>(rank));
      VecMat(sprev, R, pred_w.data(), rank, t.data());
      VecMat(t.data(), rank, pred_v.data(), K, s);
    } else {
      VecMat(sprev, R, pred_w.data(), K, s);
    }
    for (int64_t k = 0; k < K; ++k) s[k] += pred_b[k];
  }

  // Per image, the top nsel filters by predicted strength (ascending ids, images concatenated), from
  // the input's strengths sx (N, C) and, at a residual site, other's (measured here).
  // other_blocked: `other` is in the blocked layout.
  std::vector<int32_t> Choose(OrtKernelContext* context, const double* sx, const float* other, int64_t N, int64_t C,
                              int64_t K, int64_t P, int64_t nsel, bool other_blocked = false) const {
    const int64_t Ko = other ? K : 0, R = C + Ko;
    std::vector<double> sprev(static_cast<size_t>(N * R));
    for (int64_t n = 0; n < N; ++n) std::copy(sx + n * C, sx + (n + 1) * C, sprev.begin() + n * R);
    if (other && other_blocked) {
      const int64_t B = nchwc::CpuBlock(), Kb = K / B;
      auto sums = [&](size_t u) {
        const int64_t n = static_cast<int64_t>(u) / Kb, kb = static_cast<int64_t>(u) % Kb;
        nchwc::BlockAbsSums(other + u * B * P, P, B, sprev.data() + n * R + C + kb * B);
      };
      // a small `other` is summed on the calling thread (a pool dispatch costs more; nchwc.cc)
      if (N * K * P < (1 << 18))
        for (size_t u = 0; u < static_cast<size_t>(N * Kb); ++u) sums(u);
      else
        ParallelFor(context, static_cast<size_t>(N * Kb), sums);
    } else if (other) {
      const int64_t chunk = std::max<int64_t>(1, (N * K + 7) / 8);
      ParallelFor(context, static_cast<size_t>((N * K + chunk - 1) / chunk), [&](size_t t) {
        const int64_t i0 = static_cast<int64_t>(t) * chunk, i1 = std::min(N * K, i0 + chunk);
        for (int64_t i = i0; i < i1; ++i) sprev[(i / K) * R + C + i % K] = AbsSum(other + i * P, P);
      });
    }
    std::vector<int32_t> out;
    out.reserve(static_cast<size_t>(N * nsel));
    std::vector<double> s(static_cast<size_t>(K));
    std::vector<int32_t> idx(static_cast<size_t>(K));
    for (int64_t n = 0; n < N; ++n) {
      Predict(sprev.data() + n * R, R, K, s.data());
      for (auto& v : s)
        if (std::isnan(v)) v = -INFINITY;  // NaN strengths rank last (strict weak order kept)
      std::iota(idx.begin(), idx.end(), 0);
      auto better = [&](int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); };
      std::nth_element(idx.begin(), idx.begin() + (nsel - 1), idx.end(), better);
      std::sort(idx.begin(), idx.begin() + nsel);
      out.insert(out.end(), idx.begin(), idx.begin() + nsel);
    }
    return out;
  }

  // Gathering the selected filters costs a pass over their weights per image (about 3x the bytes the
  // GEMM core reads in place), worth it only where each weight does enough work: measured on the
  // ResNet-18/MNIST layers at ratio 0.5 / 0.25 (docs/design-kernels.md), nchwc wins from 7x7 maps
  // (P = 49) on and loses on 4x4 ones (P = 16). Dense runs always take nchwc (no gather).
  bool UseNchwc(int64_t nsel, int64_t K, int64_t P) const {
    constexpr int64_t kMinPixelsForGather = 32;
    return filters.ok() && (nsel >= K || P >= kMinPixelsForGather);
  }

  float Ratio(Ort::KernelContext& ctx) const {
    if (ctx.GetInputCount() <= 5) return ratio_attr;
    Ort::ConstValue r = ctx.GetInput(S::kRatio);
    if (!r) return ratio_attr;
    auto info = r.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      Fail(kOp, Msg("input 'ratio' has element type ", info.GetElementType(), ", expected float (1)"));
    if (info.GetElementCount() != 1)
      Fail(kOp, Msg("input 'ratio' has shape ", ShapeStr(info.GetShape()), ", expected a scalar in (0, 1]"));
    const float v = r.GetTensorData<float>()[0];
    if (!(v > 0.f && v <= 1.f)) Fail(kOp, Msg("input 'ratio' is ", v, ", expected a value in (0, 1]"));
    return v;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard([&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(S::kX);
      auto xinfo = x.GetTensorTypeAndShapeInfo();
      if (xinfo.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        Fail(kOp, Msg("input 'X' has element type ", xinfo.GetElementType(), ", expected float (1)"));
      const auto xs = nchwc::NchwShapeOfX(xinfo.GetShape(), lay.x, kOp);
      const ConvGeom g = ResolveConv(attrs, w_shape, xs, kOp);
      const float ratio = Ratio(ctx);
      const int64_t N = xs[0], K = g.K, C = g.C, G = g.G, Kg = g.Kg(), HW = g.H * g.W, P = g.P();
      const std::vector<int64_t> yshape{N, K, g.OH, g.OW};
      const float* residual = nchwc::OtherInputIn(ctx, S::kOther, yshape, lay.other, kOp);
      if (has_other && !residual)  // unreachable through onnxruntime (a named input is always fed)
        Fail(kOp, "input 'other' is absent, expected a tensor (the node names it and pred_W has its rows)");
      auto y = ctx.GetOutput(0, lay.y ? nchwc::BlockedShape(yshape) : yshape);
      int64_t macs = 0;
      if (N > 0 && g.P() > 0) {
        const float* X = x.GetTensorData<float>();
        float* Y = y.GetTensorMutableData<float>();
        const int64_t nsel = FiltersComputed(ratio, K);
        if (UseNchwc(nsel, K, P)) {
          // MLAS's direct convolution; the input strengths come out of its NCHWc reorder.
          nchwc::RunOptions opt;
          opt.residual = residual;
          opt.x_blocked = lay.x, opt.residual_blocked = lay.other, opt.y_blocked = lay.y;
          opt.nsel = nsel < K ? nsel : -1;
          std::vector<int32_t> chosen;
          opt.select = [&](const double* sx) -> const int32_t* {
            chosen = Choose(context, sx, residual, N, C, K, P, nsel, lay.other);
            return chosen.data();
          };
          macs = nchwc::RunConv(context, g, filters, X, N, Y, opt);
        } else {
          macs = nchwc::WithNchw(context, lay, X, xs, residual, yshape, Y,
                                 [&](const float* Xn, const float* Rn, float* Yn) -> int64_t {
            Selection sel;
            sel.G = G;
            if (nsel < K) {
              std::vector<double> sx(static_cast<size_t>(N * C));
              const int64_t chunk = std::max<int64_t>(1, (N * C + 7) / 8);
              ParallelFor(context, static_cast<size_t>((N * C + chunk - 1) / chunk), [&](size_t t) {
                const int64_t i0 = static_cast<int64_t>(t) * chunk, i1 = std::min(N * C, i0 + chunk);
                for (int64_t i = i0; i < i1; ++i) sx[i] = AbsSum(Xn + i * HW, HW);
              });
              const std::vector<int32_t> chosen = Choose(context, sx.data(), Rn, N, C, K, P, nsel);
              sel.start.assign(static_cast<size_t>(N * G + 1), 0);
              sel.rows.reserve(static_cast<size_t>(N * nsel));
              for (int64_t n = 0; n < N; ++n) {
                int64_t j = 0;
                const int32_t* idx = chosen.data() + n * nsel;  // ascending: groups are contiguous runs
                for (int64_t grp = 0; grp < G; ++grp) {
                  while (j < nsel && idx[j] < (grp + 1) * Kg) sel.rows.push_back(idx[j++]);
                  sel.start[n * G + grp + 1] = static_cast<int64_t>(sel.rows.size());
                }
              }
            }
            gemm::Epilogue ep;
            ep.residual = Rn;
            gemm::ConvPlan plan(g, weights);
            return gemm::RunConv(context, plan, weights, Xn, N, Yn, ep, nsel < K ? &Selection::Get : nullptr, &sel,
                                 /*zero_unselected=*/true);
          });
        }
      }
      if (ctx.GetOutputCount() > 1) {
        auto m = ctx.GetOutput(1, std::vector<int64_t>{});
        *m.GetTensorMutableData<int64_t>() = macs;
      }
    });
  }
};

}  // namespace

const OrtCustomOp* LazyConvOp() {
  static ConvOpDef<LazyConvKernel> op(S::kName, S::kInputs);
  return &op;
}

}  // namespace oz
