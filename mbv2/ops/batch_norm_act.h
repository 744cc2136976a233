// What the fused batch norm + ReLU6 -> conv ops (mbv2_bn_relu6_depthwise in
// depthwise_conv.cc, mbv2_bn_relu6_pointwise in pointwise_conv.cc) take from the batch norm
// op (batch_norm_act.cc): its training-mode statistics without the pass that writes y, and
// its backward with the ReLU6 gate recomputed from x. NCHW float32 CPU tensors, planes of
// at least 8 pixels; the batch norm op's arithmetic and threads (its results bit for bit,
// but for sums a caller takes itself).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "paddle/extension.h"
#include "work_chunks.h"

namespace mbv2 {

// Channel c's batch statistics from its sums of (x - shift) and (x - shift)^2 over m values:
// saved mean and 1/sqrt(var + eps), the running statistics updated in place as Paddle's
// kernel does (biased variance), and the folded a[c], b[c] with bn(x) = x * a + b.
void FinishStatsChannel(int64_t c, double sum, double sumsq, int64_t m, float shift,
                        const float* gamma, const float* beta, float eps, float momentum,
                        float* saved_mean, float* saved_invstd, float* run_mean, float* run_var,
                        float* a, float* b);

// Channel c's batch norm backward from its sums of g and g * (x - mean) over m values:
// dgamma, dbeta, and the coefficients of dx = A * g + B * x + C0 (g gated) in ca, cb, cc.
void FinishGradChannel(int64_t c, double sum_g, double sum_gx, int64_t m, const float* gamma,
                       const float* mean, const float* invstd, float* dgamma, float* dbeta,
                       float* ca, float* cb, float* cc);

// x's batch statistics (x contiguous), the running statistics updated in place: {saved
// mean, saved 1/sqrt(var + eps), folded [a (C), b (C)]} with relu6(bn(x)) = clamp(x * a +
// b, 0, 6). `op` names the caller in errors. sums: x's sums as the conv that made x took
// them (OutputSums::Finish), so no pass over x is made here; none (or its taken flag 0):
// summed here.
std::vector<paddle::Tensor> FusedBatchNormStats(const paddle::Tensor& x,
                                                const paddle::Tensor& scale,
                                                const paddle::Tensor& bias,
                                                const paddle::Tensor& running_mean,
                                                const paddle::Tensor& running_var, float eps,
                                                float momentum, const char* op,
                                                const paddle::optional<paddle::Tensor>& sums);

// A fused op's batch norm as its conv reads the input: relu6(x * a[c] + b[c]), a and b the
// folded scale and shift (FusedBatchNormStats' third output; a null: no normalisation);
// in the backward the saved mean and, where set, the batch norm backward's sums [sum g
// (C), sum g (x - mean) (C)] the conv takes as it makes g. The depthwise op's LaneNorm and
// the 1x1 op's BlockNorm add their own loops to it.
struct FoldedNorm {
  const float *a = nullptr, *b = nullptr;
  const float* mean = nullptr;
  double* sums = nullptr;
  // one value of channel c as the fused ops normalise it: relu6(v * a[c] + b[c]), or v
  // itself with no normalisation (a null)
  float At(int64_t c, float v) const {
    return a == nullptr ? v : std::min(6.f, std::max(0.f, v * a[c] + b[c]));
  }
};

// The FoldedNorm of c channels from a folded [a (C), b (C)] tensor.
inline FoldedNorm Folded(const paddle::Tensor& folded, int64_t c, const float* mean = nullptr,
                         double* sums = nullptr) {
  const float* a = folded.data<float>();
  return {a, a + c, mean, sums};
}

// The sums of a conv's output that the batch norm after it needs, taken by the conv while
// each block of its output is in cache: per channel c, sum (y - K[c]) and sum (y - K[c])^2
// with K[c] one of the channel's values (a shift against cancellation, as the batch norm
// op takes its first one), float within a block or plane, double across (ChunkSums: the
// conv's loop sizes the rows to its chunks with Chunks(count) and adds chunk k's into
// part(k)). Finish() gives the float64 tensor [sums (C), sums of squares (C), K (C),
// taken = 1] FusedBatchNormStats takes.
// Taken for every output: summing a block the conv just wrote (in L1/L2) costs less than
// the batch norm's own pass over the output, even where that output is still in the last
// level cache. Once taken only from half that cache up (outputs that leave it); on a VM
// reporting a 480 MiB L3 that was none, and taking them all (alternated whole training
// steps, 2 threads) gave x1.0 224 px b32 1.029, x0.5 1.018, 32 px b128 x1.0 1.023, x0.5
// 1.030 (from 4 MB up: 1.028, 1.002, 1.017, 1.009).
// s = sum (y[i] - k), q = sum (y[i] - k)^2 over n floats (float sums; the producers' half
// of OutputSums).
void ShiftedRowSums(const float* y, int64_t n, float k, float& s, float& q);

class OutputSums {
 public:
  explicit OutputSums(int64_t c) : c_(c), shift_(c, 0.f), part_(2 * c, 0) {}
  float* shift() { return shift_.data(); }
  const float* shift() const { return shift_.data(); }
  // K[o] = sum_i w[o][i] x0[i]: the first pixel of y = W x (w row-major, C x n) from that
  // pixel's n input values x0, in the products' order
  void ShiftFromInput(const float* w, const float* x0, int64_t n) {
    for (int64_t o = 0; o < c_; ++o) {
      float acc = 0.f;
      for (int64_t i = 0; i < n; ++i) acc += w[o * n + i] * x0[i];
      shift_[o] = acc;
    }
  }
  // one row of partial sums for each of the loop's `count` chunks, zeroed
  void Chunks(int64_t count) { part_ = ChunkSums(2 * c_, count); }
  // chunk k's [sums (C), sums of squares (C)]
  double* part(int64_t k) { return part_.part(k); }
  // into chunk k's sums: the C rows of a block of y just written (row stride ld, len
  // values each), while they are in cache
  void AddRows(int64_t k, const float* y, int64_t ld, int64_t len) {
    double* p = part(k);
    for (int64_t o = 0; o < c_; ++o) {
      float sum, sumsq;
      ShiftedRowSums(y + o * ld, len, shift_[o], sum, sumsq);
      p[o] += sum;
      p[c_ + o] += sumsq;
    }
  }
  paddle::Tensor Finish() const {
    auto out = paddle::empty({3 * c_ + 1}, paddle::DataType::FLOAT64, paddle::CPUPlace());
    double* o = out.data<double>();
    part_.ReduceInto(o);
    for (int64_t i = 0; i < c_; ++i) o[2 * c_ + i] = shift_[i];
    o[3 * c_] = 1.0;
    return out;
  }

 private:
  int64_t c_;
  std::vector<float> shift_;
  ChunkSums part_;
};

// s = sum g, q = sum g * (x[i] - mu) over n floats, g = dy[i] where 0 < x[i] * a + b < 6
// (the ReLU6 gate recomputed as the batch norm op's backward does, its arithmetic): the
// batch norm backward's sums over a run of one channel's pixels.
void GatedRowSums(const float* x, const float* dy, int64_t n, float a, float b, float mu,
                  float& s, float& q);

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

// FusedBatchNormBackward's per-channel half alone, for a caller that never forms dx (the
// expand -> depthwise op, whose 1x1 backward takes dx's terms apart): from the sums as
// above over m values a channel, {dgamma, dbeta, coefs [A (C), B (C), C0 (C)]} with dx =
// A * g + B * x + C0, g = dy where the gate passes.
std::vector<paddle::Tensor> FusedBatchNormCoefs(const paddle::Tensor& scale,
                                                const paddle::Tensor& mean,
                                                const paddle::Tensor& invstd, const double* sums,
                                                int64_t m);

// The fused batch norm -> depthwise op's forward (depthwise_conv.cc): {Out, SavedMean,
// SavedInvStd, Folded, OutSums}, as its kernel.
std::vector<paddle::Tensor> BnDepthwiseForward(
    const paddle::Tensor& x, const paddle::Tensor& scale, const paddle::Tensor& bias,
    const paddle::Tensor& running_mean, const paddle::Tensor& running_var,
    const paddle::Tensor& weight, const paddle::optional<paddle::Tensor>& sums,
    const std::vector<int>& strides, const std::vector<int>& paddings, float epsilon,
    float momentum);

// Its backward's conv half: {g, the conv's weight gradient}, g the gradient of
// relu6(bn(x)) (the conv's input gradient; gated: the gradient of bn(x), g where the ReLU6
// passes), and in sums the batch norm backward's 2C sums (FusedBatchNormBackward's), taken
// as g is made.
// fold: dy is not the output's gradient itself but what the batch norm -> ReLU6 -> 1x1
// conv after it (the projection) hands back before its batch norm's dx pass (DyFold).
struct DyFold;
std::vector<paddle::Tensor> BnDepthwiseConvBackward(const paddle::Tensor& x,
                                                    const paddle::Tensor& weight,
                                                    const paddle::Tensor& mean,
                                                    const paddle::Tensor& folded,
                                                    const paddle::Tensor& dy,
                                                    const std::vector<int>& strides,
                                                    const std::vector<int>& paddings,
                                                    std::vector<double>& sums,
                                                    bool gated = false,
                                                    const DyFold* fold = nullptr);

// The fused op's whole backward: {dx, dgamma, dbeta, the conv's weight gradient} (the
// conv half, then the batch norm's dx pass in place); fold: as above.
std::vector<paddle::Tensor> BnDepthwiseGrads(
    const paddle::Tensor& x, const paddle::Tensor& scale, const paddle::Tensor& weight,
    const paddle::Tensor& mean, const paddle::Tensor& invstd, const paddle::Tensor& folded,
    const paddle::Tensor& dy, const std::vector<int>& strides, const std::vector<int>& paddings,
    const DyFold* fold = nullptr);

// The fused op's output shapes: {Out, SavedMean, SavedInvStd, Folded, OutSums}.
std::vector<std::vector<int64_t>> BnDepthwiseInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>& w_shape, const paddle::optional<std::vector<int64_t>>&,
    const std::vector<int>& strides, const std::vector<int>& paddings, float, float);

// The conv's output gradient as a depthwise -> projection op's backward has it: dy = A
// gate(z) g + B z + C0 per channel (the projection's batch norm dx: A, B, C0 from
// FusedBatchNormCoefs), g the 1x1 conv's input gradient (of relu6(bn(z))), z the
// depthwise conv's output, gate(z) where the ReLU6 passes (0 < fa z + fb < 6; fa, fb: that
// batch norm's Folded). The depthwise backward applies it where it reads dy, so dy is
// never written: the in-place dx pass over z and g (FusedBatchNormBackward) is not made.
struct DyFold {
  const float* z = nullptr;
  const float *a = nullptr, *b = nullptr, *c0 = nullptr;  // C each
  const float *fa = nullptr, *fb = nullptr;               // C each
};

// The shape of a conv's OutSums (OutputSums::Finish) for c output channels (-1: unknown).
inline std::vector<int64_t> OutSumsShape(int64_t c) { return {c < 0 ? -1 : 3 * c + 1}; }

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
