// SpatialConv on MLAS's NCHWc kernels (issue 10 item 3: one kernel core with ConvRelu / LazyConv).
//
// Serves a layer-wide (p, p) mask on weights nchwc::Filters serves with the NCHWc kernel (group 1,
// K % B == 0, C % B == 0). Per run the input is copied once to a zero-padded NCHWc tensor
// [N][C/B][Hp][Wp][B] (from NCHW X or from a blocked X), so every kernel call is a "valid" one (no
// edge handling) and the same tensor serves both phases:
//   phase 1: the masked positions of every patch for all channels: for each output row and masked
//            column phase cp, one MLAS call per input block over the columns cp, cp+p, ... (the
//            kernel's stride argument is p*SW), up to 4 filter blocks per call. These outputs are
//            computed for every channel in any case, so block granularity costs nothing extra.
//   phase 2: per patch, the channels whose masked outputs had any value > 0. A filter block whose
//            B channels are all alive runs on MLAS (consecutive patches with the same alive blocks
//            in one call); the alive channels of the other blocks run on the per-channel dot tiles
//            (spatial_dot.cc) reading the same padded NCHWc tensor: a receptive field is KW*B
//            contiguous floats per (input block, kernel row), a multiple of 8, so no load crosses
//            into a neighbouring pixel (no Inf/NaN over-read) and no tail mask is needed.
// Every output the semantics compute is computed once and nothing else (the `macs` count is exact).
// Outputs of a task's patch row are assembled in a channel-major tile F (+ residual, ReLU keeping
// NaN) and written to Y once, NCHW or blocked: the compute does not depend on the layouts.
#pragma once

#include <cstdint>

#include "common.h"
#include "nchwc.h"

namespace oz {
namespace spatial {

// Whether RunNchwc serves these filters (a layer-wide or dense mask is checked by the caller).
bool NchwcServes(const nchwc::Filters& f, const ConvGeom& g);

struct NchwcRun {
  const ConvGeom* g = nullptr;
  const nchwc::Filters* f = nullptr;  // built gatherable (Row(k) is phase 2's dot-tile W row)
  int p = 2;                          // 1 with mask {1}: no prediction (dense)
  const uint8_t* mask = nullptr;      // (p, p), 0/1
  const float* X = nullptr;           // (N, C, H, W), or blocked (N, C/B, H, W, B) when x_blocked
  const float* other = nullptr;       // optional residual (N, K, OH, OW), or blocked when other_blocked
  float* Y = nullptr;                 // (N, K, OH, OW), or blocked when y_blocked
  int64_t N = 0;
  bool x_blocked = false, other_blocked = false, y_blocked = false;
  // The caller has another core for this run (the channels-last kernels): RunNchwc may decline a run
  // whose probe finds phase 2 mostly on the dot tiles (returns -1, nothing written).
  bool may_decline = false;
};

// Computes the run; returns the number of output elements computed (x CRS = the op's `macs`), or -1
// when it declined (run.may_decline).
int64_t RunNchwc(OrtKernelContext* ctx, const NchwcRun& run);

}  // namespace spatial
}  // namespace oz
