"""1x1 convolution on small feature maps as matrix products.

Paddle's CPU conv2d runs a 1x1 convolution as one small GEMM per image, in a loop; on the
small maps MobileNetV2 reaches at 32 px (and the last stages at 224 px) those GEMMs are too
small to use a second thread or even one well. Two replacements, picked by plane size
(measured here, 2 threads, batch 128, forward + backward, with mbv2's kept heap):

* up to 2x2 (H*W <= 4): the batch folded into the rows, N*H*W x C_in times C_in x C_out,
  one large product: 576->160 at 1x1 0.19 ms (1.93 ms as a batched product), 96->576 at 2x2
  0.51 ms vs 1.56 (and vs 2.2 ms as conv2d before);
* up to 16x16 (H*W <= 256): one batched product, weight [C_out, C_in] broadcast over
  x as [N, C_in, H*W], no transposes: 144->32 at 4x4 0.29 ms vs conv2d 0.69, 96->24 at 8x8
  0.52 vs 0.99, 32->32 at 16x16 1.21 vs 1.84, 16->96 at 16x16 level (2.7);
* larger maps (28x28 to 112x112 at 224 px): expansions, and everything on 28x28, go to
  the `mbv2_pointwise_conv2d` op of `pointwise_conv.cc` (per-block MKL GEMMs, dx and dw
  of a block while it is in cache) where the library was built with Paddle's MKL;
  projections on 56x56 and up, and everything without MKL, stay Paddle's conv2d (which
  beat the batched product there: 32->32 at 112x112, batch 32, 28 ms vs 38).
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F

from mbv2.ops import depthwise as _dw

# largest H*W that goes through the single product with the batch in the rows (2x2)
MAX_PLANE = 4
# largest H*W that goes through the batched product (16x16)
MAX_BATCHED_PLANE = 256


OP_NAME = "mbv2_pointwise_conv2d"


# The op against Paddle's conv2d, forward + backward, batch 32, 2 threads (ms): ahead on
# expansions (16->96 at 112x112 28.4 -> 25.0, 24->144 at 56x56 12.3 -> 11.0) and on 28x28
# maps (32->192 4.8 -> 3.7, 192->32 3.8 -> 2.8, 144->32 2.9 -> 2.7), behind on
# projections from 56x56 up (144->24 at 56x56 9.6 -> 11.0, 96->24 6.8 -> 7.8, 32->16 at
# 112x112 9.8 -> 10.7), which stay conv2d.
OP_MAX_PROJECTION_PLANE = 28 * 28


def _large_map(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    kernel = _dw.load_kernel()
    c_out, c_in = weight.shape[0], weight.shape[1]
    if (kernel is None or not kernel.pointwise or x.dtype != paddle.float32
            or weight.dtype != paddle.float32 or not x.place.is_cpu_place()
            or (c_out < c_in and x.shape[2] * x.shape[3] > OP_MAX_PROJECTION_PLANE)):
        return F.conv2d(x, weight)
    if not paddle.is_grad_enabled() and paddle.in_dynamic_mode():
        # as the depthwise wrapper: no grad node under no_grad
        x, weight = x.detach(), weight.detach()
    return paddle._C_ops._run_custom_op(OP_NAME, x, weight)[0]


def pointwise_conv2d(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    """`F.conv2d(x, weight)` for a 1x1, stride 1, bias-free weight [C_out, C_in, 1, 1]."""
    n, c, h, w = x.shape
    if h * w > MAX_BATCHED_PLANE:
        return _large_map(x, weight)
    c_out = weight.shape[0]
    w2d = weight.reshape([c_out, c])
    if h * w > MAX_PLANE:
        return paddle.matmul(w2d, x.reshape([n, c, h * w])).reshape([n, c_out, h, w])
    if h * w == 1:  # NCHW with 1x1 maps is already [N, C]
        return paddle.matmul(x.reshape([n, c]), w2d, transpose_y=True).reshape([n, c_out, 1, 1])
    rows = x.transpose([0, 2, 3, 1]).reshape([n * h * w, c])
    y = paddle.matmul(rows, w2d, transpose_y=True)
    return y.reshape([n, h, w, c_out]).transpose([0, 3, 1, 2])
