// ConvRelu: dense Conv(+bias)+ReLU, the no-skip baseline every skipping op is measured against. Runs on
// MLAS's direct-convolution kernels (nchwc.h) where they serve the shape and the library was built with
// them, else on the packed GEMM core (gemm.h). OZ_DENSE=gemm (read once) forces the GEMM core, to
// benchmark the two against each other. Optional output 1 `macs` (int64 scalar): MACs performed.
// Optional input 3 `other` (N, K, OH, OW), run time: a residual site, Y = ReLU(conv + B + other)
// (adds no MACs).
// Attributes x_blocked / other_blocked / y_blocked (0 or 1): X, other, Y in the blocked layout
// (N, C/B, H, W, B) of nchwc.h, for chains of onnxzero ops (passes/chain_layout.py sets them).
// Attribute relu (0 or 1, default 1): 0 makes the op a plain Conv(+bias)(+other) with no activation, so
// the convs of a chain that are not sites (projection shortcuts, a Conv without ReLU) can be onnxzero
// ops too and pass blocked tensors instead of breaking the chain with onnxruntime's NCHWc reorders.
#include <cstdlib>
#include <string>

#include "common.h"
#include "gemm.h"
#include "nchwc.h"
#include "op_def.h"
#include "ops.h"

namespace oz {
namespace {

namespace S = spec::ConvRelu;
constexpr const char* kOp = S::kName;

struct ConvReluKernel {
  ConvAttrs attrs;
  std::vector<int64_t> w_shape;
  gemm::ConvWeights weights;  // the GEMM core's copy (only when nchwc does not serve the shape)
  nchwc::Filters filters;
  nchwc::Layouts lay;
  bool relu = true;

  explicit ConvReluKernel(const OrtKernelInfo* info) {
    attrs = ReadConvAttrs(info, kOp);
    ConstTensor w = RequireConstInput(info, S::kW, kOp, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    CheckWeightShape(attrs, w.shape, kOp);
    w_shape = w.shape;
    ConstTensor b;
    const bool has_bias = TryGetConstInput(info, S::kB, &b);
    if (!has_bias && Ort::ConstKernelInfo(info).GetInputCount() > S::kB) {
      // An input 2 that is present but not a constant initializer.
      if (!Ort::ConstKernelInfo(info).GetInputName(S::kB).empty())
        Fail(kOp, "input 'B' (2) must be a constant initializer, got a runtime tensor");
    }
    if (has_bias) {
      if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        Fail(kOp, Msg("input 'B' has element type ", b.type, ", expected float (1)"));
      if (b.shape.size() != 1 || b.shape[0] != w.shape[0])
        Fail(kOp, Msg("input 'B' has shape ", ShapeStr(b.shape), ", expected (", w.shape[0], ",)"));
    }
    static const bool force_gemm = [] {
      const char* e = std::getenv("OZ_DENSE");
      return e != nullptr && std::string(e) == "gemm";
    }();
    const float* bias = has_bias ? b.as<float>() : nullptr;
    if (!force_gemm)
      filters = nchwc::Filters(w.as<float>(), bias, w.shape[0], w.shape[1] * attrs.group, w.shape[2], w.shape[3],
                               attrs.group);
    if (!filters.ok())
      weights = gemm::ConvWeights(w.as<float>(), bias, w.shape[0], w.shape[1], w.shape[2], w.shape[3], attrs.group);
    const int64_t r = AttrInt(info, "relu", S::kReluDefault);
    if (r != 0 && r != 1) Fail(kOp, Msg("attribute 'relu' is ", r, ", expected 0 or 1"));
    relu = r == 1;
    lay = nchwc::ReadLayouts(info, kOp, w.shape[0], w.shape[1] * attrs.group, attrs.group);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard([&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(S::kX);
      auto xinfo = x.GetTensorTypeAndShapeInfo();
      if (xinfo.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        Fail(kOp, Msg("input 'X' has element type ", xinfo.GetElementType(), ", expected float (1)"));
      const auto xs = nchwc::NchwShapeOfX(xinfo.GetShape(), lay.x, kOp);
      ConvGeom g = ResolveConv(attrs, w_shape, xs, kOp);
      const int64_t N = xs[0];
      const std::vector<int64_t> yshape{N, g.K, g.OH, g.OW};
      const float* residual = nchwc::OtherInputIn(ctx, S::kOther, yshape, lay.other, kOp);
      auto y = ctx.GetOutput(0, lay.y ? nchwc::BlockedShape(yshape) : yshape);
      int64_t macs = 0;
      const float* X = x.GetTensorData<float>();
      float* Y = y.GetTensorMutableData<float>();
      if (N > 0 && g.P() > 0) {
        if (filters.ok()) {
          nchwc::RunOptions opt;
          opt.residual = residual;
          opt.relu = relu;
          opt.x_blocked = lay.x, opt.residual_blocked = lay.other, opt.y_blocked = lay.y;
          macs = nchwc::RunConv(context, g, filters, X, N, Y, opt);
        } else {
          macs = nchwc::WithNchw(context, lay, X, xs, residual, yshape, Y, [&](const float* xn, const float* rn, float* yn) {
            gemm::Epilogue ep;
            ep.residual = rn;
            ep.relu = relu;
            gemm::ConvPlan plan(g, weights);
            return gemm::RunConv(context, plan, weights, xn, N, yn, ep);
          });
        }
      }
      if (ctx.GetOutputCount() > 1) {
        auto m = ctx.GetOutput(1, std::vector<int64_t>{});
        *m.GetTensorMutableData<int64_t>() = macs;
      }
    });
  }
};

}  // namespace

const OrtCustomOp* ConvReluOp() {
  static ConvOpDef<ConvReluKernel> op(S::kName, S::kInputs);
  return &op;
}

}  // namespace oz
