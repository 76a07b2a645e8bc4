// SpatialConv: Conv(+bias)(+other)+ReLU with spatial zero prediction. onnxzero/ops/spatial.py defines and
// documents the semantics (its `reference` is what the tests compare against).
//
// Per run:
//   1. X is copied channels-last and zero-padded per (image, group) (layout: spatial_conv.h), either
//      once for the whole batch or, when every task reads distinct rows (one channel block, small
//      halo), by each task for its own rows so the copy is hot in L2 when used. A dense 1x1 conv
//      without padding skips the copy and broadcasts straight from NCHW X.
//   2. An all-ones (or all-zeros) mask means no prediction: every output is computed with the
//      outer-product panel kernel (6 pixels x 16 channels, W pre-packed in 16-channel panels).
//   3. Otherwise the output is cut into p x p patches; tasks cover (image, group, channel block,
//      range of patch rows) and first zero their output region (so predicted-zero outputs cost no
//      scattered stores). Then
//        phase 1: the masked pixels x the block's channels. Layer-wide mask: one panel job over the
//                 masked pixels of all the task's patches (or dot tiles when W is so large that
//                 phase 2 should find the same W rows in cache); per-filter / full masks: channels
//                 grouped by pattern, dot tiles (4 channels x 3 pixels). The tiles record, per
//                 (patch, channel), whether any masked output is > 0 ("alive").
//        phase 2: per patch, the alive channels x the patch's remaining pixels (dot tiles); the
//                 dead channels' remaining outputs stay zero and are never computed.
//   Skipping is per (image, channel, patch) and every computed output costs exactly C/group*KH*KW
//   MACs, so the `macs` output equals the reference's element-granular count.
#include "spatial_conv.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <numeric>
#include <string>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "op_def.h"
#include "ops.h"
#include "simd.h"
#include "spatial_nchwc.h"

namespace oz {
namespace {

using spatial::DotBlock;
using spatial::DotJob;
using spatial::PanelBlock;
using spatial::PanelJob;
using spatial::SegLayout;

namespace S = spec::SpatialConv;
constexpr const char* kOp = S::kName;
constexpr int64_t kWBlockBytes = 192 * 1024;  // packed W rows of one task's channel block (L2-resident)
constexpr int64_t kTargetTasks = 8;          // tasks per run: enough for the pool to balance skipped work
constexpr int64_t kTaskBytes = 256 * 1024;    // a task's output region + input copy (L2-resident)
// Layer-wide phase 1 runs on the W panels unless a group's W exceeds this: then phase 1 reads the same
// W rows as phase 2 (dot tiles), so W streams from memory once per run instead of twice.
constexpr int64_t kPanelPhase1MaxW = 4 << 20;
// Kernel rows shorter than this (KW * C/group floats) switch to the row-merged layout.
constexpr int64_t kMergeBelow = 32;

// The kernels' one allocator (64-byte aligned, throws std::bad_alloc): gemm.h.
using FloatBuf = gemm::AlignedFloats;
using gemm::AllocFloats;

enum class MaskForm { kLayer, kFilter, kFull };

// ------------------------------------------------------------------------- channels-last input copy
inline void Transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  Transpose8(r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ldd, r[i]);
}

// One padded row ihp of image/group `img`: dst[Wp][Cg] from src = X + channel (g*Cg) plane.
void PackRow(const float* src_c0, int64_t plane, const ConvGeom& g, int64_t Wp, int64_t ihp, float* dst) {
  const int64_t Cg = g.Cg();
  const int64_t ih = ihp - g.PT;
  if (ih < 0 || ih >= g.H) {
    std::memset(dst, 0, sizeof(float) * Wp * Cg);
    return;
  }
  std::memset(dst, 0, sizeof(float) * g.PL * Cg);
  std::memset(dst + (g.PL + g.W) * Cg, 0, sizeof(float) * (Wp - g.PL - g.W) * Cg);
  const float* s = src_c0 + ih * g.W;
  float* d = dst + g.PL * Cg;
  if (Cg == 1) {
    std::memcpy(d, s, sizeof(float) * g.W);
    return;
  }
  int64_t c0 = 0;
  for (; c0 + 8 <= Cg; c0 += 8) {
    // 8 channel rows 24 channels ahead: the planes are far apart, too many streams for the hardware
    if (c0 + 32 <= Cg)
      for (int64_t c = c0 + 24; c < c0 + 32; ++c)
        for (int64_t w0 = 0; w0 < g.W; w0 += 16) _mm_prefetch(reinterpret_cast<const char*>(s + c * plane + w0), _MM_HINT_T0);
    int64_t w0 = 0;
    for (; w0 + 8 <= g.W; w0 += 8) Transpose8x8(s + c0 * plane + w0, plane, d + w0 * Cg + c0, Cg);
    for (; w0 < g.W; ++w0)
      for (int64_t c = c0; c < c0 + 8; ++c) d[w0 * Cg + c] = s[c * plane + w0];
  }
  for (; c0 < Cg; ++c0)
    for (int64_t w0 = 0; w0 < g.W; ++w0) d[w0 * Cg + c0] = s[c0 * plane + w0];
}

// Row-merged layout for output row oh: dst[iw][r][c] = padded X[c][oh*SH + r*DH][iw], iw < Wp, so the
// receptive field of (oh, ow) is the KW*KH*Cg contiguous floats at (ow*SW)*KH*Cg (dilation_w == 1).
// Built from channels-last padded rows `cl` (row ihp at cl + (ihp - ihp0)*Wp*Cg, 4 floats of slack).
void MergeRow(const float* cl, int64_t ihp0, const ConvGeom& g, int64_t Wp, int64_t oh, float* dst) {
  const int64_t Cg = g.Cg(), KH = g.KH;
  const float* src[64];
  for (int64_t r = 0; r < KH; ++r) src[r] = cl + (oh * g.SH + r * g.DH - ihp0) * Wp * Cg;
  if (Cg <= 4) {
    // one 16-byte copy per (iw, r): the spill past Cg floats is overwritten by the next copy (or
    // lands in the buffer's slack after the last one)
    for (int64_t iw = 0; iw < Wp; ++iw)
      for (int64_t r = 0; r < KH; ++r, dst += Cg) _mm_storeu_ps(dst, _mm_loadu_ps(src[r] + iw * Cg));
  } else {
    for (int64_t iw = 0; iw < Wp; ++iw)
      for (int64_t r = 0; r < KH; ++r, dst += Cg) std::memcpy(dst, src[r] + iw * Cg, sizeof(float) * Cg);
  }
}

// ------------------------------------------------------------------------------------------- kernel
struct Shared {  // one run, read-only for all tasks
  const ConvGeom* g = nullptr;
  int p = 2;
  int64_t N = 0, PH = 0, PW = 0, Hp = 0, Wp = 0, img = 0;  // img: floats per channels-last image/group
  SegLayout L;
  const float* xcl = nullptr;  // shared channels-last copy, or null: tasks pack their own rows
  bool direct = false;         // dense 1x1 without padding: no copy, panels broadcast from NCHW X
  bool merged = false;         // row-merged layout (MergeRow), always task-local
  const float* X = nullptr;
  float* Y = nullptr;
  const float* O = nullptr;  // optional residual input, (N, K, OH, OW) like Y
  const float* wpk = nullptr;
  int64_t wrow = 0;
  const float* bias = nullptr;
  const float* wpan = nullptr;    // 16-channel W panels per group (outer-product tiles)
  const float* bias16 = nullptr;  // biases, padded per group to whole panels
  int64_t npg = 0;                // panels per group
  bool panel_phase1 = true;       // phase 1 on panels; false: on W rows (phase 2 then finds them in cache)
  MaskForm form = MaskForm::kLayer;
  const uint8_t* mask = nullptr;
  int64_t FB = 0, nFB = 0, chunks = 0, units = 0;  // channel block, blocks, unit chunks, units to split
  int64_t dcol[16] = {}, dx[16] = {};  // patch bit q -> output column / Xcl offset from the patch corner
};

struct Scratch {
  std::vector<const float*> x;
  std::vector<float*> y;
  std::vector<const float*> o;  // residual rows of the channel list (when there is a residual)
  std::vector<int32_t> k, k2;
  std::vector<int64_t> ycol;
  std::vector<uint32_t> code;
  std::vector<int32_t> order, list;
  std::vector<const float*> x2;
  std::vector<int64_t> ycol2;
  std::vector<float> xbuf;   // task-local channels-last (or row-merged) input rows
  std::vector<float> xbuf2;  // channels-last rows the row-merged copy is built from
  std::vector<uint8_t> flags;
  std::vector<int64_t> fcol;
};

class Task {
 public:
  // Output rows [r0, r1) of image n, group grp, channel block fb. Without a shared channels-last copy
  // (s.xcl null) the task packs the input rows it reads into its own scratch (stays in L2).
  Task(const Shared& s, Scratch& sc, int64_t n, int64_t grp, int64_t fb, int64_t r0, int64_t r1)
      : s_(s), g_(*s.g), sc_(sc), n_(n), grp_(grp) {
    const int64_t Kg = g_.Kg();
    f0_ = fb * s.FB;
    f1_ = std::min(Kg, f0_ + s.FB);
    yimg_ = s.Y + n * g_.K * g_.P();
    if (s.O) oimg_ = s.O + n * g_.K * g_.P();
    if (s.direct) {  // 1x1, no padding: pixels read straight from NCHW X (L.xstep = H*W)
      xcl_ = s.X + (n * g_.C + grp * g_.Cg()) * g_.H * g_.W;
      return;
    }
    if (s.merged) {  // row-merged copy of the task's output rows, via channels-last input rows
      const int64_t Cg = g_.Cg(), row = s.Wp * g_.KH * Cg, plane = g_.H * g_.W, clrow = s.Wp * Cg;
      const int64_t a = r0 * g_.SH, b = std::min(s.Hp, RowsFor(r1));
      sc.xbuf2.resize(static_cast<size_t>((b - a) * clrow + 16));
      const float* src = s.X + (n * g_.C + grp * Cg) * plane;
      for (int64_t ihp = a; ihp < b; ++ihp) PackRow(src, plane, g_, s.Wp, ihp, sc.xbuf2.data() + (ihp - a) * clrow);
      std::fill(sc.xbuf2.data() + (b - a) * clrow, sc.xbuf2.data() + (b - a) * clrow + 16, 0.f);
      mr0_ = r0;
      sc.xbuf.resize(static_cast<size_t>((r1 - r0) * row + 16));
      float* buf = sc.xbuf.data();
      for (int64_t oh = r0; oh < r1; ++oh) MergeRow(sc.xbuf2.data(), a, g_, s.Wp, oh, buf + (oh - r0) * row);
      std::fill(buf + (r1 - r0) * row, buf + (r1 - r0) * row + 16, 0.f);
      xcl_ = buf;
      return;
    }
    if (s.xcl) {
      xcl_ = s.xcl + (n * g_.G + grp) * s.img;
      return;
    }
    // Task-local copy of the input rows [ihp0_, ihp1_) of output rows [r0, r1), packed by EnsureRows.
    const int64_t Cg = g_.Cg(), row = s.Wp * Cg;
    ihp0_ = r0 * g_.SH;
    ihp1_ = std::min(s.Hp, (r1 - 1) * g_.SH + (g_.KH - 1) * g_.DH + 1);
    packed_ = ihp0_;
    sc.xbuf.resize(static_cast<size_t>((ihp1_ - ihp0_) * row + 16));
    float* buf = sc.xbuf.data();
    std::fill(buf + (ihp1_ - ihp0_) * row, buf + (ihp1_ - ihp0_) * row + 16, 0.f);
    xsrc_ = s.X + (n * g_.C + grp * Cg) * g_.H * g_.W;
    xcl_ = buf;
    local_ = true;
  }

  // The local copy holds padded input rows up to (excluding) ihp: pack what is missing.
  void EnsureRows(int64_t ihp) {
    if (!local_) return;
    ihp = std::min(ihp, ihp1_);
    const int64_t plane = g_.H * g_.W, row = s_.Wp * g_.Cg();
    for (; packed_ < ihp; ++packed_)
      PackRow(xsrc_, plane, g_, s_.Wp, packed_, sc_.xbuf.data() + (packed_ - ihp0_) * row);
  }
  // Input rows needed by output rows < r (padded coordinates, exclusive).
  int64_t RowsFor(int64_t r) const { return (r - 1) * g_.SH + (g_.KH - 1) * g_.DH + 1; }

  int64_t Channels() const { return f1_ - f0_; }
  int64_t Global(int64_t f) const { return grp_ * g_.Kg() + f0_ + f; }  // f: index in block

  const float* XBase(int64_t oh, int64_t ow) const {
    if (s_.direct) return xcl_ + oh * g_.SH * g_.W + ow * g_.SW;
    if (s_.merged) return xcl_ + ((oh - mr0_) * s_.Wp + ow * g_.SW) * g_.KH * g_.Cg();
    return xcl_ + ((oh * g_.SH - ihp0_) * s_.Wp + ow * g_.SW) * g_.Cg();
  }

  // All pixels of output rows [r0, r1), every channel of the block.
  int64_t Dense(int64_t r0, int64_t r1) {
    EnsureRows(RowsFor(r1));
    const int64_t nf = Channels();
    SetChannels(nullptr, nf);
    sc_.x.clear();
    sc_.ycol.clear();
    for (int64_t oh = r0; oh < r1; ++oh)
      for (int64_t ow = 0; ow < g_.OW; ++ow) {
        sc_.x.push_back(XBase(oh, ow));
        sc_.ycol.push_back(oh * g_.OW + ow);
      }
    RunPanels(nullptr, nullptr);
    return nf * static_cast<int64_t>(sc_.x.size());
  }

  // Patch rows [u0, u1) with prediction. Returns elements computed. The task's output region is
  // zeroed first (sequential stores), so predicted-zero outputs need no scattered writes.
  int64_t Predict(int64_t u0, int64_t u1) {
    int64_t done = 0;
    const int p = s_.p;
    const int64_t pa = u0 * s_.PW, pb = u1 * s_.PW;
    {
      const int64_t r0 = u0 * p, r1 = std::min<int64_t>(u1 * p, g_.OH);
      for (int64_t f = 0; f < Channels(); ++f)
        std::memset(yimg_ + Global(f) * g_.P() + r0 * g_.OW, 0, sizeof(float) * (r1 - r0) * g_.OW);
    }
    EnsureRows(RowsFor(std::min<int64_t>(u1 * p, g_.OH)));
    if (s_.form == MaskForm::kLayer) return LayerPatches(pa, pb);
    if (s_.form == MaskForm::kFull) {
      for (int64_t t = pa; t < pb; ++t) {
        const uint32_t vb = ValidBits(t);
        const int64_t pi = t / s_.PW, pj = t % s_.PW;
        sc_.code.resize(Channels());
        for (int64_t f = 0; f < Channels(); ++f) {
          const uint8_t* m = s_.mask + Global(f) * g_.P();
          uint32_t c = 0;
          for (int i = 0; i < p; ++i)
            for (int j = 0; j < p; ++j) {
              if (!(vb >> (i * p + j) & 1u)) continue;
              if (m[(pi * p + i) * g_.OW + pj * p + j]) c |= 1u << (i * p + j);
            }
          sc_.code[f] = c;
        }
        sc_.list.assign(1, static_cast<int32_t>(t));
        done += PatchSet(vb);
      }
      return done;
    }
    // filter masks: patches of the same shape share every channel's pattern
    for (int kind = 0; kind < 4; ++kind) {
      sc_.list.clear();
      for (int64_t t = pa; t < pb; ++t)
        if (Kind(t) == kind) sc_.list.push_back(static_cast<int32_t>(t));
      if (sc_.list.empty()) continue;
      const uint32_t vb = ValidBits(sc_.list[0]);
      sc_.code.resize(Channels());
      for (int64_t f = 0; f < Channels(); ++f) {
        const uint8_t* m = s_.form == MaskForm::kLayer ? s_.mask : s_.mask + Global(f) * p * p;
        uint32_t c = 0;
        for (int q = 0; q < p * p; ++q)
          if (m[q]) c |= 1u << q;
        sc_.code[f] = c & vb;
      }
      done += PatchSet(vb);
    }
    return done;
  }

 private:
  // Alive channels (flag bytes != 0; the buffer has 16 bytes of slack) -> sc_.k2. Returns the count.
  int64_t Compact(const uint8_t* fl, int64_t nf) {
    int64_t na = 0;
    const __m128i zero = _mm_setzero_si128();
    for (int64_t i0 = 0; i0 < nf; i0 += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(fl + i0));
      uint32_t bits = ~static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, zero))) & 0xFFFFu;
      if (nf - i0 < 16) bits &= (1u << (nf - i0)) - 1;
      while (bits) {
        const int64_t i = i0 + __builtin_ctz(bits);
        bits &= bits - 1;
        sc_.k2[na++] = sc_.k[i];
      }
    }
    return na;
  }

  // Layer-wide pattern: every channel of the block shares each patch's pattern, so phase 1 is one
  // outer-product job over the masked pixels of all the task's patches (plus the whole patches whose
  // pattern selects no in-range pixel, or all of them), whatever their shape.
  int64_t LayerPatches(int64_t pa, int64_t pb) {
    const int p = s_.p;
    uint32_t layer = 0;
    for (int q = 0; q < p * p; ++q)
      if (s_.mask[q]) layer |= 1u << q;
    const int64_t nf = Channels();
    SetChannels(nullptr, nf);
    sc_.x.clear();
    sc_.ycol.clear();
    sc_.fcol.clear();
    sc_.list.clear();   // predicted patches
    sc_.order.clear();  // their remaining bits
    int64_t npred = 0;
    for (int64_t t = pa; t < pb; ++t) {
      const uint32_t vb = ValidBits(t), c = layer & vb;
      const bool whole = c == 0 || c == vb;
      AddPixels(t, whole ? vb : c, sc_.x, sc_.ycol);
      // flags of whole patches land in a scratch row after the predicted ones (never read)
      sc_.fcol.resize(sc_.x.size(), whole ? -1 : npred * nf);
      if (!whole) {
        sc_.list.push_back(static_cast<int32_t>(t));
        sc_.order.push_back(static_cast<int32_t>(vb & ~c));
        ++npred;
      }
    }
    for (auto& fc : sc_.fcol)
      if (fc < 0) fc = npred * nf;
    sc_.flags.assign(static_cast<size_t>((npred + 1) * nf + 16), 0);
    if (s_.panel_phase1) {
      RunPanels(sc_.flags.data(), sc_.fcol.data());
    } else {
      DotBlock(Job(sc_.k.data(), nf, sc_.x, sc_.ycol, sc_.flags.data(), sc_.fcol.data()), s_.L, true);
    }
    int64_t done = nf * static_cast<int64_t>(sc_.x.size());
    // phase 2: per predicted patch, alive channels x remaining pixels
    for (int64_t q = 0; q < npred; ++q) {
      const int64_t na = Compact(sc_.flags.data() + q * nf, nf);
      if (na == 0) continue;
      const uint32_t rb = static_cast<uint32_t>(sc_.order[q]);
      sc_.x2.clear();
      sc_.ycol2.clear();
      AddPixels(sc_.list[q], rb, sc_.x2, sc_.ycol2);
      DotBlock(Job(sc_.k2.data(), na, sc_.x2, sc_.ycol2), s_.L, false);
      done += na * static_cast<int64_t>(sc_.x2.size());
    }
    return done;
  }

  int Kind(int64_t t) const {
    const int64_t pi = t / s_.PW, pj = t % s_.PW;
    const bool bottom = (pi + 1) * s_.p > g_.OH, right = (pj + 1) * s_.p > g_.OW;
    return (bottom ? 2 : 0) + (right ? 1 : 0);
  }
  uint32_t ValidBits(int64_t t) const {
    const int p = s_.p;
    const int64_t pi = t / s_.PW, pj = t % s_.PW;
    const int64_t rows = std::min<int64_t>(p, g_.OH - pi * p), cols = std::min<int64_t>(p, g_.OW - pj * p);
    uint32_t vb = 0;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) vb |= 1u << (i * p + j);
    return vb;
  }
  // Appends the pixels of `bits` of patch t to xs / cols (row-major within the patch).
  void AddPixels(int64_t t, uint32_t bits, std::vector<const float*>& xs, std::vector<int64_t>& cols) const {
    const int64_t pi = t / s_.PW, pj = t % s_.PW;
    const int64_t col0 = pi * s_.p * g_.OW + pj * s_.p;
    const float* x0 = XBase(pi * s_.p, pj * s_.p);
    while (bits) {
      const int q = __builtin_ctz(bits);
      bits &= bits - 1;
      xs.push_back(x0 + s_.dx[q]);
      cols.push_back(col0 + s_.dcol[q]);
    }
  }

  // Channel list -> global ids and output rows (idx == nullptr: the whole block in order).
  void SetChannels(const int32_t* idx, int64_t nf) {
    sc_.k.resize(nf);
    sc_.k2.resize(nf);
    sc_.y.resize(nf);
    sc_.o.resize(oimg_ ? nf : 0);
    for (int64_t i = 0; i < nf; ++i) {
      const int64_t k = Global(idx ? idx[i] : i);
      sc_.k[i] = static_cast<int32_t>(k);
      sc_.y[i] = yimg_ + k * g_.P();
      if (oimg_) sc_.o[i] = oimg_ + k * g_.P();
    }
  }

  // The whole channel block in order (contiguous panels) x the current pixel list.
  void RunPanels(uint8_t* flags, const int64_t* fcol) {
    PanelJob job;
    job.wpan = s_.wpan + (grp_ * s_.npg + f0_ / 16) * s_.L.nseg * s_.L.len * 16;
    job.y = sc_.y.data();
    job.o = oimg_ ? sc_.o.data() : nullptr;
    job.bias = s_.bias16 + (grp_ * s_.npg + f0_ / 16) * 16;
    job.nf = Channels();
    job.x = sc_.x.data();
    job.ycol = sc_.ycol.data();
    job.np = static_cast<int64_t>(sc_.x.size());
    job.flags = flags;
    job.fcol = fcol;
    PanelBlock(job, s_.L);
  }

  // Channels k[0..nf) (global ids) x pixels; optional phase-1 flags.
  DotJob Job(const int32_t* k, int64_t nf, const std::vector<const float*>& xs, const std::vector<int64_t>& cols,
             uint8_t* flags = nullptr, const int64_t* fcol = nullptr) const {
    DotJob job;
    job.k = k;
    job.nf = nf;
    job.w0 = s_.wpk;
    job.wrow = s_.wrow;
    job.y0 = yimg_;
    job.ystride = g_.P();
    job.bias = s_.bias;
    job.o0 = oimg_;
    job.x = xs.data();
    job.ycol = cols.data();
    job.np = static_cast<int64_t>(xs.size());
    job.flags = flags;
    job.fcol = fcol;
    return job;
  }

  void Run(int64_t nf, bool filters_outer) { DotBlock(Job(sc_.k.data(), nf, sc_.x, sc_.ycol), s_.L, filters_outer); }

  // Patches sc_.list (all of valid bits vb), channel patterns sc_.code. Returns elements computed.
  int64_t PatchSet(uint32_t vb) {
    const int64_t nf = Channels();
    const int64_t npatch = static_cast<int64_t>(sc_.list.size());
    sc_.order.resize(nf);
    std::iota(sc_.order.begin(), sc_.order.end(), 0);
    std::stable_sort(sc_.order.begin(), sc_.order.end(),
                     [&](int32_t a, int32_t b) { return sc_.code[a] < sc_.code[b]; });
    int64_t done = 0;
    for (int64_t a = 0; a < nf;) {
      const uint32_t c = sc_.code[sc_.order[a]];
      int64_t e = a;
      while (e < nf && sc_.code[sc_.order[e]] == c) ++e;
      const int32_t* F = sc_.order.data() + a;
      const int64_t nF = e - a;
      const bool whole = nF == nf;  // one pattern for the block: channels in order, panels apply
      a = e;
      SetChannels(F, nF);
      sc_.x.clear();
      sc_.ycol.clear();
      if (c == 0 || c == vb) {  // no prediction possible: compute the whole patches
        for (int64_t q = 0; q < npatch; ++q) AddPixels(sc_.list[q], vb, sc_.x, sc_.ycol);
        if (whole)
          RunPanels(nullptr, nullptr);
        else
          Run(nF, true);
        done += nF * static_cast<int64_t>(sc_.x.size());
        continue;
      }
      // phase 1: masked pixels of every patch x the group's channels; the tiles flag, per patch and
      // channel, whether any masked output is > 0
      const int m = __builtin_popcount(c);
      for (int64_t q = 0; q < npatch; ++q) AddPixels(sc_.list[q], c, sc_.x, sc_.ycol);
      sc_.flags.assign(static_cast<size_t>(npatch * nF + 16), 0);
      sc_.fcol.resize(sc_.x.size());
      for (int64_t q = 0; q < npatch; ++q)
        for (int j = 0; j < m; ++j) sc_.fcol[q * m + j] = q * nF;
      if (whole)
        RunPanels(sc_.flags.data(), sc_.fcol.data());
      else
        DotBlock(Job(sc_.k.data(), nF, sc_.x, sc_.ycol, sc_.flags.data(), sc_.fcol.data()), s_.L, true);
      done += nF * static_cast<int64_t>(sc_.x.size());
      // phase 2: per patch, alive channels x remaining pixels (dead ones stay zero: the region was
      // zeroed, nothing is computed)
      const uint32_t rb = vb & ~c;
      const int r = __builtin_popcount(rb);
      for (int64_t q = 0; q < npatch; ++q) {
        const int64_t na = Compact(sc_.flags.data() + q * nF, nF);
        if (na == 0) continue;
        std::vector<const float*>& xs = sc_.x2;
        std::vector<int64_t>& cols = sc_.ycol2;
        xs.clear();
        cols.clear();
        AddPixels(sc_.list[q], rb, xs, cols);
        DotBlock(Job(sc_.k2.data(), na, xs, cols), s_.L, false);
        done += na * r;
      }
    }
    return done;
  }

  const Shared& s_;
  const ConvGeom& g_;
  Scratch& sc_;
  int64_t n_, grp_, f0_ = 0, f1_ = 0, ihp0_ = 0, ihp1_ = 0, packed_ = 0, mr0_ = 0;
  bool local_ = false;
  const float* xsrc_ = nullptr;  // this image/group's NCHW planes (local copies)
  const float* xcl_ = nullptr;
  float* yimg_ = nullptr;
  const float* oimg_ = nullptr;  // this image's residual planes, or null
};

struct SpatialConvKernel {
  ConvAttrs attrs;
  int p = 2;
  ConstTensor w;
  std::vector<float> bias;
  ConstTensor mask;
  bool mask_const = false;
  int64_t K = 0, Cg = 0, KH = 0, KW = 0, G = 1;
  int64_t nseg = 0, len = 0, lpad = 0;
  bool merged = false;  // row-merged input layout (see MergeRow)
  FloatBuf wpk;
  FloatBuf wpan;              // 16-channel panels per group: [G][npg][nseg*len][16]
  std::vector<float> bias16;  // [G][npg*16]
  int64_t npg = 0;
  // The NCHWc path (spatial_nchwc.h): dense masks run exactly as ConvRelu (nchwc::RunConv), layer-wide
  // masks on RunNchwc; the channels-last kernels above serve the rest (groups, per-filter and full
  // masks, stems with fewer input channels than a block). OZ_SPATIAL=legacy (read once) forces them.
  nchwc::Filters filters;
  nchwc::Layouts lay;

  explicit SpatialConvKernel(const OrtKernelInfo* info) {
    attrs = ReadConvAttrs(info, kOp);
    const int64_t patch = AttrInt(info, "patch", -1);
    if (patch == -1) Fail(kOp, "attribute 'patch' is missing, expected 2, 3 or 4");
    if (patch < 2 || patch > 4) Fail(kOp, Msg("attribute 'patch' is ", patch, ", expected 2, 3 or 4"));
    p = static_cast<int>(patch);
    w = RequireConstInput(info, S::kW, kOp, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    CheckWeightShape(attrs, w.shape, kOp);
    K = w.shape[0];
    Cg = w.shape[1];
    KH = w.shape[2];
    KW = w.shape[3];
    G = attrs.group;
    Ort::ConstKernelInfo ki(info);
    const size_t nin = ki.GetInputCount();
    bias.assign(K, 0.f);
    bool has_bias = false;
    if (nin > S::kB && !ki.GetInputName(S::kB).empty()) {
      has_bias = true;
      ConstTensor b = RequireConstInput(info, S::kB, kOp, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (b.shape.size() != 1 || b.shape[0] != K)
        Fail(kOp, Msg("input 'B' has shape ", ShapeStr(b.shape), ", expected (", K, ",)"));
      std::copy(b.as<float>(), b.as<float>() + K, bias.begin());
    }
    if (nin <= S::kMask || ki.GetInputName(S::kMask).empty())
      Fail(kOp, "input 'mask' (3) is missing, expected a uint8 mask of shape (p, p), (K, p, p) or (K, OH, OW)");
    mask_const = TryGetConstInput(info, S::kMask, &mask);
    if (mask_const) {
      if (mask.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
        Fail(kOp, Msg("input 'mask' has element type ", mask.type, ", expected uint8 (", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ")"));
      const auto& ms = mask.shape;
      const bool ok = (ms.size() == 2 && ms[0] == p && ms[1] == p) || (ms.size() == 3 && ms[0] == K && ms[1] >= 1 && ms[2] >= 1);
      if (!ok)
        Fail(kOp, Msg("input 'mask' has shape ", ShapeStr(ms), ", expected (p, p)=(", p, ", ", p, "), (K, p, p)=(", K, ", ", p,
                      ", ", p, ") or (K, OH, OW)=(", K, ", OH, OW)"));
      CheckValues(mask.as<uint8_t>(), mask.numel());
    }
    // Packed W rows: segments of the channels-last receptive field, each padded to lpad floats.
    // Short kernel rows (e.g. 7x7 on 3 channels: 21 floats) use the row-merged input layout instead:
    // one segment of KW*KH*Cg floats in (s, r, c) order.
    merged = attrs.dilations[1] == 1 && KH > 1 && KH <= 64 && KW * Cg < kMergeBelow;
    if (merged) {
      nseg = 1;
      len = KW * KH * Cg;
    } else if (attrs.dilations[1] == 1) {
      nseg = KH;
      len = KW * Cg;
    } else {
      nseg = KH * KW;
      len = Cg;
    }
    lpad = (len + 7) / 8 * 8;
    const int64_t row = nseg * lpad;
    wpk = AllocFloats(static_cast<size_t>(K * row));
    std::fill(wpk.get(), wpk.get() + K * row, 0.f);
    const float* W = w.as<float>();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t r = 0; r < KH; ++r)
          for (int64_t s = 0; s < KW; ++s) {
            const int64_t seg = merged ? 0 : attrs.dilations[1] == 1 ? r : r * KW + s;
            const int64_t at = merged ? (s * KH + r) * Cg + c : attrs.dilations[1] == 1 ? s * Cg + c : c;
            wpk[k * row + seg * lpad + at] = W[((k * Cg + c) * KH + r) * KW + s];
          }
    // Panels: the same segment order, unpadded, 16 channels of one group interleaved per row.
    const int64_t Kg = K / G, crs = nseg * len;
    npg = (Kg + 15) / 16;
    wpan = AllocFloats(static_cast<size_t>(G * npg * crs * 16));
    std::fill(wpan.get(), wpan.get() + G * npg * crs * 16, 0.f);
    bias16.assign(G * npg * 16, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t grp = k / Kg, kl = k % Kg, panel = grp * npg + kl / 16, lane = kl % 16;
      bias16[panel * 16 + lane] = bias[k];
      for (int64_t sg = 0; sg < nseg; ++sg)
        for (int64_t i = 0; i < len; ++i) wpan[(panel * crs + sg * len + i) * 16 + lane] = wpk[k * row + sg * lpad + i];
    }
    static const bool legacy = [] {
      const char* e = std::getenv("OZ_SPATIAL");
      return e != nullptr && std::string(e) == "legacy";
    }();
    if (!legacy && G == 1) filters = nchwc::Filters(W, has_bias ? bias.data() : nullptr, K, Cg, KH, KW, 1, true);
    lay = nchwc::ReadLayouts(info, kOp, K, Cg * G, G);
  }

  static void CheckValues(const uint8_t* m, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
      if (m[i] > 1) Fail(kOp, Msg("input 'mask' has value ", int(m[i]), " at flat index ", i, ", expected 0 or 1"));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard([&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(S::kX);
    const auto xs = nchwc::NchwShapeOfX(x.GetTensorTypeAndShapeInfo().GetShape(), lay.x, kOp);
    const ConvGeom g = ResolveConv(attrs, w.shape, xs, kOp);
    const int64_t N = xs[0];

    // ---- mask: form and values
    const uint8_t* mdata = nullptr;
    std::vector<int64_t> mshape;
    int64_t mnum = 0;
    if (mask_const) {
      mdata = mask.as<uint8_t>();
      mshape = mask.shape;
      mnum = mask.numel();
    } else {
      auto mv = ctx.GetInput(S::kMask);
      auto ti = mv.GetTensorTypeAndShapeInfo();
      if (ti.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
        Fail(kOp, Msg("input 'mask' has element type ", ti.GetElementType(), ", expected uint8"));
      mshape = ti.GetShape();
      mnum = static_cast<int64_t>(ti.GetElementCount());
      mdata = mv.GetTensorData<uint8_t>();
    }
    MaskForm form;
    if (mshape.size() == 2 && mshape[0] == p && mshape[1] == p)
      form = MaskForm::kLayer;
    else if (mshape.size() == 3 && mshape[0] == K && mshape[1] == p && mshape[2] == p)
      form = MaskForm::kFilter;
    else if (mshape.size() == 3 && mshape[0] == K && mshape[1] == g.OH && mshape[2] == g.OW)
      form = MaskForm::kFull;
    else
      Fail(kOp, Msg("input 'mask' has shape ", ShapeStr(mshape), ", expected (p, p)=(", p, ", ", p, "), (K, p, p)=(", K,
                    ", ", p, ", ", p, ") or (K, OH, OW)=(", K, ", ", g.OH, ", ", g.OW, ") for an output of ", g.OH, "x",
                    g.OW));
    if (!mask_const) CheckValues(mdata, mnum);
    bool any0 = false, any1 = false;
    for (int64_t i = 0; i < mnum && !(any0 && any1); ++i) (mdata[i] ? any1 : any0) = true;
    const bool dense = !(any0 && any1);  // all ones, or all zeros (nothing selected: no prediction)

    // ---- optional residual: ReLU(conv + B + other)
    const float* O = nullptr;
    const std::vector<int64_t> yshape{N, g.K, g.OH, g.OW};
    if (lay.other) {
      O = nchwc::OtherInputIn(ctx, 4, yshape, true, kOp);
    } else if (ctx.GetInputCount() > S::kOther) {
      Ort::ConstValue ov = ctx.GetInput(S::kOther);
      if (ov) {
        const auto os = ov.GetTensorTypeAndShapeInfo().GetShape();
        if (os != std::vector<int64_t>{N, g.K, g.OH, g.OW})
          Fail(kOp, Msg("input 'other' has shape ", ShapeStr(os), ", expected (N, K, OH, OW)=(", N, ", ", g.K, ", ",
                        g.OH, ", ", g.OW, ")"));
        O = ov.GetTensorData<float>();
      }
    }

    auto y = ctx.GetOutput(0, lay.y ? nchwc::BlockedShape(yshape) : yshape);
    float* Y = y.GetTensorMutableData<float>();
    const float* X = x.GetTensorData<float>();
    int64_t elems = 0;
    if (N > 0) {
      const bool nchwc_path = spatial::NchwcServes(filters, g);
      // No prediction: ConvRelu's run, except with a residual where the NCHWc path serves (nchwc::RunConv's
      // residual write-back turns NaN into 0; onnxruntime's Conv+Add+Relu keeps it): RunNchwc with
      // p = 1, every position masked.
      static const uint8_t kOne = 1;
      // OZ_SPATIAL=nchwc (read once): the NCHWc path never hands a layer-mask run to these kernels.
      static const bool legacy_never = [] {
        const char* e = std::getenv("OZ_SPATIAL");
        return e != nullptr && std::string(e) == "nchwc";
      }();
      elems = -1;
      if (dense && filters.ok() && !(O && nchwc_path)) {
        nchwc::RunOptions opt;
        opt.residual = O;
        opt.x_blocked = lay.x, opt.residual_blocked = lay.other, opt.y_blocked = lay.y;
        elems = nchwc::RunConv(context, g, filters, X, N, Y, opt) / g.CRS();
      } else if ((dense || form == MaskForm::kLayer) && nchwc_path) {
        spatial::NchwcRun r;
        r.g = &g, r.f = &filters, r.p = dense ? 1 : p, r.mask = dense ? &kOne : mdata;
        r.X = X, r.other = O, r.Y = Y, r.N = N;
        r.x_blocked = lay.x, r.other_blocked = lay.other, r.y_blocked = lay.y;
        r.may_decline = !dense && !legacy_never;
        elems = spatial::RunNchwc(context, r);
      }
      if (elems >= 0) {
        // done
      } else if (lay.Any()) {
        elems = nchwc::WithNchw(context, lay, X, xs, O, yshape, Y, [&](const float* xn, const float* on, float* yn) {
          return Run(context, g, N, xn, on, yn, form, mdata, dense);
        });
      } else {
        elems = Run(context, g, N, X, O, Y, form, mdata, dense);
      }
    }
    if (ctx.GetOutputCount() > 1) {
      auto mo = ctx.GetOutput(1, std::vector<int64_t>{});
      *mo.GetTensorMutableData<int64_t>() = elems * g.CRS();
    }
  }

  int64_t Run(OrtKernelContext* context, const ConvGeom& g, int64_t N, const float* X, const float* O, float* Y,
              MaskForm form, const uint8_t* mdata, bool dense) const {
    Shared s;
    s.g = &g;
    s.p = p;
    s.N = N;
    s.Hp = g.H + g.PT + g.PB;
    s.Wp = g.W + g.PL + g.PR;
    s.img = s.Hp * s.Wp * g.Cg();
    s.PH = (g.OH + p - 1) / p;
    s.PW = (g.OW + p - 1) / p;
    std::vector<int64_t> off(nseg, 0);
    if (!merged)
      for (int64_t r = 0; r < KH; ++r)
        for (int64_t sw = 0; sw < (attrs.dilations[1] == 1 ? 1 : KW); ++sw) {
          const int64_t seg = attrs.dilations[1] == 1 ? r : r * KW + sw;
          off[seg] = (r * g.DH * s.Wp + sw * g.DW) * g.Cg();
        }
    s.merged = merged;
    s.L.nseg = nseg;
    s.L.len = len;
    s.L.lpad = lpad;
    s.L.off = off.data();
    s.wpk = wpk.get();
    s.wrow = nseg * lpad;
    s.bias = bias.data();
    s.wpan = wpan.get();
    s.bias16 = bias16.data();
    s.npg = npg;
    s.panel_phase1 = g.Kg() * nseg * lpad * 4 <= kPanelPhase1MaxW;
    s.form = form;
    s.mask = mdata;
    for (int q = 0; q < p * p; ++q) {
      s.dcol[q] = (q / p) * g.OW + q % p;
      s.dx[q] = merged ? ((q / p) * s.Wp + (q % p) * g.SW) * g.KH * g.Cg()
                       : ((q / p) * g.SH * s.Wp + (q % p) * g.SW) * g.Cg();
    }
    s.Y = Y;
    s.O = O;

    // 1. task layout: (image, group, channel block, chunk of output rows / patch rows)
    const int64_t Kg = g.Kg();
    s.nFB = std::max<int64_t>(1, (Kg * s.wrow * 4 + kWBlockBytes - 1) / kWBlockBytes);
    s.FB = ((Kg + s.nFB - 1) / s.nFB + 15) / 16 * 16;  // whole panels
    s.nFB = (Kg + s.FB - 1) / s.FB;
    s.units = dense ? g.OH : s.PH;
    {
      // enough tasks for the pool, and few enough output rows per task that its output region and
      // input copy stay in L2
      const int64_t by_tasks = (kTargetTasks + N * g.G * s.nFB - 1) / (N * g.G * s.nFB);
      const int64_t xrow = merged ? s.Wp * g.KH * g.Cg() : s.Wp * g.Cg() * g.SH;  // input floats per output row
      const int64_t row_bytes = 4 * (std::min(s.FB, Kg) * g.OW + xrow);
      const int64_t by_bytes = (g.OH * row_bytes + kTaskBytes - 1) / kTaskBytes;
      s.chunks = std::clamp<int64_t>(std::max(by_tasks, by_bytes), 1, s.units);
    }
    const int64_t ntask = N * g.G * s.nFB * s.chunks;
    const int64_t unit_rows = dense ? 1 : p;
    auto rows_of = [&](int64_t chunk, int64_t* r0, int64_t* r1) {
      const int64_t u0 = s.units * chunk / s.chunks, u1 = s.units * (chunk + 1) / s.chunks;
      *r0 = u0 * unit_rows;
      *r1 = std::min(g.OH, u1 * unit_rows);
    };

    // 2. channels-last padded input. One shared copy, unless every task reads distinct rows once
    //    (one channel block, small halo): then each task packs its own rows, hot in L2 when used.
    const int64_t ekh = (g.KH - 1) * g.DH + 1;
    const double band = static_cast<double>(g.OH) / s.chunks;  // output rows per task (about)
    const bool local = s.nFB == 1 && ((band - 1) * g.SH + ekh) <= 1.25 * band * g.SH;
    s.X = X;
    s.direct = dense && g.KH == 1 && g.KW == 1 && g.PT == 0 && g.PL == 0 && g.PB == 0 && g.PR == 0;
    if (s.direct) s.L.xstep = g.H * g.W;
    FloatBuf xcl;
    if (!local && !s.direct && !s.merged) {
      const int64_t nimg = N * g.G;
      xcl = AllocFloats(static_cast<size_t>(nimg * s.img + 16));
      std::fill(xcl.get() + nimg * s.img, xcl.get() + nimg * s.img + 16, 0.f);
      const int64_t rows = nimg * s.Hp;
      const int64_t npack = std::min<int64_t>(rows, 4 * kTargetTasks);
      const int64_t plane = g.H * g.W;
      ParallelFor(context, static_cast<size_t>(npack), [&](size_t t) {
        const int64_t r0 = rows * static_cast<int64_t>(t) / npack, r1 = rows * static_cast<int64_t>(t + 1) / npack;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t im = r / s.Hp, ihp = r % s.Hp;
          const int64_t n = im / g.G, grp = im % g.G;
          PackRow(X + (n * g.C + grp * g.Cg()) * plane, plane, g, s.Wp, ihp, xcl.get() + im * s.img + ihp * s.Wp * g.Cg());
        }
      });
      s.xcl = xcl.get();
    }

    std::vector<int64_t> done(ntask, 0);
    std::atomic<bool> failed{false};
    ParallelFor(context, static_cast<size_t>(ntask), [&](size_t ti) {
      try {
        int64_t t = static_cast<int64_t>(ti);
        const int64_t chunk = t % s.chunks;
        t /= s.chunks;
        const int64_t fb = t % s.nFB;
        t /= s.nFB;
        const int64_t grp = t % g.G, n = t / g.G;
        const int64_t u0 = s.units * chunk / s.chunks, u1 = s.units * (chunk + 1) / s.chunks;
        int64_t r0, r1;
        rows_of(chunk, &r0, &r1);
        thread_local Scratch sc;
        Task task(s, sc, n, grp, fb, r0, r1);
        done[ti] = dense ? task.Dense(r0, r1) : task.Predict(u0, u1);
      } catch (...) {
        failed = true;
      }
    });
    if (failed) Fail(kOp, "out of memory for the per-task scratch buffers");
    return std::accumulate(done.begin(), done.end(), int64_t{0});
  }
};

}  // namespace

const OrtCustomOp* SpatialConvOp() {
  // X, W, B (optional), mask, other (optional residual, last)
  static ConvOpDef<SpatialConvKernel> op(S::kName, S::kInputs);
  return &op;
}

}  // namespace oz
