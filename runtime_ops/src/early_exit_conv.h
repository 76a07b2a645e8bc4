// EarlyExitConv: Conv(+bias)+ReLU with SnaPEA's early exit (exact and predictive
// modes). Semantics: onnxzero/ops/early_exit.py (its `reference` defines them).
//
// Inputs: 0 X (N,C,H,W) float; 1 W (K,C/group,KH,KW) float, constant; 2 B (K,)
// optional constant; 3 n_terms (K,) int64 and 4 threshold (K,) float: runtime
// inputs, required in mode "predictive", refused in mode "exact".
// Attributes: the Conv attributes; `mode` "exact" (default) or "predictive";
// `nonneg_input` (int, default 1 in exact mode, 0 in predictive mode).
//
// Session creation: each filter's nonzero weights become a term list (uint16
// reduction row + float weight): the positive ones first in row order, then the
// negative ones by decreasing magnitude, plus per-chunk offsets of the positives.
//
// Run: per task, a block of up to 64 output positions (one image, one group) and
// a block of filters. The block's im2col Col[CRS][TP] is built once (it stays in
// L2); the positive terms of all filters of the block are swept chunk by chunk
// over Col rows (each chunk in L1, accumulators in a tile); then each filter runs
// its negative terms in magnitude order with its accumulators in registers,
// checking every 16 terms whether every position of the block is <= 0 (exact stop,
// when X >= 0) and, in predictive mode, applying the threshold after n_terms.
// Output 1 `macs`: sum over (filter, block) of terms done x positions in the block.
#pragma once

#include "onnxruntime_cxx_api.h"

namespace oz {
const OrtCustomOp* EarlyExitConvOp();
}  // namespace oz
