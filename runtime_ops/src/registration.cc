// The one registration file: every onnxzero op, in the one custom domain.
// onnxruntime calls RegisterCustomOps when a session loads this library.
//
// This file is compiled WITHOUT AVX (CMakeLists.txt) and checks the CPU before anything else runs:
// every kernel is built for AVX2/FMA/F16C (x86-64-v3), and on an older CPU their first instruction
// would kill the process with SIGILL. The library has no dynamic initializers (test_op_conv_relu's
// ELF check keeps it so), so nothing of the kernels runs at load time either.
#include <cpuid.h>

#include <mutex>
#include <string>

#include "common.h"
#include "ops.h"

#define OZ_EXPORT __attribute__((visibility("default")))

namespace {

// AVX2, FMA and F16C in the CPU, and the OS saving the YMM state (OSXSAVE + XCR0 bits 1, 2).
bool CpuHasAvx2Fma() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return false;
  unsigned xlo = 0, xhi = 0;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  if ((xlo & 6u) != 6u) return false;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  return b & (1u << 5);  // AVX2
}

}  // namespace

extern "C" OZ_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // API 21 = onnxruntime 1.21, the oldest runtime we support; newer runtimes serve it too.
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // cannot even build a status without an API table
  // Before any C++ wrapper runs: inline functions shared with the AVX2 kernel files may be linked
  // from their AVX2 copies, so only the C API's function pointers are called up to here.
  if (!CpuHasAvx2Fma())
    return api->CreateStatus(ORT_FAIL,
                             "onnxzero: this CPU lacks AVX2/FMA (x86-64-v3: AVX2, FMA, F16C and OS support for "
                             "YMM state), which every onnxzero kernel needs; run the original model with "
                             "onnxruntime's own kernels instead");
  Ort::InitApi(api);
  return oz::Guard([&] {
    // The domain must outlive every session that uses it, so it lives as long as the library.
    static std::once_flag once;
    static Ort::CustomOpDomain* domain = nullptr;
    std::call_once(once, [] {
      domain = new Ort::CustomOpDomain(ONNXZERO_DOMAIN);
      for (const OrtCustomOp* op : oz::AllOps()) domain->Add(op);
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  });
}

// Lets Python (ctypes) check it loaded the library it built, without a session.
extern "C" OZ_EXPORT const char* OnnxzeroDomain() { return ONNXZERO_DOMAIN; }

// What the library really registers, for the test that holds it to onnxzero/ops/spec.json: one line
// per op, "Name:type,optional;type,optional;...". Empty on a CPU the kernels cannot run on.
extern "C" OZ_EXPORT const char* OnnxzeroOpTable() {
  static std::string table;
  static std::once_flag once;
  if (!CpuHasAvx2Fma()) return "";
  std::call_once(once, [] {
    for (const OrtCustomOp* op : oz::AllOps()) {
      table += op->GetName(op);
      table += ':';
      for (size_t i = 0; i < op->GetInputTypeCount(op); ++i) {
        table += std::to_string(static_cast<int>(op->GetInputType(op, i))) + ',' +
                 (op->GetInputCharacteristic(op, i) == INPUT_OUTPUT_OPTIONAL ? '1' : '0') + ';';
      }
      table += '\n';
    }
  });
  return table.c_str();
}
