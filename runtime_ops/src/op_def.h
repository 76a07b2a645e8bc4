// The ONNX-facing half that every onnxzero op shares: its name, its inputs' types and which are
// optional, and the two outputs (Y float, optional `macs` int64). Each kernel's .cc only says
// what differs: ConvOpDef<Kernel>("Name", {{type, optional}, ...}).
#pragma once

#include <utility>
#include <vector>

#include "common.h"

namespace oz {

struct InputSpec {
  ONNXTensorElementDataType type;
  bool optional;
};

constexpr ONNXTensorElementDataType kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

// Kernel: constructible from const OrtKernelInfo* (throwing oz::Fail on bad attributes or
// constants, which becomes a session-creation error), with OrtStatusPtr ComputeV2(OrtKernelContext*).
template <class Kernel>
class ConvOpDef : public Ort::CustomOpBase<ConvOpDef<Kernel>, Kernel, true> {
 public:
  ConvOpDef(const char* name, std::vector<InputSpec> inputs) : name_(name), inputs_(std::move(inputs)) {}

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] { *kernel = new Kernel(info); });
  }
  const char* GetName() const { return name_; }
  size_t GetInputTypeCount() const { return inputs_.size(); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return inputs_[i].type; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return inputs_[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? kFloat : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }

 private:
  const char* name_;
  std::vector<InputSpec> inputs_;
};

}  // namespace oz
