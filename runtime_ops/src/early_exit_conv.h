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
// mode: -1 = cost model (default), 1 = sparse path, 2 = stop path, 0 = dense path).
//
// Exact mode (design and numbers: docs/design-early-exit.md). Y = Conv(+Add)+ReLU exactly. One pass
// over X (on the pool) checks nonneg_input, counts zeros and spots inf / NaN. Then, per run:
//  - sparse path (work skipped: each output's zero inputs): the input is copied once zero-padded
//    and split into stride phases, so the 8 inputs of 8 consecutive output columns for reduction
//    row r are one unaligned load at base + roff[r]; per group of 8 positions of one output row,
//    8x8 transposes and a permutation table list each position's nonzero inputs (value, row) in row
//    order (sr::CompactLanes8). Each filter chunk (8*nv filters, nv <= 12 ymm accumulators, weights
//    packed [r][8*nv]) then does, per position and nonzero input: one broadcast, nv weight loads,
//    nv FMAs. Taken whenever X holds inf / NaN (every weight, zero ones included, meets them, as in
//    Conv, and the ReLU keeps a NaN).
//  - stop path (work skipped: SnaPEA's per-output stop; RunStop, shared with predictive mode):
//    outputs in lanes (8 output columns of one row), each filter's nonzero weights in its own sign
//    order (positives, then negatives by magnitude in bands), partial sums starting at bias + other;
//    after the positives a check every <= 8 terms stops a vector once all its lanes are <= 0, and
//    the live lanes are re-packed into gathered vectors when they fill < 60 % of the active ones.
//  - dense path: MLAS's direct convolution (nchwc::RunConv) or the packed GEMM core (bias and ReLU
//    fused, or a second pass adding `other`), when the cost model (SparsePays: zero fraction,
//    filters per group, weight size) says listing costs more than it saves. The cost model never
//    picks the stop path (it skips 2-10 % on the zoo's ResNets and runs 3-17x slower: see the note).
// Output 1 `macs`: sparse path: sum over outputs of its nonzero-input rows (x the filters of the
// group); stop path: per output lane, the terms computed while it sat in a vector; dense path:
// every term.
//
// Predictive mode: the stop kernel with one more period boundary at N = n_terms[k], where the lanes
// with S_N < threshold[k] are cut (output 0, done); SnaPEA's exact stop applies after the positives
// when the whole X is >= 0. `macs` as on the stop path (>= the reference's per-output count).
#pragma once

#include "onnxruntime_cxx_api.h"

namespace oz {
const OrtCustomOp* EarlyExitConvOp();
}  // namespace oz
