// Training-mode batch norm + optional ReLU6, fused (NCHW, float32, CPU), as a Paddle
// custom operator built into the same library as the depthwise conv.
//
// Paddle's CPU batch_norm and relu6 are single-threaded and run as separate passes over
// the activation; in a MobileNetV2 training step they cost about a third of the time. Here:
//
// Forward (2 reads of x, 1 write of y):
//   1. per-plane (one image, one channel) sums of (x - K) and (x - K)^2, with K the
//      channel's first element as a shift against cancellation, in float SIMD lanes per
//      plane and double across planes;
//   2. per channel: mean, biased variance, invstd = 1/sqrt(var + eps); the running
//      statistics are updated in place exactly as Paddle's CPU kernel does,
//      running = momentum * running + (1 - momentum) * batch (biased variance);
//   3. y = x * a + b with a = gamma * invstd, b = beta - mean * a, clamped to [0, 6] when act.
// Backward (2 reads of x, y, dy, 1 write of dx): dy is masked to the linear region of the
// ReLU6 (0 < y < 6) when act; dbeta = sum(dy), dgamma = sum(dy * xhat),
// dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma), M = N * H * W.
//
// Threads: OpenMP over whole channels for planes of 56x56 and up (a channel's second
// pass then reads what its first left in cache), over the N*C planes in contiguous
// static chunks (memory order) for mid-size planes, or over images with a vector loop
// over channels for planes under 8 pixels; per-thread per-channel partial sums are
// reduced at the end: deterministic for a fixed thread count.
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
#include <vector>

#include "paddle/extension.h"

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

// Per-thread rows of [sum(C), sumsq(C)] doubles, summed into out[0..2C).
void ReducePartials(const std::vector<double>& part, int threads, int64_t c, double* out) {
  std::fill(out, out + 2 * c, 0.0);
  for (int t = 0; t < threads; ++t) {
    const double* p = part.data() + static_cast<size_t>(t) * 2 * c;
    for (int64_t i = 0; i < 2 * c; ++i) out[i] += p[i];
  }
}

// This thread's share [b0, b1) of `total` items (inside a parallel region).
inline void MyRange(int64_t total, int64_t* b0, int64_t* b1) {
  const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
  *b0 = total * t / nt;
  *b1 = total * (t + 1) / nt;
}

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

// Small planes: per-channel sums [s(C), q(C)] in double over the batch. Threads split the
// images and small(n0, n1, s, q) adds images [n0, n1) into the thread's rows; the
// per-thread partials are reduced at the end.
template <class Small>
std::vector<double> SmallChannelSums(const Dims& d, Small small) {
  const int64_t C = d.c;
  const int threads = omp_get_max_threads();
  std::vector<double> part(static_cast<size_t>(threads) * 2 * C, 0.0);
#pragma omp parallel
  {
    double* s = part.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * C;
    int64_t n0, n1;
    MyRange(d.n, &n0, &n1);
    small(n0, n1, s, s + C);
  }
  std::vector<double> tot(2 * C);
  ReducePartials(part, threads, C, tot.data());
  return tot;
}

// Mid-size planes: the same sums with threads splitting the N*C planes in contiguous
// static chunks (memory order); plane(p, c, s, q) gives plane p's two float sums.
template <class Plane>
std::vector<double> PlaneOrderSums(const Dims& d, Plane plane) {
  const int64_t C = d.c, planes = d.n * d.c;
  const int threads = omp_get_max_threads();
  std::vector<double> part(static_cast<size_t>(threads) * 2 * C, 0.0);
#pragma omp parallel
  {
    double* acc = part.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * C;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t c = p % C;
      float s = 0.f, q = 0.f;
      plane(p, c, s, q);
      acc[c] += s;
      acc[C + c] += q;
    }
  }
  std::vector<double> tot(2 * C);
  ReducePartials(part, threads, C, tot.data());
  return tot;
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
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < d.c; ++c) {
    double s = 0.0, q = 0.0;
    for (int64_t n = 0; n < d.n; ++n) {
      float ss = 0.f, qq = 0.f;
      plane(n * d.c + c, c, ss, qq);
      s += ss;
      q += qq;
    }
    apply(c, s, q);
  }
}

inline void ScalePlane(const float* x, int64_t hw, float a, float b, float lo, float hi,
                       float* y) {
#pragma omp simd
  for (int64_t i = 0; i < hw; ++i) y[i] = Clamp(x[i] * a + b, lo, hi);
}

// y = x * a[c] + b[c], clamped to [0, 6] when act: the normalisation, in training (batch
// statistics folded into a, b) and in inference (running statistics).
void ScaleShift(const Dims& d, const float* x, const float* a, const float* b, bool act,
                float* y) {
  const int64_t C = d.c, hw = d.hw, planes = d.n * d.c;
  const float hi = act ? 6.f : INFINITY, lo = act ? 0.f : -INFINITY;
  if (hw < kSmallPlane) {
#pragma omp parallel
    {
      int64_t n0, n1;
      MyRange(d.n, &n0, &n1);
      MBV2_DISPATCH_HW(hw, SmallNormFwd, x, n0, n1, C, a, b, lo, hi, y);
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t c = p % C;
      ScalePlane(x + p * hw, hw, a[c], b[c], lo, hi, y + p * hw);
    }
  }
}

void Forward(const Dims& d, const float* x, const float* gamma, const float* beta, float eps,
             float momentum, bool act, float* y, float* saved_mean, float* saved_invstd,
             float* run_mean, float* run_var) {
  const int64_t C = d.c, hw = d.hw;
  const int64_t m = d.n * d.hw;
  const float hi = act ? 6.f : INFINITY, lo = act ? 0.f : -INFINITY;
  std::vector<float> shift(C), av(C), bv(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = x[c * hw];
  const float* k = shift.data();
  // Channel c's statistics from its sums of (x - K) and (x - K)^2: saved, running, and
  // the folded scale av[c] and shift bv[c].
  auto finish = [&](int64_t c, double sum, double sumsq) {
    const double ms = sum / m;  // mean of (x - K)
    double var = sumsq / m - ms * ms;
    if (var < 0.0) var = 0.0;  // rounding
    // A variance float32 cannot hold (diverged training: the float sums overflowed) is
    // NaN, as in Paddle's kernel, so that the non-finite loss check stops the run instead
    // of the layer quietly outputting beta.
    if (!(var <= FLT_MAX)) var = NAN;
    const double mean = ms + shift[c];
    const double invstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
    saved_mean[c] = static_cast<float>(mean);
    saved_invstd[c] = static_cast<float>(invstd);
    run_mean[c] = momentum * run_mean[c] + (1.f - momentum) * static_cast<float>(mean);
    run_var[c] = momentum * run_var[c] + (1.f - momentum) * static_cast<float>(var);
    av[c] = static_cast<float>(gamma[c] * invstd);
    bv[c] = static_cast<float>(beta[c] - mean * gamma[c] * invstd);
  };
  if (hw < kSmallPlane) {
    const std::vector<double> tot = SmallChannelSums(d, [&](int64_t n0, int64_t n1, double* s,
                                                             double* q) {
      MBV2_DISPATCH_HW(hw, SmallStatsFwd, x, n0, n1, C, k, s, q);
    });
    for (int64_t c = 0; c < C; ++c) finish(c, tot[c], tot[C + c]);
    ScaleShift(d, x, av.data(), bv.data(), act, y);
    return;
  }
  auto plane = [&](int64_t p, int64_t c, float& s, float& q) {
    const float* xp = x + p * hw;
    const float kc = k[c];
    float ss = 0.f, qq = 0.f;
#pragma omp simd reduction(+ : ss, qq)
    for (int64_t i = 0; i < hw; ++i) {
      const float v = xp[i] - kc;
      ss += v;
      qq += v * v;
    }
    s = ss;
    q = qq;
  };
  if (hw < kChannelPassPlane) {
    const std::vector<double> tot = PlaneOrderSums(d, plane);
    for (int64_t c = 0; c < C; ++c) finish(c, tot[c], tot[C + c]);
    ScaleShift(d, x, av.data(), bv.data(), act, y);
    return;
  }
  ByChannel(
      d, plane,
      [&](int64_t c, double sum, double sumsq) {
        finish(c, sum, sumsq);
        for (int64_t n = 0; n < d.n; ++n) {
          const int64_t p = n * C + c;
          ScalePlane(x + p * hw, hw, av[c], bv[c], lo, hi, y + p * hw);
        }
      });
}

template <bool ACT>
void DxPlane(const float* x, const float* y, const float* dy, int64_t hw, float a, float b,
             float c0, float* dx) {
#pragma omp simd
  for (int64_t i = 0; i < hw; ++i) dx[i] = a * Masked<ACT>(dy[i], y[i]) + b * x[i] + c0;
}

template <bool ACT>
void Backward(const Dims& d, const float* x, const float* gamma, const float* y,
              const float* mean, const float* invstd, const float* dy, float* dx,
              float* dgamma, float* dbeta) {
  const int64_t C = d.c, hw = d.hw;
  const int64_t m = d.n * d.hw;
  // dx = A * g + B * x + C0 per channel, from the channel's sums of g and g * (x - mean).
  std::vector<float> ca(C), cb(C), cc(C);
  auto finish = [&](int64_t c, double sum_g, double sum_gx) {
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
  };
  if (hw < kSmallPlane) {
    const std::vector<double> tot = SmallChannelSums(d, [&](int64_t n0, int64_t n1, double* s,
                                                             double* q) {
      MBV2_DISPATCH_HW_ACT(hw, SmallStatsBwd, x, y, dy, n0, n1, C, mean, s, q);
    });
    for (int64_t c = 0; c < C; ++c) finish(c, tot[c], tot[C + c]);
    const float *A = ca.data(), *B = cb.data(), *C0 = cc.data();
#pragma omp parallel
    {
      int64_t n0, n1;
      MyRange(d.n, &n0, &n1);
      MBV2_DISPATCH_HW_ACT(hw, SmallDxBwd, x, y, dy, n0, n1, C, A, B, C0, dx);
    }
    return;
  }
  auto plane = [&](int64_t p, int64_t c, float& s, float& q) {
    const float* xp = x + p * hw;
    const float* yp = y + p * hw;
    const float* gp = dy + p * hw;
    const float mu = mean[c];
    float ss = 0.f, qq = 0.f;
#pragma omp simd reduction(+ : ss, qq)
    for (int64_t i = 0; i < hw; ++i) {
      const float g = Masked<ACT>(gp[i], yp[i]);
      ss += g;
      qq += g * (xp[i] - mu);
    }
    s = ss;
    q = qq;
  };
  if (hw < kChannelPassPlane) {
    const std::vector<double> tot = PlaneOrderSums(d, plane);
    for (int64_t c = 0; c < C; ++c) finish(c, tot[c], tot[C + c]);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < d.n * C; ++p) {
      const int64_t c = p % C, o = p * hw;
      DxPlane<ACT>(x + o, y + o, dy + o, hw, ca[c], cb[c], cc[c], dx + o);
    }
    return;
  }
  ByChannel(
      d, plane,
      [&](int64_t c, double sum_g, double sum_gx) {
        finish(c, sum_g, sum_gx);
        for (int64_t n = 0; n < d.n; ++n) {
          const int64_t o = (n * C + c) * hw;
          DxPlane<ACT>(x + o, y + o, dy + o, hw, ca[c], cb[c], cc[c], dx + o);
        }
      });
}

void CheckChannelVector(const paddle::Tensor& t, int64_t c, const char* name) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32 && t.numel() == c,
           "batch_norm_act: ", name, " must be a float32 CPU vector of C elements");
}

}  // namespace

std::vector<paddle::Tensor> BatchNormActForward(const paddle::Tensor& x,
                                                const paddle::Tensor& scale,
                                                const paddle::Tensor& bias,
                                                const paddle::Tensor& running_mean,
                                                const paddle::Tensor& running_var,
                                                float epsilon, float momentum, bool act) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32,
           "batch_norm_act: x must be a float32 CPU tensor");
  const Dims d = GetDims(x);
  for (auto* t : {&scale, &bias, &running_mean, &running_var})
    CheckChannelVector(*t, d.c, "scale/bias/running stats");
  PD_CHECK(d.n * d.hw > 0, "batch_norm_act: empty batch");
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto mean = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto invstd = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  // Running statistics: updated in place, like Paddle's batch_norm MeanOut/VarianceOut.
  float* rm = const_cast<float*>(running_mean.data<float>());
  float* rv = const_cast<float*>(running_var.data<float>());
  Forward(d, xc.data<float>(), scale.data<float>(), bias.data<float>(), epsilon, momentum, act,
          y.data<float>(), mean.data<float>(), invstd.data<float>(), rm, rv);
  return {y, mean, invstd};
}

std::vector<paddle::Tensor> BatchNormActBackward(const paddle::Tensor& x,
                                                 const paddle::Tensor& scale,
                                                 const paddle::Tensor& y,
                                                 const paddle::Tensor& mean,
                                                 const paddle::Tensor& invstd,
                                                 const paddle::Tensor& dy, float epsilon,
                                                 float momentum, bool act) {
  PD_CHECK(dy.is_cpu() && dy.dtype() == paddle::DataType::FLOAT32,
           "batch_norm_act: out_grad must be a float32 CPU tensor");
  const Dims d = GetDims(x);
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const paddle::Tensor yc = y.is_contiguous() ? y : y.contiguous();
  const paddle::Tensor dyc = dy.is_contiguous() ? dy : dy.contiguous();
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dgamma = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dbeta = paddle::empty({d.c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  (act ? Backward<true> : Backward<false>)(
      d, xc.data<float>(), scale.data<float>(), yc.data<float>(), mean.data<float>(),
      invstd.data<float>(), dyc.data<float>(), dx.data<float>(), dgamma.data<float>(),
      dbeta.data<float>());
  return {dx, dgamma, dbeta};
}

std::vector<std::vector<int64_t>> BatchNormActInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>& scale_shape,
    const std::vector<int64_t>& bias_shape, const std::vector<int64_t>& mean_shape,
    const std::vector<int64_t>& var_shape, float epsilon, float momentum, bool act) {
  return {x_shape, {x_shape[1]}, {x_shape[1]}};
}

std::vector<paddle::DataType> BatchNormActInferDtype(const paddle::DataType& x_dtype,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&) {
  return {x_dtype, x_dtype, x_dtype};
}

PD_BUILD_OP(mbv2_batch_norm_act)
    .Inputs({"X", "Scale", "Bias", "RunningMean", "RunningVar"})
    .Outputs({"Y", "SavedMean", "SavedInvStd"})
    .Attrs({"epsilon: float", "momentum: float", "act: bool"})
    .SetKernelFn(PD_KERNEL(BatchNormActForward))
    .SetInferShapeFn(PD_INFER_SHAPE(BatchNormActInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(BatchNormActInferDtype));

PD_BUILD_GRAD_OP(mbv2_batch_norm_act)
    .Inputs({"X", "Scale", "Y", "SavedMean", "SavedInvStd", paddle::Grad("Y")})
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
