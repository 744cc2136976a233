// What the fused batch norm + ReLU6 -> conv ops (mbv2_bn_relu6_depthwise in
// depthwise_conv.cc, mbv2_bn_relu6_pointwise in pointwise_conv.cc) take from the batch norm
// op (batch_norm_act.cc): its training-mode statistics without the pass that writes y, and
// its backward with the ReLU6 gate recomputed from x. NCHW float32 CPU tensors, planes of
// at least 8 pixels; the batch norm op's arithmetic and threads (its results bit for bit,
// but for sums a caller takes itself).
#pragma once

#include <cstdint>
#include <vector>

#include "paddle/extension.h"
#include "stream_store.h"

namespace mbv2 {

// x's batch statistics (x contiguous), the running statistics updated in place: {saved
// mean, saved 1/sqrt(var + eps), folded [a (C), b (C)]} with relu6(bn(x)) = clamp(x * a +
// b, 0, 6). `op` names the caller in errors. sums: x's sums as the conv that made x took
// them (OutputSums::Finish), so no pass over x is made here; none or not taken: summed here.
std::vector<paddle::Tensor> FusedBatchNormStats(const paddle::Tensor& x,
                                                const paddle::Tensor& scale,
                                                const paddle::Tensor& bias,
                                                const paddle::Tensor& running_mean,
                                                const paddle::Tensor& running_var, float eps,
                                                float momentum, const char* op,
                                                const paddle::optional<paddle::Tensor>& sums);

// The sums of a conv's output that the batch norm after it needs, taken by the conv while
// each block of its output is in cache: per channel c, sum (y - K[c]) and sum (y - K[c])^2
// with K[c] one of the channel's values (a shift against cancellation, as the batch norm
// op takes its first one), float within a block or plane, double across, per thread and
// reduced in thread order (deterministic for a fixed thread count). Finish() gives the
// float64 tensor [sums (C), sums of squares (C), K (C), taken] FusedBatchNormStats takes.
// Taken only for outputs of at least mbv2::StreamThresholdBytes() (half the last-level
// cache): a smaller output is still in cache for the batch norm's own pass. Steps with
// every output's sums taken vs only these (alternated in one process): 32 px, batch 128,
// x1.0 1.005x and x0.5 1.008x slower; 224 px, batch 32, x1.0 0.992x, x0.5 1.002x.
// `taken` 0 tells the batch norm to sum for itself.
class OutputSums {
 public:
  OutputSums(int64_t c, int threads, int64_t output_floats)
      : c_(c),
        taken_(output_floats * static_cast<int64_t>(sizeof(float)) >= StreamThresholdBytes()),
        shift_(c, 0.f),
        part_(taken_ ? static_cast<size_t>(threads) * 2 * c : 0, 0.0) {}
  bool taken() const { return taken_; }
  float* shift() { return shift_.data(); }
  const float* shift() const { return shift_.data(); }
  // thread t's [sums (C), sums of squares (C)]
  double* part(int t) { return part_.data() + static_cast<size_t>(t) * 2 * c_; }
  paddle::Tensor Finish() const {
    auto out = paddle::empty({3 * c_ + 1}, paddle::DataType::FLOAT64, paddle::CPUPlace());
    double* o = out.data<double>();
    for (int64_t i = 0; i < 3 * c_ + 1; ++i) o[i] = 0.0;
    if (!taken_) return out;
    const size_t threads = part_.size() / static_cast<size_t>(2 * c_ > 0 ? 2 * c_ : 1);
    for (size_t t = 0; t < threads; ++t)
      for (int64_t i = 0; i < 2 * c_; ++i) o[i] += part_[t * 2 * c_ + i];
    for (int64_t i = 0; i < c_; ++i) o[2 * c_ + i] = shift_[i];
    o[3 * c_] = 1.0;
    return out;
  }

 private:
  int64_t c_;
  bool taken_;
  std::vector<float> shift_;
  std::vector<double> part_;
};

// s = sum (y[i] - k), q = sum (y[i] - k)^2 over n floats (float sums): four vector
// accumulators a sum (one would wait on its own add latency every 8 values).
inline void ShiftedRowSums(const float* y, int64_t n, float k, float& s, float& q) {
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
  alignas(32) float ls[8], lq[8];
  _mm256_store_ps(ls, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  _mm256_store_ps(lq, _mm256_add_ps(_mm256_add_ps(q0, q1), _mm256_add_ps(q2, q3)));
  for (int l = 0; l < 8; ++l) {
    ss += ls[l];
    qq += lq[l];
  }
#endif
  for (; i < n; ++i) {
    const float v = y[i] - k;
    ss += v;
    qq += v * v;
  }
  s = ss;
  q = qq;
}

// dy, the gradient of relu6(bn(x)) (contiguous, x's shape), turned into x's gradient in
// place, the ReLU6 gate recomputed from x and the folded a, b; returns {dgamma, dbeta}.
// sums: per channel c, sum(g) at [c] and sum(g * (x - mean)) at [C + c], g = dy where the
// gate passes, where the caller summed them while making dy (then one pass over x and dy
// instead of two); nullptr: summed here.
std::vector<paddle::Tensor> FusedBatchNormBackward(const paddle::Tensor& x,
                                                   const paddle::Tensor& scale,
                                                   const paddle::Tensor& mean,
                                                   const paddle::Tensor& invstd,
                                                   const paddle::Tensor& folded,
                                                   paddle::Tensor& dy,
                                                   const double* sums = nullptr);

// The shapes of FusedBatchNormStats' outputs for c channels (-1: unknown).
inline std::vector<std::vector<int64_t>> FusedStatsShapes(int64_t c) {
  return {{c}, {c}, {c < 0 ? -1 : 2 * c}};
}

// The fused ops' output types: {Out, SavedMean, SavedInvStd, Folded}, all x's, then
// OUT_SUMS float64 outputs (the depthwise op's OutSums) (their inputs: X, Scale, Bias,
// RunningMean, RunningVar, Weight and the optional Sums).
template <int OUT_SUMS>
std::vector<paddle::DataType> FusedInferDtype(const paddle::DataType& x_dtype,
                                              const paddle::DataType&, const paddle::DataType&,
                                              const paddle::DataType&, const paddle::DataType&,
                                              const paddle::DataType&,
                                              const paddle::optional<paddle::DataType>&) {
  std::vector<paddle::DataType> out(4, x_dtype);
  out.resize(4 + OUT_SUMS, paddle::DataType::FLOAT64);
  return out;
}

}  // namespace mbv2
