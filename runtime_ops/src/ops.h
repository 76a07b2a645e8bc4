// Every op the library registers; each kernel's .cc defines its getter.
#pragma once

#include <vector>

#include "onnxruntime_cxx_api.h"

namespace oz {

const OrtCustomOp* ConvReluOp();  // dense Conv(+bias)+ReLU: the no-skip baseline
const OrtCustomOp* LazyConvOp();  // lazy filter evaluation: top ratio*K predicted filters (lazy_conv.cc)
const OrtCustomOp* SpatialConvOp();  // spatial zero prediction over p x p output patches (spatial_conv.cc)
const OrtCustomOp* SparseQuantConvOp();  // pruned 8-bit weights, relative sparse index (sparse_quant_conv.cc)
const OrtCustomOp* EarlyExitConvOp();  // SnaPEA early exit, exact / predictive (early_exit_conv.cc)

inline std::vector<const OrtCustomOp*> AllOps() {
  return {ConvReluOp(), LazyConvOp(), SparseQuantConvOp(), EarlyExitConvOp(), SpatialConvOp()};
}

}  // namespace oz
