// SparseQuantConv kernel: see sparse_quant_conv.h for the format and the op.
#include "sparse_quant_conv.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "nchwc.h"
#include "op_def.h"
#include "sparse_rows.h"

namespace oz {
namespace {

namespace S = spec::SparseQuantConv;
constexpr const char* kOp = S::kName;

// Rows of the reduction swept across all filters of a block at a time (<= 256: the
// terms hold a row within its chunk in 8 bits). A chunk of 64 rows x 64 positions
// is 16 KiB of Col; a sparser layer takes bigger chunks so that a filter still has
// ~20-30 terms per chunk (the per-chunk cost of a filter is then small). Measured:
// 64 rows is best at >= 50% density, 128-192 at 25% and 10%.
int64_t ChunkRowsFor(int64_t nonzeros, int64_t dense) {
  const double d = dense > 0 ? double(nonzeros) / double(dense) : 1.0;
  return d >= 0.375 ? 64 : d >= 0.15 ? 128 : 192;
}

struct SparseQuantKernel {
  ConvAttrs attrs;
  std::vector<int64_t> w_shape;  // (K, C/group, KH, KW)
  int64_t K = 0, CRS = 0, kc = 64, nch = 1;
  int frac_bits = 0;
  float scale = 1.f;             // 2^-frac_bits
  std::vector<uint8_t> terms;    // (row within chunk, int8 value) pairs, filter by filter
  std::vector<uint32_t> toff;    // toff[c*K + k]: first term of filter k in chunk c; terms of (c, k+1) follow
  // Small maps (a position block of <= 16 positions: 1-2 accumulators per term): each filter's terms
  // over the whole reduction, read against the shared im2col in one sweep. The chunked form above
  // then has ~10 terms per (chunk, filter) at 90 % pruned (512x4x4: 24 chunks), so its per-chunk
  // accumulator loads/stores and loop exits cost more than the FMAs.
  static constexpr int kWholeMaxPositions = 16;
  std::vector<uint16_t> frows;   // each term's reduction row, filter by filter
  std::vector<float> fw;         // each term's int8 weight as a float (the scale is applied on store)
  std::vector<int64_t> foff;     // foff[k]: filter k's first term; (K+1,)
  std::vector<float> bias;       // (K,) zeros when B is absent
  int64_t nnz = 0;               // kept (non-filler) entries over all filters
  bool has_other = false;        // input 5 `other`: a residual site, ReLU(conv + bias + other)
  // Dense path: above this density MLAS's direct convolution on the dequantized weights beats the
  // sparse kernel (one Col load per FMA): measured 0.77-0.94x onnxruntime sparse vs 1.00-1.10x dense
  // at 50 % nonzeros on maps of 7x7 and more, ~1.8x vs ~1.1x at 100 %: crossover ~60 %. On tiny maps
  // (fewer than kSmallMap positions per image: a position block fills few accumulators, so each
  // term's decode is shared by few FMAs) the sparse kernel loses at 50 % already (512x4x4: 1.36-1.66
  // vs 1.03-1.07) and still wins at 10 % (0.32-0.44): crossover ~30 %. A reduction shorter than
  // kShortReduction (a stem: 1x3x3) never pays (1->64 28x28: sparse 2.20 / 1.83 at 50 / 90 %
  // nonzeros vs dense 1.50). Decided per run (the map size is known then): DenseAbove.
  static constexpr double kDenseAbove = 0.6, kDenseAboveSmall = 0.3;
  static constexpr int64_t kSmallMap = 32, kShortReduction = 32;
  static double DenseAbove(int64_t P, int64_t CRS) {
    return CRS < kShortReduction ? -1.0 : P < kSmallMap ? kDenseAboveSmall : kDenseAbove;
  }
  int sparse_path = -1;          // attribute sparse_path: 1 always, 0 never, -1 (default) by density and map size
  bool UseDense(int64_t P) const {
    return sparse_path == 0 || (sparse_path == -1 && double(nnz) > DenseAbove(P, CRS) * double(K * CRS));
  }
  nchwc::Filters direct;         // the dequantized weights, only when UseDense can hold: MLAS's direct conv
  gemm::ConvWeights dense;       // ... or the packed GEMM core where that does not serve the shape

  SparseQuantKernel() = default;  // for the standalone benchmark harness
  explicit SparseQuantKernel(const OrtKernelInfo* info) {
    attrs = ReadConvAttrs(info, kOp);
    if (attrs.kernel_shape.empty())
      Fail(kOp, "attribute 'kernel_shape' is required (the weights are compressed, so their shape cannot be read from a W tensor), expected 2 values");
    const int64_t KH = attrs.kernel_shape[0], KW = attrs.kernel_shape[1];

    ConstTensor values = RequireConstInput(info, S::kValues, kOp, "values", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8);
    ConstTensor index = RequireConstInput(info, S::kIndex, kOp, "index", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    ConstTensor row_ptr = RequireConstInput(info, S::kRowPtr, kOp, "row_ptr", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
    if (values.shape.size() != 1) Fail(kOp, Msg("input 'values' has shape ", ShapeStr(values.shape), ", expected rank 1 (L,)"));
    if (index.shape.size() != 1) Fail(kOp, Msg("input 'index' has shape ", ShapeStr(index.shape), ", expected rank 1 (L,)"));
    if (index.shape[0] != values.shape[0])
      Fail(kOp, Msg("input 'index' has ", index.shape[0], " entries, expected ", values.shape[0], " (the length of input 'values')"));
    if (row_ptr.shape.size() != 1 || row_ptr.shape[0] < 2)
      Fail(kOp, Msg("input 'row_ptr' has shape ", ShapeStr(row_ptr.shape), ", expected (K+1,) with K >= 1"));
    K = row_ptr.shape[0] - 1;
    const int64_t L = values.shape[0];

    // Filter shape: weight_shape and/or channels.
    const std::vector<int64_t> ws = AttrInts(info, "weight_shape", {});
    const int64_t channels = AttrInt(info, "channels", S::kChannelsDefault);
    int64_t Cg = -1;
    if (!ws.empty()) {
      if (ws.size() != 4) Fail(kOp, Msg("attribute 'weight_shape' ", ShapeStr(ws), " has ", ws.size(), " values, expected 4 (K, C/group, KH, KW)"));
      if (ws[0] != K) Fail(kOp, Msg("attribute 'weight_shape' ", ShapeStr(ws), " has K=", ws[0], ", expected ", K, " (input 'row_ptr' has K+1=", K + 1, " entries)"));
      if (ws[2] != KH || ws[3] != KW)
        Fail(kOp, Msg("attribute 'weight_shape' ", ShapeStr(ws), " does not match attribute 'kernel_shape' ", ShapeStr(attrs.kernel_shape)));
      Cg = ws[1];
    }
    if (channels != -1) {
      if (Cg != -1 && channels != Cg)
        Fail(kOp, Msg("attribute 'channels' is ", channels, ", expected ", Cg, " (C/group of attribute 'weight_shape')"));
      Cg = channels;
    }
    if (Cg == -1) Fail(kOp, "attribute 'channels' (C/group) or 'weight_shape' is required, expected one of them");
    if (Cg < 1) Fail(kOp, Msg("attribute 'channels' is ", Cg, ", expected >= 1"));
    w_shape = {K, Cg, KH, KW};
    if (K % attrs.group != 0)
      Fail(kOp, Msg("input 'row_ptr' describes K=", K, " filters, expected a multiple of group=", attrs.group));
    CRS = Cg * KH * KW;

    const int64_t fb = AttrInt(info, "frac_bits", INT64_MIN);
    if (fb == INT64_MIN) Fail(kOp, "attribute 'frac_bits' is required, expected the fractional length of the 8-bit weights");
    if (fb < -64 || fb > 64) Fail(kOp, Msg("attribute 'frac_bits' is ", fb, ", expected a value in [-64, 64]"));
    frac_bits = static_cast<int>(fb);
    scale = std::ldexp(1.0f, -frac_bits);

    // Bias.
    bias.assign(K, 0.f);
    if (sr::InputPresent(info, S::kB)) {
      ConstTensor b = RequireConstInput(info, S::kB, kOp, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (b.shape.size() != 1 || b.shape[0] != K) Fail(kOp, Msg("input 'B' has shape ", ShapeStr(b.shape), ", expected (", K, ",)"));
      std::copy(b.as<float>(), b.as<float>() + K, bias.begin());
    }

    has_other = sr::InputPresent(info, S::kOther);
    const int64_t sp = AttrInt(info, "sparse_path", S::kSparsePathDefault);
    if (sp < -1 || sp > 1) Fail(kOp, Msg("attribute 'sparse_path' is ", sp, ", expected -1 (auto), 0 or 1"));

    const int64_t* rp = row_ptr.as<int64_t>();
    const int8_t* val = values.as<int8_t>();
    const uint8_t* idx = index.as<uint8_t>();
    Validate(val, idx, rp, L);
    sparse_path = static_cast<int>(sp);  // before BuildRuntime: which run-time forms it keeps depends on it
    BuildRuntime(val, idx, rp, L);
    const bool dense_some = UseDense(1), dense_always = UseDense(kSmallMap);  // small maps go dense first
    if (dense_some) {
      // dequantized once: q * 2^-fl is exact in float, so both paths multiply the same weights
      std::vector<float> w(static_cast<size_t>(K * CRS), 0.f);
      for (int64_t k = 0; k < K; ++k) {
        int64_t pos = -1;
        for (int64_t e = rp[k]; e < rp[k + 1]; ++e) {
          pos += idx[e];
          if (val[e] != 0) w[static_cast<size_t>(k * CRS + pos)] = float(val[e]) * scale;
        }
      }
      direct = nchwc::Filters(w.data(), bias.data(), K, Cg * attrs.group, KH, KW, attrs.group);
      if (!direct.ok()) dense = gemm::ConvWeights(w.data(), bias.data(), K, Cg, KH, KW, attrs.group);
    }
    if (dense_always) {  // the sparse form is never read: do not keep the weights twice
      std::vector<uint8_t>().swap(terms);
      std::vector<uint32_t>().swap(toff);
    }
  }

  // Refuses a malformed stream (naming the input and the expected value) before anything reads it.
  void Validate(const int8_t* val, const uint8_t* idx, const int64_t* rp, int64_t L) const {
    if (rp[0] != 0) Fail(kOp, Msg("input 'row_ptr' starts at ", rp[0], ", expected 0"));
    for (int64_t k = 0; k < K; ++k)
      if (rp[k + 1] < rp[k] || rp[k + 1] > L)
        Fail(kOp, Msg("input 'row_ptr' entry ", k + 1, " is ", rp[k + 1], ", expected a value in [", rp[k], ", ", L,
                      "] (non-decreasing, within the ", L, " entries of 'values')"));
    if (rp[K] != L) Fail(kOp, Msg("input 'row_ptr' ends at ", rp[K], ", expected ", L, " (the length of input 'values')"));
    for (int64_t k = 0; k < K; ++k) {
      int64_t pos = -1;
      for (int64_t e = rp[k]; e < rp[k + 1]; ++e) {
        const int gap = idx[e];
        if (gap == 0)
          Fail(kOp, Msg("input 'index' entry ", e, " (filter ", k, ") is 0, expected a gap in [1, 255]"));
        pos += gap;
        if (pos >= CRS)
          Fail(kOp, Msg("input 'index': the gaps of filter ", k, " reach position ", pos, " at entry ", e,
                        ", expected positions < C/group*KH*KW = ", CRS));
        if (val[e] == 0 && gap != 255)
          Fail(kOp, Msg("input 'values' entry ", e, " (filter ", k, ") is 0 with gap ", gap,
                        ", expected a nonzero value (0 only in fillers, whose gap is 255)"));
      }
    }

  }

  // The run-time form (see the header) from a validated stream.
  void BuildRuntime(const int8_t* val, const uint8_t* idx, const int64_t* rp, int64_t L) {
    kc = ChunkRowsFor(std::count_if(val, val + L, [](int8_t v) { return v != 0; }), K * CRS);
    nch = (CRS + kc - 1) / kc;
    // Terms stored in the order the kernel reads them: chunk by chunk, and inside a
    // chunk filter by filter, so every task streams them sequentially.
    toff.assign(static_cast<size_t>(nch * K + 1), 0);
    for (int64_t k = 0; k < K; ++k) {
      int64_t pos = -1;
      for (int64_t e = rp[k]; e < rp[k + 1]; ++e) {
        pos += idx[e];
        if (val[e] != 0) ++toff[static_cast<size_t>((pos / kc) * K + k + 1)];
      }
    }
    for (size_t i = 1; i < toff.size(); ++i) toff[i] += toff[i - 1];
    nnz = static_cast<int64_t>(toff.back());
    if (nnz > int64_t{UINT32_MAX}) Fail(kOp, "input 'values' has more than 2^32 nonzero weights, expected fewer");
    terms.assign(static_cast<size_t>(2 * nnz + 8), 0);  // + slack: never read, kept for safety
    std::vector<uint32_t> fill(toff.begin(), toff.end() - 1);
    for (int64_t k = 0; k < K; ++k) {
      int64_t pos = -1;
      for (int64_t e = rp[k]; e < rp[k + 1]; ++e) {
        pos += idx[e];
        if (val[e] == 0) continue;  // filler
        const size_t at = fill[static_cast<size_t>((pos / kc) * K + k)]++;
        terms[2 * at] = static_cast<uint8_t>(pos % kc);
        terms[2 * at + 1] = static_cast<uint8_t>(val[e]);
      }
    }
    if (UseDense(1) || CRS > 65536) return;  // small maps run dense, or rows do not fit 16 bits
    foff.assign(static_cast<size_t>(K + 1), 0);
    frows.reserve(static_cast<size_t>(nnz));
    fw.reserve(static_cast<size_t>(nnz));
    for (int64_t k = 0; k < K; ++k) {
      int64_t pos = -1;
      for (int64_t e = rp[k]; e < rp[k + 1]; ++e) {
        pos += idx[e];
        if (val[e] == 0) continue;
        frows.push_back(static_cast<uint16_t>(pos));
        fw.push_back(static_cast<float>(val[e]));
      }
      foff[static_cast<size_t>(k + 1)] = static_cast<int64_t>(frows.size());
    }
    (void)L;
  }

  // One block of <= 16 positions x filters [k0, k1) from the shared im2col `col` (all CRS rows).
  template <int NA>
  void ItemWhole(const ConvGeom& g, float* Y, int64_t n, int64_t p0, int np, int64_t k0, int64_t k1,
                 const float* col, const float* other) const {
    constexpr int LD = 8 * NA;
    const int64_t P = g.P();
    const sr::StridedRows col_rows{col, LD};
    alignas(32) float acc[LD];
    for (int64_t k = k0; k < k1; ++k) {
      __m256 a[NA];
      for (int i = 0; i < NA; ++i) a[i] = _mm256_setzero_ps();
      const size_t t0 = static_cast<size_t>(foff[static_cast<size_t>(k)]);
      sr::FmaRowsF<NA>(a, col_rows, frows.data() + t0, fw.data() + t0, static_cast<size_t>(foff[static_cast<size_t>(k + 1)]) - t0);
      for (int i = 0; i < NA; ++i) _mm256_store_ps(acc + 8 * i, a[i]);
      const int64_t at = (n * g.K + k) * P + p0;
      sr::StoreRelu<NA>(acc, scale, bias[k], other ? other + at : nullptr, Y + at, np);
    }
  }


  // One block of positions x filters [k0, k1): chunk-outer over the reduction (the
  // chunk's Col rows in L1), filter-inner, accumulators in tile between chunks. The
  // im2col chunk is built here (fresh in L1) or read from a Col shared by the filter
  // blocks of a lone position block. (Reading the rows in place from shifted input
  // copies instead, with no im2col, measured slower: the rows of a chunk are then
  // scattered over many pages and conflict in L1.)
  template <int NA>
  void Item(const ConvGeom& g, const sr::PaddedInput& pi, float* Y, int64_t n, int64_t grp, int64_t p0, int np,
            int64_t k0, int64_t k1, float* tile, float* chunk, const float* shared_col, const float* other) const {
    constexpr int LD = 8 * NA;
    const int64_t Kb = k1 - k0, P = g.P();
    for (int64_t i = 0; i < Kb * LD; i += 8) _mm256_store_ps(tile + i, _mm256_setzero_ps());
    const float* xg = pi.data + (n * g.C + grp * g.Cg()) * pi.chan;
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t r0 = c * kc, r1 = std::min(CRS, r0 + kc);
      const uint32_t* c0 = toff.data() + static_cast<size_t>(c * K);
      const uint32_t* c1 = c0 + 1;  // end of (c, k) = start of (c, k+1)
      if (c0[k1] == c0[k0]) continue;  // no term of these filters in this chunk
      const float* ch = chunk;
      if (shared_col) {
        ch = shared_col + r0 * LD;
      } else {
        sr::ColBuilder cb(g, pi, xg, p0, np, LD);
        cb.Build(r0, r1, chunk);
      }
      const sr::StridedRows rows{ch, LD};
      for (int64_t k = k0; k < k1; ++k)
        if (c1[k] > c0[k]) sr::FmaRowsQ<NA>(tile + (k - k0) * LD, rows, terms.data() + 2 * size_t{c0[k]}, c1[k] - c0[k]);
    }
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t at = (n * g.K + k) * P + p0;
      sr::StoreRelu<NA>(tile + (k - k0) * LD, scale, bias[k], other ? other + at : nullptr, Y + at, np);
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return Guard([&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(S::kX);
      auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
      ConvGeom g = ResolveConv(attrs, w_shape, xs, kOp);
      const int64_t N = xs[0], P = g.P();
      auto y = ctx.GetOutput(0, {N, g.K, g.OH, g.OW});
      const float* X = x.GetTensorData<float>();
      float* Y = y.GetTensorMutableData<float>();
      if (ctx.GetOutputCount() > 1) {
        auto m = ctx.GetOutput(1, std::vector<int64_t>{});
        *m.GetTensorMutableData<int64_t>() = N * P * (UseDense(P) ? K * CRS : nnz);
      }
      const float* other = sr::OtherInput(context, 5, has_other, g, N, kOp);
      if (N == 0 || P == 0) return;
      if (UseDense(P)) {
        RunDense(context, g, X, other, Y, N);
        return;
      }
      Run(context, g, X, other, Y, N);
    });
  }

  // Dense path: MLAS's direct convolution or the GEMM core (bias and, without a shortcut, the
  // ReLU fused); with a shortcut, + other and the NaN-keeping ReLU in a second pass.
  void RunDense(OrtKernelContext* context, const ConvGeom& g, const float* X, const float* other, float* Y,
                int64_t N) const {
    if (direct.ok()) {
      nchwc::RunOptions opt;
      opt.relu = other == nullptr;
      nchwc::RunConv(context, g, direct, X, N, Y, opt);
    } else {
      const gemm::ConvPlan plan(g, dense);
      gemm::Epilogue ep;
      ep.relu = other == nullptr;
      gemm::RunConv(context, plan, dense, X, N, Y, ep);
    }
    if (other) sr::AddRelu(context, Y, other, N * g.K * g.P());
  }

  // The convolution itself (shapes already validated); ctx: the pool to run on.
  void Run(OrtKernelContext* context, const ConvGeom& g, const float* X, const float* other, float* Y, int64_t N) const {
    const int64_t P = g.P(), G = g.G, Kg = g.Kg();
    sr::PaddedInput pi;
    if (!sr::BuildPaddedInput(context, g, X, N, &pi)) Fail(kOp, "out of memory for the padded input copy");
    const sr::PosBlocks pb = sr::ChoosePosBlocks(P);
    // Filter blocks: at most 128 filters (a 32 KiB accumulator tile), and enough
    // blocks for a few tasks per thread when there are few position blocks.
    const int64_t base = N * G * pb.count;
    const int64_t hw = static_cast<int64_t>(HardwareThreads());
    int64_t nkb = std::max<int64_t>((Kg + 127) / 128, std::min<int64_t>((Kg + 15) / 16, (4 * hw + base - 1) / base));
    nkb = std::max<int64_t>(1, std::min(nkb, Kg));
    const int64_t kbs = (Kg + nkb - 1) / nkb;
    nkb = (Kg + kbs - 1) / kbs;
    // Few position blocks split over filter blocks: build their im2col once, shared
    // by the filter-block tasks (read chunk by chunk), instead of once per task.
    float* shared = nullptr;
    const size_t blk_floats = static_cast<size_t>(CRS) * sr::kMaxTP;
    if (nkb > 1 && static_cast<size_t>(base) * blk_floats <= (size_t{64} << 20) / sizeof(float)) {
      shared = sr::Scratch(2, static_cast<size_t>(base) * blk_floats + 8);
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
    std::atomic<bool> oom{false};
    sr::ForTasks(context, tasks, [&](size_t t) {
      const size_t i0 = t * items / tasks, i1 = (t + 1) * items / tasks;
      float* tile = sr::Scratch(0, static_cast<size_t>(kbs) * sr::kMaxTP);
      float* chunk = sr::Scratch(1, static_cast<size_t>(kc) * sr::kMaxTP + 8);
      if (!tile || !chunk) {
        oom = true;
        return;
      }
      for (size_t it = i0; it < i1; ++it) {
        int64_t rem = static_cast<int64_t>(it);
        const int64_t kbi = rem % nkb; rem /= nkb;
        const int64_t b = rem % pb.count; rem /= pb.count;
        const int64_t grp = rem % G, n = rem / G;
        const int64_t k0 = grp * Kg + kbi * kbs, k1 = std::min(grp * Kg + Kg, k0 + kbs);
        const int64_t p0 = pb.begin(b);
        const int np = pb.size(b);
        const float* sc = shared ? shared + ((n * G + grp) * pb.count + b) * blk_floats : nullptr;
        if (sc && np <= kWholeMaxPositions && !foff.empty()) {
          if (np <= 8) ItemWhole<1>(g, Y, n, p0, np, k0, k1, sc, other);
          else ItemWhole<2>(g, Y, n, p0, np, k0, k1, sc, other);
          continue;
        }
        switch ((np + 7) / 8) {
#define OZ_SQ_CASE(na) \
  case na: Item<na>(g, pi, Y, n, grp, p0, np, k0, k1, tile, chunk, sc, other); break;
          OZ_SQ_CASE(1) OZ_SQ_CASE(2) OZ_SQ_CASE(3) OZ_SQ_CASE(4)
          OZ_SQ_CASE(5) OZ_SQ_CASE(6) OZ_SQ_CASE(7) OZ_SQ_CASE(8)
#undef OZ_SQ_CASE
          default: break;
        }
      }
    });
    if (oom) Fail(kOp, "out of memory for the per-thread scratch buffers");
  }
};

}  // namespace

const OrtCustomOp* SparseQuantConvOp() {
  static ConvOpDef<SparseQuantKernel> op(S::kName, S::kInputs);
  return &op;
}

}  // namespace oz
