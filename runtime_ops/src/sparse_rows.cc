// sparse_rows: im2col of a position block, block sizing, per-thread scratch.
#include "sparse_rows.h"

#include <cstdlib>
#include <memory>
#include <thread>

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
    : g_(g), pi_(pi), x_(xg), np_(np), ld_(ld) {
  int j = 0;
  while (j < np) {
    const int64_t p = p0 + j;
    const int64_t oh = p / g.OW, ow = p % g.OW;
    const int len = static_cast<int>(std::min<int64_t>(np - j, g.OW - ow));
    seg_[nseg_++] = Seg{oh * g.SH * pi.row + ow, j, len};
    j += len;
  }
}

void ColBuilder::Build(int64_t r0, int64_t r1, float* col) const {
  const ConvGeom& g = g_;
  const int64_t khw = g.KH * g.KW;
  int64_t c = r0 / khw, kh = (r0 / g.KW) % g.KH, kw = r0 % g.KW;
  for (int64_t r = r0; r < r1; ++r) {
    float* out = col + (r - r0) * ld_;
    const int64_t tap = kw * g.DW;
    const float* base = x_ + c * pi_.chan + kh * g.DH * pi_.row + (tap % pi_.SW) * pi_.Wq + tap / pi_.SW;
    for (int s = 0; s < nseg_; ++s) {
      const float* src = base + seg_[s].src;
      const int j0 = seg_[s].j0, len = seg_[s].len;
      float* o = out + j0;
      int j = 0;
      for (; j + 8 <= len; j += 8) _mm256_storeu_ps(o + j, _mm256_loadu_ps(src + j));
      if (j < len) {
        // A partial last vector may spill into the next segment's lanes (written after
        // this one) or into lanes >= np (zeroed below), never past this row.
        if (pi_.slack && j0 + j + 8 <= ld_) {
          _mm256_storeu_ps(o + j, _mm256_loadu_ps(src + j));
        } else {
          for (; j < len; ++j) o[j] = src[j];
        }
      }
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

namespace {
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
struct ThreadScratch {
  std::unique_ptr<float, FreeDeleter> buf[4];
  size_t cap[4] = {0, 0, 0, 0};
};
thread_local ThreadScratch tls_scratch;
}  // namespace

float* Scratch(int slot, size_t floats) {
  ThreadScratch& s = tls_scratch;
  if (floats > s.cap[slot]) {
    const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) return nullptr;
    s.buf[slot].reset(p);
    s.cap[slot] = bytes / sizeof(float);
  }
  return s.buf[slot].get();
}

bool InputPresent(const OrtKernelInfo* info, size_t index) {
  Ort::ConstKernelInfo ki(info);
  if (index >= ki.GetInputCount()) return false;
  return !ki.GetInputName(index).empty();
}

bool BuildPaddedInput(OrtKernelContext* ctx, const ConvGeom& g, const float* X, int64_t N, PaddedInput* pi) {
  pi->Plan(g, N);
  if (g.PT == 0 && g.PL == 0 && g.PB == 0 && g.PR == 0 && g.SW == 1) {  // the layout is X itself
    pi->slack = false;
    pi->data = X;
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

bool ShiftedInput::Build(OrtKernelContext* ctx, const ConvGeom& g, const float* X, int64_t N, uint32_t* tab) {
  const int64_t Hp = g.H + g.PT + g.PB;
  SH = g.SH;
  KW = g.KW;
  C = g.C;
  E = g.OW;
  Hq = (Hp + SH - 1) / SH;
  image = KW * C * SH * Hq * E;
  const int64_t Cg = g.Cg(), khw = g.KH * g.KW;
  for (int64_t r = 0; r < Cg * khw; ++r) {
    const int64_t c = r / khw, kh = (r / g.KW) % g.KH, kw = r % g.KW;
    const int64_t o = ((kw * C + c) * SH + (kh * g.DH) % SH) * Hq * E + (kh * g.DH / SH) * E;
    tab[r] = static_cast<uint32_t>(o);
  }
  in_place = g.KW == 1 && g.KH == 1 && g.SH == 1 && g.SW == 1 && g.PT == 0 && g.PL == 0 && g.PB == 0 && g.PR == 0 &&
             g.OW == g.W && reinterpret_cast<uintptr_t>(X) % 32 == 0;
  if (in_place) {  // Z[n][0][c][0][h][w] is X itself
    data = X;
    return true;
  }
  const size_t floats = static_cast<size_t>(N * image);
  float* buf = Scratch(3, floats + 8);
  if (!buf) return false;
  // one item per (n, kw, c, ph) plane
  const size_t items = static_cast<size_t>(N * KW * C * SH);
  const size_t tasks = std::min(items, std::max<size_t>(1, TaskCount(items) / 2));
  ForTasks(ctx, tasks, [&](size_t t) {
    for (size_t it = t * items / tasks; it < (t + 1) * items / tasks; ++it) {
      int64_t rem = static_cast<int64_t>(it);
      const int64_t ph = rem % SH; rem /= SH;
      const int64_t c = rem % C; rem /= C;
      const int64_t kw = rem % KW; const int64_t n = rem / KW;
      float* z = buf + n * image + ((kw * C + c) * SH + ph) * Hq * E;
      const float* xc = X + (n * C + c) * g.H * g.W;
      const int64_t x0 = kw * g.DW - g.PL;  // input column of x = 0
      // columns x with 0 <= x*SW + x0 < W
      const int64_t lo = std::min<int64_t>(E, x0 >= 0 ? 0 : (-x0 + g.SW - 1) / g.SW);
      const int64_t hi = std::max(lo, std::min<int64_t>(E, x0 >= g.W ? 0 : (g.W - x0 + g.SW - 1) / g.SW));
      for (int64_t i = 0; i < Hq; ++i) {
        float* zr = z + i * E;
        const int64_t ih = i * SH + ph - g.PT;
        if (ih < 0 || ih >= g.H) {
          std::memset(zr, 0, sizeof(float) * E);
          continue;
        }
        const float* xr = xc + ih * g.W + x0;
        std::memset(zr, 0, sizeof(float) * lo);
        if (g.SW == 1) {
          std::memcpy(zr + lo, xr + lo, sizeof(float) * (hi - lo));
        } else {
          for (int64_t x = lo; x < hi; ++x) zr[x] = xr[x * g.SW];
        }
        std::memset(zr + hi, 0, sizeof(float) * (E - hi));
      }
    }
  });
  data = buf;
  return true;
}

size_t PartitionTasks(size_t items, size_t min_tasks_hint) {
  size_t t = TaskCount(items);
  if (min_tasks_hint) t = std::max(t, std::min(items, min_tasks_hint));
  return std::max<size_t>(1, std::min(t, items));
}

}  // namespace sr
}  // namespace oz
