// The ONNX-facing half that every onnxzero op shares: its name, its inputs' types and which are
// optional, and the two outputs (Y float, optional `macs` int64). Name and inputs come from the op
// spec (onnxzero/ops/spec.json, generated into op_spec.h), which Python's make_node reads too:
// ConvOpDef<Kernel>(spec::Name::kName, spec::Name::kInputs).
#pragma once

#include <utility>
#include <vector>

#include "common.h"
#include "op_spec.h"

namespace oz {

constexpr ONNXTensorElementDataType kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

// Kernel: constructible from const OrtKernelInfo* (throwing oz::Fail on bad attributes or
// constants, which becomes a session-creation error), with OrtStatusPtr ComputeV2(OrtKernelContext*).
template <class Kernel>
class ConvOpDef : public Ort::CustomOpBase<ConvOpDef<Kernel>, Kernel, true> {
 public:
  template <size_t N>
  ConvOpDef(const char* name, const spec::InputDecl (&inputs)[N]) : name_(name), inputs_(inputs, inputs + N) {}

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
  std::vector<spec::InputDecl> inputs_;
};

}  // namespace oz
