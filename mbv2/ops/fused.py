"""relu6(batch_norm(x)) folded into the depthwise conv that reads it, in training on CPU:
the `mbv2_bn_relu6_depthwise` op (`depthwise_conv.cc`, built into the depthwise conv's
library by `depthwise.load_kernel`).

In an inverted residual unit the expand 1x1 conv's batch norm + ReLU6 feeds the 3x3
depthwise conv; its output is the network's widest activation (6x the unit's channels, at
the unit's input resolution). The op runs the batch norm's statistics pass, then the
depthwise conv with the normalisation applied to each input plane while it is in cache,
so that activation is never written, read back, or kept for the backward (which
recomputes it the same way). Outputs, gradients and running statistics are bit-identical
to `batch_norm_act` followed by `depthwise_conv2d`.

`covers(x, bn, conv)` says where the op applies (training-mode batch statistics on float32
NCHW CPU tensors, a 3x3 depthwise conv that the op library's channel-lane path takes,
planes of 8 pixels and up); `CpuKernels.expand_depthwise` runs the two ops elsewhere.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from mbv2.ops import batch_norm as _bn
from mbv2.ops import depthwise as _dw

OP_NAME = "mbv2_bn_relu6_depthwise"
# the op library's channel-lane path by shape (UseCL in depthwise_conv.cc): a full group of
# channel lanes, or rows up to 32 wide, or stride 2
LANES, CL_MAX_WIDTH = 8, 32
# planes under 8 pixels (2x2, 1x1) take other paths in both ops
MIN_PLANE = 8


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


def covers(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D) -> bool:
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


def bn_relu6_depthwise(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D) -> paddle.Tensor:
    """`conv(relu6(bn(x)))` through the fused op; only where `covers(x, bn, conv)`."""
    strides, pads = _conv_args(x, conv)
    weight, scale, bias = conv.weight, bn.weight, bn.bias
    if not paddle.is_grad_enabled() and paddle.in_dynamic_mode():
        # as the other wrappers: no grad node under no_grad
        x, weight, scale, bias = x.detach(), weight.detach(), scale.detach(), bias.detach()
    outs = paddle._C_ops._run_custom_op(OP_NAME, x, scale, bias, bn._mean, bn._variance, weight,
                                        strides, pads, float(bn._epsilon), float(bn._momentum))
    return outs[0]
