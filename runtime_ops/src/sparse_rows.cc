// sparse_rows: im2col of a position block, block sizing, per-thread scratch.
#include "sparse_rows.h"

#include <cstdlib>
#include <memory>
#include <new>
#include <thread>

#include "gemm.h"

namespace oz {
namespace sr {

PosBlocks ChoosePosBlocks(int64_t P, int64_t max_bs) {
  max_bs = std::max<int64_t>(8, std::min<int64_t>(kMaxTP, max_bs / 8 * 8));
  PosBlocks best;
  best.P = P;
  int64_t best_cost = -1;
  for (int64_t bs = max_bs; bs >= 8; bs -= 8) {
    const int64_t full = P / bs, tail = P % bs;
    // cost in "vector slots": a block of NA vectors costs NA + 1 (loop overhead),
    // and fewer than 4 vectors run latency-bound at about the rate of 4.
    int64_t cost = full * (bs / 8 + 1);
    if (tail) cost += std::max<int64_t>((tail + 7) / 8, 4) + 1;
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best.bs = bs;
    }
  }
  best.count = (P + best.bs - 1) / best.bs;
  return best;
}

void PaddedInput::Plan(const ConvGeom& g, int64_t N) {
  SW = g.SW;
  Hp = g.H + g.PT + g.PB;
  Wp = g.W + g.PL + g.PR;
  Wq = (Wp + SW - 1) / SW;
  row = SW * Wq;
  chan = Hp * row;
  floats = static_cast<size_t>(N * g.C * chan) + 64;
}

void PaddedInput::Fill(const ConvGeom& g, const float* X, int64_t n, int64_t c0, int64_t c1, float* buf) const {
  for (int64_t c = c0; c < c1; ++c) {
    float* dst = buf + (n * g.C + c) * chan;
    const float* src = X + (n * g.C + c) * g.H * g.W;
    std::memset(dst, 0, sizeof(float) * g.PT * row);
    for (int64_t h = 0; h < g.H; ++h) {
      float* d = dst + (h + g.PT) * row;
      const float* s = src + h * g.W;
      if (SW == 1) {
        std::memset(d, 0, sizeof(float) * g.PL);
        std::memcpy(d + g.PL, s, sizeof(float) * g.W);
        std::memset(d + g.PL + g.W, 0, sizeof(float) * (row - g.PL - g.W));
      } else {
        std::memset(d, 0, sizeof(float) * row);
        for (int64_t w = 0; w < g.W; ++w) {
          const int64_t iw = w + g.PL;
          d[(iw % SW) * Wq + iw / SW] = s[w];
        }
      }
    }
    std::memset(dst + (g.PT + g.H) * row, 0, sizeof(float) * (Hp - g.PT - g.H) * row);
  }
}

ColBuilder::ColBuilder(const ConvGeom& g, const PaddedInput& pi, const float* xg, int64_t p0, int np, int ld)
    : g_(g), pi_(pi), x_(xg), x_end_(pi.end), np_(np), ld_(ld) {
  int j = 0;
  while (j < np) {
    const int64_t p = p0 + j;
    const int64_t oh = p / g.OW, ow = p % g.OW;
    const int len = static_cast<int>(std::min<int64_t>(np - j, g.OW - ow));
    seg_[nseg_++] = Seg{oh * g.SH * pi.row + ow, oh, ow, j, len};
    j += len;
  }
}

void ColBuilder::BuildDirect(int64_t r0, int64_t r1, float* col) const {
  const ConvGeom& g = g_;
  const int64_t khw = g.KH * g.KW;
  int64_t c = r0 / khw, kh = (r0 / g.KW) % g.KH, kw = r0 % g.KW;
  const __m256 z = _mm256_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    float* out = col + (r - r0) * ld_;
    const float* xc = x_ + c * g.H * g.W;
    for (int s = 0; s < nseg_; ++s) {
      const Seg& sg = seg_[s];
      float* o = out + sg.j0;
      const int len = sg.len;
      const int64_t ih = sg.oh * g.SH - g.PT + kh * g.DH;
      int lo = len, hi = len;  // lanes [lo, hi) read X; the rest are padding
      const float* src = nullptr;
      if (ih >= 0 && ih < g.H) {
        const int64_t iw0 = sg.ow0 - g.PL + kw * g.DW;  // SW == 1
        lo = static_cast<int>(std::min<int64_t>(len, std::max<int64_t>(0, -iw0)));
        hi = static_cast<int>(std::max<int64_t>(lo, std::min<int64_t>(len, g.W - iw0)));
        src = xc + ih * g.W + iw0;
      }
      int j = 0;
      for (; j + 8 <= lo; j += 8) _mm256_storeu_ps(o + j, z);
      for (; j < lo; ++j) o[j] = 0.f;
      for (; j + 32 <= hi; j += 32) {
        const __m256 v0 = _mm256_loadu_ps(src + j), v1 = _mm256_loadu_ps(src + j + 8);
        const __m256 v2 = _mm256_loadu_ps(src + j + 16), v3 = _mm256_loadu_ps(src + j + 24);
        _mm256_storeu_ps(o + j, v0);
        _mm256_storeu_ps(o + j + 8, v1);
        _mm256_storeu_ps(o + j + 16, v2);
        _mm256_storeu_ps(o + j + 24, v3);
      }
      for (; j + 8 <= hi; j += 8) _mm256_storeu_ps(o + j, _mm256_loadu_ps(src + j));
      if (j < hi) {
        // A full vector when it stays inside X and this Col row: lanes past hi get
        // neighbouring input values, zeroed just below or overwritten by the next
        // segment (or by the lanes >= np zeroing); else one by one.
        if (sg.j0 + j + 8 <= ld_ && src + j + 8 <= x_end_) {
          _mm256_storeu_ps(o + j, _mm256_loadu_ps(src + j));
        } else {
          for (int q = j; q < hi; ++q) o[q] = src[q];
        }
        j = hi;
      }
      for (; j + 8 <= len; j += 8) _mm256_storeu_ps(o + j, z);
      for (; j < len; ++j) o[j] = 0.f;
    }
    for (int j = np_; j < ld_; ++j) out[j] = 0.f;
    if (++kw == g.KW) {
      kw = 0;
      if (++kh == g.KH) {
        kh = 0;
        ++c;
      }
    }
  }
}

void ColBuilder::Build(int64_t r0, int64_t r1, float* col) const {
  if (pi_.direct) {
    BuildDirect(r0, r1, col);
    return;
  }
  const ConvGeom& g = g_;
  const int64_t khw = g.KH * g.KW;
  int64_t c = r0 / khw, kh = (r0 / g.KW) % g.KH, kw = r0 % g.KW;
  // Offsets of (c, kh) and of kw's stride phase, updated incrementally (no division per row).
  const float* ckh = x_ + c * pi_.chan + kh * g.DH * pi_.row;
  const int64_t kw_step_mod = g.DW % pi_.SW, kw_step_div = g.DW / pi_.SW;
  const int64_t tap0 = kw * g.DW;
  int64_t tmod = tap0 % pi_.SW, tdiv = tap0 / pi_.SW;
  const int nseg = nseg_;
  for (int64_t r = r0; r < r1; ++r) {
    float* out = col + (r - r0) * ld_;
    const float* base = ckh + tmod * pi_.Wq + tdiv;
    for (int s = 0; s < nseg; ++s) {
      const float* src = base + seg_[s].src;
      const int j0 = seg_[s].j0, len = seg_[s].len;
      float* o = out + j0;
      int j = 0;
      // loads first, then stores: no store is followed by a load that could
      // falsely alias it (same address bits below 4 KiB)
      for (; j + 32 <= len; j += 32) {
        const __m256 v0 = _mm256_loadu_ps(src + j), v1 = _mm256_loadu_ps(src + j + 8);
        const __m256 v2 = _mm256_loadu_ps(src + j + 16), v3 = _mm256_loadu_ps(src + j + 24);
        _mm256_storeu_ps(o + j, v0);
        _mm256_storeu_ps(o + j + 8, v1);
        _mm256_storeu_ps(o + j + 16, v2);
        _mm256_storeu_ps(o + j + 24, v3);
      }
      for (; j + 8 <= len; j += 8) _mm256_storeu_ps(o + j, _mm256_loadu_ps(src + j));
      if (j < len) {
        // A partial last vector may spill into the next segment's lanes (written after
        // this one) or into lanes >= np (zeroed below), never past this row.
        if (j0 + j + 8 <= ld_) {
          _mm256_storeu_ps(o + j, _mm256_loadu_ps(src + j));
        } else {
          for (; j < len; ++j) o[j] = src[j];
        }
      }
    }
    for (int j = np_; j < ld_; ++j) out[j] = 0.f;
    if (++kw == g.KW) {
      kw = 0;
      tmod = 0;
      tdiv = 0;
      ckh += g.DH * pi_.row;
      if (++kh == g.KH) {
        kh = 0;
        ++c;
        ckh = x_ + c * pi_.chan;
      }
    } else {
      tmod += kw_step_mod;
      tdiv += kw_step_div;
      if (tmod >= pi_.SW) {
        tmod -= pi_.SW;
        ++tdiv;
      }
    }
  }
}

// The slots are the kernels' one grow-only scratch buffer (gemm.h), four per thread.
float* Scratch(int slot, size_t floats) {
  static thread_local gemm::GrowableFloats slots[4];
  try {
    return slots[slot].Floats(floats);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}

bool InputPresent(const OrtKernelInfo* info, size_t index) {
  Ort::ConstKernelInfo ki(info);
  if (index >= ki.GetInputCount()) return false;
  return !ki.GetInputName(index).empty();
}

bool BuildPaddedInput(OrtKernelContext* ctx, const ConvGeom& g, const float* X, int64_t N, PaddedInput* pi,
                      bool allow_direct) {
  pi->Plan(g, N);
  // Stride 1 without padding: the im2col reads X directly (no copy). With padding
  // the copy is cheaper than bounds per segment (measured: 0.75 vs 1.0 ms on a 3x3
  // 64x56x56 layer at 90% pruning), although it costs a parallel section.
  if (allow_direct && g.SW == 1 && g.PT == 0 && g.PL == 0 && g.PB == 0 && g.PR == 0) {
    pi->direct = true;
    pi->data = X;
    pi->end = X + N * g.C * g.H * g.W;
    pi->row = g.W;
    pi->chan = g.H * g.W;
    return true;
  }
  float* buf = Scratch(3, pi->floats);
  if (!buf) return false;
  std::memset(buf + pi->floats - 64, 0, 64 * sizeof(float));
  const size_t items = static_cast<size_t>(N * g.C);
  const size_t tasks = std::min(items, std::max<size_t>(1, TaskCount(items) / 2));
  const PaddedInput& p = *pi;
  ForTasks(ctx, tasks, [&](size_t t) {
    const size_t i0 = t * items / tasks, i1 = (t + 1) * items / tasks;
    for (size_t i = i0; i < i1;) {
      const int64_t n = static_cast<int64_t>(i) / g.C, c = static_cast<int64_t>(i) % g.C;
      const int64_t c1 = std::min<int64_t>(g.C, c + static_cast<int64_t>(i1 - i));
      p.Fill(g, X, n, c, c1, buf);
      i += static_cast<size_t>(c1 - c);
    }
  });
  pi->data = buf;
  return true;
}

const float* OtherInput(OrtKernelContext* context, size_t index, bool declared, const ConvGeom& g, int64_t N,
                        const char* op) {
  if (!declared) return nullptr;
  Ort::KernelContext ctx(context);
  auto o = ctx.GetInput(index);
  const std::vector<int64_t> want{N, g.K, g.OH, g.OW};
  if (!o) Fail(op, Msg("input 'other' is missing at run time, expected shape ", ShapeStr(want)));
  auto info = o.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    Fail(op, Msg("input 'other' has element type ", info.GetElementType(), ", expected float"));
  const std::vector<int64_t> got = info.GetShape();
  if (got != want)
    Fail(op, Msg("input 'other' has shape ", ShapeStr(got), ", expected ", ShapeStr(want),
                 " (N, K, OH, OW: the conv output's shape)"));
  return o.GetTensorData<float>();
}

void AddRelu(OrtKernelContext* ctx, float* Y, const float* other, int64_t n) {
  const size_t tasks = PartitionTasks(static_cast<size_t>((n + 4095) / 4096));
  ForTasks(ctx, tasks, [&](size_t t) {
    const int64_t T = static_cast<int64_t>(tasks), ti = static_cast<int64_t>(t);
    const int64_t i0 = n * ti / T / 8 * 8, i1 = ti + 1 == T ? n : n * (ti + 1) / T / 8 * 8;
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8)
      _mm256_storeu_ps(Y + i, Relu(_mm256_add_ps(_mm256_loadu_ps(Y + i), _mm256_loadu_ps(other + i))));
    for (; i < i1; ++i) Y[i] = Relu(Y[i] + other[i]);
  });
}

std::vector<int64_t> RowOffsets(const ConvGeom& g, const PaddedInput& pi) {
  const int64_t CRS = g.Cg() * g.KH * g.KW;
  std::vector<int64_t> roff(static_cast<size_t>(CRS));
  for (int64_t r = 0; r < CRS; ++r) {
    const int64_t c = r / (g.KH * g.KW), kh = r / g.KW % g.KH, tap = r % g.KW * g.DW;
    roff[static_cast<size_t>(r)] = c * pi.chan + kh * g.DH * pi.row + tap % pi.SW * pi.Wq + tap / pi.SW;
  }
  return roff;
}

size_t PartitionTasks(size_t items, size_t min_tasks_hint) {
  size_t t = TaskCount(items);
  if (min_tasks_hint) t = std::max(t, std::min(items, min_tasks_hint));
  return std::max<size_t>(1, std::min(t, items));
}

}  // namespace sr
}  // namespace oz
