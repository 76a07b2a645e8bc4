// SparseQuantConv: Conv(+bias)+ReLU computed from pruned, 8-bit dynamic fixed
// point weights in a relative-index sparse format (the format behind Table II of
// the pruning-quantization paper), never densified.
//
// Inputs: 0 X (N,C,H,W) float; 1 values int8 (L,), 2 index uint8 (L,), 3 row_ptr
// int64 (K+1,), all constant; 4 B (K,) float, optional constant; 5 other (N,K,OH,OW)
// float, optional run-time input: a residual site, Y = ReLU(conv + B + other).
// Attributes: the Conv attributes with kernel_shape required, `channels` (C/group)
// or `weight_shape` (K, C/group, KH, KW), and `frac_bits` (fl, required).
//
// Stream (per filter k, entries row_ptr[k] .. row_ptr[k+1]-1, in increasing
// position order over the flattened (c, kh, kw) reduction of length CRS):
//   position_i = position_{i-1} + index_i, position_{-1} = -1, index_i in [1, 255];
//   weight at position_i = values_i * 2^-fl. A filler (value 0, index 255) is
//   inserted wherever the distance to the next kept weight exceeds 255; value 0
//   appears only in fillers. Every position must be < CRS.
//
// Run-time form (built once at session creation, validated first): the reduction
// is cut into chunks of kc rows (64 / 128 / 192 by density); the kept (non-filler) entries become 2-byte
// terms (row within its chunk: uint8, value: int8), stored chunk by chunk and,
// inside a chunk, filter by filter (the order the kernel reads them), plus the
// offset of each (chunk, filter) run. That is 2 bytes per nonzero weight (+ 4 bytes
// per filter and chunk): as compact as the input stream, half of an int8 dense
// tensor at 50% pruning; no dense weight tensor is ever built.
//
// Kernel: per task, a block of up to 64 output positions x a block of filters.
// Chunk-outer (the chunk's Col rows stay in L1), filter-inner, accumulators of
// the block in a tile between chunks; q * x accumulated in float, the 2^-fl scale
// and the bias applied once per output. Col rows come from an im2col chunk built
// on the fly, in L1 (or built once and shared by the filter blocks of a lone
// position block).
// At 0% pruning this is slower than a dense GEMM: one Col load per FMA, no reuse
// of a load across filters.
//
// Output 1 `macs` (optional int64 scalar) = N * OH * OW * (nonzero weights):
// every kept term is multiplied at every output position; fillers never are.
#pragma once

#include "onnxruntime_cxx_api.h"

namespace oz {
const OrtCustomOp* SparseQuantConvOp();
}  // namespace oz
