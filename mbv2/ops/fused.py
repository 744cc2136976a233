"""relu6(batch_norm(x)) folded into the conv that reads it, in training on CPU: the
`mbv2_bn_relu6_depthwise` op (`depthwise_conv.cc`) and the `mbv2_bn_relu6_pointwise` op
(`pointwise_conv.cc`, and its bfloat16 variant), built into the depthwise conv's library
by `depthwise.load_kernel`.

An inverted residual unit has two: the expand 1x1 conv's batch norm + ReLU6 feeds the 3x3
depthwise conv (the network's widest activation, 6x the unit's channels at its input
resolution), and the depthwise conv's feeds the projection 1x1 conv. Each op runs the
batch norm's statistics pass, then the conv with the normalisation applied to each input
plane or block while it is in cache, so the batch norm's output is never written, read
back, or kept for the backward (which recomputes it the same way, and takes the batch norm
backward's sums while the conv's input gradient is in cache: one pass over x and that
gradient instead of two). They compute what `batch_norm_act` followed by
`depthwise_conv2d` or `pointwise_conv2d` computes, summed in other orders (float rounding;
the running statistics and the depthwise op's output and weight gradient bit for bit).

`depthwise_covers(x, bn, conv)` and `pointwise_op(x, bn, conv, bf16)` say where they apply
(training-mode batch statistics on float32 NCHW CPU tensors, planes of 8 pixels and up, a
conv shape the library's own paths take); `CpuKernels.inverted_residual` runs the ops
apart elsewhere.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from mbv2.ops import batch_norm as _bn
from mbv2.ops import depthwise as _dw
from mbv2.ops import pointwise as _pw

OP_NAME = "mbv2_bn_relu6_depthwise"
POINTWISE_OPS = {_pw.OP_NAME: "mbv2_bn_relu6_pointwise",
                 _pw.BF16_OP_NAME: "mbv2_bn_relu6_pointwise_bf16"}
# the op library's channel-lane path by shape (UseCL in depthwise_conv.cc): a full group of
# channel lanes, or rows up to 32 wide, or stride 2
LANES, CL_MAX_WIDTH = 8, 32
# planes under 8 pixels (2x2, 1x1) take other paths in both ops
MIN_PLANE = 8


def batch_stats(bn: nn.BatchNorm2D) -> bool:
    """Whether `bn` normalises with batch statistics now (training): the fused ops' mode."""
    return _bn._batch_stats(bn)


def _conv_args(x: paddle.Tensor, conv: nn.Conv2D) -> tuple[list[int], list[int]] | None:
    c = x.shape[1]
    if not (conv._groups == c == conv._in_channels == conv._out_channels) or conv.bias is not None:
        return None
    if tuple(conv._dilation) != (1, 1) or getattr(conv, "_data_format", "NCHW") != "NCHW":
        return None
    strides, pads = _dw._stride2(conv._stride), _dw._pad4(conv._padding)
    if not _dw._use_kernel(x, conv.weight, strides, pads):
        return None
    return strides, pads


def depthwise_covers(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D) -> bool:
    """Whether `bn_relu6_depthwise(x, bn, conv)` runs the fused op (else the caller runs
    the batch norm and the conv apart)."""
    if not _bn._use_op(x, bn):
        return False
    args = _conv_args(x, conv)
    if args is None:
        return False
    strides = args[0]
    _, c, h, w = x.shape
    if h * w < MIN_PLANE:
        return False
    if not (c >= LANES or w <= CL_MAX_WIDTH or strides == [2, 2]):
        return False
    return _dw.load_kernel() is not None


def _inputs(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D) -> tuple:
    """The fused ops' tensor inputs: X, Scale, Bias, RunningMean, RunningVar, Weight."""
    weight, scale, bias = conv.weight, bn.weight, bn.bias
    if not paddle.is_grad_enabled() and paddle.in_dynamic_mode():
        # as the other wrappers: no grad node under no_grad
        x, weight, scale, bias = x.detach(), weight.detach(), scale.detach(), bias.detach()
    return x, scale, bias, bn._mean, bn._variance, weight


def bn_relu6_depthwise(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D,
                       sums: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """`conv(relu6(bn(x)))` through the fused op, only where `depthwise_covers(x, bn, conv)`,
    and the batch norm sums of that output (for a fused 1x1 op after it). sums: x's, as the
    conv that made x took them (`pointwise_conv2d_sums`), else summed here."""
    strides, pads = _conv_args(x, conv)
    outs = paddle._C_ops._run_custom_op(OP_NAME, *_inputs(x, bn, conv), sums, strides, pads,
                                        float(bn._epsilon), float(bn._momentum))
    return outs[0], outs[4].detach()  # no gradient flows through the sums


def pointwise_op(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D,
                 bf16: bool = False) -> str | None:
    """The fused op that runs `conv(relu6(bn(x)))` for a bias-free 1x1 conv (the float32
    one, or with bf16 its bfloat16 variant where `pointwise_conv2d` would pick that), or
    None where the fused op does not apply."""
    if not _bn._use_op(x, bn) or x.shape[2] * x.shape[3] < MIN_PLANE:
        return None
    if (conv._groups != 1 or conv.bias is not None or tuple(conv._kernel_size) != (1, 1)
            or tuple(conv._stride) != (1, 1) or tuple(conv._dilation) != (1, 1)
            or _dw._pad4(conv._padding) != [0, 0, 0, 0]
            or getattr(conv, "_data_format", "NCHW") != "NCHW"):
        return None
    return POINTWISE_OPS.get(_pw.block_op(x, conv.weight, bf16))


def bn_relu6_pointwise(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D, op: str,
                       sums: paddle.Tensor | None = None) -> paddle.Tensor:
    """`conv(relu6(bn(x)))` through `op`, what `pointwise_op` gave; sums: x's, as the fused
    depthwise op that made x took them, else summed here."""
    outs = paddle._C_ops._run_custom_op(op, *_inputs(x, bn, conv), sums, float(bn._epsilon),
                                        float(bn._momentum))
    return outs[0]
