// Depthwise 2-D convolution (NCHW, float32, CPU) as a Paddle custom operator.
//
// Paddle's own CPU depthwise conv is a scalar loop and dominates a MobileNetV2 training
// step; this op replaces it (forward, input gradient, weight gradient). There are two
// implementations, picked per call by plane size (UseCL), both branch-free in their inner
// loops, with zero padding living in scratch buffers instead of bounds tests:
//
// 1. Channel-lane (3x3 with at least 8 channels, or planes up to 32 wide, or stride 2):
//    MobileNetV2 at 32 px has 1x1..16x16 planes, shorter than a vector register row. The
//    planes of 8 consecutive channels of one image are interleaved ([pixel][lane], by 8x8
//    register transposes under AVX2) into a zero-bordered buffer, so every tap is one
//    full-width FMA with a per-lane weight vector, at any stride.
//    The input gradient is a gather, each dx pixel from the dy pixels its taps reach (stride
//    1 on planes of 7x7 and up; stride 2 with padding 1), elsewhere a scatter-add of w * dy
//    into a padded buffer (the transposed conv, stride handled by index arithmetic); the
//    weight gradient is accumulated in registers.
//
// 2. Flat correlation (other kernels; wide stride-1 planes of fewer than 8 channels):
//    every output is sum_k w[k] * src[t + off_k] over one contiguous index t, so the
//    inner loop is a unit-stride FMA chain the compiler vectorises.
//    * Stride: the zero-padded input is split into sh*sw polyphase sub-images,
//      Ph[qy][qx][r][c] = Pad[r*sh + qy][c*sw + qx]; a strided tap (ky, kx) then reads
//      sub-image (ky%sh, kx%sw) at (i + ky/sh, j + kx/sw): unit stride in j.
//    * The planes of one channel for G images are stacked with one row stride and one
//      loop runs over all of them; columns/rows between planes compute garbage that is
//      never copied out.
//    * Input gradient: per output phase (Y%sh, X%sw), a correlation of the zero-margined
//      output gradient D with that phase's sub-kernel, then phases are interleaved.
//    * Weight gradient: dot products of D with shifted views of the input sub-images, all
//      taps at once so each D vector is loaded once.
//
// 3. Picked by shape only: 1x1 and 2x2 planes, where the conv is a small per-channel
//    matrix over the plane's pixels (SmallPlane).
//
// The channel-lane path writes outputs (y, dx) of at least half the last-level cache with
// streamed stores (stream_store.h).
//
// Threads: OpenMP over (channel group, image) work items; the channel-lane path takes them
// in chunks a thread that finishes early can take over (work_chunks.h), its weight
// gradients in per-chunk partial sums reduced at the end: race-free and deterministic for
// a fixed thread count. The Python side links this against the OpenMP runtime Paddle uses
// (libiomp5), so the op shares Paddle's thread pool and its OMP_NUM_THREADS.

#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "batch_norm_act.h"
#include "paddle/extension.h"
#include "stream_store.h"
#include "work_chunks.h"

namespace {

struct Geom {
  int64_t n, c, h, w;  // input
  int kh, kw;          // kernel
  int sh, sw;          // stride
  int pt, pb, pl, pr;  // padding: top, bottom, left, right
  int ho, wo;          // output
  int ty, tx;          // (kh-1)/sh, (kw-1)/sw: sub-image rows/cols a tap can reach past i/j
};

Geom MakeGeom(const std::vector<int64_t>& xs, const std::vector<int64_t>& ws,
              const std::vector<int>& strides, const std::vector<int>& paddings) {
  PD_CHECK(xs.size() == 4, "depthwise_conv2d: x must be NCHW");
  PD_CHECK(ws.size() == 4 && ws[1] == 1 && ws[0] == xs[1],
           "depthwise_conv2d: weight must be [C, 1, KH, KW] with C = x.shape[1]");
  PD_CHECK(strides.size() == 2 && strides[0] >= 1 && strides[1] >= 1,
           "depthwise_conv2d: strides must be [sh, sw] >= 1");
  PD_CHECK(paddings.size() == 4, "depthwise_conv2d: paddings must be [top, bottom, left, right]");
  Geom g{};
  g.n = xs[0]; g.c = xs[1]; g.h = xs[2]; g.w = xs[3];
  g.kh = static_cast<int>(ws[2]); g.kw = static_cast<int>(ws[3]);
  g.sh = strides[0]; g.sw = strides[1];
  g.pt = paddings[0]; g.pb = paddings[1]; g.pl = paddings[2]; g.pr = paddings[3];
  PD_CHECK(g.pt >= 0 && g.pb >= 0 && g.pl >= 0 && g.pr >= 0, "depthwise_conv2d: negative padding");
  g.ho = static_cast<int>((g.h + g.pt + g.pb - g.kh) / g.sh + 1);
  g.wo = static_cast<int>((g.w + g.pl + g.pr - g.kw) / g.sw + 1);
  PD_CHECK(g.h + g.pt + g.pb >= g.kh && g.w + g.pl + g.pr >= g.kw && g.ho > 0 && g.wo > 0,
           "depthwise_conv2d: kernel larger than padded input");
  g.ty = (g.kh - 1) / g.sh;
  g.tx = (g.kw - 1) / g.sw;
  return g;
}

// Scratch is reused across work items of a thread; grows only.
inline float* Scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---------------------------------------------------------------------------------------
// Inner loops.

// out[t] = sum_k w[k] * src[off[k] + t], t in [0, len). NT taps known at compile time so
// the weights and tap pointers stay in registers.
template <int NT>
inline void CorrelateN(const float* src, const int64_t* off, const float* w,
                       float* __restrict out, int64_t len) {
  const float* p[NT];
  float wk[NT];
  for (int k = 0; k < NT; ++k) { p[k] = src + off[k]; wk[k] = w[k]; }
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) {
    float acc = wk[0] * p[0][t];
#pragma GCC unroll 16
    for (int k = 1; k < NT; ++k) acc += wk[k] * p[k][t];
    out[t] = acc;
  }
}

void Correlate(const float* src, const int64_t* off, const float* w, int nt,
               float* __restrict out, int64_t len) {
  switch (nt) {
    case 1: return CorrelateN<1>(src, off, w, out, len);
    case 2: return CorrelateN<2>(src, off, w, out, len);
    case 3: return CorrelateN<3>(src, off, w, out, len);
    case 4: return CorrelateN<4>(src, off, w, out, len);
    case 6: return CorrelateN<6>(src, off, w, out, len);
    case 9: return CorrelateN<9>(src, off, w, out, len);
    default: break;
  }
  if (nt == 0) {  // a phase no tap reaches (stride > kernel): its gradient is zero
    std::fill(out, out + len, 0.f);
    return;
  }
  // Other kernel sizes: first tap writes, the rest accumulate; each sweep vectorised.
  CorrelateN<1>(src, off, w, out, len);
  for (int k = 1; k < nt; ++k) {
    const float* p = src + off[k];
    const float wk = w[k];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) out[t] += wk * p[t];
  }
}

// acc[k] += sum_t g[t] * src[off[k] + t]. Lane-wise accumulators (kLanes per tap) so the
// reduction vectorises without -ffast-math; summed across lanes once at the end.
constexpr int kLanes = 8;

template <int NT>
inline void DotTapsN(const float* __restrict g, const float* src, const int64_t* off,
                     int64_t len, double* acc) {
  const float* p[NT];
  for (int k = 0; k < NT; ++k) p[k] = src + off[k];
  float a[NT][kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= len; t += kLanes) {
#pragma GCC unroll 16
    for (int k = 0; k < NT; ++k) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) a[k][l] += g[t + l] * p[k][t + l];
    }
  }
  for (int k = 0; k < NT; ++k) {
    float s = 0.f;
    for (int64_t u = t; u < len; ++u) s += g[u] * p[k][u];
    for (int l = 0; l < kLanes; ++l) s += a[k][l];
    acc[k] += s;
  }
}

void DotTaps(const float* g, const float* src, const int64_t* off, int nt, int64_t len,
             double* acc) {
  switch (nt) {
    case 9: return DotTapsN<9>(g, src, off, len, acc);
    case 4: return DotTapsN<4>(g, src, off, len, acc);
    case 1: return DotTapsN<1>(g, src, off, len, acc);
    default: break;
  }
  for (int k = 0; k < nt; ++k) DotTapsN<1>(g, src, off + k, len, acc + k);
}

// ---------------------------------------------------------------------------------------
// Buffer builders.

// Polyphase sub-images of the zero-padded planes x[n0..n0+gn) of one channel, each block
// bh x bw, layout [phase][image][bh][bw]. Returns floats written (tail slack is zeroed).
void BuildPhases(const Geom& g, const float* x, int64_t c, int64_t n0, int gn, int bh, int bw,
                 float* ph, int64_t slack) {
  const int64_t block = static_cast<int64_t>(bh) * bw;
  const int64_t plane = g.h * g.w;
  for (int qy = 0; qy < g.sh; ++qy) {
    for (int qx = 0; qx < g.sw; ++qx) {
      float* base = ph + (static_cast<int64_t>(qy) * g.sw + qx) * gn * block;
      // Columns c of this phase that land inside the image: X = c*sw + qx - pl in [0, w).
      const int c0 = std::min<int64_t>(bw, std::max<int64_t>(0, (g.pl - qx + g.sw - 1) / g.sw));
      const int c1 = std::max<int64_t>(
          c0, std::min<int64_t>(bw, (g.w - 1 + g.pl - qx) >= 0 ? (g.w - 1 + g.pl - qx) / g.sw + 1 : 0));
      const int64_t x0 = static_cast<int64_t>(c0) * g.sw + qx - g.pl;
      for (int i = 0; i < gn; ++i) {
        const float* xp = x + ((n0 + i) * g.c + c) * plane;
        float* blk = base + i * block;
        for (int r = 0; r < bh; ++r) {
          float* row = blk + static_cast<int64_t>(r) * bw;
          const int64_t y = static_cast<int64_t>(r) * g.sh + qy - g.pt;
          if (y < 0 || y >= g.h) {
            std::memset(row, 0, sizeof(float) * bw);
            continue;
          }
          const float* xr = xp + y * g.w + x0;
          std::memset(row, 0, sizeof(float) * c0);
          if (g.sw == 1) {
            std::memcpy(row + c0, xr, sizeof(float) * (c1 - c0));
          } else {
            const int s = g.sw;
            for (int cc = 0; cc < c1 - c0; ++cc) row[c0 + cc] = xr[static_cast<int64_t>(cc) * s];
          }
          std::memset(row + c1, 0, sizeof(float) * (bw - c1));
        }
      }
    }
  }
  std::memset(ph + static_cast<int64_t>(g.sh) * g.sw * gn * block, 0, sizeof(float) * slack);
}

// Output-gradient planes of one channel with a top/left margin (ty, tx), blocks bh x bw,
// zero elsewhere: D[i][ty + a][tx + b] = dy[n0 + i][c][a][b].
void BuildMargined(const Geom& g, const float* dy, int64_t c, int64_t n0, int gn, int bh, int bw,
                   float* d, int64_t slack) {
  const int64_t block = static_cast<int64_t>(bh) * bw;
  const int64_t oplane = static_cast<int64_t>(g.ho) * g.wo;
  std::memset(d, 0, sizeof(float) * (gn * block + slack));
  for (int i = 0; i < gn; ++i) {
    const float* src = dy + ((n0 + i) * g.c + c) * oplane;
    float* blk = d + i * block + static_cast<int64_t>(g.ty) * bw + g.tx;
    for (int a = 0; a < g.ho; ++a)
      std::memcpy(blk + static_cast<int64_t>(a) * bw, src + static_cast<int64_t>(a) * g.wo,
                  sizeof(float) * g.wo);
  }
}

// How many images of one channel go in a work item: enough to make the flat loops long
// for small planes, few enough that the scratch stays in L2.
int GroupSize(int64_t n, int64_t floats_per_image) {
  constexpr int64_t kBudget = 48 * 1024;  // floats (~192 KB)
  int64_t gsz = std::max<int64_t>(1, kBudget / std::max<int64_t>(1, floats_per_image));
  return static_cast<int>(std::min<int64_t>(gsz, n));
}

// ---------------------------------------------------------------------------------------
// Forward.

void ForwardImpl(const Geom& g, const float* x, const float* w, float* y) {
  const int bh = g.ho + g.ty, bw = g.wo + g.tx;
  const int64_t block = static_cast<int64_t>(bh) * bw;
  const int phases = g.sh * g.sw;
  const int gsz = GroupSize(g.n, block * (phases + 1));
  const int64_t groups = (g.n + gsz - 1) / gsz;
  const int64_t items = g.c * groups;
  const int nt = g.kh * g.kw;
  const int64_t slack = g.tx + 16;
  const int64_t oplane = static_cast<int64_t>(g.ho) * g.wo;

#pragma omp parallel
  {
    std::vector<float> ph_buf, out_buf;
    std::vector<int64_t> off(nt);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t c = it / groups;
      const int64_t n0 = (it % groups) * gsz;
      const int gn = static_cast<int>(std::min<int64_t>(gsz, g.n - n0));
      float* ph = Scratch(ph_buf, phases * gn * block + slack);
      BuildPhases(g, x, c, n0, gn, bh, bw, ph, slack);
      for (int ky = 0; ky < g.kh; ++ky)
        for (int kx = 0; kx < g.kw; ++kx)
          off[ky * g.kw + kx] = ((ky % g.sh) * g.sw + (kx % g.sw)) * gn * block +
                                static_cast<int64_t>(ky / g.sh) * bw + kx / g.sw;
      // Last needed flat index ends at row ho of the last block.
      const int64_t len = (gn - 1) * block + static_cast<int64_t>(g.ho) * bw;
      float* out = Scratch(out_buf, len);
      Correlate(ph, off.data(), w + c * nt, nt, out, len);
      for (int i = 0; i < gn; ++i) {
        float* dst = y + ((n0 + i) * g.c + c) * oplane;
        const float* src = out + i * block;
        for (int a = 0; a < g.ho; ++a)
          std::memcpy(dst + static_cast<int64_t>(a) * g.wo, src + static_cast<int64_t>(a) * bw,
                      sizeof(float) * g.wo);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward: dx and dw in one pass over (channel, image group), sharing the D buffer.

void BackwardImpl(const Geom& g, const float* x, const float* w, const float* dy, float* dx,
                  float* dw) {
  // D block: dy at (ty, tx); tall/wide enough for every input row/col's phase index.
  const int bh = g.ty + std::max<int>(g.ho, static_cast<int>((g.pt + g.h - 1) / g.sh + 1));
  const int bw = g.tx + std::max<int>(g.wo, static_cast<int>((g.pl + g.w - 1) / g.sw + 1));
  const int64_t block = static_cast<int64_t>(bh) * bw;
  const int phases = g.sh * g.sw;
  const int gsz = GroupSize(g.n, block * (2 * phases + 1));
  const int64_t groups = (g.n + gsz - 1) / gsz;
  const int64_t items = g.c * groups;
  const int nt = g.kh * g.kw;
  const int64_t slack = static_cast<int64_t>(g.ty) * bw + g.tx + 16;
  const int64_t plane = g.h * g.w;
  const int max_threads = omp_get_max_threads();
  // Per-thread weight-gradient partials in double: batch sums of many small products.
  std::vector<double> partial(static_cast<size_t>(max_threads) * g.c * nt, 0.0);

  // Taps of each phase of dx: ky = qy + m*sh, kx = qx + n*sw.
  struct PhaseTaps { int qy, qx; std::vector<int> ky, kx; };
  std::vector<PhaseTaps> ptaps;
  for (int qy = 0; qy < g.sh; ++qy)
    for (int qx = 0; qx < g.sw; ++qx) {
      PhaseTaps p{qy, qx, {}, {}};
      for (int ky = qy; ky < g.kh; ky += g.sh)
        for (int kx = qx; kx < g.kw; kx += g.sw) { p.ky.push_back(ky); p.kx.push_back(kx); }
      ptaps.push_back(std::move(p));
    }

#pragma omp parallel
  {
    const int tid = omp_get_thread_num();
    std::vector<float> ph_buf, d_buf, tmp_buf, wq;
    std::vector<int64_t> off(nt);
    std::vector<double> acc(nt);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t c = it / groups;
      const int64_t n0 = (it % groups) * gsz;
      const int gn = static_cast<int>(std::min<int64_t>(gsz, g.n - n0));
      const float* wc = w + c * nt;
      const int64_t span = gn * block;

      float* d = Scratch(d_buf, span + slack);
      BuildMargined(g, dy, c, n0, gn, bh, bw, d, slack);

      // ---- dx: one correlation per phase, into tmp[phase], then interleave.
      float* tmp = Scratch(tmp_buf, phases * span);
      // Rows of the phase images that any input row maps to: r <= (pt + h - 1) / sh.
      const int64_t rows = (g.pt + g.h - 1) / g.sh + 1;
      const int64_t len = (gn - 1) * block + rows * bw;
      for (int p = 0; p < phases; ++p) {
        const PhaseTaps& pt = ptaps[p];
        const int m = static_cast<int>(pt.ky.size());
        wq.resize(m);
        for (int k = 0; k < m; ++k) {
          wq[k] = wc[pt.ky[k] * g.kw + pt.kx[k]];
          off[k] = static_cast<int64_t>(g.ty - pt.ky[k] / g.sh) * bw + (g.tx - pt.kx[k] / g.sw);
        }
        Correlate(d, off.data(), wq.data(), m, tmp + p * span, len);
      }
      for (int i = 0; i < gn; ++i) {
        float* dst = dx + ((n0 + i) * g.c + c) * plane;
        for (int64_t yy = 0; yy < g.h; ++yy) {
          const int64_t Y = yy + g.pt;
          const int qy = static_cast<int>(Y % g.sh);
          const float* trow = tmp + static_cast<int64_t>(qy) * g.sw * span + i * block + (Y / g.sh) * bw;
          float* drow = dst + yy * g.w;
          if (g.sw == 1) {
            std::memcpy(drow, trow + g.pl, sizeof(float) * g.w);
          } else {
            // Column phase by phase: consecutive reads, no division in the loop.
            for (int qx = 0; qx < g.sw; ++qx) {
              const int64_t x0 = ((qx - g.pl) % g.sw + g.sw) % g.sw;
              const float* tp = trow + qx * span + (x0 + g.pl) / g.sw;
              const int s = g.sw;
              for (int64_t m = 0; x0 + m * s < g.w; ++m) drow[x0 + m * s] = tp[m];
            }
          }
        }
      }

      // ---- dw: the padded input in the same block geometry as D, so one flat index t
      // addresses dy in D and the matching input element in each phase image.
      float* ph = Scratch(ph_buf, phases * span + 16);
      BuildPhases(g, x, c, n0, gn, bh, bw, ph, 16);
      const int64_t t0 = static_cast<int64_t>(g.ty) * bw + g.tx;
      const int64_t t1 = (gn - 1) * block + static_cast<int64_t>(g.ty + g.ho) * bw;
      for (int ky = 0; ky < g.kh; ++ky)
        for (int kx = 0; kx < g.kw; ++kx)
          off[ky * g.kw + kx] = ((ky % g.sh) * g.sw + (kx % g.sw)) * span + t0 +
                                static_cast<int64_t>(ky / g.sh - g.ty) * bw + (kx / g.sw - g.tx);
      std::fill(acc.begin(), acc.end(), 0.0);
      DotTaps(d + t0, ph, off.data(), nt, t1 - t0, acc.data());
      double* pc = partial.data() + (static_cast<int64_t>(tid) * g.c + c) * nt;
      for (int k = 0; k < nt; ++k) pc[k] += acc[k];
    }
  }
  for (int64_t i = 0; i < g.c * nt; ++i) {
    double s = 0.0;
    for (int t = 0; t < max_threads; ++t) s += partial[static_cast<int64_t>(t) * g.c * nt + i];
    dw[i] = static_cast<float>(s);
  }
}

// ---------------------------------------------------------------------------------------
// Channel-lane path for small planes (MobileNetV2 at 32 px: 16x16 down to 1x1). A plane
// row there is shorter than a vector, so instead the kLanes planes of consecutive channels
// of one image are interleaved ([pixel][lane]) into a zero-bordered buffer and every tap is
// one full-width FMA with a per-lane weight vector. No garbage rows/cols, no phase split:
// strides are plain index arithmetic outside the vector op. 3x3 only.

typedef float v8 __attribute__((vector_size(32)));  // GCC/Clang; SSE pairs without AVX
static_assert(sizeof(v8) == kLanes * sizeof(float), "lane count");

struct ClGeom {
  int hp, wp;  // padded plane, interleaved buffer is hp * wp vectors
  int64_t groups;  // channel groups of kLanes
};

ClGeom MakeClGeom(const Geom& g) {
  return {static_cast<int>(g.h + g.pt + g.pb), static_cast<int>(g.w + g.pl + g.pr),
          (g.c + kLanes - 1) / kLanes};
}

// The channel-lane loops' work: (channel group, image) items, group-major, in chunks
// (mbv2::WorkChunks) of one group's images each (a multiple of the group count), so a
// chunk's weight gradient and sums are its group's lanes alone; about kChunksPerThread
// chunks a thread.
struct LaneChunks {
  int64_t groups, per_group;  // chunk k is image run k % per_group of group k / per_group
  mbv2::WorkChunks work;
  LaneChunks(const ClGeom& cg, int64_t n)
      : groups(cg.groups),
        per_group(std::max<int64_t>(1, std::min<int64_t>(
            n, (mbv2::kChunksPerThread * omp_get_max_threads() + groups - 1) / groups))),
        work(groups * n, groups * per_group) {}
  int64_t count() const { return groups * per_group; }
};

#ifdef __AVX2__
// In-register transpose of 8 rows of 8 floats.
inline void Transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5,
                       __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20); r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20); r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31); r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31); r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// The kLanes planes (channel stride `stride`) of an h x w image as [pixel][lane] vectors
// placed in rows of `row_stride` vectors: dst[(y * row_stride + x) * 8 + l] =
// src[l * stride + y * w + x]. The 8x8 transposes run over the flat plane, so a block may
// span two rows and rows narrower or not a multiple of 8 wide take them too. A row at a
// time, 14- and 28-wide rows left 6 and 4 pixels of each to a scalar tail; the flat
// transposes took (batch 32, 2 threads, fused batch norm op, forward / backward ms)
// 384x14x14 1.80 / 4.56 -> 1.54 / 3.40, 576x14x14 stride 2 2.42 / 4.97 -> 1.69 / 3.77,
// 960x7x7 1.21 / 2.80 -> 1.07 / 2.56, 192x28x28 2.84 / 7.67 -> 2.58 / 7.01.
// Floats ahead of the block that Gather8Plane prefetches in each of its 8 planes, one line
// a plane every other block: 8 strided streams a thread, which the hardware prefetcher
// left to wait on memory (the loads were a fifth of ForwardCL's samples). 96x112x112
// stride 2, batch 32, fwd / bwd ms, 3-4 alternated processes: 13.6 / 32 -> 11.2-12.7 /
// 26.5-30.5 (64 floats ahead about the same); x1.0 224 px training step 600 -> 591 ms.
constexpr int64_t kAhead = 128;
// The kLanes planes a gather reads: plane l's 8 pixels from p (vec) or its pixel p (at),
// and the prefetch of plane l ahead of p.
struct PlainPlanes {
  const float* src;
  int64_t stride;
#ifdef __AVX2__
  __m256 vec(int l, int64_t p) const { return _mm256_loadu_ps(src + l * stride + p); }
  void prefetch(int l, int64_t p) const {
    _mm_prefetch(reinterpret_cast<const char*>(src + l * stride + p), _MM_HINT_T0);
  }
#endif
  float at(int l, int64_t p) const { return src[l * stride + p]; }
};

// As PlainPlanes, of a depthwise -> projection op's folded output gradient (mbv2::DyFold):
// plane l's dy = a gate(z) g + b z + c0 made from g and z as they are read, a, b, c0, fa,
// fb those of channel c0 + l (zero past the group's last channel).
struct FoldedPlanes {
  const float *g, *z;
  int64_t stride;
  float a[kLanes], b[kLanes], c0[kLanes], fa[kLanes], fb[kLanes];

#ifdef __AVX2__
  __m256 va[kLanes], vb[kLanes], vc[kLanes], vfa[kLanes], vfb[kLanes];  // broadcast once
#endif

  FoldedPlanes(const mbv2::DyFold& f, const float* g_, int64_t off, int64_t stride_, int64_t ch,
               int lanes)
      : g(g_ + off), z(f.z + off), stride(stride_) {
    for (int l = 0; l < kLanes; ++l) {
      const bool in = l < lanes;
      a[l] = in ? f.a[ch + l] : 0.f;
      b[l] = in ? f.b[ch + l] : 0.f;
      c0[l] = in ? f.c0[ch + l] : 0.f;
      fa[l] = in ? f.fa[ch + l] : 0.f;
      fb[l] = in ? f.fb[ch + l] : 0.f;
#ifdef __AVX2__
      va[l] = _mm256_set1_ps(a[l]);
      vb[l] = _mm256_set1_ps(b[l]);
      vc[l] = _mm256_set1_ps(c0[l]);
      vfa[l] = _mm256_set1_ps(fa[l]);
      vfb[l] = _mm256_set1_ps(fb[l]);
#endif
    }
  }
#ifdef __AVX2__
  static __m256 Fma(__m256 x, __m256 y, __m256 acc) {
#ifdef __FMA__
    return _mm256_fmadd_ps(x, y, acc);
#else
    return _mm256_add_ps(_mm256_mul_ps(x, y), acc);
#endif
  }
  // GatedDx's arithmetic (batch_norm_act.cc), so dy is what its in-place pass wrote
  __m256 vec(int l, int64_t p) const {
    const __m256 zv = _mm256_loadu_ps(z + l * stride + p);
    const __m256 t = Fma(zv, vfa[l], vfb[l]);
    const __m256 pass = _mm256_and_ps(_mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_GT_OQ),
                                      _mm256_cmp_ps(t, _mm256_set1_ps(6.f), _CMP_LT_OQ));
    const __m256 gv = _mm256_and_ps(_mm256_loadu_ps(g + l * stride + p), pass);
    return Fma(va[l], gv, Fma(vb[l], zv, vc[l]));
  }
  void prefetch(int l, int64_t p) const {
    _mm_prefetch(reinterpret_cast<const char*>(g + l * stride + p), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(z + l * stride + p), _MM_HINT_T0);
  }
#endif
  float at(int l, int64_t p) const {
    const float zi = z[l * stride + p], t = zi * fa[l] + fb[l];
    const float gi = t > 0.f && t < 6.f ? g[l * stride + p] : 0.f;
    return a[l] * gi + b[l] * zi + c0[l];
  }
};

// As Gather8Plane, each pixel vector handed to put(index, vector), index = y * row_stride
// + x, instead of stored; the planes read through `src` (PlainPlanes, FoldedPlanes).
template <class Planes, class Put>
inline void Gather8PlaneTo(const Planes& src, int64_t h, int64_t w, int64_t row_stride, Put put) {
  const int64_t plane = h * w;
  int64_t p = 0, y = 0, x = 0;  // (y, x): pixel p's place
#ifdef __AVX2__
  for (; p + 8 <= plane; p += 8) {
    if (p % 16 == 0)
      for (int k = 0; k < 8; ++k) src.prefetch(k, p + kAhead);
    __m256 r[8] = {src.vec(0, p), src.vec(1, p), src.vec(2, p), src.vec(3, p),
                   src.vec(4, p), src.vec(5, p), src.vec(6, p), src.vec(7, p)};
    Transpose8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
    if (x + 8 <= w) {  // the block within one row
      const int64_t i = y * row_stride + x;
      for (int k = 0; k < 8; ++k) put(i + k, static_cast<v8>(r[k]));
      x += 8;
      if (x == w) x = 0, ++y;
      continue;
    }
    for (int k = 0; k < 8; ++k) {
      put(y * row_stride + x, static_cast<v8>(r[k]));
      if (++x == w) x = 0, ++y;
    }
  }
#endif
  for (; p < plane; ++p) {
    v8 v;
    for (int l = 0; l < kLanes; ++l) v[l] = src.at(l, p);
    put(y * row_stride + x, v);
    if (++x == w) x = 0, ++y;
  }
}

template <class Put>
inline void Gather8PlaneTo(const float* src, int64_t stride, int64_t h, int64_t w,
                           int64_t row_stride, Put put) {
  Gather8PlaneTo(PlainPlanes{src, stride}, h, w, row_stride, put);
}

// The gather described above: Gather8PlaneTo storing vector i at dst + i * 8.
template <class Planes>
inline void Gather8Plane(const Planes& src, int64_t h, int64_t w, int64_t row_stride,
                         float* dst) {
  Gather8PlaneTo(src, h, w, row_stride, [dst](int64_t i, v8 v) {
    std::memcpy(dst + i * kLanes, &v, sizeof(v));  // dst: any float alignment
  });
}

// Gather8Plane's inverse: dst[l * stride + y * w + x] = src[(y * row_stride + x) * 8 + l].
// STREAM: streamed stores (dst, stride and the plane 32-byte aligned).
template <bool STREAM = false>
inline void Scatter8Plane(const float* src, int64_t h, int64_t w, int64_t row_stride,
                          float* dst, int64_t stride) {
  const int64_t plane = h * w;
  int64_t p = 0, y = 0, x = 0;
#ifdef __AVX2__
  for (; p + 8 <= plane; p += 8) {
    __m256 r[8];
    if (x + 8 <= w) {
      const float* s = src + (y * row_stride + x) * kLanes;
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(s + k * kLanes);
      x += 8;
      if (x == w) x = 0, ++y;
    } else {
      for (int k = 0; k < 8; ++k) {
        r[k] = _mm256_loadu_ps(src + (y * row_stride + x) * kLanes);
        if (++x == w) x = 0, ++y;
      }
    }
    Transpose8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
    float* d = dst + p;
    for (int k = 0; k < 8; ++k) mbv2::Store<STREAM>(d + k * stride, r[k]);
  }
  if (STREAM) _mm_sfence();
#endif
  for (; p < plane; ++p) {
    for (int l = 0; l < kLanes; ++l) dst[l * stride + p] = src[(y * row_stride + x) * kLanes + l];
    if (++x == w) x = 0, ++y;
  }
}

// buf[(y + pt) * wp + x + pl][l] = planes[l][y][x] for l < lanes; lanes >= `lanes` zero.
// Planes: PlainPlanes or FoldedPlanes, the planes' pixels in order (stride between planes).
template <class Planes>
inline void InterleaveIn(const Geom& g, const ClGeom& cg, const Planes& planes, int lanes,
                         v8* buf) {
  float* b = reinterpret_cast<float*>(buf);
  if (lanes == kLanes) {
    Gather8Plane(planes, g.h, g.w, cg.wp, b + (g.pt * cg.wp + g.pl) * kLanes);
    return;
  }
  for (int l = 0; l < lanes; ++l) {
    for (int64_t yy = 0; yy < g.h; ++yy) {
      float* row = b + ((yy + g.pt) * cg.wp + g.pl) * kLanes + l;
      for (int64_t xx = 0; xx < g.w; ++xx) row[xx * kLanes] = planes.at(l, yy * g.w + xx);
    }
  }
  for (int l = lanes; l < kLanes; ++l)
    for (int64_t yy = 0; yy < g.h; ++yy)
      for (int64_t xx = 0; xx < g.w; ++xx) b[((yy + g.pt) * cg.wp + g.pl + xx) * kLanes + l] = 0.f;
}

inline void InterleaveIn(const Geom& g, const ClGeom& cg, const float* planes, int64_t plane,
                         int lanes, v8* buf) {
  InterleaveIn(g, cg, PlainPlanes{planes, plane}, lanes, buf);
}

// [pixel][lane] rows of `width` (row stride `row_stride`, from vector `offset`) to `lanes`
// planes; stream: the output is large enough for streamed stores (mbv2::StreamOutput).
inline void InterleaveOut(const v8* buf, int64_t rows, int64_t width, int64_t row_stride,
                          int64_t offset, int lanes, float* planes, int64_t plane,
                          bool stream = false) {
  const float* b = reinterpret_cast<const float*>(buf);
  if (lanes == kLanes) {
    // Streamed only where each lane plane's run is whole 64-byte lines: a line that
    // streamed stores fill in part is written to memory in pieces (backward ms, batch 32,
    // streamed on any 8-float run -> whole lines only: 144x56x56 10.5 -> 9.4, 192x28x28
    // 4.55 -> 3.94, 144x56x56 at stride 2 6.2 -> 4.8).
    const int64_t run = rows * width;
    if (stream && plane % 16 == 0 && run % 16 == 0 &&
        reinterpret_cast<uintptr_t>(planes) % 64 == 0)
      Scatter8Plane<true>(b + offset * kLanes, rows, width, row_stride, planes, plane);
    else
      Scatter8Plane(b + offset * kLanes, rows, width, row_stride, planes, plane);
    return;
  }
  for (int l = 0; l < lanes; ++l) {
    float* dst = planes + l * plane;
    for (int64_t r = 0; r < rows; ++r) {
      const float* brow = b + (offset + r * row_stride) * kLanes + l;
      float* drow = dst + r * width;
      for (int64_t xx = 0; xx < width; ++xx) drow[xx] = brow[xx * kLanes];
    }
  }
}

inline void LoadLaneWeights(const float* w, int64_t c0, int lanes, v8* w8) {
  for (int k = 0; k < 9; ++k)
    for (int l = 0; l < kLanes; ++l) w8[k][l] = l < lanes ? w[(c0 + l) * 9 + k] : 0.f;
}

// The fused op's normalisation of the input, relu6(x * a[c] + b[c]) (the batch norm's
// folded scale and shift; `a` null: none). Shared by the threads, so const: each thread
// keeps its channel group's lane vectors (LaneCoefs) itself. In the backward, where
// `sums` is set, the batch norm backward's per-channel sums of g and g * (x - mean)
// (g: the conv's input gradient where the ReLU6 passes) are taken while g is in cache
// (Accumulate), so the batch norm backward makes one pass instead of two.
struct LaneCoefs {
  v8 a{}, b{}, mean{};
};

struct LaneNorm : mbv2::FoldedNorm {
  bool gated = false;  // the backward writes gm, not g (Accumulate<true>)

  LaneNorm(const mbv2::FoldedNorm& f = {}, bool gated_out = false)
      : mbv2::FoldedNorm(f), gated(gated_out) {}

  void load(int64_t c0, int lanes, LaneCoefs& k) const {
    if (a == nullptr) return;
    for (int l = 0; l < kLanes; ++l) {
      k.a[l] = l < lanes ? a[c0 + l] : 0.f;
      k.b[l] = l < lanes ? b[c0 + l] : 0.f;
      k.mean[l] = l < lanes && mean != nullptr ? mean[c0 + l] : 0.f;
    }
  }

  // relu6(v * a + b) for one pixel vector: the batch norm op's arithmetic (one FMA, then
  // max with 0 and min with 6, a NaN kept), so the values are its output bit for bit.
  static v8 Norm(const LaneCoefs& k, v8 v) {
#ifdef __AVX2__
    const __m256 t = _mm256_fmadd_ps(static_cast<__m256>(v), static_cast<__m256>(k.a),
                                     static_cast<__m256>(k.b));
    return static_cast<v8>(
        _mm256_min_ps(_mm256_set1_ps(6.f), _mm256_max_ps(_mm256_setzero_ps(), t)));
#else
    for (int l = 0; l < kLanes; ++l) {
      float t = v[l] * k.a[l] + k.b[l];
      t = t < 0.f ? 0.f : t;
      v[l] = t > 6.f ? 6.f : t;
    }
    return v;
#endif
  }

  // Normalises the plane inside src's zero border into dst (src itself: in place; the
  // border stays as it is, zero, as the conv pads the batch norm's output).
  void apply(const Geom& g, const ClGeom& cg, const LaneCoefs& k, const v8* src, v8* dst) const {
    if (a == nullptr) return;
    for (int64_t yy = 0; yy < g.h; ++yy) {
      const int64_t o = (yy + g.pt) * cg.wp + g.pl;
      for (int64_t xx = 0; xx < g.w; ++xx) dst[o + xx] = Norm(k, src[o + xx]);
    }
  }

  // InterleaveIn of x then apply: `out` gets the normalised plane, `raw` (unless null) x
  // as it is. Full lane groups normalise each vector as the transposes make it (a pass
  // over the buffer fewer).
  void interleave(const Geom& g, const ClGeom& cg, const LaneCoefs& k, const float* planes,
                  int64_t plane, int lanes, v8* raw, v8* out) const {
    if (a == nullptr || lanes != kLanes) {
      InterleaveIn(g, cg, planes, plane, lanes, raw != nullptr ? raw : out);
      apply(g, cg, k, raw != nullptr ? raw : out, out);
      return;
    }
    v8* r = raw == nullptr ? nullptr : raw + g.pt * cg.wp + g.pl;
    v8* o = out + g.pt * cg.wp + g.pl;
    Gather8PlaneTo(planes, plane, g.h, g.w, cg.wp, [&](int64_t i, v8 v) {
      if (r != nullptr) r[i] = v;
      o[i] = Norm(k, v);
    });
  }

  // s += gm, q += gm * (x - mean) over n pixels, gm = g where 0 < x * a + b < 6 (the
  // forward's gate, the batch norm op's arithmetic): x raw, g the gradient at the same
  // pixels, both [pixel][lane].
  // GATED: g itself becomes gm (the gradient of the batch norm's output before the ReLU6).
  template <bool GATED = false>
  static void Accumulate(const LaneCoefs& k, const v8* x, v8* g, int64_t n, v8& s, v8& q) {
#ifdef __AVX2__
    const __m256 va = _mm256_loadu_ps(reinterpret_cast<const float*>(&k.a));
    const __m256 vb = _mm256_loadu_ps(reinterpret_cast<const float*>(&k.b));
    const __m256 vm = _mm256_loadu_ps(reinterpret_cast<const float*>(&k.mean));
    const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
    // two accumulators a sum, alternate pixels (one would wait on its own latency); named,
    // not an array indexed by i & 1, which kept them in memory
    __m256 s0 = _mm256_loadu_ps(reinterpret_cast<const float*>(&s)), s1 = _mm256_setzero_ps();
    __m256 q0 = _mm256_loadu_ps(reinterpret_cast<const float*>(&q)), q1 = _mm256_setzero_ps();
    auto pixel = [&](int64_t i, __m256& vs, __m256& vq) {
      const __m256 xv = _mm256_loadu_ps(reinterpret_cast<const float*>(x + i));
      const __m256 v = _mm256_fmadd_ps(xv, va, vb);
      const __m256 pass = _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ),
                                        _mm256_cmp_ps(v, six, _CMP_LT_OQ));
      const __m256 gm =
          _mm256_and_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(g + i)), pass);
      if (GATED) _mm256_storeu_ps(reinterpret_cast<float*>(g + i), gm);
      vs = _mm256_add_ps(vs, gm);
      vq = _mm256_fmadd_ps(gm, _mm256_sub_ps(xv, vm), vq);
    };
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      pixel(i, s0, q0);
      pixel(i + 1, s1, q1);
    }
    if (i < n) pixel(i, s0, q0);
    _mm256_storeu_ps(reinterpret_cast<float*>(&s), _mm256_add_ps(s0, s1));
    _mm256_storeu_ps(reinterpret_cast<float*>(&q), _mm256_add_ps(q0, q1));
#else
    for (int64_t i = 0; i < n; ++i)
      for (int l = 0; l < kLanes; ++l) {
        const float v = x[i][l] * k.a[l] + k.b[l];
        const float gm = (v > 0.f && v < 6.f) ? g[i][l] : 0.f;
        if (GATED) g[i][l] = gm;
        s[l] += gm;
        q[l] += gm * (x[i][l] - k.mean[l]);
      }
#endif
  }
};

// s = sum (v[i] - k), q = sum (v[i] - k)^2 over n [pixel][lane] vectors: four
// accumulators a sum (one would wait on its own add latency every pixel).
inline void LaneShiftedSums(const v8* v, int64_t n, const v8& k, v8& s, v8& q) {
  v8 s0{}, s1{}, s2{}, s3{}, q0{}, q1{}, q2{}, q3{};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const v8 d0 = v[i] - k, d1 = v[i + 1] - k, d2 = v[i + 2] - k, d3 = v[i + 3] - k;
    s0 += d0; s1 += d1; s2 += d2; s3 += d3;
    q0 += d0 * d0; q1 += d1 * d1; q2 += d2 * d2; q3 += d3 * d3;
  }
  for (; i < n; ++i) {
    const v8 d = v[i] - k;
    s0 += d;
    q0 += d * d;
  }
  s = (s0 + s1) + (s2 + s3);
  q = (q0 + q1) + (q2 + q3);
}

// The value of output pixel (0, 0) of image 0, channel c (a sample of the channel for
// OutputSums' shift): its taps over the input, normalised as `norm` says.
float FirstOutput(const Geom& g, const float* x, const float* w, const LaneNorm& norm, int64_t c) {
  float acc = 0.f;
  for (int ky = 0; ky < g.kh; ++ky)
    for (int kx = 0; kx < g.kw; ++kx) {
      const int64_t r = ky - g.pt, q = kx - g.pl;
      if (r < 0 || r >= g.h || q < 0 || q >= g.w) continue;
      float v = x[c * g.h * g.w + r * g.w + q];
      v = norm.At(c, v);
      acc += w[(c * g.kh + ky) * g.kw + kx] * v;
    }
  return acc;
}

// norm: the fused op's input normalisation (LaneNorm), else none. ys: y's sums for the
// batch norm after it (OutputSums), taken a plane group at a time while it is in cache.
void ForwardCL(const Geom& g, const float* x, const float* w, float* y,
               const LaneNorm& norm = {}, mbv2::OutputSums* ys = nullptr) {
  if (ys != nullptr)
    for (int64_t c = 0; c < g.c; ++c) ys->shift()[c] = FirstOutput(g, x, w, norm, c);
  const ClGeom cg = MakeClGeom(g);
  const bool stream = mbv2::StreamOutput(g.n * g.c * g.ho * g.wo, y);
  LaneChunks chunks(cg, g.n);
  if (ys != nullptr) ys->Chunks(chunks.count());
  const int64_t plane = g.h * g.w, oplane = static_cast<int64_t>(g.ho) * g.wo;
#pragma omp parallel
  {
    std::vector<v8> buf(static_cast<size_t>(cg.hp) * cg.wp, v8{}), out(oplane);
    v8 w8[9];
    LaneCoefs coefs;
    mbv2::ForEachChunk(chunks.work, [&](int64_t k, int64_t first, int64_t end) {
      const int64_t grp = first / g.n, c0 = grp * kLanes;
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.c - c0));
      LoadLaneWeights(w, c0, lanes, w8);
      norm.load(c0, lanes, coefs);
      for (int64_t it = first; it < end; ++it) {
        const int64_t n = it % g.n;
        norm.interleave(g, cg, coefs, x + (n * g.c + c0) * plane, plane, lanes, nullptr,
                        buf.data());
        const int wp = cg.wp;
        for (int i = 0; i < g.ho; ++i) {
          const v8* r0 = buf.data() + static_cast<int64_t>(i) * g.sh * wp;
          const v8* r1 = r0 + wp;
          const v8* r2 = r1 + wp;
          v8* o = out.data() + static_cast<int64_t>(i) * g.wo;
          for (int j = 0; j < g.wo; ++j) {
            const int q = j * g.sw;
            o[j] = w8[0] * r0[q] + w8[1] * r0[q + 1] + w8[2] * r0[q + 2] +
                   w8[3] * r1[q] + w8[4] * r1[q + 1] + w8[5] * r1[q + 2] +
                   w8[6] * r2[q] + w8[7] * r2[q + 1] + w8[8] * r2[q + 2];
          }
        }
        if (ys != nullptr) {
          v8 k8{}, s8{}, q8{};
          for (int l = 0; l < lanes; ++l) k8[l] = ys->shift()[c0 + l];
          LaneShiftedSums(out.data(), oplane, k8, s8, q8);
          double* part = ys->part(k);
          for (int l = 0; l < lanes; ++l) {
            part[c0 + l] += s8[l];
            part[g.c + c0 + l] += q8[l];
          }
        }
        InterleaveOut(out.data(), g.ho, g.wo, g.wo, 0, lanes, y + (n * g.c + c0) * oplane, oplane,
                      stream);
      }
    });
  }
}

// The backward's dy interleaved into a zero-bordered buffer for the stride-1 gather: the
// margins (kh - 1 - pt, kw - 1 - pl) put dx[r][c] = sum_k w[k] dy[r + pt - ky][c + pl - kx]
// at taps (2 - ky, 2 - kx) of a correlation (3x3 only), as the forward reads its input.
Geom DyGeom(const Geom& g) {
  Geom d = g;
  d.h = g.ho;
  d.w = g.wo;
  d.pt = 2 - g.pt;
  d.pb = 2 - g.pb;
  d.pl = 2 - g.pl;
  d.pr = 2 - g.pr;
  return d;
}

// fold: dy is the folded gradient of a depthwise -> projection op (mbv2::DyFold), made
// where it is read.
void BackwardCL(const Geom& g, const float* x, const float* w, const float* dy, float* dx,
                float* dw, const LaneNorm& norm = {}, const mbv2::DyFold* fold = nullptr) {
  const ClGeom cg = MakeClGeom(g);
  const bool stream = mbv2::StreamOutput(g.n * g.c * g.h * g.w, dx);
  const int64_t plane = g.h * g.w, oplane = static_cast<int64_t>(g.ho) * g.wo;
  LaneChunks chunks(cg, g.n);
  // per chunk, its group's dw (lane l, tap k at l * 9 + k) and the fused op's batch norm
  // sums (LaneNorm::sums; lane l's at l and kLanes + l), reduced in chunk order
  const bool bn_sums = norm.sums != nullptr;
  mbv2::ChunkSums dw_part(kLanes * 9, chunks.count());
  mbv2::ChunkSums bn_part(2 * kLanes, bn_sums ? chunks.count() : 0);
  const int64_t bufn = static_cast<int64_t>(cg.hp) * cg.wp;
  // Stride 1 on planes of 7x7 and up: dx by a gather (a correlation of the bordered dy
  // with the flipped kernel), each dx pixel written once, a row at a time. Elsewhere a
  // scatter-add of w * dy into a bordered dx buffer (the transposed conv). Backward, 2
  // threads, scatter -> gather ms: 144x56x56 (batch 32) 12.0 -> 9.7, 576x14x14 3.3 -> 2.9,
  // 960x7x7 1.49 -> 1.38, 32x16x16 (batch 128) 0.57 -> 0.42, 144x8x8 0.71 -> 0.54; on 4x4
  // planes the gather lost (192 channels 0.265 -> 0.320: bordered buffers of 36 pixels for
  // 16), which keep the scatter.
  const bool gather = g.sh == 1 && g.sw == 1 && g.h * g.w >= 49;
  const Geom gd = DyGeom(g);
  const ClGeom cgd = MakeClGeom(gd);
  // Stride 2 with the 1-pixel top and left padding 3x3 convs take: dx by a gather too, each
  // dx pixel from the 1, 2 or 4 dy pixels whose taps reach it (by the parity of its row
  // and column; the same products added in the scatter's order), from dy in a buffer with
  // a 1-pixel zero border, where the scatter zeroed a whole bordered plane an item and
  // loaded and stored it nine times a dy pixel. Whole training steps alternated in one
  // process (2 threads): x1.0 at 224 px 1.026, x0.5 1.020; at 32 px (batch 128) 1.009 and
  // 1.002.
  const bool gather2 = g.sh == 2 && g.sw == 2 && g.pt == 1 && g.pl == 1;
  Geom gd2 = g;
  gd2.h = g.ho;
  gd2.w = g.wo;
  gd2.pt = gd2.pb = gd2.pl = gd2.pr = 1;
  const ClGeom cgd2 = MakeClGeom(gd2);
  const int64_t gpadn = gather    ? static_cast<int64_t>(cgd.hp) * cgd.wp
                        : gather2 ? static_cast<int64_t>(cgd2.hp) * cgd2.wp
                                  : 0;
#pragma omp parallel
  {
    // the gather's dx rows go out a row at a time where a row is whole 8x8 transposes,
    // else the plane at once (gbuf holds it)
    const bool row_out = g.w % kLanes == 0;
    const bool gathers = gather || gather2;
    std::vector<v8> buf(bufn, v8{}), dbuf(gathers ? 0 : bufn),
        gbuf(gathers ? (row_out ? g.w : plane) : oplane);
    std::vector<v8> gpad(gpadn, v8{});
    // with bn_sums the raw x stays in buf for the sums and the conv reads its normalised copy
    std::vector<v8> nbuf(bn_sums ? bufn : 0, v8{});
    v8* const in = bn_sums ? nbuf.data() : buf.data();
    v8 w8[9], f8[9], acc[9];
    LaneCoefs coefs;
    mbv2::ForEachChunk(chunks.work, [&](int64_t chunk, int64_t first, int64_t end) {
      const int64_t c0 = first / g.n * kLanes;
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.c - c0));
      LoadLaneWeights(w, c0, lanes, w8);
      for (int k = 0; k < 9; ++k) f8[k] = w8[8 - k];
      norm.load(c0, lanes, coefs);
      for (auto& a : acc) a = v8{};  // float lane sums of the chunk's dw, to double at its end
      for (int64_t it = first; it < end; ++it) {
        const int64_t n = it % g.n;
        norm.interleave(g, cg, coefs, x + (n * g.c + c0) * plane, plane, lanes,
                        bn_sums ? buf.data() : nullptr, in);
        auto accumulate = [&](const v8* xr, v8* gr, int64_t len, v8& s, v8& q) {
          if (norm.gated)
            LaneNorm::Accumulate<true>(coefs, xr, gr, len, s, q);
          else
            LaneNorm::Accumulate(coefs, xr, gr, len, s, q);
        };
        v8 bs{}, bq{};  // this plane group's batch norm sums (bn_sums)
        auto add_sums = [&]() {
          if (!bn_sums) return;
          double* pb = bn_part.part(chunk);
          for (int l = 0; l < lanes; ++l) {
            pb[l] += bs[l];
            pb[kLanes + l] += bq[l];
          }
        };
        const float* dyn = dy + (n * g.c + c0) * oplane;
        float* dxn = dx + (n * g.c + c0) * plane;
        // dy's planes of this image and group, as given or folded
        auto with_dy = [&](auto use) {
          if (fold != nullptr)
            use(FoldedPlanes(*fold, dy, (n * g.c + c0) * oplane, oplane, c0, lanes));
          else
            use(PlainPlanes{dyn, oplane});
        };
        const int wp = cg.wp;
        // the gathers' tail of dx row r (o: its vectors): the batch norm sums, the row out
        auto row_done = [&](int r, v8* o) {
          if (bn_sums) accumulate(buf.data() + (r + g.pt) * wp + g.pl, o, g.w, bs, bq);
          if (row_out)
            InterleaveOut(gbuf.data(), 1, g.w, g.w, 0, lanes,
                          dxn + static_cast<int64_t>(r) * g.w, plane, stream);
        };
        auto plane_done = [&]() {
          if (!row_out) InterleaveOut(gbuf.data(), g.h, g.w, g.w, 0, lanes, dxn, plane, stream);
          add_sums();
        };
        // dw from the gathers' bordered dy (row i's first pixel at dy_row(i)) against the
        // input's views at stride S
        auto dw_from = [&](auto stride, auto dy_row) {
          constexpr int S = decltype(stride)::value;
          for (int i = 0; i < g.ho; ++i) {
            const v8* r0 = in + static_cast<int64_t>(i) * S * wp;
            const v8* r1 = r0 + wp;
            const v8* r2 = r1 + wp;
            const v8* gr = dy_row(i);
            for (int j = 0; j < g.wo; ++j) {
              const int q = j * S;
              const v8 gv = gr[j];
              acc[0] += gv * r0[q]; acc[1] += gv * r0[q + 1]; acc[2] += gv * r0[q + 2];
              acc[3] += gv * r1[q]; acc[4] += gv * r1[q + 1]; acc[5] += gv * r1[q + 2];
              acc[6] += gv * r2[q]; acc[7] += gv * r2[q + 1]; acc[8] += gv * r2[q + 2];
            }
          }
        };
        if (gather) {
          with_dy([&](const auto& planes) { InterleaveIn(gd, cgd, planes, lanes, gpad.data()); });
          const int gw = cgd.wp;
          for (int r = 0; r < g.h; ++r) {  // dx, a row at a time
            const v8* q0 = gpad.data() + static_cast<int64_t>(r) * gw;
            const v8* q1 = q0 + gw;
            const v8* q2 = q1 + gw;
            v8* o = gbuf.data() + (row_out ? 0 : static_cast<int64_t>(r) * g.w);
            for (int c = 0; c < g.w; ++c)
              o[c] = f8[0] * q0[c] + f8[1] * q0[c + 1] + f8[2] * q0[c + 2] +
                     f8[3] * q1[c] + f8[4] * q1[c + 1] + f8[5] * q1[c + 2] +
                     f8[6] * q2[c] + f8[7] * q2[c + 1] + f8[8] * q2[c + 2];
            row_done(r, o);
          }
          plane_done();
          dw_from(std::integral_constant<int, 1>{}, [&](int i) {
            return gpad.data() + static_cast<int64_t>(i + gd.pt) * gw + gd.pl;
          });
          continue;
        }
        if (gather2) {
          with_dy([&](const auto& planes) { InterleaveIn(gd2, cgd2, planes, lanes, gpad.data()); });
          const int gw = cgd2.wp;
          const v8* gp = gpad.data();
          // dx, a row at a time; dy pixel (i, j) at gp[(i + 1) * gw + j + 1]
          for (int r = 0; r < g.h; ++r) {
            v8* o = gbuf.data() + (row_out ? 0 : static_cast<int64_t>(r) * g.w);
            if (r % 2 == 0) {  // tap row 1 of dy row r / 2
              const v8* q = gp + static_cast<int64_t>(r / 2 + 1) * gw + 1;
              int c = 0;
              for (; c + 1 < g.w; c += 2) {
                const int j = c / 2;
                o[c] = w8[4] * q[j];
                o[c + 1] = w8[5] * q[j] + w8[3] * q[j + 1];
              }
              if (c < g.w) o[c] = w8[4] * q[c / 2];
            } else {  // tap row 2 of dy row (r - 1) / 2, tap row 0 of dy row (r + 1) / 2
              const v8* qb = gp + static_cast<int64_t>((r - 1) / 2 + 1) * gw + 1;
              const v8* qa = qb + gw;
              int c = 0;
              for (; c + 1 < g.w; c += 2) {
                const int j = c / 2;
                o[c] = w8[7] * qb[j] + w8[1] * qa[j];
                o[c + 1] = w8[8] * qb[j] + w8[6] * qb[j + 1] + w8[2] * qa[j] + w8[0] * qa[j + 1];
              }
              if (c < g.w) o[c] = w8[7] * qb[c / 2] + w8[1] * qa[c / 2];
            }
            row_done(r, o);
          }
          plane_done();
          dw_from(std::integral_constant<int, 2>{},
                  [&](int i) { return gp + static_cast<int64_t>(i + 1) * gw + 1; });
          continue;
        }
        // dy as [pixel][lane] (no padding).
        with_dy([&](const auto& planes) {
          float* b = reinterpret_cast<float*>(gbuf.data());
          if (lanes == kLanes) {
            Gather8Plane(planes, 1, oplane, oplane, b);
          } else {
            for (int l = 0; l < lanes; ++l)
              for (int64_t p = 0; p < oplane; ++p) b[p * kLanes + l] = planes.at(l, p);
            for (int l = lanes; l < kLanes; ++l)
              for (int64_t p = 0; p < oplane; ++p) b[p * kLanes + l] = 0.f;
          }
        });
        std::fill(dbuf.begin(), dbuf.end(), v8{});
        for (int i = 0; i < g.ho; ++i) {
          const int64_t base = static_cast<int64_t>(i) * g.sh * wp;
          const v8* r0 = in + base;
          const v8* r1 = r0 + wp;
          const v8* r2 = r1 + wp;
          v8* d0 = dbuf.data() + base;
          v8* d1 = d0 + wp;
          v8* d2 = d1 + wp;
          const v8* gr = gbuf.data() + static_cast<int64_t>(i) * g.wo;
          for (int j = 0; j < g.wo; ++j) {
            const int q = j * g.sw;
            const v8 gv = gr[j];
            d0[q] += w8[0] * gv; d0[q + 1] += w8[1] * gv; d0[q + 2] += w8[2] * gv;
            d1[q] += w8[3] * gv; d1[q + 1] += w8[4] * gv; d1[q + 2] += w8[5] * gv;
            d2[q] += w8[6] * gv; d2[q + 1] += w8[7] * gv; d2[q + 2] += w8[8] * gv;
            acc[0] += gv * r0[q]; acc[1] += gv * r0[q + 1]; acc[2] += gv * r0[q + 2];
            acc[3] += gv * r1[q]; acc[4] += gv * r1[q + 1]; acc[5] += gv * r1[q + 2];
            acc[6] += gv * r2[q]; acc[7] += gv * r2[q + 1]; acc[8] += gv * r2[q + 2];
          }
        }
        if (bn_sums) {
          for (int64_t yy = 0; yy < g.h; ++yy) {
            const int64_t o = (yy + g.pt) * wp + g.pl;
            accumulate(buf.data() + o, dbuf.data() + o, g.w, bs, bq);
          }
          add_sums();
        }
        InterleaveOut(dbuf.data(), g.h, g.w, wp, static_cast<int64_t>(g.pt) * wp + g.pl, lanes,
                      dxn, plane, stream);
      }
      double* pc = dw_part.part(chunk);
      for (int l = 0; l < lanes; ++l)
        for (int k = 0; k < 9; ++k) pc[l * 9 + k] += acc[k][l];
    });
  }
  // each group's sums over its chunks, in chunk order
  std::vector<double> dw_group(kLanes * 9), bn_group(2 * kLanes);
  for (int64_t grp = 0; grp < cg.groups; ++grp) {
    const int64_t c0 = grp * kLanes, lanes = std::min<int64_t>(kLanes, g.c - c0);
    for (auto& v : dw_group) v = 0.0;
    for (auto& v : bn_group) v = 0.0;
    for (int64_t k = grp * chunks.per_group; k < (grp + 1) * chunks.per_group; ++k) {
      for (int i = 0; i < kLanes * 9; ++i) dw_group[i] += dw_part.part(k)[i];
      if (bn_sums)
        for (int i = 0; i < 2 * kLanes; ++i) bn_group[i] += bn_part.part(k)[i];
    }
    for (int64_t l = 0; l < lanes; ++l) {
      for (int k = 0; k < 9; ++k) dw[(c0 + l) * 9 + k] = static_cast<float>(dw_group[l * 9 + k]);
      if (bn_sums) {
        norm.sums[c0 + l] = bn_group[l];
        norm.sums[g.c + c0 + l] = bn_group[kLanes + l];
      }
    }
  }
}

// Which implementation: 0 = by shape, 1 = flat, 2 = channel-lane (tests force each).
// Measured (batch 32, MobileNetV2 shapes, forward + backward, 1 and 2 threads): with the
// interleave done by 8x8 register transposes, channel-lane wins everywhere there is a full
// group of 8 channels: 1.3-1.5x at stride 1 (32x112x112: 17.6 -> 14.0 ms, 144x56x56:
// 23.6 -> 15.6 ms, 2 threads), 2.3x at stride 2. With fewer than 8 channels most lanes
// would be idle, so wide planes there stay flat; narrow planes and stride 2 always go
// channel-lane (rows shorter than a vector, and the flat path's phase split).
constexpr int kClMaxWidth = 32;
bool UseCL(const Geom& g, int algo) {
  if (g.kh != 3 || g.kw != 3) return false;
  if (algo == 1) return false;
  if (algo == 2) return true;
  return g.c >= kLanes || g.w <= kClMaxWidth || (g.sh == 2 && g.sw == 2);
}

// Planes of 1x1 or 2x2 (3x3 kernel, outputs of 1x1 or 2x2: MobileNetV2's stages 4-7 at 32
// px): every output pixel sees all P input pixels of its plane through fixed taps, so the
// conv is a per-channel PO x P matrix (zero where no tap meets a pair), applied
// channel-vectorised with a channel's pixels interleaved. Measured at batch 128: 960
// channels 1x1 -> 1x1 forward 0.13 -> 0.024 ms and backward 0.22 -> 0.046 ms, 384 channels
// 2x2 -> 2x2 forward 0.113 -> 0.081 ms, 576 channels 2x2 -> 1x1 forward 0.113 -> 0.034 ms
// and backward 0.19 -> 0.065 ms, against the channel-lane path. The backward runs here only
// for one output pixel (PO = 1): with 2x2 outputs its 16 partial sums a channel were slower
// than the channel-lane path (0.25 vs 0.19 ms), which keeps them.
struct SmallPlane {
  int p = 0, po = 0;     // input and output pixels of a plane
  std::vector<int> tap;  // tap[o * p + q]: the kernel tap from input q to output o, or -1
};

// The shape as a SmallPlane, or false where it is not one (used by shape, algo 0, only).
bool GetSmallPlane(const Geom& g, SmallPlane& sp) {
  if (g.h != g.w || g.h > 2 || g.ho != g.wo || g.ho > g.h || g.kh != 3 || g.kw != 3)
    return false;
  sp.p = static_cast<int>(g.h * g.w);
  sp.po = g.ho * g.wo;
  sp.tap.assign(static_cast<size_t>(sp.po * sp.p), -1);
  for (int i = 0; i < g.ho; ++i)
    for (int j = 0; j < g.wo; ++j)
      for (int r = 0; r < g.h; ++r)
        for (int c = 0; c < g.w; ++c) {
          const int a = r - i * g.sh + g.pt, b = c - j * g.sw + g.pl;
          if (a >= 0 && a < 3 && b >= 0 && b < 3)
            sp.tap[(i * g.wo + j) * sp.p + r * static_cast<int>(g.w) + c] = a * 3 + b;
        }
  return true;
}

// m[c][o][q]: channel c's weight for output pixel o from input pixel q (0 where none).
std::vector<float> SmallMatrices(const Geom& g, const SmallPlane& sp, const float* w) {
  const int64_t mo = static_cast<int64_t>(sp.tap.size());
  std::vector<float> m(static_cast<size_t>(g.c * mo));
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t k = 0; k < mo; ++k) m[c * mo + k] = sp.tap[k] < 0 ? 0.f : w[c * 9 + sp.tap[k]];
  return m;
}

template <int P, int PO>
void SmallForward(const Geom& g, const float* x, const float* m, float* y) {
  const int64_t C = g.c;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < g.n; ++n) {
    const float* xn = x + n * C * P;
    float* yn = y + n * C * PO;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      for (int o = 0; o < PO; ++o) {
        float acc = 0.f;
        for (int q = 0; q < P; ++q) acc += m[(c * PO + o) * P + q] * xn[c * P + q];
        yn[c * PO + o] = acc;
      }
  }
}

// One output pixel: dx[q] = m[q] dy, dm[q] = sum_n dy x[q] (per-thread float sums over a
// thread's images, then double), folded into dw by tap.
template <int P>
void SmallBackward(const Geom& g, const SmallPlane& sp, const float* x, const float* m,
                   const float* dy, float* dx, float* dw) {
  const int64_t C = g.c;
  const int threads = omp_get_max_threads();
  std::vector<float> part(static_cast<size_t>(threads) * C * P, 0.f);
#pragma omp parallel
  {
    float* acc = part.data() + static_cast<int64_t>(omp_get_thread_num()) * C * P;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < g.n; ++n) {
      const float* xn = x + n * C * P;
      const float* gn = dy + n * C;
      float* dn = dx + n * C * P;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        for (int q = 0; q < P; ++q) {
          dn[c * P + q] = m[c * P + q] * gn[c];
          acc[c * P + q] += gn[c] * xn[c * P + q];
        }
    }
  }
  std::fill(dw, dw + C * 9, 0.f);
  for (int64_t c = 0; c < C; ++c)
    for (int q = 0; q < P; ++q) {
      if (sp.tap[q] < 0) continue;
      double sum = 0.0;
      for (int t = 0; t < threads; ++t) sum += part[(static_cast<int64_t>(t) * C + c) * P + q];
      dw[c * 9 + sp.tap[q]] += static_cast<float>(sum);
    }
}

void CheckInput(const paddle::Tensor& t, const char* name) {
  PD_CHECK(t.is_cpu(), "depthwise_conv2d: ", name, " must be on CPU");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, "depthwise_conv2d: ", name, " must be float32");
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Paddle glue.

std::vector<paddle::Tensor> DepthwiseConvForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                 const std::vector<int>& strides,
                                                 const std::vector<int>& paddings, int algo) {
  CheckInput(x, "x");
  CheckInput(weight, "weight");
  const Geom g = MakeGeom(x.shape(), weight.shape(), strides, paddings);
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const paddle::Tensor wc = weight.is_contiguous() ? weight : weight.contiguous();
  auto y = paddle::empty({g.n, g.c, g.ho, g.wo}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  SmallPlane sp;
  if (g.n * g.c > 0) {
    if (algo == 0 && GetSmallPlane(g, sp)) {
      const std::vector<float> m = SmallMatrices(g, sp, wc.data<float>());
      (sp.p == 1 ? SmallForward<1, 1> : sp.po == 1 ? SmallForward<4, 1> : SmallForward<4, 4>)(
          g, xc.data<float>(), m.data(), y.data<float>());
    } else if (UseCL(g, algo))
      ForwardCL(g, xc.data<float>(), wc.data<float>(), y.data<float>());
    else
      ForwardImpl(g, xc.data<float>(), wc.data<float>(), y.data<float>());
  }
  return {y};
}

std::vector<paddle::Tensor> DepthwiseConvBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                  const paddle::Tensor& dy,
                                                  const std::vector<int>& strides,
                                                  const std::vector<int>& paddings, int algo) {
  CheckInput(dy, "out_grad");
  const Geom g = MakeGeom(x.shape(), weight.shape(), strides, paddings);
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const paddle::Tensor wc = weight.is_contiguous() ? weight : weight.contiguous();
  const paddle::Tensor dyc = dy.is_contiguous() ? dy : dy.contiguous();
  auto dx = paddle::empty({g.n, g.c, g.h, g.w}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dw = paddle::empty({g.c, 1, g.kh, g.kw}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  SmallPlane sp;
  if (g.n * g.c > 0) {
    if (algo == 0 && GetSmallPlane(g, sp) && sp.po == 1) {
      const std::vector<float> m = SmallMatrices(g, sp, wc.data<float>());
      (sp.p == 1 ? SmallBackward<1> : SmallBackward<4>)(g, sp, xc.data<float>(), m.data(),
                                                         dyc.data<float>(), dx.data<float>(),
                                                         dw.data<float>());
    } else if (UseCL(g, algo))
      BackwardCL(g, xc.data<float>(), wc.data<float>(), dyc.data<float>(), dx.data<float>(),
                 dw.data<float>());
    else
      BackwardImpl(g, xc.data<float>(), wc.data<float>(), dyc.data<float>(), dx.data<float>(),
                   dw.data<float>());
  } else {
    std::fill(dw.data<float>(), dw.data<float>() + g.c * g.kh * g.kw, 0.f);
  }
  return {dx, dw};
}

std::vector<std::vector<int64_t>> DepthwiseConvInferShape(const std::vector<int64_t>& x_shape,
                                                          const std::vector<int64_t>& w_shape,
                                                          const std::vector<int>& strides,
                                                          const std::vector<int>& paddings,
                                                          int algo) {
  // Unknown (-1) spatial sizes stay unknown, e.g. under paddle.jit with InputSpec.
  auto out_size = [](int64_t in, int64_t k, int s, int p0, int p1) -> int64_t {
    return in < 0 ? -1 : (in + p0 + p1 - k) / s + 1;
  };
  return {{x_shape[0], x_shape[1], out_size(x_shape[2], w_shape[2], strides[0], paddings[0], paddings[1]),
           out_size(x_shape[3], w_shape[3], strides[1], paddings[2], paddings[3])}};
}

std::vector<paddle::DataType> DepthwiseConvInferDtype(const paddle::DataType& x_dtype,
                                                      const paddle::DataType& w_dtype) {
  return {x_dtype};
}

PD_BUILD_OP(mbv2_depthwise_conv2d)
    .Inputs({"X", "Weight"})
    .Outputs({"Out"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "algo: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseConvForward))
    .SetInferShapeFn(PD_INFER_SHAPE(DepthwiseConvInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(DepthwiseConvInferDtype));

PD_BUILD_GRAD_OP(mbv2_depthwise_conv2d)
    .Inputs({"X", "Weight", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight")})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "algo: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseConvBackward));

// ---------------------------------------------------------------------------------------
// relu6(batch_norm(x)) -> depthwise conv in one op (training), for MobileNetV2's expand ->
// depthwise pair: the batch norm's statistics pass (mbv2::FusedBatchNormStats), then the
// channel-lane conv with the normalisation applied to each interleaved plane while it is
// in cache (LaneNorm), so the batch norm's output, the network's widest activation, is
// neither written nor read back nor kept for the backward. The backward normalises x the
// same way for the weight gradient, writes the conv's input gradient g, taking the batch
// norm backward's per-channel sums of g while it is in cache (LaneNorm::Accumulate), and
// runs the batch norm's dx pass on g in place with the ReLU6 gate recomputed from x
// (mbv2::FusedBatchNormBackward): one pass over x and g where the batch norm op makes two.
// The output, weight gradient and running statistics are bit-identical to the two ops';
// dx, dgamma and dbeta sum in another order (float rounding).
// Covered: what the channel-lane path takes by shape (UseCL) on planes of 8 pixels and up;
// Python sends nothing else.

namespace {

Geom FusedGeom(const paddle::Tensor& x, const paddle::Tensor& w, const std::vector<int>& strides,
               const std::vector<int>& paddings) {
  CheckInput(x, "x");
  CheckInput(w, "weight");
  const Geom g = MakeGeom(x.shape(), w.shape(), strides, paddings);
  PD_CHECK(g.n > 0 && g.c > 0 && g.h * g.w >= 8 && UseCL(g, 0),
           "bn_relu6_depthwise: the shape is not one the fused op covers");
  return g;
}

}  // namespace

std::vector<paddle::Tensor> mbv2::BnDepthwiseForward(
    const paddle::Tensor& x, const paddle::Tensor& scale, const paddle::Tensor& bias,
    const paddle::Tensor& running_mean, const paddle::Tensor& running_var,
    const paddle::Tensor& weight, const paddle::optional<paddle::Tensor>& sums,
    const std::vector<int>& strides, const std::vector<int>& paddings, float epsilon,
    float momentum) {
  const Geom g = FusedGeom(x, weight, strides, paddings);
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const paddle::Tensor wc = weight.is_contiguous() ? weight : weight.contiguous();
  auto stats = mbv2::FusedBatchNormStats(xc, scale, bias, running_mean, running_var, epsilon,
                                         momentum, "bn_relu6_depthwise", sums);
  auto y = paddle::empty({g.n, g.c, g.ho, g.wo}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  mbv2::OutputSums ys(g.c);
  ForwardCL(g, xc.data<float>(), wc.data<float>(), y.data<float>(),
            mbv2::Folded(stats[2], g.c), &ys);
  return {y, stats[0], stats[1], stats[2], ys.Finish()};
}

std::vector<paddle::Tensor> mbv2::BnDepthwiseConvBackward(
    const paddle::Tensor& x, const paddle::Tensor& weight, const paddle::Tensor& mean,
    const paddle::Tensor& folded, const paddle::Tensor& dy, const std::vector<int>& strides,
    const std::vector<int>& paddings, std::vector<double>& sums, bool gated,
    const mbv2::DyFold* fold) {
  CheckInput(dy, "out_grad");
  const Geom g = FusedGeom(x, weight, strides, paddings);
  PD_CHECK(folded.numel() == 2 * g.c, "bn_relu6_depthwise: folded scale/shift of the wrong size");
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const paddle::Tensor wc = weight.is_contiguous() ? weight : weight.contiguous();
  const paddle::Tensor dyc = dy.is_contiguous() ? dy : dy.contiguous();
  auto dx = paddle::empty({g.n, g.c, g.h, g.w}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dw = paddle::empty({g.c, 1, g.kh, g.kw}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  // the batch norm backward's sums taken by the conv backward as it makes dx (LaneNorm)
  sums.assign(2 * g.c, 0.0);
  const LaneNorm norm(mbv2::Folded(folded, g.c, mean.data<float>(), sums.data()), gated);
  PD_CHECK(dy.numel() == g.n * g.c * g.ho * g.wo, "bn_relu6_depthwise: out_grad of the wrong size");
  BackwardCL(g, xc.data<float>(), wc.data<float>(), dyc.data<float>(), dx.data<float>(),
             dw.data<float>(), norm, fold);
  return {dx, dw};
}

std::vector<paddle::Tensor> mbv2::BnDepthwiseGrads(
    const paddle::Tensor& x, const paddle::Tensor& scale, const paddle::Tensor& weight,
    const paddle::Tensor& mean, const paddle::Tensor& invstd, const paddle::Tensor& folded,
    const paddle::Tensor& dy, const std::vector<int>& strides, const std::vector<int>& paddings,
    const mbv2::DyFold* fold) {
  std::vector<double> sums;
  // the conv's input gradient, then the batch norm's input gradient in the same buffer
  auto conv = mbv2::BnDepthwiseConvBackward(x, weight, mean, folded, dy, strides, paddings, sums,
                                            /*gated=*/false, fold);
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  auto dbn = mbv2::FusedBatchNormBackward(xc, scale, mean, invstd, folded, conv[0], sums.data());
  return {conv[0], dbn[0], dbn[1], conv[1]};
}

std::vector<paddle::Tensor> BnDepthwiseBackward(const paddle::Tensor& x, const paddle::Tensor& scale,
                                                const paddle::Tensor& weight,
                                                const paddle::Tensor& mean,
                                                const paddle::Tensor& invstd,
                                                const paddle::Tensor& folded,
                                                const paddle::Tensor& dy,
                                                const std::vector<int>& strides,
                                                const std::vector<int>& paddings, float, float) {
  return mbv2::BnDepthwiseGrads(x, scale, weight, mean, invstd, folded, dy, strides, paddings);
}

std::vector<std::vector<int64_t>> mbv2::BnDepthwiseInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>& w_shape, const paddle::optional<std::vector<int64_t>>&,
    const std::vector<int>& strides, const std::vector<int>& paddings, float, float) {
  auto shapes = mbv2::FusedStatsShapes(x_shape[1]);
  shapes.insert(shapes.begin(), DepthwiseConvInferShape(x_shape, w_shape, strides, paddings, 0)[0]);
  shapes.push_back(mbv2::OutSumsShape(x_shape[1]));
  return shapes;
}

PD_BUILD_OP(mbv2_bn_relu6_depthwise)
    .Inputs({"X", "Scale", "Bias", "RunningMean", "RunningVar", "Weight",
             paddle::Optional("Sums")})
    .Outputs({"Out", "SavedMean", "SavedInvStd", "Folded", "OutSums"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "epsilon: float",
            "momentum: float"})
    .SetKernelFn(PD_KERNEL(mbv2::BnDepthwiseForward))
    .SetInferShapeFn(PD_INFER_SHAPE(mbv2::BnDepthwiseInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(mbv2::FusedInferDtype<1>));

PD_BUILD_GRAD_OP(mbv2_bn_relu6_depthwise)
    .Inputs({"X", "Scale", "Weight", "SavedMean", "SavedInvStd", "Folded", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Bias"),
              paddle::Grad("Weight")})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "epsilon: float",
            "momentum: float"})
    .SetKernelFn(PD_KERNEL(BnDepthwiseBackward));
