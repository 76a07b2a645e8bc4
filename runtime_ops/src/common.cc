#include "common.h"

#include <algorithm>
#include <thread>

namespace oz {

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

void Fail(const char* op, const std::string& what) {
  throw Ort::Exception(Msg(op, ": ", what), ORT_INVALID_ARGUMENT);
}

int64_t ConstTensor::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

bool TryGetConstInput(const OrtKernelInfo* info, size_t index, ConstTensor* out) {
  Ort::ConstKernelInfo ki(info);
  if (index >= ki.GetInputCount()) return false;
  int is_const = 0;
  const OrtValue* v = nullptr;
  Ort::ThrowOnError(Ort::GetApi().KernelInfoGetConstantInput_tensor(info, index, &is_const, &v));
  if (!is_const || v == nullptr) return false;
  Ort::ConstValue cv(v);
  auto ti = cv.GetTensorTypeAndShapeInfo();
  out->shape = ti.GetShape();
  out->type = ti.GetElementType();
  out->data = cv.GetTensorRawData();
  return true;
}

ConstTensor RequireConstInput(const OrtKernelInfo* info, size_t index, const char* op, const char* name,
                              ONNXTensorElementDataType type) {
  ConstTensor t;
  if (!TryGetConstInput(info, index, &t))
    Fail(op, Msg("input '", name, "' (", index, ") must be a constant initializer, got a runtime tensor or none"));
  if (t.type != type) Fail(op, Msg("input '", name, "' has element type ", t.type, ", expected ", type));
  return t;
}

int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return dflt;
  }
  return v;
}

float AttrFloat(const OrtKernelInfo* info, const char* name, float dflt) {
  float v = dflt;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &v);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return dflt;
  }
  return v;
}

std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& dflt) {
  size_t size = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return dflt;
  }
  std::string out(size, '\0');
  Ort::ThrowOnError(Ort::GetApi().KernelInfoGetAttribute_string(info, name, out.data(), &size));
  out.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return out;
}

std::vector<int64_t> AttrInts(const OrtKernelInfo* info, const char* name, const std::vector<int64_t>& dflt) {
  size_t size = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return dflt;
  }
  std::vector<int64_t> out(size);
  if (size) Ort::ThrowOnError(Ort::GetApi().KernelInfoGetAttributeArray_int64(info, name, out.data(), &size));
  return out;
}

ConvAttrs ReadConvAttrs(const OrtKernelInfo* info, const char* op) {
  ConvAttrs a;
  a.kernel_shape = AttrInts(info, "kernel_shape", {});
  a.strides = AttrInts(info, "strides", {1, 1});
  a.dilations = AttrInts(info, "dilations", {1, 1});
  a.pads = AttrInts(info, "pads", {0, 0, 0, 0});
  a.auto_pad = AttrString(info, "auto_pad", "NOTSET");
  a.group = AttrInt(info, "group", 1);
  if (!a.kernel_shape.empty() && a.kernel_shape.size() != 2)
    Fail(op, Msg("attribute 'kernel_shape' has ", a.kernel_shape.size(), " values, expected 2 (only 2-D convolution is supported)"));
  if (a.strides.size() != 2) Fail(op, Msg("attribute 'strides' has ", a.strides.size(), " values, expected 2"));
  if (a.dilations.size() != 2) Fail(op, Msg("attribute 'dilations' has ", a.dilations.size(), " values, expected 2"));
  if (a.pads.size() != 4) Fail(op, Msg("attribute 'pads' has ", a.pads.size(), " values, expected 4"));
  for (auto v : a.strides) if (v < 1) Fail(op, Msg("attribute 'strides' ", ShapeStr(a.strides), ", expected values >= 1"));
  for (auto v : a.dilations) if (v < 1) Fail(op, Msg("attribute 'dilations' ", ShapeStr(a.dilations), ", expected values >= 1"));
  for (auto v : a.pads) if (v < 0) Fail(op, Msg("attribute 'pads' ", ShapeStr(a.pads), ", expected values >= 0"));
  for (auto v : a.kernel_shape) if (v < 1) Fail(op, Msg("attribute 'kernel_shape' ", ShapeStr(a.kernel_shape), ", expected values >= 1"));
  if (a.group < 1) Fail(op, Msg("attribute 'group' is ", a.group, ", expected >= 1"));
  if (a.auto_pad != "NOTSET" && a.auto_pad != "VALID" && a.auto_pad != "SAME_UPPER" && a.auto_pad != "SAME_LOWER")
    Fail(op, Msg("attribute 'auto_pad' is '", a.auto_pad, "', expected NOTSET, VALID, SAME_UPPER or SAME_LOWER"));
  return a;
}

void CheckWeightShape(const ConvAttrs& a, const std::vector<int64_t>& w, const char* op) {
  if (w.size() != 4) Fail(op, Msg("input 'W' has shape ", ShapeStr(w), ", expected rank 4 (K, C/group, KH, KW): only 2-D convolution is supported"));
  for (auto d : w) if (d < 1) Fail(op, Msg("input 'W' has shape ", ShapeStr(w), ", expected all dimensions >= 1"));
  if (w[0] % a.group != 0) Fail(op, Msg("input 'W' has ", w[0], " output channels, expected a multiple of group=", a.group));
  if (!a.kernel_shape.empty() && (a.kernel_shape[0] != w[2] || a.kernel_shape[1] != w[3]))
    Fail(op, Msg("attribute 'kernel_shape' ", ShapeStr(a.kernel_shape), " does not match input 'W' of shape ", ShapeStr(w)));
}

ConvGeom ResolveConv(const ConvAttrs& a, const std::vector<int64_t>& w, const std::vector<int64_t>& x, const char* op) {
  CheckWeightShape(a, w, op);
  if (x.size() != 4) Fail(op, Msg("input 'X' has shape ", ShapeStr(x), ", expected rank 4 (N, C, H, W)"));
  ConvGeom g;
  g.G = a.group;
  g.C = x[1]; g.H = x[2]; g.W = x[3];
  g.K = w[0]; g.KH = w[2]; g.KW = w[3];
  if (g.C != w[1] * a.group)
    Fail(op, Msg("input 'X' has ", g.C, " channels, expected ", w[1] * a.group, " (W's C/group=", w[1], " x group=", a.group, ")"));
  g.SH = a.strides[0]; g.SW = a.strides[1];
  g.DH = a.dilations[0]; g.DW = a.dilations[1];
  const int64_t ekh = (g.KH - 1) * g.DH + 1, ekw = (g.KW - 1) * g.DW + 1;  // effective kernel extent
  if (a.auto_pad == "NOTSET") {
    g.PT = a.pads[0]; g.PL = a.pads[1]; g.PB = a.pads[2]; g.PR = a.pads[3];
  } else if (a.auto_pad == "VALID") {
    g.PT = g.PL = g.PB = g.PR = 0;
  } else {  // SAME_*: output = ceil(in / stride)
    auto same = [&](int64_t in, int64_t s, int64_t ek, int64_t* lo, int64_t* hi) {
      int64_t out = (in + s - 1) / s;
      int64_t total = std::max<int64_t>(0, (out - 1) * s + ek - in);
      *lo = a.auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
      *hi = total - *lo;
    };
    same(g.H, g.SH, ekh, &g.PT, &g.PB);
    same(g.W, g.SW, ekw, &g.PL, &g.PR);
  }
  const int64_t hp = g.H + g.PT + g.PB, wp = g.W + g.PL + g.PR;
  if (hp < ekh || wp < ekw)
    Fail(op, Msg("input 'X' of spatial size ", g.H, "x", g.W, " (padded ", hp, "x", wp, ") is smaller than the dilated kernel ",
                 ekh, "x", ekw, ", expected at least the kernel's size"));
  g.OH = (hp - ekh) / g.SH + 1;
  g.OW = (wp - ekw) / g.SW + 1;
  return g;
}

size_t HardwareThreads() {
  // once: glibc's hardware_concurrency opens and reads /sys/devices/system/cpu/online on every call
  // (~20 us, a fifth of a small layer's run)
  static const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  return hw;
}

size_t TaskCount(size_t work_items) {
  return std::max<size_t>(1, std::min(work_items, HardwareThreads() * 4));
}

const float* OtherInput(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& expected, const char* op) {
  if (index >= ctx.GetInputCount()) return nullptr;
  Ort::ConstValue v = ctx.GetInput(index);
  if (!v) return nullptr;
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    Fail(op, Msg("input 'other' has element type ", info.GetElementType(), ", expected float (1)"));
  const auto shape = info.GetShape();
  if (shape != expected)
    Fail(op, Msg("input 'other' has shape ", ShapeStr(shape), ", expected ", ShapeStr(expected),
                 " (the conv output's shape)"));
  return v.GetTensorData<float>();
}

}  // namespace oz
