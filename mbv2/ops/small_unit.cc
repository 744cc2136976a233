// A whole inverted residual unit on small maps as one Paddle custom operator, in training
// (NCHW float32 CPU tensors, batch statistics): mbv2_small_unit computes
//
//   y = bn3(proj(relu6(bn2(dw3x3(relu6(bn1(expand(x))))))))
//
// for maps of at most 16 pixels (MobileNetV2's last stages at 32 px: 4x4, 2x2 and 1x1),
// the unit's shortcut left to the caller. Apart, those are six ops a unit forward and six
// grad nodes backward (two 1x1 products, three batch norms, the depthwise conv; the
// residual add is a seventh either way), each a few tens of microseconds of Paddle
// dispatch, Python routing and thread start-up around a few microseconds of arithmetic:
// x0.5 at 32 px, batch 128, the units on 2x2 and 1x1 maps were 14 ms of a 36 ms training
// step.
//
// Here the batch is folded into the rows of each product, rows[n*P + p][c] = x[n][c][p]
// (P = H*W, nothing to pack for 1x1 maps), and every step between the products works on
// those rows:
//   E = X We^T (MKL)        -> batch norm 1 statistics, A = relu6(E a1 + b1)
//   D = depthwise(A)        -> batch norm 2 statistics, B = relu6(D a2 + b2)
//   Q = B Wp^T (MKL)        -> batch norm 3 statistics, y = Q a3 + b3 (unpacked to NCHW)
// Batch norm and the depthwise conv are per channel, so the steps between two products run
// in one OpenMP region with each thread on a fixed range of channels (no reduction across
// threads: the results do not depend on the thread that ran them). Statistics as the batch
// norm op takes them (batch_norm_act.cc, whose per-channel finishing steps both ops call):
// sums of (v - K) and (v - K)^2 in double with K the channel's first value, biased
// variance, the running statistics updated in place with Paddle's formula. The backward reverses it, the ReLU6 gates read off the saved A and
// B (0 < v < 6, as Paddle's relu6 grad reads its output):
//   dQ = bn3'(dy);  dWp = dQ^T B, dB = dQ Wp (MKL)
//   dD = bn2'(dB gated);  dA, dWd = depthwise'(dD);  dE = bn1'(dA gated)
//   dWe = dE^T X, dX = dE We (MKL)
// The forward saves E, A, D, B, Q and the three batch norms' mean, 1/std and folded scale
// and shift in one float32 tensor (Saved): one output instead of fifteen.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "batch_norm_act.h"
#include "paddle/extension.h"

#ifdef MBV2_WITH_MKL

#include "mkl_cblas.h"
#include "repack.h"

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Maps of at most this many pixels (4x4) are the op's; fused.SMALL_UNIT_MAX_PIXELS routes.
constexpr int64_t kMaxPixels = 16;
// Rows a float partial sum runs over before it is added into the channel's double sum.
constexpr int64_t kRowBlock = 32;

struct UnitShape {
  int64_t n, ci, h, w, ch, co, stride, ho, wo;
  int64_t p() const { return h * w; }
  int64_t q() const { return ho * wo; }
  int64_t m1() const { return n * p(); }  // rows before the depthwise conv
  int64_t m2() const { return n * q(); }  // rows after it
  // Saved's layout: E, A [m1 x ch], D, B [m2 x ch], Q [m2 x co], then per batch norm
  // (channels k = ch, ch, co) mean, invstd, a, b [k each].
  int64_t e() const { return 0; }
  int64_t a() const { return m1() * ch; }
  int64_t d() const { return 2 * m1() * ch; }
  int64_t b() const { return d() + m2() * ch; }
  int64_t qq() const { return d() + 2 * m2() * ch; }
  int64_t stats(int k) const {
    const int64_t base = qq() + m2() * co;
    return base + (k == 0 ? 0 : k == 1 ? 4 * ch : 8 * ch);
  }
  int64_t saved() const { return stats(2) + 4 * co; }
};

int64_t OutSize(int64_t in, int64_t stride) { return in < 0 ? -1 : (in - 1) / stride + 1; }

UnitShape GetShape(const std::vector<int64_t>& xs, const std::vector<int64_t>& we,
                   const std::vector<int64_t>& wd, const std::vector<int64_t>& wp, int stride) {
  PD_CHECK(xs.size() == 4 && we.size() == 4 && wd.size() == 4 && wp.size() == 4,
           "small_unit: x and the three weights must be 4-D (NCHW, OIHW)");
  PD_CHECK(we[1] == xs[1] && we[2] == 1 && we[3] == 1,
           "small_unit: expand weight must be [C_hidden, C_in, 1, 1]");
  PD_CHECK(wd[0] == we[0] && wd[1] == 1 && wd[2] == 3 && wd[3] == 3,
           "small_unit: depthwise weight must be [C_hidden, 1, 3, 3]");
  PD_CHECK(wp[1] == we[0] && wp[2] == 1 && wp[3] == 1,
           "small_unit: projection weight must be [C_out, C_hidden, 1, 1]");
  PD_CHECK(stride == 1 || stride == 2, "small_unit: stride 1 or 2");
  return {xs[0], xs[1], xs[2], xs[3], we[0], wp[0], stride, OutSize(xs[2], stride),
          OutSize(xs[3], stride)};
}

// This thread's share [c0, c1) of c channels, in whole cache lines.
void ChannelRange(int64_t c, int64_t& c0, int64_t& c1) {
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
  const int64_t per = ((c + nt - 1) / nt + 15) / 16 * 16;
  c0 = std::min(c, t * per);
  c1 = std::min(c, c0 + per);
}

float* Scratch(paddle::Tensor& t, int64_t n) {
  t = paddle::empty({std::max<int64_t>(n, 1)}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  return t.data<float>();
}

// One batch norm's per-channel numbers inside Saved.
struct Stats {
  float *mean, *invstd, *a, *b;
  Stats(float* base, int64_t c) : mean(base), invstd(base + c), a(base + 2 * c), b(base + 3 * c) {}
};

// Two per-channel sums over m rows into the doubles a and b (len channels, zeroed here):
// row(r, pa, pb) adds row r's terms into float partials, which are added into a and b
// every kRowBlock rows (vector lanes in float, double across blocks).
template <typename Row>
void RowBlockSums(int64_t m, int64_t len, std::vector<double>& a, std::vector<double>& b,
                  Row row) {
  a.assign(len, 0.0);
  b.assign(len, 0.0);
  std::vector<float> fa(len), fb(len);
  for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
    const int64_t r1 = std::min(m, r0 + kRowBlock);
    std::fill(fa.begin(), fa.end(), 0.f);
    std::fill(fb.begin(), fb.end(), 0.f);
    for (int64_t r = r0; r < r1; ++r) row(r, fa.data(), fb.data());
    for (int64_t i = 0; i < len; ++i) {
      a[i] += fa[i];
      b[i] += fb[i];
    }
  }
}

// Batch norm statistics of channels [c0, c1) of v (m rows of c), the running statistics
// updated in place and the folded a, b set, as the batch norm op does.
__attribute__((noinline)) void ForwardStats(const float* v, int64_t m, int64_t c, int64_t c0, int64_t c1,
                  const float* gamma, const float* beta, float* run_mean, float* run_var,
                  float eps, float momentum, Stats st) {
  const int64_t len = c1 - c0;
  if (len <= 0) return;
  std::vector<double> s, q;
  const float* k = v + c0;  // row 0: the shift
  RowBlockSums(m, len, s, q, [&](int64_t r, float* __restrict ps, float* __restrict pq) {
    const float* __restrict row = v + r * c + c0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float d = row[i] - k[i];
      ps[i] += d;
      pq[i] += d * d;
    }
  });
  for (int64_t i = 0; i < len; ++i)
    mbv2::FinishStatsChannel(c0 + i, s[i], q[i], m, k[i], gamma, beta, eps, momentum, st.mean,
                             st.invstd, run_mean, run_var, st.a, st.b);
}

// out = v * a + b on channels [c0, c1), clamped to [0, 6] when ACT.
template <bool ACT>
__attribute__((noinline)) void Normalise(const float* v, int64_t m, int64_t c, int64_t c0, int64_t c1, const Stats& st,
               float* out) {
  const float *__restrict a = st.a, *__restrict b = st.b;
  for (int64_t r = 0; r < m; ++r) {
    const float* __restrict row = v + r * c;
    float* __restrict o = out + r * c;
#pragma omp simd
    for (int64_t ch = c0; ch < c1; ++ch) {
      float y = row[ch] * a[ch] + b[ch];
      if (ACT) {
        y = y < 0.f ? 0.f : y;
        y = y > 6.f ? 6.f : y;
      }
      o[ch] = y;
    }
  }
}

// The depthwise weight as 9 rows of c (tap-major), so the channel loop is unit-stride.
std::vector<float> Taps(const float* wd, int64_t c) {
  std::vector<float> t(9 * c);
  for (int64_t ch = 0; ch < c; ++ch)
    for (int k = 0; k < 9; ++k) t[k * c + ch] = wd[ch * 9 + k];
  return t;
}

// The 3x3 conv's (padding 1) pairs of an output pixel q and an input pixel p inside the
// map, one image's worth (the same for every image), grouped three ways: by output pixel
// (the forward gathers them), by input pixel (the input gradient gathers them: each
// element written once) and by tap (the weight gradient: one register sum a tap).
struct TapPairs {
  struct Pair {
    int64_t q, p;
    int k;
  };
  std::vector<std::vector<Pair>> by_out, by_in, by_tap;
  explicit TapPairs(const UnitShape& s) : by_out(s.q()), by_in(s.p()), by_tap(9) {
    for (int64_t oy = 0; oy < s.ho; ++oy)
      for (int64_t ox = 0; ox < s.wo; ++ox)
        for (int ky = 0; ky < 3; ++ky) {
          const int64_t iy = oy * s.stride - 1 + ky;
          if (iy < 0 || iy >= s.h) continue;
          for (int kx = 0; kx < 3; ++kx) {
            const int64_t ix = ox * s.stride - 1 + kx;
            if (ix < 0 || ix >= s.w) continue;
            const Pair pr{oy * s.wo + ox, iy * s.w + ix, ky * 3 + kx};
            by_out[pr.q].push_back(pr);
            by_in[pr.p].push_back(pr);
            by_tap[pr.k].push_back(pr);
          }
        }
  }
};

// Eight channels in a vector register (GCC's vector extension: AVX with the library's
// flags, SSE pairs without), loaded and stored unaligned.
typedef float V8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
// Bytes of A and dD rows the weight gradient takes a block of images at a time for (a
// quarter of a core's L2 here).
constexpr int64_t kBlockBytes = 256 * 1024;
inline V8 Load8(const float* p) {
  V8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void Store8(float* p, V8 v) { __builtin_memcpy(p, &v, sizeof v); }

// Channels [c0, c1) of dst's rows (dst_per rows an image) as sums over tap pairs of src's
// rows (src_per an image) times the taps: row j of an image sums lists[j], the source row of
// a pair its input pixel (kFromIn: the forward, lists by output pixel) or its output pixel
// (the input gradient, lists by input pixel). Each row is summed in registers and written
// once.
template <bool kFromIn>
void GatherTaps(const std::vector<std::vector<TapPairs::Pair>>& lists, int64_t n_img,
                const float* src, int64_t src_per, const float* taps, int64_t ch, int64_t c0,
                int64_t c1, float* dst) {
  const int64_t dst_per = static_cast<int64_t>(lists.size());
  for (int64_t n = 0; n < n_img; ++n)
    for (int64_t j = 0; j < dst_per; ++j) {
      const auto& pairs = lists[j];
      float* o = dst + (n * dst_per + j) * ch;
      const float* sn = src + n * src_per * ch;
      int64_t c = c0;
      for (; c + kLanes <= c1; c += kLanes) {
        V8 acc = {};
        for (const auto& pr : pairs)
          acc += Load8(sn + (kFromIn ? pr.p : pr.q) * ch + c) * Load8(taps + pr.k * ch + c);
        Store8(o + c, acc);
      }
      for (; c < c1; ++c) {
        float acc = 0.f;
        for (const auto& pr : pairs) acc += sn[(kFromIn ? pr.p : pr.q) * ch + c] * taps[pr.k * ch + c];
        o[c] = acc;
      }
    }
}

// Channels [c0, c1) of the depthwise conv: D (m2 rows) from A (m1 rows).
__attribute__((noinline)) void DepthwiseForward(const UnitShape& s, const TapPairs& tp,
                                                const float* A, const float* taps, int64_t c0,
                                                int64_t c1, float* D) {
  GatherTaps<true>(tp.by_out, s.n, A, s.p(), taps, s.ch, c0, c1, D);
}

// Its backward on channels [c0, c1): dA (gathered over the output pixels that read each
// input pixel) and the taps' gradient dtaps (9 rows of ch), each tap's sum in four register
// accumulators over the images (a sum through memory would wait on its own store every
// pixel).
__attribute__((noinline)) void DepthwiseBackward(const UnitShape& s, const TapPairs& tp,
                                                 const float* A, const float* dD,
                                                 const float* taps, int64_t c0, int64_t c1,
                                                 float* dA, float* dtaps) {
  const int64_t ch = s.ch, P = s.p(), Q = s.q();
  GatherTaps<false>(tp.by_in, s.n, dD, Q, taps, ch, c0, c1, dA);
  // the weight gradient: images in blocks that stay in cache across the taps and channel
  // groups (a group's 8 channels are a quarter of each row's cache lines)
  const int64_t len = c1 - c0;
  if (len <= 0) return;
  for (int k = 0; k < 9; ++k) std::fill(dtaps + k * ch + c0, dtaps + k * ch + c1, 0.f);
  const int64_t nb = std::max<int64_t>(1, kBlockBytes / ((P + Q) * ch * int64_t{sizeof(float)}));
  for (int64_t n0 = 0; n0 < s.n; n0 += nb) {
    const int64_t n1 = std::min(s.n, n0 + nb);
    for (int k = 0; k < 9; ++k) {
      const auto& pairs = tp.by_tap[k];
      if (pairs.empty()) continue;
      float* dt = dtaps + k * ch;
      int64_t c = c0;
      for (; c + kLanes <= c1; c += kLanes) {
        V8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4)
          for (const auto& pr : pairs) {
            const float* g = dD + (n * Q + pr.q) * ch + c;
            const float* a = A + (n * P + pr.p) * ch + c;
            a0 += Load8(g) * Load8(a);
            a1 += Load8(g + Q * ch) * Load8(a + P * ch);
            a2 += Load8(g + 2 * Q * ch) * Load8(a + 2 * P * ch);
            a3 += Load8(g + 3 * Q * ch) * Load8(a + 3 * P * ch);
          }
        for (; n < n1; ++n)
          for (const auto& pr : pairs)
            a0 += Load8(dD + (n * Q + pr.q) * ch + c) * Load8(A + (n * P + pr.p) * ch + c);
        Store8(dt + c, Load8(dt + c) + ((a0 + a1) + (a2 + a3)));
      }
      for (; c < c1; ++c) {
        float acc = 0.f;
        for (int64_t n = n0; n < n1; ++n)
          for (const auto& pr : pairs) acc += dD[(n * Q + pr.q) * ch + c] * A[(n * P + pr.p) * ch + c];
        dt[c] += acc;
      }
    }
  }
}

// Channels [c0, c1) of the batch norm backward from g's rows (gated by the saved
// activation when `act` is not null: g where 0 < act < 6): writes dx = gamma invstd / m
// (m g - sum g - xhat sum g xhat) over v's rows into out (may be g), and dgamma, dbeta.
__attribute__((noinline)) void BackwardNorm(const float* g, const float* act, const float* v, int64_t m, int64_t c,
                  int64_t c0, int64_t c1, const float* gamma, const Stats& st, float* out,
                  float* dgamma, float* dbeta) {
  const int64_t len = c1 - c0;
  if (len <= 0) return;
  std::vector<double> sg, sgx;
  std::vector<float> A(c), B(c), C0(c);  // by channel, [c0, c1) set
  const float* __restrict mu = st.mean + c0;
  RowBlockSums(m, len, sg, sgx, [&](int64_t r, float* __restrict pg, float* __restrict pgx) {
    const float* __restrict gr = g + r * c + c0;
    const float* __restrict vr = v + r * c + c0;
    if (act != nullptr) {
      const float* __restrict ar = act + r * c + c0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float gi = (ar[i] > 0.f && ar[i] < 6.f) ? gr[i] : 0.f;
        pg[i] += gi;
        pgx[i] += gi * (vr[i] - mu[i]);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        pg[i] += gr[i];
        pgx[i] += gr[i] * (vr[i] - mu[i]);
      }
    }
  });
  for (int64_t i = 0; i < len; ++i)
    mbv2::FinishGradChannel(c0 + i, sg[i], sgx[i], m, gamma, st.mean, st.invstd, dgamma, dbeta,
                            A.data(), B.data(), C0.data());
  const float *__restrict pa = A.data() + c0, *__restrict pb = B.data() + c0,
                         *__restrict pc = C0.data() + c0;
  for (int64_t r = 0; r < m; ++r) {
    const float* gr = g + r * c + c0;  // may be o itself
    const float* __restrict vr = v + r * c + c0;
    float* o = out + r * c + c0;
    if (act != nullptr) {
      const float* __restrict ar = act + r * c + c0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float gi = (ar[i] > 0.f && ar[i] < 6.f) ? gr[i] : 0.f;
        o[i] = pa[i] * gi + pb[i] * vr[i] + pc[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) o[i] = pa[i] * gr[i] + pb[i] * vr[i] + pc[i];
    }
  }
}

void CheckVector(const paddle::Tensor& t, int64_t c, const char* what) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32 && t.numel() == c,
           "small_unit: ", what, " must be a float32 CPU vector of its layer's channels");
}

paddle::Tensor Contiguous(const paddle::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

float* Mutable(const paddle::Tensor& t) { return const_cast<float*>(t.data<float>()); }

}  // namespace

std::vector<paddle::Tensor> SmallUnitForward(
    const paddle::Tensor& x, const paddle::Tensor& we, const paddle::Tensor& g1,
    const paddle::Tensor& b1, const paddle::Tensor& rm1, const paddle::Tensor& rv1,
    const paddle::Tensor& wd, const paddle::Tensor& g2, const paddle::Tensor& b2,
    const paddle::Tensor& rm2, const paddle::Tensor& rv2, const paddle::Tensor& wp,
    const paddle::Tensor& g3, const paddle::Tensor& b3, const paddle::Tensor& rm3,
    const paddle::Tensor& rv3, int stride, const std::vector<float>& eps,
    const std::vector<float>& momentum) {
  for (auto* t : {&x, &we, &wd, &wp})
    PD_CHECK(t->is_cpu() && t->dtype() == paddle::DataType::FLOAT32,
             "small_unit: x and the weights must be float32 CPU tensors");
  PD_CHECK(eps.size() == 3 && momentum.size() == 3, "small_unit: three epsilons and momentums");
  const UnitShape s = GetShape(x.shape(), we.shape(), wd.shape(), wp.shape(), stride);
  PD_CHECK(s.p() <= kMaxPixels, "small_unit: maps of at most 16 pixels only");
  PD_CHECK(s.m1() > 1 && s.m2() > 1, "small_unit: batch norm needs more than one value a channel");
  for (auto* t : {&g1, &b1, &rm1, &rv1, &g2, &b2, &rm2, &rv2}) CheckVector(*t, s.ch, "a hidden batch norm's vector");
  for (auto* t : {&g3, &b3, &rm3, &rv3}) CheckVector(*t, s.co, "the output batch norm's vector");
  const paddle::Tensor xc = Contiguous(x), wec = Contiguous(we), wdc = Contiguous(wd),
                       wpc = Contiguous(wp);
  auto y = paddle::empty({s.n, s.co, s.ho, s.wo}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto saved = paddle::empty({s.saved()}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  float* sv = saved.data<float>();
  float *E = sv + s.e(), *A = sv + s.a(), *D = sv + s.d(), *B = sv + s.b(), *Q = sv + s.qq();
  const Stats st1(sv + s.stats(0), s.ch), st2(sv + s.stats(1), s.ch), st3(sv + s.stats(2), s.co);
  paddle::Tensor xbuf, ybuf;
  const float* X = xc.data<float>();
  if (s.p() > 1) {
    float* rows = Scratch(xbuf, s.m1() * s.ci);
    mbv2::Repack<true>(X, s.n, s.ci, s.p(), rows);
    X = rows;
  }
  const int m1 = static_cast<int>(s.m1()), m2 = static_cast<int>(s.m2());
  const int ci = static_cast<int>(s.ci), ch = static_cast<int>(s.ch), co = static_cast<int>(s.co);
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, m1, ch, ci, 1.f, X, ci, wec.data<float>(), ci, 0.f,
              E, ch);
  const std::vector<float> taps = Taps(wdc.data<float>(), s.ch);
  const TapPairs tp(s);
#pragma omp parallel
  {
    int64_t c0, c1;
    ChannelRange(s.ch, c0, c1);
    ForwardStats(E, s.m1(), s.ch, c0, c1, g1.data<float>(), b1.data<float>(), Mutable(rm1),
                 Mutable(rv1), eps[0], momentum[0], st1);
    Normalise<true>(E, s.m1(), s.ch, c0, c1, st1, A);
    DepthwiseForward(s, tp, A, taps.data(), c0, c1, D);
    ForwardStats(D, s.m2(), s.ch, c0, c1, g2.data<float>(), b2.data<float>(), Mutable(rm2),
                 Mutable(rv2), eps[1], momentum[1], st2);
    Normalise<true>(D, s.m2(), s.ch, c0, c1, st2, B);
  }
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, m2, co, ch, 1.f, B, ch, wpc.data<float>(), ch, 0.f,
              Q, co);
  float* Y = s.q() > 1 ? Scratch(ybuf, s.m2() * s.co) : y.data<float>();
#pragma omp parallel
  {
    int64_t c0, c1;
    ChannelRange(s.co, c0, c1);
    ForwardStats(Q, s.m2(), s.co, c0, c1, g3.data<float>(), b3.data<float>(), Mutable(rm3),
                 Mutable(rv3), eps[2], momentum[2], st3);
    Normalise<false>(Q, s.m2(), s.co, c0, c1, st3, Y);
  }
  if (s.q() > 1) mbv2::Repack<false>(Y, s.n, s.co, s.q(), y.data<float>());
  return {y, saved};
}

std::vector<paddle::Tensor> SmallUnitBackward(
    const paddle::Tensor& x, const paddle::Tensor& we, const paddle::Tensor& g1,
    const paddle::Tensor& wd, const paddle::Tensor& g2, const paddle::Tensor& wp,
    const paddle::Tensor& g3, const paddle::Tensor& saved, const paddle::Tensor& dy, int stride,
    const std::vector<float>& eps, const std::vector<float>& momentum) {
  const UnitShape s = GetShape(x.shape(), we.shape(), wd.shape(), wp.shape(), stride);
  PD_CHECK(saved.numel() == s.saved(), "small_unit: saved tensor of the wrong size");
  PD_CHECK(dy.is_cpu() && dy.dtype() == paddle::DataType::FLOAT32 && dy.numel() == s.m2() * s.co,
           "small_unit: out_grad must be a float32 CPU tensor of the output's shape");
  const paddle::Tensor xc = Contiguous(x), wec = Contiguous(we), wdc = Contiguous(wd),
                       wpc = Contiguous(wp), dyc = Contiguous(dy);
  const float* sv = saved.data<float>();
  float* svm = const_cast<float*>(sv);
  const float *E = sv + s.e(), *A = sv + s.a(), *D = sv + s.d(), *B = sv + s.b(), *Q = sv + s.qq();
  const Stats st1(svm + s.stats(0), s.ch), st2(svm + s.stats(1), s.ch), st3(svm + s.stats(2), s.co);
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dwe = paddle::empty(we.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dwd = paddle::empty(wd.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dwp = paddle::empty(wp.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  std::vector<paddle::Tensor> dgb;
  for (int64_t c : {s.ch, s.ch, s.ch, s.ch, s.co, s.co})
    dgb.push_back(paddle::empty({c}, paddle::DataType::FLOAT32, paddle::CPUPlace()));
  paddle::Tensor xbuf, dqbuf, dbbuf, dabuf, dxbuf;
  const int m1 = static_cast<int>(s.m1()), m2 = static_cast<int>(s.m2());
  const int ci = static_cast<int>(s.ci), ch = static_cast<int>(s.ch), co = static_cast<int>(s.co);
  // dQ = bn3'(dy), in rows
  float* dQ = Scratch(dqbuf, s.m2() * s.co);
  const float* G = dyc.data<float>();
  if (s.q() > 1) {
    mbv2::Repack<true>(G, s.n, s.co, s.q(), dQ);
    G = dQ;
  }
#pragma omp parallel
  {
    int64_t c0, c1;
    ChannelRange(s.co, c0, c1);
    BackwardNorm(G, nullptr, Q, s.m2(), s.co, c0, c1, g3.data<float>(), st3, dQ,
                 dgb[4].data<float>(), dgb[5].data<float>());
  }
  cblas_sgemm(kRowMajor, kTrans, kNoTrans, co, ch, m2, 1.f, dQ, co, B, ch, 0.f,
              dwp.data<float>(), ch);
  float* dB = Scratch(dbbuf, s.m2() * s.ch);
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m2, ch, co, 1.f, dQ, co, wpc.data<float>(), ch, 0.f,
              dB, ch);
  const std::vector<float> taps = Taps(wdc.data<float>(), s.ch);
  const TapPairs tp(s);
  std::vector<float> dtaps(9 * s.ch, 0.f);
  float* dA = Scratch(dabuf, s.m1() * s.ch);
#pragma omp parallel
  {
    int64_t c0, c1;
    ChannelRange(s.ch, c0, c1);
    // dD = bn2'(dB gated by B), in place
    BackwardNorm(dB, B, D, s.m2(), s.ch, c0, c1, g2.data<float>(), st2, dB,
                 dgb[2].data<float>(), dgb[3].data<float>());
    DepthwiseBackward(s, tp, A, dB, taps.data(), c0, c1, dA, dtaps.data());
    // dE = bn1'(dA gated by A), in place
    BackwardNorm(dA, A, E, s.m1(), s.ch, c0, c1, g1.data<float>(), st1, dA,
                 dgb[0].data<float>(), dgb[1].data<float>());
  }
  float* dwdp = dwd.data<float>();
  for (int64_t c = 0; c < s.ch; ++c)
    for (int k = 0; k < 9; ++k) dwdp[c * 9 + k] = dtaps[k * s.ch + c];
  const float* X = xc.data<float>();
  if (s.p() > 1) {
    float* rows = Scratch(xbuf, s.m1() * s.ci);
    mbv2::Repack<true>(X, s.n, s.ci, s.p(), rows);
    X = rows;
  }
  cblas_sgemm(kRowMajor, kTrans, kNoTrans, ch, ci, m1, 1.f, dA, ch, X, ci, 0.f,
              dwe.data<float>(), ci);
  float* dX = s.p() > 1 ? Scratch(dxbuf, s.m1() * s.ci) : dx.data<float>();
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m1, ci, ch, 1.f, dA, ch, wec.data<float>(), ci, 0.f,
              dX, ci);
  if (s.p() > 1) mbv2::Repack<false>(dX, s.n, s.ci, s.p(), dx.data<float>());
  return {dx, dwe, dgb[0], dgb[1], dwd, dgb[2], dgb[3], dwp, dgb[4], dgb[5]};
}

std::vector<std::vector<int64_t>> SmallUnitInferShape(
    const std::vector<int64_t>& x, const std::vector<int64_t>& we, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>& wd, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>& wp,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, int stride, const std::vector<float>&,
    const std::vector<float>&) {
  const UnitShape s = GetShape(x, we, wd, wp, stride);
  const bool known = s.n >= 0 && s.h >= 0 && s.w >= 0;
  return {{s.n, s.co, s.ho, s.wo}, {known ? s.saved() : -1}};
}

std::vector<paddle::DataType> SmallUnitInferDtype(
    const paddle::DataType& x, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&) {
  return {x, x};
}

PD_BUILD_OP(mbv2_small_unit)
    .Inputs({"X", "ExpandWeight", "Scale1", "Bias1", "Mean1", "Var1", "DwWeight", "Scale2",
             "Bias2", "Mean2", "Var2", "ProjWeight", "Scale3", "Bias3", "Mean3", "Var3"})
    .Outputs({"Y", "Saved"})
    .Attrs({"stride: int", "epsilons: std::vector<float>", "momentums: std::vector<float>"})
    .SetKernelFn(PD_KERNEL(SmallUnitForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SmallUnitInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SmallUnitInferDtype));

PD_BUILD_GRAD_OP(mbv2_small_unit)
    .Inputs({"X", "ExpandWeight", "Scale1", "DwWeight", "Scale2", "ProjWeight", "Scale3",
             "Saved", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("ExpandWeight"), paddle::Grad("Scale1"),
              paddle::Grad("Bias1"), paddle::Grad("DwWeight"), paddle::Grad("Scale2"),
              paddle::Grad("Bias2"), paddle::Grad("ProjWeight"), paddle::Grad("Scale3"),
              paddle::Grad("Bias3")})
    .Attrs({"stride: int", "epsilons: std::vector<float>", "momentums: std::vector<float>"})
    .SetKernelFn(PD_KERNEL(SmallUnitBackward));

#endif  // MBV2_WITH_MKL
