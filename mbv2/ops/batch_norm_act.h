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

namespace mbv2 {

// x's batch statistics (x contiguous), the running statistics updated in place: {saved
// mean, saved 1/sqrt(var + eps), folded [a (C), b (C)]} with relu6(bn(x)) = clamp(x * a +
// b, 0, 6). `op` names the caller in errors.
std::vector<paddle::Tensor> FusedBatchNormStats(const paddle::Tensor& x,
                                                const paddle::Tensor& scale,
                                                const paddle::Tensor& bias,
                                                const paddle::Tensor& running_mean,
                                                const paddle::Tensor& running_var, float eps,
                                                float momentum, const char* op);

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

// The fused ops' output types: {Out, SavedMean, SavedInvStd, Folded}, all x's.
inline std::vector<paddle::DataType> FusedInferDtype(const paddle::DataType& x_dtype,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&,
                                                     const paddle::DataType&) {
  return {x_dtype, x_dtype, x_dtype, x_dtype};
}

}  // namespace mbv2
