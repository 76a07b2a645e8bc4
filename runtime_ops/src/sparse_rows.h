// sparse_rows: the micro-kernel shared by EarlyExitConv and SparseQuantConv.
//
// Both ops compute, per output channel (filter) k, a list of (input row, weight)
// terms accumulated over a block of output positions:
//
//   acc[k][j] = bias[k] + sum_t w_t * Col[row_t][j],   j < TP (positions of the block)
//
// where Col is the im2col tile of that block: Col[r][j] = the input value that
// reduction row r = (c*KH + kh)*KW + kw of output position p0+j multiplies (0 for
// padding and for lanes past the block). A block has TP = 8*NA positions held in
// NA ymm accumulators (NA <= 8); the Col tile is laid out with a row stride of
// exactly TP floats (a compile-time constant in the micro-kernels) and is 64-byte
// aligned, so one term is: one weight broadcast + NA aligned loads + NA FMAs.
//
// There is no reuse of a Col load across filters (each filter has its own rows),
// so the kernel does one load per FMA: it runs at FMA speed only when the Col rows
// it touches are in L1. Both ops therefore sweep the reduction in row chunks small
// enough for L1, across all filters of a filter block ("chunk-outer", with the
// accumulators kept in a tile in memory between chunks); their term lists are
// stored in that traversal order. (Measured on the 2-core Zen box: ~75-80 GFLOP/s
// per core in L1, about half that when the rows come from L2; pairing filters to
// share loads of common rows did not help: the loop is not load-port bound there.)
//
// The kernels keep at least 8 independent FMA chains (FMA latency 4 x 2 pipes):
// with NA <= 4 they split the terms over two accumulator sets.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "simd.h"

#define OZ_SR_INLINE inline __attribute__((always_inline))

namespace oz {
namespace sr {

constexpr int kMaxNA = 8;              // at most 8 ymm accumulators = 64 positions per block
constexpr int kMaxTP = 8 * kMaxNA;

// ---- position blocks ---------------------------------------------------------

// The P = OH*OW output positions of one image split into blocks of at most
// `max_bs` (a multiple of 8, <= 64) positions; the last block may be shorter.
struct PosBlocks {
  int64_t P = 0, bs = kMaxTP, count = 0;
  int64_t begin(int64_t b) const { return b * bs; }
  int size(int64_t b) const { return static_cast<int>(std::min(bs, P - b * bs)); }
};
// Picks a block size in {max_bs, max_bs-8, ..., 8} that wastes the fewest vector
// lanes (a short tail block runs at a lower rate, so it is charged extra).
PosBlocks ChoosePosBlocks(int64_t P, int64_t max_bs = kMaxTP);

// ---- im2col of one position block --------------------------------------------

// Where the im2col reads the input from. Stride 1 and no padding (direct): X
// itself. Otherwise: a zero-padded copy of the input with each row
// split into its SW stride phases, so that the input values of consecutive output
// columns are contiguous for every kernel column: element (c, ih, iw) of the
// padded image (ih in [0, Hp), iw in [0, Wp), the original at (ih-PT, iw-PL)) is
//   data[(n*C + c)*chan + ih*row + (iw % SW)*Wq + iw / SW],
// built once per run (in parallel over images x channels), read by every task.
struct PaddedInput {
  int64_t Hp = 0, Wp = 0, Wq = 0, SW = 1;
  int64_t row = 0, chan = 0;  // strides in floats
  size_t floats = 0;          // padded copy: buffer size incl. slack for vector over-reads
  bool direct = false;        // stride 1, no padding: data is X, no over-reads allowed
  const float* data = nullptr;
  const float* end = nullptr;  // direct: the end of X (no read may reach past it)
  void Plan(const ConvGeom& g, int64_t N);
  // Fills channels [c0, c1) of image n from X (N, C, H, W) into buf.
  void Fill(const ConvGeom& g, const float* X, int64_t n, int64_t c0, int64_t c1, float* buf) const;
};

// Builds Col rows [r0, r1) for positions [p0, p0+np) of one image and one group.
// col must hold (r1-r0)*ld floats; nothing outside them is written (rows of one
// Col may be built by different threads); lanes j >= np are zero.
class ColBuilder {
 public:
  // xg: the padded input of this image's group (PaddedInput::data + (n*C + grp*Cg)*chan).
  ColBuilder(const ConvGeom& g, const PaddedInput& pi, const float* xg, int64_t p0, int np, int ld);
  void Build(int64_t r0, int64_t r1, float* col) const;

 private:
  struct Seg {
    int64_t src;  // padded layout: offset of the segment's first input value for tap (0, 0, 0)
    int64_t oh, ow0;  // direct: output row and first output column
    int j0, len;  // lanes [j0, j0+len) of the block
  };
  void BuildDirect(int64_t r0, int64_t r1, float* col) const;
  const ConvGeom& g_;
  const PaddedInput& pi_;
  const float* x_;
  const float* x_end_;
  int np_, ld_, nseg_ = 0;
  Seg seg_[kMaxTP];
};

// Row addressing for the micro-kernels: a Col tile with row stride ld (a
// compile-time constant 8*NA at the calls, so the multiply is a shift).
struct StridedRows {
  const float* col;
  size_t ld;
  OZ_SR_INLINE const float* operator()(size_t r) const { return col + r * ld; }
};

// ---- per-thread scratch --------------------------------------------------------

// A 64-byte aligned buffer of at least `floats` floats owned by the calling
// thread (grow-only, reused across runs; nullptr if out of memory). `slot` selects
// one of 4 independent buffers: tasks use slots 0-2; slot 3 (and 2 for a shared
// Col) belongs to the thread running Compute, which fills it before the parallel
// section and only reads it during. Each pool thread runs one task at a time, so
// a task may use its thread's buffers freely.
float* Scratch(int slot, size_t floats);

// ---- kernel info ---------------------------------------------------------------------

// Whether the node has input `index` (an optional input left out has an empty name).
bool InputPresent(const OrtKernelInfo* info, size_t index);

// Plans the input of a run (stride 1: X itself) or fills the padded copy in
// parallel on the session's pool (buffer: the calling thread's scratch slot 3).
// Returns false if out of memory.
// allow_direct = false: always the padded copy (whose slack allows 8-float over-reads at any row).
bool BuildPaddedInput(OrtKernelContext* ctx, const ConvGeom& g, const float* X, int64_t N, PaddedInput* pi,
                      bool allow_direct = true);

// oz::ParallelFor on the session's pool; with ctx == nullptr (the standalone
// benchmark harness) the tasks run serially on the calling thread.
template <class F>
void ForTasks(OrtKernelContext* ctx, size_t n, F&& fn) {
  if (!ctx) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  ParallelFor(ctx, n, std::forward<F>(fn));
}

// ---- the nonzero inputs of each output position ---------------------------------

// kCompress.perm[m]: the lanes set in the 8-bit mask m, in increasing order (then zeros).
struct CompressTable {
  alignas(32) int32_t perm[256][8];
  constexpr CompressTable() : perm() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) perm[m][n++] = l;
    }
  }
};
inline constexpr CompressTable kCompress{};

// All bits set in lanes [0, n) (maskload / maskstore of the first n floats).
OZ_SR_INLINE __m256i LaneMask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}


// The nonzero inputs of 8 output positions (lanes), listed per position: rowp(r) points to the 8
// lanes' input values of reduction row r (r < R; rows past R count as 0); lanes >= valid are
// ignored. For each lane j: val[j*stride + e] (the value) and idx[j*stride + e] (the row), e <
// cnt[j], in increasing row order; NaN and +-inf are kept (Conv multiplies them, by zero weights
// too). bnd[j*(nrc+1) + q] = the entries of lane j with row < q*rc (rc: a multiple of 8; nrc =
// ceil(R8/rc)), so a filter chunk can sweep the rows chunk by chunk. stride >= R rounded up to 8.
// About one operation per input value (8x8 transposes, a permutation from kCompress per 8
// rows), shared by every filter that reads the lists.
template <class RowPtr>
OZ_SR_INLINE void CompactLanes8(const RowPtr& rowp, int64_t R, int valid, int64_t rc, float* val, int32_t* idx,
                                int64_t stride, int32_t* cnt, int32_t* bnd) {
  const int64_t R8 = (R + 7) / 8 * 8, nrc = (R8 + rc - 1) / rc;
  int32_t c[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const __m256 z = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int vmask = (1 << valid) - 1;
  for (int j = 0; j < 8; ++j) bnd[j * (nrc + 1)] = 0;
  for (int64_t r = 0; r < R8; r += 8) {
    __m256 t[8];
    const int64_t full = std::min<int64_t>(8, R - r);
    for (int i = 0; i < 8; ++i) t[i] = i < full ? _mm256_loadu_ps(rowp(r + i)) : z;
    Transpose8(t);  // t[j]: rows r..r+7 of lane j
    const __m256i rows = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(r)), lane);
    for (int j = 0; j < 8; ++j) {
      const int m = ((vmask >> j) & 1) ? _mm256_movemask_ps(_mm256_cmp_ps(t[j], z, _CMP_NEQ_UQ)) : 0;
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.perm[m]));
      _mm256_storeu_ps(val + j * stride + c[j], _mm256_permutevar8x32_ps(t[j], perm));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j * stride + c[j]), _mm256_permutevar8x32_epi32(rows, perm));
      c[j] += __builtin_popcount(static_cast<unsigned>(m));
    }
    if ((r + 8) % rc == 0 || r + 8 == R8) {
      const int64_t q = (r + 8 + rc - 1) / rc;
      for (int j = 0; j < 8; ++j) bnd[j * (nrc + 1) + q] = c[j];
    }
  }
  for (int j = 0; j < 8; ++j) cnt[j] = c[j];
}

// ---- residual input ------------------------------------------------------------

// The optional last input `other` (N, K, OH, OW) of a residual site (Conv -> Add(other) -> ReLU):
// nullptr when the node does not declare it (`declared`, read at session creation). A tensor of
// any other shape fails naming the op, input 'other', the shape got and the one expected.
const float* OtherInput(OrtKernelContext* ctx, size_t index, bool declared, const ConvGeom& g, int64_t N,
                        const char* op);

// Y[i] = ReLU(Y[i] + other[i]) for i < n (NaN kept), on the session's pool: a residual site's
// second pass after a GEMM that could not fuse the shortcut.
void AddRelu(OrtKernelContext* ctx, float* Y, const float* other, int64_t n);

// ---- stride-phase row offsets ----------------------------------------------------

// Offset of reduction row r = (c, kh, kw) of one group in the padded, stride-phase-split input
// (BuildPaddedInput with allow_direct = false): the inputs of output columns ow0..ow0+7 of output
// row oh for row r are the 8 consecutive floats at base(oh, ow0) + roff[r], base(oh, ow0) =
// (group's first channel) + oh*SH*row + ow0.
std::vector<int64_t> RowOffsets(const ConvGeom& g, const PaddedInput& pi);

// ---- task partition --------------------------------------------------------------

// How many tasks to split `items` work items into (task t runs items
// [t*items/T, (t+1)*items/T)): oz::TaskCount, at least min_tasks_hint if given.
size_t PartitionTasks(size_t items, size_t min_tasks_hint = 0);

// ---- micro-kernels -----------------------------------------------------------------
//
// Accumulators live in registers for the whole call: acc (8*NA floats, 32-byte
// aligned memory) is loaded at the start and stored at the end. Term streams are
// read two terms per 32-bit load (the loads, not the FMAs, are the scarce
// resource: every FMA already reads its Col operand from memory).

#define OZ_SR_UNROLL _Pragma("GCC unroll 8")

template <int NA>
OZ_SR_INLINE void Fill(float* p, float v) {
  const __m256 b = _mm256_set1_ps(v);
  OZ_SR_UNROLL for (int i = 0; i < NA; ++i) _mm256_store_ps(p + 8 * i, b);
}

// acc += sum_t q_t * Col[row(t)] (row(): StridedRows, 32-byte aligned rows); terms are 2-byte
// pairs (row within the chunk: uint8, weight: int8), SparseQuantConv's form.
template <int NA, class Rows>
OZ_SR_INLINE void FmaRowsQ(float* acc, const Rows& row, const uint8_t* terms, size_t n) {
  __m256 a[NA], b[NA];
  OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_load_ps(acc + 8 * i), b[i] = _mm256_setzero_ps();
  size_t t = 0;
  for (; t + 2 <= n; t += 2) {
    uint32_t v;
    std::memcpy(&v, terms + 2 * t, 4);
    const float* r0 = row(v & 0xffu);
    const float* r1 = row((v >> 16) & 0xffu);
    const __m256 w0 = _mm256_set1_ps(static_cast<float>(static_cast<int8_t>(v >> 8)));
    const __m256 w1 = _mm256_set1_ps(static_cast<float>(static_cast<int8_t>(v >> 24)));
    if constexpr (NA <= 4) {  // two accumulator sets: 2*NA independent FMA chains
      OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_load_ps(r0 + 8 * i), a[i]);
      OZ_SR_UNROLL for (int i = 0; i < NA; ++i) b[i] = _mm256_fmadd_ps(w1, _mm256_load_ps(r1 + 8 * i), b[i]);
    } else {
      OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_load_ps(r0 + 8 * i), a[i]);
      OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_fmadd_ps(w1, _mm256_load_ps(r1 + 8 * i), a[i]);
    }
  }
  if (t < n) {
    const float* r0 = row(terms[2 * t]);
    const __m256 w0 = _mm256_set1_ps(static_cast<float>(static_cast<int8_t>(terms[2 * t + 1])));
    OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_load_ps(r0 + 8 * i), a[i]);
  }
  if constexpr (NA <= 4) {
    OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_add_ps(a[i], b[i]);
  }
  OZ_SR_UNROLL for (int i = 0; i < NA; ++i) _mm256_store_ps(acc + 8 * i, a[i]);
}

// The same for float weights and uint16 rows (EarlyExitConv's term lists), on
// register accumulators a (the caller loads/stores them around checks).
template <int NA, class Rows>
OZ_SR_INLINE void FmaRowsF(__m256 (&a)[NA], const Rows& row, const uint16_t* rows, const float* w, size_t n) {
  __m256 b[NA];
  OZ_SR_UNROLL for (int i = 0; i < NA; ++i) b[i] = _mm256_setzero_ps();
  size_t t = 0;
  for (; t + 2 <= n; t += 2) {
    uint32_t v;
    std::memcpy(&v, rows + t, 4);
    const float* r0 = row(v & 0xffffu);
    const float* r1 = row(v >> 16);
    const __m256 w0 = _mm256_broadcast_ss(w + t), w1 = _mm256_broadcast_ss(w + t + 1);
    if constexpr (NA <= 4) {
      OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_load_ps(r0 + 8 * i), a[i]);
      OZ_SR_UNROLL for (int i = 0; i < NA; ++i) b[i] = _mm256_fmadd_ps(w1, _mm256_load_ps(r1 + 8 * i), b[i]);
    } else {
      OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_load_ps(r0 + 8 * i), a[i]);
      OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_fmadd_ps(w1, _mm256_load_ps(r1 + 8 * i), a[i]);
    }
  }
  if (t < n) {
    const float* r0 = row(rows[t]);
    const __m256 w0 = _mm256_broadcast_ss(w + t);
    OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_load_ps(r0 + 8 * i), a[i]);
  }
  if constexpr (NA <= 4) {
    OZ_SR_UNROLL for (int i = 0; i < NA; ++i) a[i] = _mm256_add_ps(a[i], b[i]);
  }
}

// Lane masks of a block with np valid positions: valid[i] has all bits set in
// lanes 8*i + l < np.
template <int NA>
OZ_SR_INLINE void ValidMask(__m256 (&m)[NA], int np) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int i = 0; i < NA; ++i)
    m[i] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(np - 8 * i), lane));
}

// The starting partial sums of a block: lanes j < np get bias + other[j] (other: the block's
// row of the residual input, or nullptr), lanes past np get bias (masked out later).
template <int NA>
OZ_SR_INLINE void FillBias(float* acc, float bias, const float* other, int np) {
  Fill<NA>(acc, bias);
  if (!other) return;
  const __m256 b = _mm256_set1_ps(bias);
  int j = 0;
  for (; j + 8 <= np; j += 8) _mm256_store_ps(acc + j, _mm256_add_ps(b, _mm256_loadu_ps(other + j)));
  for (; j < np; ++j) acc[j] = bias + other[j];
}

// ReLU that lets a NaN through, as onnxruntime's Relu does (max_ps returns its second operand
// when either is NaN).
OZ_SR_INLINE __m256 Relu(__m256 v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }
OZ_SR_INLINE float Relu(float v) { return v <= 0.f ? 0.f : v; }

// Stores ReLU(a*scale + bias + other) (other: the block's row of the residual input, or
// nullptr) to the first np lanes of y.
template <int NA>
OZ_SR_INLINE void StoreRelu(const float* acc, float scale, float bias, const float* other, float* y, int np) {
  const __m256 s = _mm256_set1_ps(scale), b = _mm256_set1_ps(bias);
  int j = 0;
  if (other) {
    for (; j + 8 <= np; j += 8)
      _mm256_storeu_ps(y + j, Relu(_mm256_add_ps(_mm256_fmadd_ps(_mm256_load_ps(acc + j), s, b), _mm256_loadu_ps(other + j))));
    for (; j < np; ++j) y[j] = Relu(acc[j] * scale + bias + other[j]);
    return;
  }
  for (; j + 8 <= np; j += 8) _mm256_storeu_ps(y + j, Relu(_mm256_fmadd_ps(_mm256_load_ps(acc + j), s, b)));
  for (; j < np; ++j) y[j] = Relu(acc[j] * scale + bias);
}

}  // namespace sr
}  // namespace oz
