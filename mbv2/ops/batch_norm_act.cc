// Training-mode batch norm + optional ReLU6, fused (NCHW, float32, CPU), as a Paddle
// custom operator built into the same library as the depthwise conv.
//
// Paddle's CPU batch_norm and relu6 are single-threaded and run as separate passes over
// the activation; in a MobileNetV2 training step they cost about a third of the time. Here:
//
// Forward (2 reads of x, 1 write of y and of the gate, 1/32 of y's bytes):
//   1. per-plane (one image, one channel) sums of (x - K) and (x - K)^2, with K the
//      channel's first element as a shift against cancellation, in float SIMD lanes per
//      plane and double across planes;
//   2. per channel: mean, biased variance, invstd = 1/sqrt(var + eps); the running
//      statistics are updated in place exactly as Paddle's CPU kernel does,
//      running = momentum * running + (1 - momentum) * batch (biased variance);
//   3. y = x * a + b with a = gamma * invstd, b = beta - mean * a, clamped to [0, 6] when act.
// Backward (2 reads of x and dy, 1 write of dx): dy is masked to the linear region of the
// ReLU6 (0 < y < 6) when act, read off a one-bit-a-pixel gate the forward writes beside y
// (planes under 8 pixels read y itself); dbeta = sum(dy), dgamma = sum(dy * xhat),
// dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma), M = N * H * W.
//
// Outputs (y, dx) of at least half the last-level cache are written with streamed stores
// (stream_store.h) where their planes are 32-byte aligned.
//
// Threads: OpenMP over whole channels for planes of 56x56 and up (a channel's second
// pass then reads what its first left in cache), over the N*C planes in memory order for
// mid-size planes, or over images with a vector loop over channels for planes under 8
// pixels, each in chunks a thread that finishes early can take over (work_chunks.h);
// per-chunk per-channel partial sums are reduced at the end: deterministic for a fixed
// thread count.
//
// The running mean/variance are inputs written in place (the layer's buffers, as Paddle's
// own batch_norm does with MeanOut/VarianceOut sharing them): the op is for dygraph
// training only; eval mode and exported programs use Paddle's batch_norm.

#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "batch_norm_act.h"
#include "paddle/extension.h"
#include "stream_store.h"

namespace {

struct Dims {
  int64_t n, c, hw;
};

Dims GetDims(const paddle::Tensor& x) {
  const auto s = x.shape();
  PD_CHECK(s.size() == 4, "batch_norm_act: x must be NCHW");
  return {s[0], s[1], s[2] * s[3]};
}

// Planes smaller than this (the last stages at 32 px: 2x2, 1x1) take the channel-vector
// path: threads split the images, and the inner loop runs over channels, so a 1x1 plane
// costs a vector lane instead of a loop setup.
constexpr int64_t kSmallPlane = 8;

// The output gradient that reaches the batch norm: dy where ReLU6 passes it. Branch-free
// and ACT a template argument, so the loops vectorise (a data-dependent branch here
// mispredicts on about every other element).
template <bool ACT>
inline float Masked(float g, float yv) {
  if (!ACT) return g;
  // g's bits AND an all-ones/all-zeros mask: a select GCC vectorises (the ?: form kept a
  // branch, 8x slower on a half-clamped activation).
  const uint32_t keep = 0u - static_cast<uint32_t>((yv > 0.f) & (yv < 6.f));
  uint32_t bits;
  std::memcpy(&bits, &g, sizeof bits);
  bits &= keep;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// Ternaries on values (not std::min/max on references) so the loops if-convert and vectorise.
inline float Clamp(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// Small planes: images [n0, n1), vector loop over channels, the HW pixels of a plane
// unrolled (HW is a compile-time constant).
template <int HW>
void SmallStatsFwd(const float* x, int64_t n0, int64_t n1, int64_t C, const float* k,
                   double* s, double* q) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* xn = x + n * C * HW;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float ss = 0.f, qq = 0.f;
      for (int i = 0; i < HW; ++i) {
        const float v = xn[c * HW + i] - k[c];
        ss += v;
        qq += v * v;
      }
      s[c] += ss;
      q[c] += qq;
    }
  }
}

template <int HW>
void SmallNormFwd(const float* x, int64_t n0, int64_t n1, int64_t C, const float* a,
                  const float* b, float lo, float hi, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* xn = x + n * C * HW;
    float* yn = y + n * C * HW;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < HW; ++i) yn[c * HW + i] = Clamp(xn[c * HW + i] * a[c] + b[c], lo, hi);
  }
}

template <bool ACT, int HW>
void SmallStatsBwd(const float* x, const float* y, const float* dy, int64_t n0, int64_t n1,
                   int64_t C, const float* mean, double* s, double* q) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t o = n * C * HW;
    const float *xn = x + o, *yn = y + o, *gn = dy + o;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float ss = 0.f, qq = 0.f;
      for (int i = 0; i < HW; ++i) {
        const float g = Masked<ACT>(gn[c * HW + i], yn[c * HW + i]);
        ss += g;
        qq += g * (xn[c * HW + i] - mean[c]);
      }
      s[c] += ss;
      q[c] += qq;
    }
  }
}

template <bool ACT, int HW>
void SmallDxBwd(const float* x, const float* y, const float* dy, int64_t n0, int64_t n1,
                int64_t C, const float* A, const float* B, const float* C0, float* dx) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t o = n * C * HW;
    const float *xn = x + o, *yn = y + o, *gn = dy + o;
    float* on = dx + o;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < HW; ++i)
        on[c * HW + i] = A[c] * Masked<ACT>(gn[c * HW + i], yn[c * HW + i]) +
                         B[c] * xn[c * HW + i] + C0[c];
  }
}

#define MBV2_DISPATCH_HW(hw, FN, ...)          \
  switch (hw) {                                \
    case 1: FN<1>(__VA_ARGS__); break;         \
    case 2: FN<2>(__VA_ARGS__); break;         \
    case 3: FN<3>(__VA_ARGS__); break;         \
    case 4: FN<4>(__VA_ARGS__); break;         \
    case 5: FN<5>(__VA_ARGS__); break;         \
    case 6: FN<6>(__VA_ARGS__); break;         \
    default: FN<7>(__VA_ARGS__); break;        \
  }

// The same, for the backward templates, inside Backward<ACT>.
#define MBV2_DISPATCH_HW_ACT(hw, FN, ...)    \
  switch (hw) {                              \
    case 1: FN<ACT, 1>(__VA_ARGS__); break;  \
    case 2: FN<ACT, 2>(__VA_ARGS__); break;  \
    case 3: FN<ACT, 3>(__VA_ARGS__); break;  \
    case 4: FN<ACT, 4>(__VA_ARGS__); break;  \
    case 5: FN<ACT, 5>(__VA_ARGS__); break;  \
    case 6: FN<ACT, 6>(__VA_ARGS__); break;  \
    default: FN<ACT, 7>(__VA_ARGS__); break; \
                                             \
  }

// Per-channel sums [s(C), q(C)] in double over `items` items: body(first, end, acc) adds
// items [first, end) into the row acc[0..2C) (sums, then sums of squares) of their chunk
// (mbv2::WorkChunks); the rows are reduced at the end, in chunk order: deterministic for
// a fixed thread count.
template <class Body>
std::vector<double> ChannelSums(int64_t C, int64_t items, Body body) {
  mbv2::WorkChunks work(items, mbv2::ChunkCount(items, 2 * C * sizeof(double)));
  mbv2::ChunkSums part(2 * C, work.count());
#pragma omp parallel
  mbv2::ForEachChunk(work, [&](int64_t k, int64_t first, int64_t end) {
    body(first, end, part.part(k));
  });
  std::vector<double> tot(2 * C);
  part.ReduceInto(tot.data());
  return tot;
}

// Small planes: chunks of images; small(n0, n1, s, q) adds images [n0, n1).
template <class Small>
std::vector<double> SmallChannelSums(const Dims& d, Small small) {
  return ChannelSums(d.c, d.n, [&](int64_t n0, int64_t n1, double* acc) {
    small(n0, n1, acc, acc + d.c);
  });
}

// Mid-size planes: chunks of the N*C planes in memory order; plane(p, c, s, q) gives
// plane p's two float sums.
template <class Plane>
std::vector<double> PlaneOrderSums(const Dims& d, Plane plane) {
  return ChannelSums(d.c, d.n * d.c, [&](int64_t first, int64_t end, double* acc) {
    for (int64_t p = first; p < end; ++p) {
      const int64_t c = p % d.c;
      float s = 0.f, q = 0.f;
      plane(p, c, s, q);
      acc[c] += s;
      acc[d.c + c] += q;
    }
  });
}

// Planes at least this large (56x56 and up) take ByChannel below; smaller ones (28x28 to
// 3x3) take the plane-order passes, which measured faster there (batch 32, forward:
// 192x28x28 1.01 vs 1.43 ms, 576x14x14 0.88 vs 1.28 ms, 2 threads) while ByChannel won at
// 112x112 (96 channels: forward 11.3 -> 9.2 ms, backward 40 -> 32 ms).
constexpr int64_t kChannelPassPlane = 56 * 56;

// Large planes, channel by channel: one thread takes a whole channel, sums its N planes
// (plane(p, c, s, q): plane p's two float sums, added in double) and then calls
// apply(c, s, q), which computes the channel's coefficients and makes the second pass
// over the same N planes while they are still in cache (batch 32 in backward: 4.8 MB
// for a 112x112 channel, 1.2 MB at 56x56, against the 32 MiB L3 and 1-2 MiB L2 of the
// CPUs here), where a first pass over the whole activation before the second would
// stream it from memory twice. No cross-thread sums: deterministic for any thread count.
template <class Plane, class Apply>
void ByChannel(const Dims& d, Plane plane, Apply apply) {
  mbv2::ForItems(d.c, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0.0, q = 0.0;
      for (int64_t n = 0; n < d.n; ++n) {
        float ss = 0.f, qq = 0.f;
        plane(n * d.c + c, c, ss, qq);
        s += ss;
        q += qq;
      }
      apply(c, s, q);
    }
  });
}

// apply(p, p % C) for every plane p, in chunks of planes.
template <class Apply>
void EveryPlane(const Dims& d, Apply apply) {
  mbv2::ForItems(d.n * d.c, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) apply(p, p % d.c);
  });
}

// TwoPasses' first pass alone, in its order (the fused op's statistics: no second pass).
template <class Plane, class Finish>
void FirstPass(const Dims& d, Plane plane, Finish finish) {
  if (d.hw < kChannelPassPlane) {
    const std::vector<double> tot = PlaneOrderSums(d, plane);
    for (int64_t c = 0; c < d.c; ++c) finish(c, tot[c], tot[d.c + c]);
    return;
  }
  ByChannel(d, plane, finish);
}

// The two passes over planes of kSmallPlane pixels and up: plane(p, c, s, q) gives plane
// p's sums, finish(c, s, q) turns channel c's totals into its coefficients, apply(p, c)
// makes the second pass over plane p. Mid-size planes: PlaneOrderSums, then all planes;
// from kChannelPassPlane up: ByChannel, each channel's planes right after its sums.
template <class Plane, class Finish, class Apply>
void TwoPasses(const Dims& d, Plane plane, Finish finish, Apply apply) {
  if (d.hw < kChannelPassPlane) {
    FirstPass(d, plane, finish);
    EveryPlane(d, apply);
    return;
  }
  ByChannel(d, plane, [&](int64_t c, double sum, double sumsq) {
    finish(c, sum, sumsq);
    for (int64_t n = 0; n < d.n; ++n) apply(n * d.c + c, c);
  });
}

inline void ScalePlane(const float* x, int64_t hw, float a, float b, float lo, float hi,
                       float* y) {
#pragma omp simd
  for (int64_t i = 0; i < hw; ++i) y[i] = Clamp(x[i] * a + b, lo, hi);
}

// ---------------------------------------------------------------------------------------
// The ReLU6 gate of a plane of hw >= kSmallPlane pixels, one bit a pixel: bit i % 8 of
// byte i / 8 is set where 0 < y < 6, that is where the gradient passes. The forward
// writes it beside y, so the backward streams 1/32 of y's bytes instead of y itself
// (in its statistics pass and, for planes under 56x56, again in its dx pass).
inline int64_t GateBytes(int64_t hw) { return (hw + 7) / 8; }

inline bool Passes(const uint8_t* gate, int64_t i) { return (gate[i >> 3] >> (i & 7)) & 1; }

inline float Gated(float g, bool pass) { return pass ? g : 0.f; }

#if defined(__AVX2__) && defined(__FMA__)
// 8 lanes of all-ones where the gate byte's bit (lane) is set.
inline __m256 GateLanes(uint8_t bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i v = _mm256_and_si256(_mm256_set1_epi32(bits), sel);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, sel));
}

// A statistics pass reads each plane once, from memory, one plane after another: the
// hardware prefetcher starts over at every 4 KiB page, so the loops ask for the line
// kPassAhead floats (one page) ahead themselves.
constexpr int64_t kPassAhead = 1024;
inline void Prefetch(const float* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// y = clamp(x * a + b, 0, 6) and the plane's gate (NaN stays NaN and does not pass).
// STREAM: y written with non-temporal stores (stream_store.h; y 32-byte aligned). HW: the
// plane size where it is a compile-time constant (FixedPlane), else 0 and `hw`.
template <bool STREAM, int64_t HW = 0>
void ScalePlaneGate(const float* x, int64_t hw, float a, float b, float* y, uint8_t* gate) {
  if (HW) hw = HW;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
  for (; i + 8 <= hw; i += 8) {
    const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), va, vb);
    const __m256 pass = _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ),
                                      _mm256_cmp_ps(v, six, _CMP_LT_OQ));
    // max/min return their second operand for a NaN: v, as Clamp does
    mbv2::Store<STREAM>(y + i, _mm256_min_ps(six, _mm256_max_ps(zero, v)));
    gate[i >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(pass));
  }
#endif
  for (; i < hw; i += 8) {
    uint8_t bits = 0;
    for (int64_t j = i; j < std::min(hw, i + 8); ++j) {
      const float v = x[j] * a + b;
      y[j] = Clamp(v, 0.f, 6.f);
      bits |= static_cast<uint8_t>((v > 0.f && v < 6.f) ? 1u << (j - i) : 0u);
    }
    gate[i >> 3] = bits;
  }
#if defined(__AVX2__) && defined(__FMA__)
  if (STREAM) _mm_sfence();  // the streamed stores are weakly ordered: done before the barrier
#endif
}

// Where the ReLU6 passes the gradient, two ways: BitGate reads the gate the forward wrote;
// RecomputedGate recomputes it from x and the forward's folded a, b (0 < x * a + b < 6,
// the forward's own arithmetic, so the same pixels), for the fused batch norm ->
// depthwise op, which writes no y and no gate. lanes(i, xv): 8 lanes of all-ones where
// pixels i .. i + 7 pass (i a multiple of 8); pass(i, xi): whether pixel i does.
struct BitGate {
  const uint8_t* bits;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 lanes(int64_t i, __m256) const { return GateLanes(bits[i >> 3]); }
#endif
  bool pass(int64_t i, float) const { return Passes(bits, i); }
};

struct RecomputedGate {
  float a, b;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 lanes(int64_t, __m256 xv) const {
    const __m256 v = _mm256_fmadd_ps(xv, _mm256_set1_ps(a), _mm256_set1_ps(b));
    return _mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ),
                         _mm256_cmp_ps(v, _mm256_set1_ps(6.f), _CMP_LT_OQ));
  }
#endif
  bool pass(int64_t, float xi) const {
    const float v = xi * a + b;
    return v > 0.f && v < 6.f;
  }
};

// s = sum(g), q = sum(g * (x - mu)), g = dy where the gate passes.
template <class Gate>
void GatedSums(const float* x, const float* dy, Gate gate, int64_t hw, float mu, float& s,
               float& q) {
  int64_t i = 0;
  float ss = 0.f, qq = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vmu = _mm256_set1_ps(mu);
  __m256 vs = _mm256_setzero_ps(), vq = _mm256_setzero_ps();
  for (; i + 8 <= hw; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 g = _mm256_and_ps(_mm256_loadu_ps(dy + i), gate.lanes(i, xv));
    vs = _mm256_add_ps(vs, g);
    vq = _mm256_fmadd_ps(g, _mm256_sub_ps(xv, vmu), vq);
  }
  ss = HorizontalSum(vs);
  qq = HorizontalSum(vq);
#endif
  for (; i < hw; ++i) {
    const float g = Gated(dy[i], gate.pass(i, x[i]));
    ss += g;
    qq += g * (x[i] - mu);
  }
  s = ss;
  q = qq;
}

// dx = a * g + b * x + c0, g = dy where the gate passes; STREAM as in ScalePlaneGate. dx
// may be dy itself (each pixel is read before it is written).
template <bool STREAM, class Gate>
void GatedDx(const float* x, const float* dy, Gate gate, int64_t hw, float a, float b,
             float c0, float* dx) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vc = _mm256_set1_ps(c0);
  for (; i + 8 <= hw; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 g = _mm256_and_ps(_mm256_loadu_ps(dy + i), gate.lanes(i, xv));
    const __m256 bx = _mm256_fmadd_ps(vb, xv, vc);
    mbv2::Store<STREAM>(dx + i, _mm256_fmadd_ps(va, g, bx));
  }
#endif
  for (; i < hw; ++i) dx[i] = a * Gated(dy[i], gate.pass(i, x[i])) + b * x[i] + c0;
#if defined(__AVX2__) && defined(__FMA__)
  if (STREAM) _mm_sfence();
#endif
}

// s = sum(x - k), q = sum((x - k)^2) over the n values at x, each lane in order; the
// line a page ahead asked for (kPassAhead). Whole x1.0 steps at 224 px, batch 32, with
// and without the prefetch alternated in one process: 1.010, 1.020, 1.041 (float32),
// 1.025 (bf16), x0.5 1.023 (the Intel Xeon of round 35).
inline void ShiftedSums(const float* x, int64_t n, float k, float& s, float& q) {
  float ss = 0.f, qq = 0.f;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vk = _mm256_set1_ps(k);
  __m256 vs = _mm256_setzero_ps(), vq = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    Prefetch(x + i + kPassAhead);
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), vk);
    vs = _mm256_add_ps(vs, v);
    vq = _mm256_fmadd_ps(v, v, vq);
    const __m256 w = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vk);
    vs = _mm256_add_ps(vs, w);
    vq = _mm256_fmadd_ps(w, w, vq);
  }
  ss = HorizontalSum(vs);
  qq = HorizontalSum(vq);
#endif
  for (; i < n; ++i) {
    const float v = x[i] - k;
    ss += v;
    qq += v * v;
  }
  s = ss;
  q = qq;
}

// ShiftedSums over a plane of HW pixels, HW a compile-time multiple of 8 (FixedPlane):
// unrolled vectors and one horizontal sum each.
template <int64_t HW>
inline void FixedPlaneSums(const float* x, float k, float& s, float& q) {
#if defined(__AVX2__) && defined(__FMA__)
  static_assert(HW % 8 == 0, "whole vectors only");
  const __m256 vk = _mm256_set1_ps(k);
  __m256 vs = _mm256_setzero_ps(), vq = _mm256_setzero_ps();
  for (int64_t i = 0; i < HW; i += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), vk);
    vs = _mm256_add_ps(vs, v);
    vq = _mm256_fmadd_ps(v, v, vq);
  }
  s = HorizontalSum(vs);
  q = HorizontalSum(vq);
#else
  ShiftedSums(x, HW, k, s, q);
#endif
}

template <int64_t V>
using Pixels = std::integral_constant<int64_t, V>;

// body(Pixels<HW>{}) with the plane size as a compile-time constant where it is one of the
// small square planes a 32 px input gives (4x4, 8x8, 16x16), else body(Pixels<0>{}). On
// such planes the per-plane loop setup, tails and reductions of a run-time size were most
// of the forward's time: batch 128, 96x4x4 124 -> 69 us, 72x8x8 142 -> 103, 144x8x8 262 ->
// 179, 48x16x16 314 -> 266 (best of 35 calls, three alternated processes); training steps
// at 32 px 1.015x (x0.5) and 1.022-1.027x (x1.0) with and without, alternated in one
// process. The backward, specialised the same way, was level (96x4x4 166 vs 158 us).
template <class Body>
void FixedPlane(int64_t hw, Body body) {
  switch (hw) {
    case 16: body(Pixels<16>{}); break;
    case 64: body(Pixels<64>{}); break;
    case 256: body(Pixels<256>{}); break;
    default: body(Pixels<0>{}); break;
  }
}

// y = x * a[c] + b[c], clamped to [0, 6] when act: the normalisation, in training (batch
// statistics folded into a, b) and in inference (running statistics).
void ScaleShift(const Dims& d, const float* x, const float* a, const float* b, bool act,
                float* y) {
  const int64_t C = d.c, hw = d.hw;
  const float hi = act ? 6.f : INFINITY, lo = act ? 0.f : -INFINITY;
  if (hw < kSmallPlane) {
    mbv2::ForItems(d.n, [&](int64_t n0, int64_t n1) {
      MBV2_DISPATCH_HW(hw, SmallNormFwd, x, n0, n1, C, a, b, lo, hi, y);
    });
  } else {
    EveryPlane(d, [&](int64_t p, int64_t c) {
      ScalePlane(x + p * hw, hw, a[c], b[c], lo, hi, y + p * hw);
    });
  }
}

// Whether ScalePlaneGate / GatedDx stream their output (stream_store.h): planes whose
// starts are all 32-byte aligned.
bool StreamOutput(const Dims& d, const float* y) {
  return d.hw % 8 == 0 && mbv2::StreamOutput(d.n * d.c * d.hw, y);
}

// gate: the ReLU6 gate of every plane (GateBytes(hw) bytes each), written when act and
// hw >= kSmallPlane (Backward reads it there instead of y). av, bv: C floats each, the
// folded y = x * av + bv. y == nullptr: the statistics only (no second pass, no gate).
// given: x's sums as a fused op's producer took them (3C: sums of x - K, of (x - K)^2, K;
// OutputSums), with y == nullptr: no pass over x at all.
void Forward(const Dims& d, const float* x, const float* gamma, const float* beta, float eps,
             float momentum, bool act, float* y, uint8_t* gate, float* saved_mean,
             float* saved_invstd, float* run_mean, float* run_var, float* av, float* bv,
             const double* given = nullptr) {
  const int64_t C = d.c, hw = d.hw;
  const int64_t m = d.n * d.hw;
  const float hi = act ? 6.f : INFINITY, lo = act ? 0.f : -INFINITY;
  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; ++c)
    shift[c] = given != nullptr ? static_cast<float>(given[2 * C + c]) : x[c * hw];
  const float* k = shift.data();
  // Channel c's statistics from its sums of (x - K) and (x - K)^2: saved, running, and
  // the folded scale av[c] and shift bv[c].
  auto finish = [&](int64_t c, double sum, double sumsq) {
    mbv2::FinishStatsChannel(c, sum, sumsq, m, shift[c], gamma, beta, eps, momentum, saved_mean,
                             saved_invstd, run_mean, run_var, av, bv);
  };
  if (given != nullptr) {
    for (int64_t c = 0; c < C; ++c) finish(c, given[c], given[C + c]);
    if (y == nullptr) return;
  }
  if (hw < kSmallPlane) {
    if (given == nullptr) {
      const std::vector<double> tot = SmallChannelSums(d, [&](int64_t n0, int64_t n1, double* s,
                                                               double* q) {
        MBV2_DISPATCH_HW(hw, SmallStatsFwd, x, n0, n1, C, k, s, q);
      });
      for (int64_t c = 0; c < C; ++c) finish(c, tot[c], tot[C + c]);
    }
    if (y != nullptr) ScaleShift(d, x, av, bv, act, y);
    return;
  }
  const int64_t gb = GateBytes(hw);
  const bool stream = y != nullptr && StreamOutput(d, y);
  FixedPlane(hw, [&](auto fixed) {
    constexpr int64_t HW = decltype(fixed)::value;
    auto plane = [&](int64_t p, int64_t c, float& s, float& q) {
      const float* xp = x + p * hw;
      const float kc = k[c];
      if constexpr (HW != 0)
        FixedPlaneSums<HW>(xp, kc, s, q);
      else
        ShiftedSums(xp, hw, kc, s, q);
    };
    auto scale_plane = [&](int64_t p, int64_t c) {
      if (act && stream)
        ScalePlaneGate<true, HW>(x + p * hw, hw, av[c], bv[c], y + p * hw, gate + p * gb);
      else if (act)
        ScalePlaneGate<false, HW>(x + p * hw, hw, av[c], bv[c], y + p * hw, gate + p * gb);
      else
        ScalePlane(x + p * hw, hw, av[c], bv[c], lo, hi, y + p * hw);
    };
    if (given != nullptr)
      EveryPlane(d, scale_plane);  // the statistics are in: the normalising pass alone
    else if (y == nullptr)
      FirstPass(d, plane, finish);
    else
      TwoPasses(d, plane, finish, scale_plane);
  });
}

// dx = a * dy + b * x + c0 (no activation).
void DxPlane(const float* x, const float* dy, int64_t hw, float a, float b, float c0,
             float* dx) {
#pragma omp simd
  for (int64_t i = 0; i < hw; ++i) dx[i] = a * dy[i] + b * x[i] + c0;
}

// y: read (its ReLU6 test) only for planes under kSmallPlane; larger planes read `gate`,
// or, where fa is not null (the fused ops: ACT, planes of kSmallPlane and up), recompute
// it from x and the forward's folded fa, fb (RecomputedGate). dx may be dy itself.
// sums: the channels' sums of g and g * (x - mean) (2C doubles) where the caller already
// has them (a fused op's conv backward, which made dy), so only the dx pass runs.
template <bool ACT>
void Backward(const Dims& d, const float* x, const float* gamma, const float* y,
              const uint8_t* gate, const float* fa, const float* fb, const float* mean,
              const float* invstd, const float* dy, float* dx, float* dgamma, float* dbeta,
              const double* sums = nullptr) {
  const int64_t C = d.c, hw = d.hw;
  const int64_t m = d.n * d.hw;
  // dx = A * g + B * x + C0 per channel, from the channel's sums of g and g * (x - mean).
  std::vector<float> ca(C), cb(C), cc(C);
  auto finish = [&](int64_t c, double sum_g, double sum_gx) {
    mbv2::FinishGradChannel(c, sum_g, sum_gx, m, gamma, mean, invstd, dgamma, dbeta, ca.data(),
                            cb.data(), cc.data());
  };
  if (hw < kSmallPlane) {
    const std::vector<double> tot = SmallChannelSums(d, [&](int64_t n0, int64_t n1, double* s,
                                                             double* q) {
      MBV2_DISPATCH_HW_ACT(hw, SmallStatsBwd, x, y, dy, n0, n1, C, mean, s, q);
    });
    for (int64_t c = 0; c < C; ++c) finish(c, tot[c], tot[C + c]);
    const float *A = ca.data(), *B = cb.data(), *C0 = cc.data();
    mbv2::ForItems(d.n, [&](int64_t n0, int64_t n1) {
      MBV2_DISPATCH_HW_ACT(hw, SmallDxBwd, x, y, dy, n0, n1, C, A, B, C0, dx);
    });
    return;
  }
  const int64_t gb = GateBytes(hw);
  auto plane = [&](int64_t p, int64_t c, float& s, float& q) {
    const float* xp = x + p * hw;
    const float* gp = dy + p * hw;
    const float mu = mean[c];
    if (ACT && fa != nullptr) {
      GatedSums(xp, gp, RecomputedGate{fa[c], fb[c]}, hw, mu, s, q);
      return;
    }
    if (ACT) {
      GatedSums(xp, gp, BitGate{gate + p * gb}, hw, mu, s, q);
      return;
    }
    float ss = 0.f, qq = 0.f;
#pragma omp simd reduction(+ : ss, qq)
    for (int64_t i = 0; i < hw; ++i) {
      ss += gp[i];
      qq += gp[i] * (xp[i] - mu);
    }
    s = ss;
    q = qq;
  };
  const bool stream = StreamOutput(d, dx);
  auto dx_plane = [&](int64_t p, int64_t c) {
    const int64_t o = p * hw;
    auto gated = [&](auto g) {
      if (stream)
        GatedDx<true>(x + o, dy + o, g, hw, ca[c], cb[c], cc[c], dx + o);
      else
        GatedDx<false>(x + o, dy + o, g, hw, ca[c], cb[c], cc[c], dx + o);
    };
    if (ACT && fa != nullptr)
      gated(RecomputedGate{fa[c], fb[c]});
    else if (ACT)
      gated(BitGate{gate + p * gb});
    else
      DxPlane(x + o, dy + o, hw, ca[c], cb[c], cc[c], dx + o);
  };
  if (sums != nullptr) {
    for (int64_t c = 0; c < C; ++c) finish(c, sums[c], sums[C + c]);
    EveryPlane(d, dx_plane);
    return;
  }
  TwoPasses(d, plane, finish, dx_plane);
}

void CheckChannelVector(const paddle::Tensor& t, int64_t c, const char* name) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32 && t.numel() == c,
           "batch_norm_act: ", name, " must be a float32 CPU vector of C elements");
}

// The producer's sums of x (OutputSums::Finish, C channels) checked, or null where there
// are none or their taken flag is 0 (the caller then sums x itself).
const double* GivenSums(const paddle::optional<paddle::Tensor>& sums, int64_t c,
                        const char* op) {
  if (!sums) return nullptr;
  PD_CHECK(sums->is_cpu() && sums->dtype() == paddle::DataType::FLOAT64 &&
               sums->numel() == 3 * c + 1,
           op, ": the producer's sums must be a float64 CPU vector of 3 C + 1 elements");
  const double* given = sums->data<double>();
  return given[3 * c] != 0.0 ? given : nullptr;
}

}  // namespace

void mbv2::FinishStatsChannel(int64_t c, double sum, double sumsq, int64_t m, float shift,
                              const float* gamma, const float* beta, float eps, float momentum,
                              float* saved_mean, float* saved_invstd, float* run_mean,
                              float* run_var, float* a, float* b) {
  const double ms = sum / m;  // mean of (x - K)
  double var = sumsq / m - ms * ms;
  if (var < 0.0) var = 0.0;  // rounding
  // A variance float32 cannot hold (diverged training: the float sums overflowed) is NaN,
  // as in Paddle's kernel, so that the non-finite loss check stops the run instead of the
  // layer quietly outputting beta.
  if (!(var <= FLT_MAX)) var = NAN;
  const double mean = ms + shift;
  const double invstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
  saved_mean[c] = static_cast<float>(mean);
  saved_invstd[c] = static_cast<float>(invstd);
  run_mean[c] = momentum * run_mean[c] + (1.f - momentum) * static_cast<float>(mean);
  run_var[c] = momentum * run_var[c] + (1.f - momentum) * static_cast<float>(var);
  a[c] = static_cast<float>(gamma[c] * invstd);
  b[c] = static_cast<float>(beta[c] - mean * gamma[c] * invstd);
}

void mbv2::FinishGradChannel(int64_t c, double sum_g, double sum_gx, int64_t m,
                             const float* gamma, const float* mean, const float* invstd,
                             float* dgamma, float* dbeta, float* ca, float* cb, float* cc) {
  const double is = invstd[c];
  const double db = sum_g;
  const double dg = sum_gx * is;
  dbeta[c] = static_cast<float>(db);
  dgamma[c] = static_cast<float>(dg);
  const double A = gamma[c] * is;
  const double B = -gamma[c] * is * is * dg / m;
  ca[c] = static_cast<float>(A);
  cb[c] = static_cast<float>(B);
  cc[c] = static_cast<float>(-A * db / m - B * mean[c]);
}

std::vector<paddle::Tensor> mbv2::FusedBatchNormStats(
    const paddle::Tensor& x, const paddle::Tensor& scale, const paddle::Tensor& bias,
    const paddle::Tensor& running_mean, const paddle::Tensor& running_var, float eps,
    float momentum, const char* op, const paddle::optional<paddle::Tensor>& sums) {
  const Dims d = GetDims(x);
  PD_CHECK(d.hw >= kSmallPlane, op, ": planes of 8 pixels and up only");
  const double* given = GivenSums(sums, d.c, op);
  for (auto* t : {&scale, &bias, &running_mean, &running_var})
    PD_CHECK(t->is_cpu() && t->dtype() == paddle::DataType::FLOAT32 && t->numel() == d.c, op,
             ": batch norm parameters and statistics must be float32 CPU vectors of C elements");
  auto mean = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto invstd = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto folded = paddle::empty({2 * d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  float* ab = folded.data<float>();
  // running statistics updated in place, as the batch norm op does
  Forward(d, x.data<float>(), scale.data<float>(), bias.data<float>(), eps, momentum, true,
          nullptr, nullptr, mean.data<float>(), invstd.data<float>(),
          const_cast<float*>(running_mean.data<float>()),
          const_cast<float*>(running_var.data<float>()), ab, ab + d.c, given);
  return {mean, invstd, folded};
}

std::vector<paddle::Tensor> mbv2::FusedBatchNormBackward(const paddle::Tensor& x,
                                                         const paddle::Tensor& scale,
                                                         const paddle::Tensor& mean,
                                                         const paddle::Tensor& invstd,
                                                         const paddle::Tensor& folded,
                                                         paddle::Tensor& dy,
                                                         const double* sums) {
  const Dims d = GetDims(x);
  PD_CHECK(d.hw >= kSmallPlane && folded.numel() == 2 * d.c,
           "batch_norm_act: a fused op's folded scale/shift or plane of the wrong size");
  auto dgamma = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dbeta = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* ab = folded.data<float>();
  float* g = dy.data<float>();
  Backward<true>(d, x.data<float>(), scale.data<float>(), nullptr, nullptr, ab, ab + d.c,
                 mean.data<float>(), invstd.data<float>(), g, g, dgamma.data<float>(),
                 dbeta.data<float>(), sums);
  return {dgamma, dbeta};
}

std::vector<paddle::Tensor> mbv2::FusedBatchNormCoefs(const paddle::Tensor& scale,
                                                      const paddle::Tensor& mean,
                                                      const paddle::Tensor& invstd,
                                                      const double* sums, int64_t m) {
  const int64_t c = scale.numel();
  auto dgamma = paddle::empty({c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dbeta = paddle::empty({c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto coefs = paddle::empty({3 * c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  float* k = coefs.data<float>();
  for (int64_t i = 0; i < c; ++i)
    mbv2::FinishGradChannel(i, sums[i], sums[c + i], m, scale.data<float>(), mean.data<float>(),
                  invstd.data<float>(), dgamma.data<float>(), dbeta.data<float>(), k, k + c,
                  k + 2 * c);
  return {dgamma, dbeta, coefs};
}

void mbv2::ShiftedRowSums(const float* y, int64_t n, float k, float& s, float& q) {
  // four vector accumulators a sum (one would wait on its own add latency every 8 values)
  int64_t i = 0;
  float ss = 0.f, qq = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vk = _mm256_set1_ps(k);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0;
  for (; i + 32 <= n; i += 32) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(y + i), vk);
    const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(y + i + 8), vk);
    const __m256 d2 = _mm256_sub_ps(_mm256_loadu_ps(y + i + 16), vk);
    const __m256 d3 = _mm256_sub_ps(_mm256_loadu_ps(y + i + 24), vk);
    s0 = _mm256_add_ps(s0, d0); s1 = _mm256_add_ps(s1, d1);
    s2 = _mm256_add_ps(s2, d2); s3 = _mm256_add_ps(s3, d3);
    q0 = _mm256_fmadd_ps(d0, d0, q0); q1 = _mm256_fmadd_ps(d1, d1, q1);
    q2 = _mm256_fmadd_ps(d2, d2, q2); q3 = _mm256_fmadd_ps(d3, d3, q3);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(y + i), vk);
    s0 = _mm256_add_ps(s0, d);
    q0 = _mm256_fmadd_ps(d, d, q0);
  }
  ss = HorizontalSum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  qq = HorizontalSum(_mm256_add_ps(_mm256_add_ps(q0, q1), _mm256_add_ps(q2, q3)));
#endif
  for (; i < n; ++i) {
    const float v = y[i] - k;
    ss += v;
    qq += v * v;
  }
  s = ss;
  q = qq;
}

void mbv2::GatedRowSums(const float* x, const float* dy, int64_t n, float a, float b, float mu,
                        float& s, float& q) {
  GatedSums(x, dy, RecomputedGate{a, b}, n, mu, s, q);
}

// Bytes of the ReLU6 gate output: one bit a pixel per plane where Backward reads it (act,
// planes of kSmallPlane pixels and up), else a 1-byte placeholder.
int64_t GateSize(const std::vector<int64_t>& shape, bool act) {
  if (shape.size() != 4) return 1;
  const int64_t hw = shape[2] * shape[3];
  return act && hw >= kSmallPlane ? std::max<int64_t>(1, shape[0] * shape[1] * GateBytes(hw))
                                  : 1;
}

// sums: x's, as the conv that made x took them (OutputSums::Finish), so the statistics
// need no pass over x; none (or not taken): summed here.
std::vector<paddle::Tensor> BatchNormActForward(const paddle::Tensor& x,
                                                const paddle::Tensor& scale,
                                                const paddle::Tensor& bias,
                                                const paddle::Tensor& running_mean,
                                                const paddle::Tensor& running_var,
                                                const paddle::optional<paddle::Tensor>& sums,
                                                float epsilon, float momentum, bool act) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32,
           "batch_norm_act: x must be a float32 CPU tensor");
  const Dims d = GetDims(x);
  for (auto* t : {&scale, &bias, &running_mean, &running_var})
    CheckChannelVector(*t, d.c, "scale/bias/running stats");
  PD_CHECK(d.n * d.hw > 0, "batch_norm_act: empty batch");
  const double* given = GivenSums(sums, d.c, "batch_norm_act");
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto gate = paddle::empty({GateSize(x.shape(), act)}, paddle::DataType::UINT8,
                            paddle::CPUPlace());
  auto mean = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto invstd = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  // Running statistics: updated in place, like Paddle's batch_norm MeanOut/VarianceOut.
  float* rm = const_cast<float*>(running_mean.data<float>());
  float* rv = const_cast<float*>(running_var.data<float>());
  std::vector<float> av(d.c), bv(d.c);
  Forward(d, xc.data<float>(), scale.data<float>(), bias.data<float>(), epsilon, momentum, act,
          y.data<float>(), gate.data<uint8_t>(), mean.data<float>(), invstd.data<float>(), rm,
          rv, av.data(), bv.data(), given);
  return {y, mean, invstd, gate};
}

std::vector<paddle::Tensor> BatchNormActBackward(const paddle::Tensor& x,
                                                 const paddle::Tensor& scale,
                                                 const paddle::Tensor& y,
                                                 const paddle::Tensor& mean,
                                                 const paddle::Tensor& invstd,
                                                 const paddle::Tensor& gate,
                                                 const paddle::Tensor& dy, float epsilon,
                                                 float momentum, bool act) {
  PD_CHECK(dy.is_cpu() && dy.dtype() == paddle::DataType::FLOAT32,
           "batch_norm_act: out_grad must be a float32 CPU tensor");
  const Dims d = GetDims(x);
  PD_CHECK(gate.numel() == GateSize(x.shape(), act), "batch_norm_act: gate of the wrong size");
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const paddle::Tensor yc = y.is_contiguous() ? y : y.contiguous();
  const paddle::Tensor dyc = dy.is_contiguous() ? dy : dy.contiguous();
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dgamma = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dbeta = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  (act ? Backward<true> : Backward<false>)(
      d, xc.data<float>(), scale.data<float>(), yc.data<float>(), gate.data<uint8_t>(),
      nullptr, nullptr, mean.data<float>(), invstd.data<float>(), dyc.data<float>(),
      dx.data<float>(), dgamma.data<float>(), dbeta.data<float>(), nullptr);
  return {dx, dgamma, dbeta};
}

std::vector<std::vector<int64_t>> BatchNormActInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>& scale_shape,
    const std::vector<int64_t>& bias_shape, const std::vector<int64_t>& mean_shape,
    const std::vector<int64_t>& var_shape, const paddle::optional<std::vector<int64_t>>&,
    float epsilon, float momentum, bool act) {
  return {x_shape, {x_shape[1]}, {x_shape[1]}, {GateSize(x_shape, act)}};
}

std::vector<paddle::DataType> BatchNormActInferDtype(const paddle::DataType& x_dtype,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&,
                                                     const paddle::optional<paddle::DataType>&) {
  return {x_dtype, x_dtype, x_dtype, paddle::DataType::UINT8};
}

PD_BUILD_OP(mbv2_batch_norm_act)
    .Inputs({"X", "Scale", "Bias", "RunningMean", "RunningVar", paddle::Optional("Sums")})
    .Outputs({"Y", "SavedMean", "SavedInvStd", "Gate"})
    .Attrs({"epsilon: float", "momentum: float", "act: bool"})
    .SetKernelFn(PD_KERNEL(BatchNormActForward))
    .SetInferShapeFn(PD_INFER_SHAPE(BatchNormActInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(BatchNormActInferDtype));

PD_BUILD_GRAD_OP(mbv2_batch_norm_act)
    .Inputs({"X", "Scale", "Y", "SavedMean", "SavedInvStd", "Gate", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Bias")})
    .Attrs({"epsilon: float", "momentum: float", "act: bool"})
    .SetKernelFn(PD_KERNEL(BatchNormActBackward));

// Inference: batch norm with the running statistics (+ ReLU6) in one multi-threaded pass,
// for eval mode without gradients. No grad op: autograd never records it (the Python side
// uses it only under no_grad, on inputs detached from the graph).
std::vector<paddle::Tensor> BatchNormActInferForward(const paddle::Tensor& x,
                                                     const paddle::Tensor& scale,
                                                     const paddle::Tensor& bias,
                                                     const paddle::Tensor& running_mean,
                                                     const paddle::Tensor& running_var,
                                                     float epsilon, bool act) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32,
           "batch_norm_act_infer: x must be a float32 CPU tensor");
  const Dims d = GetDims(x);
  for (auto* t : {&scale, &bias, &running_mean, &running_var})
    CheckChannelVector(*t, d.c, "scale/bias/running stats");
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *gamma = scale.data<float>(), *beta = bias.data<float>();
  const float *mean = running_mean.data<float>(), *var = running_var.data<float>();
  std::vector<float> av(d.c), bv(d.c);
  for (int64_t c = 0; c < d.c; ++c) {
    // As Paddle's kernel: invstd from float var + eps.
    const double invstd = 1.0 / std::sqrt(static_cast<double>(var[c]) + epsilon);
    av[c] = static_cast<float>(gamma[c] * invstd);
    bv[c] = static_cast<float>(beta[c] - mean[c] * gamma[c] * invstd);
  }
  if (d.n * d.c * d.hw > 0) ScaleShift(d, xc.data<float>(), av.data(), bv.data(), act, y.data<float>());
  return {y};
}

std::vector<std::vector<int64_t>> BatchNormActInferInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, float epsilon, bool act) {
  return {x_shape};
}

std::vector<paddle::DataType> BatchNormActInferInferDtype(const paddle::DataType& x_dtype,
                                                          const paddle::DataType&,
                                                          const paddle::DataType&,
                                                          const paddle::DataType&,
                                                          const paddle::DataType&) {
  return {x_dtype};
}

PD_BUILD_OP(mbv2_batch_norm_act_infer)
    .Inputs({"X", "Scale", "Bias", "Mean", "Variance"})
    .Outputs({"Y"})
    .Attrs({"epsilon: float", "act: bool"})
    .SetKernelFn(PD_KERNEL(BatchNormActInferForward))
    .SetInferShapeFn(PD_INFER_SHAPE(BatchNormActInferInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(BatchNormActInferInferDtype));
