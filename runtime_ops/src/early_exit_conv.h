// EarlyExitConv: Conv(+bias)+ReLU with SnaPEA's early exit (exact and predictive
// modes). Semantics: onnxzero/ops/early_exit.py (its `reference` defines them).
//
// Inputs: 0 X (N,C,H,W) float; 1 W (K,C/group,KH,KW) float, constant; 2 B (K,)
// optional constant; 3 n_terms (K,) int64 and 4 threshold (K,) float: runtime
// inputs, required in mode "predictive", refused in mode "exact"; 5 other (N,K,OH,OW)
// float, optional run-time input: a residual site, Y = ReLU(conv + B + other), the partial
// sums starting at B + other.
// Attributes: the Conv attributes; `mode` "exact" (default) or "predictive";
// `nonneg_input` (int, default 1 in exact mode, 0 in predictive mode); `skip_zeros` (exact
// mode: -1 = cost model (default), 1 = sparse path, 0 = dense path).
//
// Exact mode (design and numbers: docs/design-early-exit.md). Y = Conv(+Add)+ReLU exactly; the
// work skipped is each output's own zero inputs. One pass over X (on the pool) checks
// nonneg_input, counts zeros and spots inf / NaN. Then, per run:
//  - sparse path: the input is copied once zero-padded and split into stride phases, so the 8
//    inputs of 8 consecutive output columns for reduction row r are one unaligned load at
//    base + roff[r]; per group of 8 positions of one output row, 8x8 transposes and a
//    permutation table list each position's nonzero inputs (value, row) in row order
//    (sr::CompactLanes8). Each filter chunk (8*nv filters, nv <= 12 ymm accumulators, weights
//    packed [r][8*nv]) then does, per position and nonzero input: one broadcast, nv weight
//    loads, nv FMAs; the rows are swept in chunks whose weights (<= 24 KiB) stay in L1 while the
//    8 positions read them. Taken whenever X holds inf / NaN (every weight, zero ones included,
//    meets them, as in Conv, and the ReLU keeps a NaN).
//  - dense path: the packed GEMM core (gemm::RunConv; bias and ReLU fused, or a second pass
//    adding `other`), when the cost model (SparsePays: zero fraction, filters per group, weight
//    size) says listing costs more than it saves.
// Output 1 `macs`: sparse path: sum over outputs of its nonzero-input rows (x the filters of the
// group); dense path: every term.
//
// Predictive mode (the SnaPEA kernel, unchanged): each filter's nonzero weights become a term
// list (uint16 reduction row + float weight) in the op's order: the positives in row order,
// then the negatives by decreasing magnitude in bands (largest 1/4, next 1/4, last 1/2), each
// band in row order; stored band by band, piece by piece, filter by filter (the order the
// kernel reads them), with per-(band, chunk, filter) offsets. Per task, a block of up to 64
// output positions (one image, one group) and a block of filters; the block's im2col is swept
// band by band, chunk by chunk (chunk-outer, filter-inner: the chunk stays in L1). After the
// positives and after every piece of a negative band, a filter's block stops when every
// position is <= 0 (exact stop, X >= 0); the threshold applies after exactly n_terms terms. A
// stopped block writes zeros. `macs`: sum over (filter, block) of terms done x positions.
#pragma once

#include "onnxruntime_cxx_api.h"

namespace oz {
const OrtCustomOp* EarlyExitConvOp();
}  // namespace oz
