// Every op the library registers; each kernel's .cc defines its getter.
#pragma once

#include <vector>

#include "onnxruntime_cxx_api.h"

namespace oz {

const OrtCustomOp* ConvReluOp();  // dense Conv(+bias)+ReLU: the no-skip baseline

inline std::vector<const OrtCustomOp*> AllOps() {
  return {ConvReluOp()};
}

}  // namespace oz
