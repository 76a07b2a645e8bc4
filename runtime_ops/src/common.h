// Shared plumbing for every onnxzero kernel: errors that name the op, the
// input and the expected value; constant inputs read at session creation;
// Conv attribute parsing; and the session's intra-op thread pool.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "onnxruntime_cxx_api.h"

namespace oz {

// Build a message from streamable parts: Msg("input 'W' has rank ", r, ", expected 4").
template <class... Args>
std::string Msg(Args&&... args) {
  std::ostringstream s;
  (s << ... << std::forward<Args>(args));
  return s.str();
}

std::string ShapeStr(const std::vector<int64_t>& shape);

// Throw an ORT_INVALID_ARGUMENT error prefixed with the op name.
[[noreturn]] void Fail(const char* op, const std::string& what);

// Run f and turn any exception into an OrtStatus, so no exception ever crosses
// onnxruntime's C boundary (which would terminate the process).
template <class F>
OrtStatusPtr Guard(F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, "onnxzero: unknown error");
  }
}

// A constant input (initializer) read once when the session is created.
struct ConstTensor {
  const void* data = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  int64_t numel() const;
  template <class T>
  const T* as() const { return static_cast<const T*>(data); }
};

// Returns false if input `index` is absent or not a constant initializer.
bool TryGetConstInput(const OrtKernelInfo* info, size_t index, ConstTensor* out);
// Like TryGetConstInput but refuses (naming op and input) when it is not constant.
ConstTensor RequireConstInput(const OrtKernelInfo* info, size_t index, const char* op, const char* name,
                              ONNXTensorElementDataType type);

int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t dflt);
float AttrFloat(const OrtKernelInfo* info, const char* name, float dflt);
std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& dflt);
std::vector<int64_t> AttrInts(const OrtKernelInfo* info, const char* name, const std::vector<int64_t>& dflt);

// Conv attributes exactly as ONNX Conv defines them (2-D only).
struct ConvAttrs {
  std::vector<int64_t> kernel_shape;  // may be empty: taken from W
  std::vector<int64_t> strides{1, 1}, dilations{1, 1};
  std::vector<int64_t> pads{0, 0, 0, 0};  // top, left, bottom, right
  std::string auto_pad = "NOTSET";
  int64_t group = 1;
};
// Reads and validates the Conv attributes; refuses 3-D, bad values, unknown auto_pad.
ConvAttrs ReadConvAttrs(const OrtKernelInfo* info, const char* op);

// A fully resolved 2-D convolution (one image; N is per run).
struct ConvGeom {
  int64_t C = 0, H = 0, W = 0;       // input channels and size
  int64_t K = 0, KH = 0, KW = 0;     // output channels, kernel size
  int64_t OH = 0, OW = 0;            // output size
  int64_t SH = 1, SW = 1, DH = 1, DW = 1;
  int64_t PT = 0, PL = 0, PB = 0, PR = 0;
  int64_t G = 1;                     // groups
  int64_t Cg() const { return C / G; }   // input channels per group
  int64_t Kg() const { return K / G; }   // output channels per group
  int64_t CRS() const { return Cg() * KH * KW; }  // reduction length of one output
  int64_t P() const { return OH * OW; }
  int64_t Macs() const { return K * P() * CRS(); }  // dense MACs per image
};

// Resolve geometry from the weight shape (K, C/G, KH, KW) and an input shape
// (N, C, H, W); validates ranks, channel counts and sizes, naming the op.
ConvGeom ResolveConv(const ConvAttrs& a, const std::vector<int64_t>& w_shape, const std::vector<int64_t>& x_shape,
                     const char* op);
// Only the weight-dependent checks, done once at session creation.
void CheckWeightShape(const ConvAttrs& a, const std::vector<int64_t>& w_shape, const char* op);

// Residual sites: the optional run-time input `other` at `index` (float32, shape `expected` =
// (N, K, OH, OW)). Returns nullptr when the node has no such input or it is absent; refuses (naming op,
// input 'other', the got and expected shapes) a wrong element type or shape.
const float* OtherInput(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& expected, const char* op);

// Run fn(i) for i in [0, n) on the session's intra-op thread pool.
// fn must not throw: validate before calling.
template <class F>
void ParallelFor(OrtKernelContext* ctx, size_t n, F&& fn) {
  if (n == 0) return;
  if (n == 1) {
    fn(size_t{0});
    return;
  }
  using Fn = std::remove_reference_t<F>;
  auto tramp = [](void* p, size_t i) { (*static_cast<Fn*>(p))(i); };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, tramp, n, 0, static_cast<void*>(&fn)));
}

// How many tasks to split a run into: a few per hardware thread, so the pool's
// dynamic scheduling can balance uneven (skipped) work. The C API does not expose
// the pool's size, so this only sizes work; the pool decides who runs it.
size_t TaskCount(size_t work_items);
// The one source of the thread count every kernel sizes its work by. The C API (1.21) does not
// expose the session pool's size, so this is the hardware's, read once.
size_t HardwareThreads();

}  // namespace oz
