"""1x1 convolution (stride 1, no bias) on CPU, picked by plane size.

Paddle's CPU conv2d runs a 1x1 convolution as one GEMM per image, in a loop, with separate
passes for the input and weight gradients. The paths here (measured on this project's
2-core machine, 2 threads, forward + backward, with mbv2's kept heap):

* up to 2x2 (H*W <= 4): the batch folded into the rows, N*H*W x C_in times C_in x C_out,
  one large product: 576->160 at 1x1 0.19 ms (1.93 ms as a batched product), 96->576 at 2x2
  0.51 ms vs 1.56 (and vs 2.2 ms as conv2d), batch 128; 192->64 at 2x2 0.20 ms against
  0.39 ms through the op below. Where the op library is built, its `mbv2_pointwise_rows`
  op packs the rows itself (the transposes and reshapes around Paddle's matmul were 4 ops
  each way: the eleven <= 2x2 layers of x1.0 at 32 px, batch 128, forward + backward
  with a sum, 9.3 -> 7.6 ms against 6.6 for the bare products on packed rows);
* larger maps, where the library was built with Paddle's MKL: the `mbv2_pointwise_conv2d`
  op of `pointwise_conv.cc` (per-block MKL GEMMs, a block's dx and dw while it is in
  cache). Against the batched product of the next item: 16->96 at 16x16 (batch 128) 3.15
  -> 1.94 ms, 96->24 at 8x8 0.55 -> 0.37, 144->32 at 4x4 0.32 -> 0.23, 64->384 at 14x14
  (batch 32) 3.87 -> 2.73, 320->1280 at 7x7 12.1 -> 11.2; against conv2d (batch 32): 16->96
  at 112x112 28.4 -> 25.0, 24->144 at 56x56 12.3 -> 11.0, 192->32 at 28x28 3.8 -> 2.8.
  Projections (C_out < C_in) on maps over 28x28 go through the op where the CPU has
  AVX-512, where the op's weight gradient is its own dot-product kernel (fwd + bwd
  against conv2d: 32->16 at 112x112 13.6 -> 11.7 ms, 96->24 at 56x56 8.1 -> 6.8, 144->24
  at 56x56 10.7 -> 9.3, each with a multiply and sum for the upstream gradient); elsewhere
  conv2d, which beat the op's MKL products there (144->24 at 56x56 9.6 -> 11.0, 32->16 at
  112x112 9.8 -> 10.7);
* without the op, up to 16x16 (H*W <= 256): one batched product, weight [C_out, C_in]
  broadcast over x as [N, C_in, H*W], no transposes (144->32 at 4x4 0.29 ms vs conv2d 0.69,
  96->24 at 8x8 0.52 vs 0.99, batch 128), and Paddle's conv2d on larger maps (which beat
  the batched product there: 32->32 at 112x112, batch 32, 28 ms vs 38).
"""
from __future__ import annotations

import functools
import math

import paddle
import paddle.nn.functional as F

from mbv2.ops import depthwise as _dw
from mbv2.runtime import cpu_flags

# largest H*W that goes through the single product with the batch in the rows (2x2)
MAX_PLANE = 4
# largest H*W that goes through the batched product when the op is unavailable (16x16)
MAX_BATCHED_PLANE = 256
# largest H*W on which a projection (C_out < C_in) goes through the op (28x28) on CPUs
# without AVX-512F (with it, the op's weight-gradient kernel takes every plane size)
OP_MAX_PROJECTION_PLANE = 28 * 28


@functools.cache
def _projection_plane_limit() -> float:
    # the flag the op checks (HasAvx512 in pointwise_conv.cc) before its own kernel runs
    return math.inf if "avx512f" in cpu_flags() else OP_MAX_PROJECTION_PLANE


OP_NAME = "mbv2_pointwise_conv2d"
ROWS_OP_NAME = "mbv2_pointwise_rows"
BF16_OP_NAME = "mbv2_pointwise_conv2d_bf16"
# The bfloat16 variant where its products are large enough to beat its per-call costs (the
# blocks rounded to bfloat16, oneDNN packing them): maps from 7x7 to 28x28, at least 32
# channels on either side and 1.5M multiply-adds in a block's product. Forward + backward,
# 2 threads, fp32 -> bf16 ms (best of 3 x 10): 160->960 at 7x7 (batch 32) 4.39 -> 3.18,
# 576->96 at 7x7 (batch 64) 3.52 -> 2.48, 64->384 at 14x14 (32) 2.66 -> 2.37, 48->288 at
# 14x14 1.49 -> 1.10, 32->192 at 28x28 3.82 -> 3.28; left in float32: 32->192 at 14x14
# 0.79 vs 0.82 (1.2M multiply-adds a block), 64->384 at 7x7 1.58 vs 1.49, 4x4 maps (960->
# 160, batch 64, 3.12 vs 3.05), 16->96 at 28x28 1.18 vs 1.21, 24->144 at 56x56 (batch 4)
# 1.01 vs 1.15, and so every layer of a 32 px input.
BF16_MIN_PLANE, BF16_MAX_PLANE = 7 * 7, 28 * 28
BF16_MIN_CHANNELS = 32
BF16_MIN_BLOCK_MACS = 1_500_000


# The rows op's bfloat16 variant (maps up to 2x2: one product over the whole batch) from 3M
# multiply-adds in that product, at least 32 channels a side. Forward + backward, 2 threads,
# fp32 -> bf16 ms: batch 128, 320->1280 at 1x1 0.72 -> 0.45, 96->576 at 2x2 0.49 -> 0.35,
# 64->384 at 2x2 0.28 -> 0.21; batch 64, 48->288 at 2x2 (3.5M) 0.104 -> 0.094; left in
# float32: 288->80 at 1x1 (1.5M) 0.052 vs 0.051, 96->24 at 2x2 0.073 vs 0.077.
ROWS_BF16_OP_NAME = "mbv2_pointwise_rows_bf16"
ROWS_BF16_MIN_MACS = 10_000_000


def _bf16_pays(c_in: int, c_out: int, plane: int) -> bool:
    return (BF16_MIN_PLANE <= plane <= BF16_MAX_PLANE and min(c_in, c_out) >= BF16_MIN_CHANNELS
            and c_in * c_out * min(plane, 1024) >= BF16_MIN_BLOCK_MACS)


def _rows_bf16_pays(c_in: int, c_out: int, rows: int) -> bool:
    return min(c_in, c_out) >= BF16_MIN_CHANNELS and rows * c_in * c_out >= ROWS_BF16_MIN_MACS


def _use_op(x: paddle.Tensor, weight: paddle.Tensor) -> bool:
    c_out, c_in = weight.shape[0], weight.shape[1]
    if c_out < c_in and x.shape[2] * x.shape[3] > _projection_plane_limit():
        return False
    if x.dtype != paddle.float32 or weight.dtype != paddle.float32 or not x.place.is_cpu_place():
        return False
    kernel = _dw.load_kernel()
    return kernel is not None and kernel.pointwise


def _outs(x: paddle.Tensor, weight: paddle.Tensor, name: str, *attrs) -> list[paddle.Tensor]:
    if not paddle.is_grad_enabled() and paddle.in_dynamic_mode():
        # as the depthwise wrapper: no grad node under no_grad
        x, weight = x.detach(), weight.detach()
    return paddle._C_ops._run_custom_op(name, x, weight, *attrs)


def _op(x: paddle.Tensor, weight: paddle.Tensor, name: str = OP_NAME, *attrs) -> paddle.Tensor:
    return _outs(x, weight, name, *attrs)[0]


def block_op(x: paddle.Tensor, weight: paddle.Tensor, bf16: bool = False) -> str | None:
    """The per-block op (OP_NAME or its bfloat16 variant) that `pointwise_conv2d` runs for
    this map over 2x2, or None where it runs something else."""
    c, h, w = x.shape[1:]
    if h * w <= MAX_PLANE or not _use_op(x, weight):
        return None
    if bf16 and _bf16_pays(c, weight.shape[0], h * w) and _dw.load_kernel().pointwise_bf16:
        return BF16_OP_NAME
    return OP_NAME


# the per-block ops' variants that also give their output's batch norm sums (OutputSums in
# batch_norm_act.h), for the fused batch norm op after them (`mbv2.ops.fused`)
SUMS_OPS = {OP_NAME: "mbv2_pointwise_conv2d_sums", BF16_OP_NAME: "mbv2_pointwise_conv2d_bf16_sums"}


def pointwise_conv2d_sums(x: paddle.Tensor, weight: paddle.Tensor,
                          bf16: bool = False) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """`pointwise_conv2d(x, weight, bf16)` and, where that runs a per-block op, its output's
    batch norm sums (float64 [3 C_out + 1], no gradient; OutputSums in batch_norm_act.h)
    taken by the op as it writes each block, in cache: the batch norm op after it (fused
    or `batch_norm.batch_norm_act`) then makes no statistics pass over it."""
    op = block_op(x, weight, bf16)
    if op is None:
        return pointwise_conv2d(x, weight, bf16), None
    y, sums = _outs(x, weight, SUMS_OPS[op])
    # no gradient flows through the sums: detached, so that no grad node waits on them
    return y, sums.detach()


def pointwise_conv2d(x: paddle.Tensor, weight: paddle.Tensor, bf16: bool = False) -> paddle.Tensor:
    """`F.conv2d(x, weight)` for a 1x1, stride 1, bias-free weight [C_out, C_in, 1, 1].
    bf16: the op's products from bfloat16 copies of x, weight and the gradients (float32
    accumulation and outputs) on the layers where that is faster (trainer.amp on CPU)."""
    n, c, h, w = x.shape
    c_out = weight.shape[0]
    if h * w > MAX_PLANE:
        op = block_op(x, weight, bf16)
        if op is not None:
            return _op(x, weight, op)
        if h * w > MAX_BATCHED_PLANE:
            return F.conv2d(x, weight)
        w2d = weight.reshape([c_out, c])
        return paddle.matmul(w2d, x.reshape([n, c, h * w])).reshape([n, c_out, h, w])
    if _use_op(x, weight):  # the batch in the rows, packed inside the op
        if bf16 and _rows_bf16_pays(c, c_out, n * h * w) and _dw.load_kernel().pointwise_bf16:
            return _op(x, weight, ROWS_BF16_OP_NAME)
        return _op(x, weight, ROWS_OP_NAME)
    w2d = weight.reshape([c_out, c])
    if h * w == 1:  # NCHW with 1x1 maps is already [N, C]
        return paddle.matmul(x.reshape([n, c]), w2d, transpose_y=True).reshape([n, c_out, 1, 1])
    rows = x.transpose([0, 2, 3, 1]).reshape([n * h * w, c])
    y = paddle.matmul(rows, w2d, transpose_y=True)
    return y.reshape([n, h, w, c_out]).transpose([0, 3, 1, 2])


# Dense convolutions with at most this many input channels (the network's stem, 3 -> 32,
# 3x3) go through the stem op (im2col a block at a time inside the op, the weight's
# gradient only) when the input needs no gradient, as the images never do, and through
# im2col (Paddle's unfold) and the 1x1 op when it does. Against conv2d, forward + weight
# gradient, batch 128 at 32 px: 2.26 -> 1.38 ms through unfold; batch 32 at 224 px
# 26.9 -> 22.1 ms through unfold.
STEM_MAX_IN_CHANNELS = 4
STEM_OP_NAME = "mbv2_stem_conv2d"
STEM_SUMS_OP_NAME = "mbv2_stem_conv2d_sums"


def _stem_route(x: paddle.Tensor, conv) -> str:
    """How `stem_conv2d` runs `conv(x)`: "op" (the stem op), "unfold" (the 1x1 op over
    the unfolded input) or "native" (`conv(x)`)."""
    k, stride, pad = tuple(conv._kernel_size), tuple(conv._stride), conv._padding
    if (conv.bias is not None or conv._groups != 1
            or conv.weight.shape[1] > STEM_MAX_IN_CHANNELS
            or not isinstance(pad, int) or tuple(conv._dilation) != (1, 1)
            or getattr(conv, "_data_format", "NCHW") != "NCHW"
            or not _use_op(x, conv.weight)):
        return "native"
    return "op" if x.stop_gradient and k[0] == k[1] and stride[0] == stride[1] else "unfold"


def stem_conv2d_sums(x: paddle.Tensor, conv) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """`stem_conv2d(x, conv)` and, where the stem op runs it, its output's batch norm sums
    (as `pointwise_conv2d_sums`), taken as the op writes each block."""
    if _stem_route(x, conv) != "op":
        return stem_conv2d(x, conv), None
    y, sums = _outs(x, conv.weight, STEM_SUMS_OP_NAME, int(conv._stride[0]), int(conv._padding))
    return y, sums.detach()


def stem_conv2d(x: paddle.Tensor, conv) -> paddle.Tensor:
    """`conv(x)` for a bias-free, ungrouped `nn.Conv2D` with few input channels (the
    stem): through the stem op or the 1x1 op over the unfolded input where they apply,
    else `conv(x)`."""
    route = _stem_route(x, conv)
    if route == "native":
        return conv(x)
    k, stride, pad = tuple(conv._kernel_size), tuple(conv._stride), conv._padding
    c_out, c_in = conv.weight.shape[0], conv.weight.shape[1]
    if route == "op":
        return _op(x, conv.weight, STEM_OP_NAME, int(stride[0]), int(pad))
    n, _, h, w = x.shape
    ho = (h + 2 * pad - k[0]) // stride[0] + 1
    wo = (w + 2 * pad - k[1]) // stride[1] + 1
    cols = F.unfold(x, list(k), strides=list(stride), paddings=pad)  # [N, C_in*kh*kw, L]
    kk = c_in * k[0] * k[1]
    return _op(cols.reshape([n, kk, ho, wo]), conv.weight.reshape([c_out, kk, 1, 1]))
