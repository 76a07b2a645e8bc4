// gemm.h: the packed SGEMM core of onnxzero's convolutions (AVX2/FMA). ConvRelu and LazyConv run on
// MLAS's direct-convolution kernels instead where those serve the shape (nchwc.h); this core serves
// the rest (grouped convs, K % 8 != 0, LazyConv's filter subsets on maps under 32 pixels) and the
// ops that compute arbitrary rows x columns subsets (spatial, early exit, sparse).
//
// A 2-D convolution of one image in one group is the GEMM
//     Y[k, p] = act( bias[k] + sum_{q < CRS} W[k, q] * col(q, p) )
// with k an output channel (GEMM row), p = oh*OW + ow an output pixel (GEMM column), q = (c, r, s) the
// reduction index (CRS = C/group * KH * KW) and col(q, p) = X[c, oh*SH - PT + r*DH, ow*SW - PL + s*DW]
// (0 outside the image): im2col, which is never materialised here.
//
// How it runs (the same recipe as a BLAS, specialised to convolution):
//   * ConvWeights (session creation): W copied once into 64-byte aligned rows of CRS floats (stride ld),
//     one per output channel, so any SUBSET of rows can be computed without repacking: the micro-kernel
//     broadcasts A straight from row pointers (as MLAS does). Bias kept beside it (zeros when absent).
//   * B, two modes per tile (ConvPlan::UseDirect picks by a cost model):
//     - packed: a kc x nc block of col(q, p), in kNR-column panels, packed straight from X ("implicit
//       im2col") through a zero-padded slab of the X rows the tile needs; 1x1/stride 1/no pad packs
//       from X directly. Vectorised (stride 1 and 2; other strides element by element).
//     - direct (pack-free): the tile's X rows are copied once into a slab split into stride phases,
//       so each reduction index q is ONE contiguous row (offset qoff[q]) over "wide" output columns
//       p' = oh*(OW + (KW-1)*DW/SW) + ow; the kernel reads B rows in place, a few columns per output
//       row are computed and thrown away. Wins when the tile has few rows (skipping ops), where
//       packing would cost more than the waste.
//   * Micro-kernel kMR x kNR = 6 x 16: 12 ymm FMA accumulators, A broadcast from the rows, B from the
//     panel or the slab row; short row panels (rows % 6 <= 3) take 32- or 64-column tiles so they keep
//     >= 8 FMA chains; a last 1..4 columns run as dot products along q (7x7 maps: 49 = 3*16 + 1).
//     Blocking: kc (reduction) so the 6 A rows stay in L1, nc (columns) so a packed block stays in
//     L2. Fused epilogue: + bias, ReLU on the last reduction block; every edge tile is handled.
//   * RunConv splits (image, group, row block, column block) tiles over the session's intra-op pool
//     with oz::ParallelFor, sized by a cycle model (weights re-read per column block vs B packed per
//     row block vs load balance); scratch is per thread (thread_local, reused across runs), so
//     kernels stay thread-safe and allocation-free in steady state.
//
// Subsets, for the skipping ops:
//   (a) rows: every entry point takes the list of output channels (global ids, all in one group) to
//       compute; the others are not touched (RunConv can zero them). Cost ~ proportional to the rows.
//   (b) columns: ComputeTile takes a column range [p0, p1); ComputeTileCols an explicit list of output
//       pixels (any order, no duplicates) whose results are scattered into Y.
// MACs performed by a tile = rows * columns * CRS (columns actually requested, not padded panels).
//
// Debugging aids (environment, read once): OZ_GEMM_TRACE=1 prints RunConv's tiling to stderr;
// OZ_GEMM_MODE=packed|direct forces a B mode (benchmarks of the mode choice).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"

namespace oz {
namespace gemm {

constexpr int kMR = 6;   // output channels (GEMM rows) per micro-tile
constexpr int kNR = 16;  // output pixels (GEMM columns) per micro-tile (two ymm)

// 64-byte aligned float storage (weights, scratch).
struct AlignedFree {
  void operator()(float* p) const noexcept;
};
using AlignedFloats = std::unique_ptr<float[], AlignedFree>;
AlignedFloats AllocFloats(size_t n);  // throws std::bad_alloc; contents uninitialised

// An aligned float buffer that only grows: the per-thread scratch the kernels reuse across runs.
struct GrowableFloats {
  AlignedFloats buf;
  size_t cap = 0;
  float* Floats(size_t n) {
    if (n > cap) {
      buf = AllocFloats(n);
      cap = n;
    }
    return buf.get();
  }
};

// Conv weights prepared once at session creation (immutable afterwards: safe to share between runs).
// Layout: one 64-byte aligned row of CRS floats per output channel (q = (c, r, s) order, stride ld()),
// so any subset of rows is addressable without repacking (Slice). (A block-major layout -- every
// row's slice of one reduction block contiguous -- measured slower: 70 vs 86 GFLOP/s on 512x7x7.)
class ConvWeights {
 public:
  ConvWeights() = default;
  // w: (K, Cg, KH, KW) row-major; bias: (K,) or nullptr. group must divide K.
  ConvWeights(const float* w, const float* bias, int64_t K, int64_t Cg, int64_t KH, int64_t KW, int64_t group);

  int64_t K() const { return K_; }
  int64_t G() const { return G_; }
  int64_t Kg() const { return K_ / G_; }
  int64_t CRS() const { return CRS_; }
  int64_t kc() const { return kc_; }  // reduction block of the micro-kernel (CRS split into equal blocks)
  int64_t ld() const { return ld_; }  // floats between rows (CRS rounded up to 16, zero padded)
  // Output channel k's weights from reduction index q0 on (contiguous to the row's end). Reading up to
  // 16 floats past the row stays inside the allocation (finite values).
  const float* Slice(int64_t k, int64_t q0) const { return data_.get() + k * ld_ + q0; }
  const float* Bias() const { return bias_.data(); }  // K floats (zeros when no bias)
  bool HasBias() const { return has_bias_; }
  // The output channels of group grp in order: Kg() ids starting at grp*Kg() (for dense tiles).
  const int32_t* GroupRows(int64_t grp) const { return iota_.data() + grp * Kg(); }

 private:
  int64_t K_ = 0, G_ = 1, CRS_ = 0, kc_ = 0, ld_ = 0;
  AlignedFloats data_;
  std::vector<float> bias_;
  std::vector<int32_t> iota_;
  bool has_bias_ = false;
};

// What happens to each output after the reduction.
struct Epilogue {
  bool bias = true;  // add ConvWeights::Bias()[k]
  bool relu = true;  // max(., 0)
  // Residual sites: a tensor added after the reduction, before the ReLU (nullptr: none). ComputeTile /
  // ComputeTileCols take that image's (K, OH*OW) tensor, RunConv the batch's (N, K, OH, OW) one.
  const float* residual = nullptr;
};

// Per-run plan: blocking for one input geometry. Cheap to build; build it once per Run (after
// ResolveConv) and share it read-only between tasks.
struct ConvPlan {
  ConvPlan(const ConvGeom& g, const ConvWeights& w);
  ConvGeom g;
  bool flat = false;  // 1x1, stride 1, no pad: B packed from X directly (the image is one long row)
  int64_t kc = 0;     // reduction block: ConvWeights::kc() (CRS split into equal blocks)
  int64_t nc = 0;     // columns per block (multiple of kNR): one task's natural width
  int64_t ColumnBlocks() const { return (g.P() + nc - 1) / nc; }
  // Pack-free ("direct") mode: B rows read in place from a per-task copy of the input rearranged
  // into stride phases (a 1x1/stride 1/no pad conv reads X itself), so every reduction index q is
  // one contiguous row at offset qoff[q]; the price is computing OW + (KW-1)*DW/SW columns per
  // output row (direct_waste of the columns are thrown away). Tiles with few rows use it (packing
  // would cost more than the waste); see UseDirect.
  bool direct_ok = false;     // strides <= 4
  double direct_waste = 0;    // fraction of computed columns thrown away
  bool UseDirect(int64_t rows) const;
};

// One tile of one image: rows[0..nrows) (global output channel ids, all in group grp) x output columns
// [p0, p1) (flat p = oh*OW + ow). x_image: that image's (C, H, W); y_image: that image's (K, OH*OW).
// Writes exactly those outputs. Thread-safe; scratch is thread-local. Never throws; returns false on
// allocation failure (the tile's outputs are then unspecified).
bool ComputeTile(const ConvPlan& plan, const ConvWeights& w, const float* x_image, float* y_image, int64_t grp,
                 const int32_t* rows, int64_t nrows, int64_t p0, int64_t p1, Epilogue ep = {}) noexcept;

// Same for an explicit list of output pixels cols[0..ncols) (flat p, each in [0, OH*OW), no duplicates;
// runs of consecutive pixels pack and store fastest).
bool ComputeTileCols(const ConvPlan& plan, const ConvWeights& w, const float* x_image, float* y_image, int64_t grp,
                     const int32_t* rows, int64_t nrows, const int32_t* cols, int64_t ncols,
                     Epilogue ep = {}) noexcept;

// Row selection for RunConv: for image n and group grp, the output channels to compute.
struct RowSet {
  const int32_t* rows = nullptr;  // global ids in group grp, ascending is fastest (any order works)
  int64_t count = -1;             // < 0: every row of the group (rows ignored); 0: none
};

// The whole batch X (N, C, H, W) -> Y (N, K, OH, OW) on the session's pool, tiles over
// (image, group, row block, column block). select(user, n, grp) -> RowSet chooses the rows (select
// nullptr: all). Rows not selected are zeroed when zero_unselected (with ep.residual: set to
// ReLU(residual), the output of a skipped conv term), else left untouched.
// Returns the MACs performed (sum of selected rows x OH*OW x CRS). Throws (after the parallel
// region) on allocation failure. X and Y must not alias.
using RowSelectFn = RowSet (*)(const void* user, int64_t n, int64_t grp);
int64_t RunConv(OrtKernelContext* ctx, const ConvPlan& plan, const ConvWeights& w, const float* X, int64_t N,
                float* Y, Epilogue ep = {}, RowSelectFn select = nullptr, const void* user = nullptr,
                bool zero_unselected = false);

}  // namespace gemm
}  // namespace oz
