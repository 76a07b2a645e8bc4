// SpatialConv internals: the channels-last "segment" layout and the dot-product micro-kernels that
// compute any set of (output channel, output pixel) pairs at element granularity.
//
// Layout (prepared once per run for X, once per session for W):
//   * X of one image and group is copied channels-last and zero-padded: Xcl[Hp][Wp][Cg] with
//     Hp = H + pads, Wp = W + pads. The receptive field of output (oh, ow) then starts at
//     base = (oh*SH*Wp + ow*SW)*Cg and is a fixed list of contiguous "segments":
//       dilation_w == 1: one segment per kernel row r, KW*Cg floats at r*DH*Wp*Cg;
//       otherwise:       one per (r, s), Cg floats at (r*DH*Wp + s*DW)*Cg.
//   * W row k is the same segments, each zero-padded to a multiple of 8 floats (lpad), so a dot
//     product is nseg x lpad/8 full ymm steps. The padding reads up to 7 floats past a segment's end
//     (always inside the buffer, which carries 8 zero floats of slack) and multiplies them by 0.
//
// The micro-kernel computes MF output channels x MP pixels (MF*MP <= 12 ymm accumulators, a second
// accumulator set when the tile is small so FMA latency stays covered), then reduces horizontally and
// writes max(sum + bias, 0). Because every tile names its channels and pixels through pointer lists,
// the same kernel serves dense tiles, gathered first-phase pixels and per-patch second-phase work.
#pragma once

#include <cstddef>
#include <cstdint>

namespace oz {
namespace spatial {

struct SegLayout {
  int64_t nseg = 0;            // segments per receptive field
  int64_t len = 0;             // floats per segment (real)
  int64_t lpad = 0;            // floats per segment in W rows (multiple of 8)
  const int64_t* off = nullptr;  // nseg offsets (floats) from a pixel's base in Xcl
  int64_t row() const { return nseg * lpad; }  // floats per packed W row
};

// One list of channels x one list of pixels. Channel k reads W row w0 + k*wrow, writes output row
// y0 + k*ystride at columns ycol[j], with bias[k].
struct DotJob {
  const int32_t* k = nullptr;       // nf channel ids
  int64_t nf = 0;
  const float* w0 = nullptr;
  int64_t wrow = 0;
  float* y0 = nullptr;
  int64_t ystride = 0;
  const float* bias = nullptr;
  const float* const* x = nullptr;  // np pixel bases in Xcl
  const int64_t* ycol = nullptr;    // np output column offsets
  int64_t np = 0;
  // Optional: flags[fcol[j] + f] |= (output > 0) for every computed (f, j) (phase-1 "alive" flags;
  // f is the position in the channel list).
  uint8_t* flags = nullptr;
  const int64_t* fcol = nullptr;    // np flag offsets
};

// Outer-product job for a contiguous channel block: W panels of 16 channels, each [nseg*len][16]
// (segments unpadded), pixels broadcast from Xcl. Output/bias/flags as in DotJob; nf may be any
// count (the last panel's missing channels are zero weights and are not stored).
struct PanelJob {
  const float* wpan = nullptr;      // ceil(nf/16) panels of nseg*len*16 floats
  float* const* y = nullptr;        // nf output rows
  const float* bias = nullptr;      // ceil(nf/16)*16 biases (zero padded)
  int64_t nf = 0;
  const float* const* x = nullptr;
  const int64_t* ycol = nullptr;
  int64_t np = 0;
  uint8_t* flags = nullptr;         // optional: flags[fcol[j] + f] |= (output > 0)
  const int64_t* fcol = nullptr;
};
void PanelBlock(const PanelJob& job, const SegLayout& L) noexcept;

// Computes every (f, j) of the job. filters_outer: loop channel tiles outside (W tile stays in L1
// while pixels stream), else pixel tiles outside (pixels stay in L1 while W streams).
void DotBlock(const DotJob& job, const SegLayout& L, bool filters_outer) noexcept;

}  // namespace spatial
}  // namespace oz
