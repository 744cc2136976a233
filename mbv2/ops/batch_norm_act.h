// What the fused batch norm + ReLU6 -> depthwise conv op (depthwise_conv.cc) takes from
// the batch norm op (batch_norm_act.cc): its training-mode statistics without the pass
// that writes y, and its backward with the ReLU6 gate recomputed from x. NCHW float32,
// planes of at least 8 pixels (hw = H * W); OpenMP threads as the batch norm op's.
#pragma once

#include <cstdint>

namespace mbv2 {

// Batch statistics of x (n x c x hw): saved mean and 1/sqrt(var + eps), the running
// statistics updated in place, and the folded a, b of relu6(bn(x)) = clamp(x * a + b, 0, 6)
// (c floats each), the same values the batch norm op computes.
void BatchNormStats(int64_t n, int64_t c, int64_t hw, const float* x, const float* gamma,
                    const float* beta, float eps, float momentum, float* saved_mean,
                    float* saved_invstd, float* run_mean, float* run_var, float* a, float* b);

// The backward of relu6(bn(x)) from dy, the gradient of its output, with the ReLU6 gate
// recomputed from x, a and b: dx (which may be dy itself), dgamma and dbeta, bit-identical
// to the batch norm op's backward.
void BatchNormRelu6Backward(int64_t n, int64_t c, int64_t hw, const float* x, const float* gamma,
                            const float* a, const float* b, const float* mean,
                            const float* invstd, const float* dy, float* dx, float* dgamma,
                            float* dbeta);

}  // namespace mbv2
