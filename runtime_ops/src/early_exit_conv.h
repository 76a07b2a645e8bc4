// EarlyExitConv: Conv(+bias)+ReLU with SnaPEA's early exit (exact and predictive
// modes). Semantics: onnxzero/ops/early_exit.py (its `reference` defines them).
//
// Inputs: 0 X (N,C,H,W) float; 1 W (K,C/group,KH,KW) float, constant; 2 B (K,)
// optional constant; 3 n_terms (K,) int64 and 4 threshold (K,) float: runtime
// inputs, required in mode "predictive", refused in mode "exact"; 5 other (N,K,OH,OW)
// float, optional run-time input: a residual site, Y = ReLU(conv + B + other), the partial
// sums starting at B + other.
// Attributes: the Conv attributes; `mode` "exact" (default) or "predictive";
// `nonneg_input` (int, default 1 in exact mode, 0 in predictive mode).
//
// Session creation: each filter's nonzero weights become a term list (uint16
// reduction row + float weight) in the op's order: the positives in row order,
// then the negatives by decreasing magnitude in bands (largest 1/4, next 1/4, last
// 1/2), each band in row order; stored band by band, piece by piece, filter by
// filter (the order the kernel reads them), with per-(band, chunk, filter) offsets.
//
// Run: per task, a block of up to 64 output positions (one image, one group) and a
// block of filters. The block's im2col Col[CRS][TP] is built once (it stays in L2,
// or is shared by the filter blocks of a lone position block); every band is swept
// chunk by chunk over Col rows (chunk-outer, filter-inner: the chunk stays in L1),
// a filter's accumulators and live-lane masks sitting in a tile between its pieces.
// After the positives and after every piece of a negative band, a filter's block
// stops when every position is <= 0 (exact stop, X >= 0); in predictive mode the
// threshold applies after exactly n_terms terms. A stopped block writes zeros.
// Output 1 `macs`: sum over (filter, block) of terms done x positions in the block.
#pragma once

#include "onnxruntime_cxx_api.h"

namespace oz {
const OrtCustomOp* EarlyExitConvOp();
}  // namespace oz
