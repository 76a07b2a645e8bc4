// The one registration file: every onnxzero op, in the one custom domain.
// onnxruntime calls RegisterCustomOps when a session loads this library.
#include <mutex>

#include "common.h"
#include "ops.h"

#define OZ_EXPORT __attribute__((visibility("default")))

extern "C" OZ_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // API 21 = onnxruntime 1.21, the oldest runtime we support; newer runtimes serve it too.
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // cannot even build a status without an API table
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
