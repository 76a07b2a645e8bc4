// ConvRelu: dense Conv(+bias)+ReLU. Temporary straightforward version used
// to bring up the build; replaced by the packed GEMM kernel.
#include <algorithm>
#include <cstring>

#include "common.h"
#include "ops.h"

namespace oz {
namespace {

constexpr const char* kOp = "ConvRelu";

struct ConvReluKernel {
  ConvAttrs attrs;
  ConstTensor w, b;
  bool has_bias = false;

  ConvReluKernel(const OrtKernelInfo* info) {
    attrs = ReadConvAttrs(info, kOp);
    w = RequireConstInput(info, 1, kOp, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    CheckWeightShape(attrs, w.shape, kOp);
    has_bias = TryGetConstInput(info, 2, &b);
    if (has_bias && (b.shape.size() != 1 || b.shape[0] != w.shape[0]))
      Fail(kOp, Msg("input 'B' has shape ", ShapeStr(b.shape), ", expected (", w.shape[0], ",)"));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard([&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0);
      auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
      ConvGeom g = ResolveConv(attrs, w.shape, xs, kOp);
      const int64_t N = xs[0];
      auto y = ctx.GetOutput(0, {N, g.K, g.OH, g.OW});
      const float* X = x.GetTensorData<float>();
      float* Y = y.GetTensorMutableData<float>();
      const float* Wt = w.as<float>();
      const float* B = has_bias ? b.as<float>() : nullptr;
      const int64_t P = g.P(), Kg = g.Kg(), Cg = g.Cg();
      ParallelFor(context, static_cast<size_t>(N * g.K), [&](size_t task) {
        const int64_t n = task / g.K, k = task % g.K, grp = k / Kg;
        float* out = Y + (n * g.K + k) * P;
        std::fill(out, out + P, B ? B[k] : 0.f);
        for (int64_t c = 0; c < Cg; ++c) {
          const float* in = X + (n * g.C + grp * Cg + c) * g.H * g.W;
          for (int64_t r = 0; r < g.KH; ++r)
            for (int64_t s = 0; s < g.KW; ++s) {
              const float wv = Wt[((k * Cg + c) * g.KH + r) * g.KW + s];
              for (int64_t oh = 0; oh < g.OH; ++oh) {
                const int64_t ih = oh * g.SH - g.PT + r * g.DH;
                if (ih < 0 || ih >= g.H) continue;
                for (int64_t ow = 0; ow < g.OW; ++ow) {
                  const int64_t iw = ow * g.SW - g.PL + s * g.DW;
                  if (iw >= 0 && iw < g.W) out[oh * g.OW + ow] += wv * in[ih * g.W + iw];
                }
              }
            }
        }
        for (int64_t i = 0; i < P; ++i) out[i] = std::max(out[i], 0.f);
      });
      if (ctx.GetOutputCount() > 1) {
        auto m = ctx.GetOutput(1, std::vector<int64_t>{});
        *m.GetTensorMutableData<int64_t>() = N * g.Macs();
      }
    });
  }
};

struct ConvReluOpDef : Ort::CustomOpBase<ConvReluOpDef, ConvReluKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] { *kernel = new ConvReluKernel(info); });
  }
  const char* GetName() const { return kOp; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace

const OrtCustomOp* ConvReluOp() {
  static ConvReluOpDef op;
  return &op;
}

}  // namespace oz
