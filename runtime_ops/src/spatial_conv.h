// SpatialConv internals: input layouts and the two micro-kernels that compute any set of
// (output channel, output pixel) pairs.
//
// Layouts (prepared once per run for X, once per session for W):
//   * channels-last: X of one image and group copied zero-padded as Xcl[Hp][Wp][Cg]. The receptive
//     field of output (oh, ow) starts at base = (oh*SH*Wp + ow*SW)*Cg and is a fixed list of
//     contiguous "segments": dilation_w == 1: one per kernel row r, KW*Cg floats at r*DH*Wp*Cg;
//     otherwise one per (r, s), Cg floats at (r*DH*Wp + s*DW)*Cg.
//   * row-merged (short kernel rows, KW*Cg < 32, e.g. a 7x7 stem on 3 channels): per output row,
//     [Wp][KH][Cg], so the whole field is one segment of KW*KH*Cg floats in (s, r, c) order.
//   * NCHW itself for a dense 1x1 without padding (panel kernel only, xstep = H*W).
//   * W rows: the same segments, each zero-padded to lpad (multiple of 8) floats, for the dot kernel;
//     W panels: 16 channels interleaved per reduction element, unpadded, for the panel kernel.
//     The dot kernel's last chunk of a segment is loaded from X with a lane mask: the floats past the
//     segment belong to the next pixel, and an Inf/NaN there times a zero weight would be NaN in an
//     output that plain Conv keeps finite.
//
// Kernels:
//   * DotTile: MF channels x MP pixels (MF*MP <= 12 ymm accumulators, a second set for small tiles),
//     any channel list and any pixel list, horizontal reduction at the end: phase 2 (per patch: alive
//     channels x remaining pixels) and phase 1 of per-filter / full masks.
//   * PanelTile: 6 pixels broadcast x 16 channels of one panel (12 accumulators, no reduction): dense
//     tiles and phase 1 of layer-wide masks.
// Both write max(sum + bias + other, 0) (other: the optional residual input, same layout as the output;
// NaN stays NaN, like onnxruntime's Relu) and can OR per-(patch, channel) "alive" flags (output > 0).
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
  int64_t xstep = 1;           // floats between consecutive reduction elements (panel tiles only;
                               // H*W when broadcasting a 1x1 convolution straight from NCHW X)
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
  const float* o0 = nullptr;        // optional residual: channel k's row at o0 + k*ystride
  // > 0: channels blocked by kblock lanes (the NCHWc path's tiles): channel k's row is at
  // (k / kblock) * ystride + k % kblock, for y0 and o0 alike (ycol then counts in floats of a block row)
  int64_t kblock = 0;
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
  const float* const* o = nullptr;  // optional: nf residual rows (same columns as y)
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
