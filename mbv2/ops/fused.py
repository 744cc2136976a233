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

On maps of 28x28 and up the expand conv and the first op run as one
(`mbv2_expand_bn_relu6_depthwise`, `expand_bn_relu6_depthwise`), whose backward never forms
the expand conv's output gradient: the 1x1 backward takes the batch norm backward's terms
apart (see `pointwise_conv.cc`), so the batch norm's dx pass over that map is not made.

Where the depthwise output is 28x28 and up, that op (either one) and the projection's fused
op after it run as one too (`mbv2_bn_relu6_depthwise_pointwise`,
`mbv2_expand_bn_relu6_depthwise_pointwise`; `depthwise_pointwise`,
`expand_depthwise_pointwise`): the projection batch norm's dx is made as the depthwise
backward reads its output gradient (DyFold in batch_norm_act.h) instead of in a pass of
its own over z and g.

On maps of at most 16 pixels (4x4, 2x2, 1x1: the last stages at 32 px) a whole unit, expand ->
batch norm -> ReLU6 -> depthwise -> batch norm -> ReLU6 -> projection -> batch norm, is one
op (`mbv2_small_unit`, `small_unit.cc`; `small_unit_plan`, `small_unit`): six ops and six
grad nodes apart, each mostly dispatch around a few microseconds of arithmetic.

`depthwise_covers(x, bn, conv)` and `pointwise_op(x, bn, conv, bf16)` say where they apply
(training-mode batch statistics on float32 NCHW CPU tensors, planes of 8 pixels and up, a
conv shape the library's own paths take); `CpuKernels.inverted_residual` runs the ops
apart elsewhere (`expand_covers` for the expand op).
"""
from __future__ import annotations

from typing import NamedTuple

import paddle
import paddle.nn as nn

from mbv2.ops import batch_norm as _bn
from mbv2.ops import depthwise as _dw
from mbv2.ops import pointwise as _pw

OP_NAME = "mbv2_bn_relu6_depthwise"
# the expand 1x1 conv and the fused op above as one (pointwise_conv.cc)
EXPAND_OP = "mbv2_expand_bn_relu6_depthwise"
# Where it pays: its backward's extra products (x's Gram matrix, M x) cost C_in / C_out of
# the 1x1 backward's own, and its saving (the batch norm's dx pass over the expanded map,
# gone) is a pass over memory. Backward of a unit's expand + batch norm + depthwise, two
# ops / one, 2 threads, batch 32 (128 at 16x16 and under), medians of alternated rounds:
# 24->144 at 56x56 1.076 (stride 2 1.125), 16->96 at 112x112 stride 2 1.050, 32->192 at
# 28x28 1.079 (stride 2 1.063), 16->96 at 16x16 1.076, 8->48 at 16x16 1.036; 64->384 and
# 96->576 at 14x14 1.003, 1.001; lost on maps in cache and at expansion 1: 24->144 at
# 8x8 0.946, 12->72 at 8x8 0.982, 160->960 at 7x7 0.860, 32->32 at 112x112 0.849. Whole
# training steps (alternated in one process): x1.0 at 224 px 1.013 and 1.041, x0.5 at 224
# px 1.002; with 16x16 maps taken too, 32 px steps moved 0.95-1.03 (the machine's noise
# there): so maps of 28x28 and up, expansion 4 and up.
EXPAND_MIN_RATIO, EXPAND_MIN_PLANE = 4, 28 * 28
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


def _plain_1x1(conv: nn.Conv2D) -> bool:
    """A bias-free 1x1 conv, stride 1, no padding or dilation, NCHW."""
    return (conv._groups == 1 and conv.bias is None and tuple(conv._kernel_size) == (1, 1)
            and tuple(conv._stride) == (1, 1) and tuple(conv._dilation) == (1, 1)
            and _dw._pad4(conv._padding) == [0, 0, 0, 0]
            and getattr(conv, "_data_format", "NCHW") == "NCHW")


def pointwise_op(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D,
                 bf16: bool = False) -> str | None:
    """The fused op that runs `conv(relu6(bn(x)))` for a bias-free 1x1 conv (the float32
    one, or with bf16 its bfloat16 variant where `pointwise_conv2d` would pick that), or
    None where the fused op does not apply."""
    if not _bn._use_op(x, bn) or x.shape[2] * x.shape[3] < MIN_PLANE or not _plain_1x1(conv):
        return None
    return POINTWISE_OPS.get(_pw.block_op(x, conv.weight, bf16))


class _Output(NamedTuple):
    """What the routing checks read of a conv's output, before it exists."""
    shape: list[int]
    dtype: paddle.dtype
    place: paddle.CPUPlace


def expand_covers(x: paddle.Tensor, expand: nn.Conv2D, bn: nn.BatchNorm2D, conv: nn.Conv2D,
                  bf16: bool = False) -> bool:
    """Whether `expand_bn_relu6_depthwise(x, expand, bn, conv)` runs the one op for
    `conv(relu6(bn(expand(x))))`: where the 1x1 conv `expand` runs the float32 per-block op
    (`pointwise.block_op`; its bfloat16 variant keeps the ops apart) and
    `depthwise_covers` holds for its output."""
    if len(x.shape) != 4:
        return False
    n, c, h, w = x.shape
    if expand.weight.shape[0] < EXPAND_MIN_RATIO * c or h * w < EXPAND_MIN_PLANE:
        return False  # first: the cheap test that rules out most units (every one at 32 px)
    if not _plain_1x1(expand) or _pw.block_op(x, expand.weight, bf16) != _pw.OP_NAME:
        return False
    return depthwise_covers(_Output([n, expand.weight.shape[0], h, w], x.dtype, x.place), bn, conv)


def expand_bn_relu6_depthwise(x: paddle.Tensor, expand: nn.Conv2D, bn: nn.BatchNorm2D,
                              conv: nn.Conv2D) -> tuple[paddle.Tensor, paddle.Tensor]:
    """`conv(relu6(bn(expand(x))))` through the one op, only where `expand_covers` says, and
    that output's batch norm sums (as `bn_relu6_depthwise`). The 1x1 conv's output is the
    op's last output, kept for its backward, which makes that output's gradient a block at
    a time where the two ops write it whole and read it back."""
    n, _, h, w = x.shape
    strides, pads = _conv_args(_Output([n, expand.weight.shape[0], h, w], x.dtype, x.place), conv)
    y, scale, bias, mean, var, weight = _inputs(x, bn, conv)
    expand_weight = expand.weight if y is x else expand.weight.detach()
    outs = paddle._C_ops._run_custom_op(EXPAND_OP, y, expand_weight, scale, bias, mean, var, weight,
                                        strides, pads, float(bn._epsilon), float(bn._momentum))
    return outs[0], outs[4].detach()  # no gradient flows through the sums


def bn_relu6_pointwise(x: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D, op: str,
                       sums: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """(`conv(relu6(bn(x)))` through `op`, what `pointwise_op` gave, and its output's batch
    norm sums for `batch_norm.batch_norm_act`); sums: x's, as the fused depthwise op that
    made x took them, else summed here."""
    outs = paddle._C_ops._run_custom_op(op, *_inputs(x, bn, conv), sums, float(bn._epsilon),
                                        float(bn._momentum))
    return outs[0], outs[4].detach()  # no gradient flows through the sums


# The depthwise -> projection pair as one op (pointwise_conv.cc), by the 1x1 op it takes
# the place of: its backward applies the projection batch norm's dx (dz = A gate(z) g +
# B z + C0) as the depthwise backward reads its output gradient, where apart the 1x1 op's
# backward makes dz in place, a pass reading z and g and writing dz before the depthwise
# backward reads it (~17 ms of a x1.0 224 px batch-32 step, 2.9 of them at 32x112x112).
# Where it pays: depthwise outputs of 28x28 and up, whose passes go to memory. One unit,
# forward + backward, batch 32, 2 threads, x1.0 at 224 px, apart / pair (medians of 40
# alternated rounds): 32->32 at 112x112 1.037, 24->144 at 56x56 1.031, 32->192 at 28x28
# 1.044; on maps in cache it lost: 64->384 at 14x14 0.972 and 0.955, 96->576 at 14x14
# stride 2 0.997, 160->960 at 7x7 0.990 (the made-in-registers dz costs the gather more
# than the pass over cached data did).
PAIR_MIN_PLANE = 28 * 28
PAIR_OPS = {"mbv2_bn_relu6_pointwise": "mbv2_bn_relu6_depthwise_pointwise",
            "mbv2_bn_relu6_pointwise_bf16": "mbv2_bn_relu6_depthwise_pointwise_bf16"}
EXPAND_PAIR_OPS = {"mbv2_bn_relu6_pointwise": "mbv2_expand_bn_relu6_depthwise_pointwise",
                   "mbv2_bn_relu6_pointwise_bf16": "mbv2_expand_bn_relu6_depthwise_pointwise_bf16"}


def _depthwise_output(y_shape: list[int], x: paddle.Tensor, conv: nn.Conv2D) -> _Output:
    """What the depthwise `conv` makes of an input of `y_shape` (x's dtype and place)."""
    n, c, h, w = y_shape
    (sh, sw), (pt, pb, pl, pr) = _dw._stride2(conv._stride), _dw._pad4(conv._padding)
    kh, kw = conv._kernel_size
    return _Output([n, c, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1],
                   x.dtype, x.place)


def _pair_op(ops: dict, z: _Output, bn2: nn.BatchNorm2D, conv2: nn.Conv2D, bf16: bool) -> str | None:
    """The pair op of `ops` for a depthwise output like z and the projection after it, or
    None where the ops apart run (maps under PAIR_MIN_PLANE, no fused 1x1 op)."""
    if z.shape[2] * z.shape[3] < PAIR_MIN_PLANE:
        return None
    return ops.get(pointwise_op(z, bn2, conv2, bf16))


def depthwise_pointwise(y: paddle.Tensor, bn: nn.BatchNorm2D, conv: nn.Conv2D,
                        bn2: nn.BatchNorm2D, conv2: nn.Conv2D, sums: paddle.Tensor | None,
                        bf16: bool = False) -> tuple[paddle.Tensor, paddle.Tensor] | None:
    """(`conv2(relu6(bn2(conv(relu6(bn(y))))))`, its batch norm sums) through the pair op
    where `depthwise_covers(y, bn, conv)` holds (the caller's check) and the projection runs
    a fused 1x1 op (`pointwise_op`), else None (the caller runs the two ops)."""
    if y.shape[2] * y.shape[3] < PAIR_MIN_PLANE:
        return None  # first: the cheap test (every unit at 32 px; the output is no larger)
    op = _pair_op(PAIR_OPS, _depthwise_output(y.shape, y, conv), bn2, conv2, bf16)
    if op is None:
        return None
    strides, pads = _conv_args(y, conv)
    outs = paddle._C_ops._run_custom_op(
        op, *_inputs(y, bn, conv), sums, *_inputs(y, bn2, conv2)[1:], strides, pads,
        float(bn._epsilon), float(bn._momentum), float(bn2._epsilon), float(bn2._momentum))
    return outs[0], outs[-1].detach()


def expand_depthwise_pointwise(x: paddle.Tensor, expand: nn.Conv2D, bn: nn.BatchNorm2D,
                               conv: nn.Conv2D, bn2: nn.BatchNorm2D, conv2: nn.Conv2D,
                               bf16: bool = False) -> tuple[paddle.Tensor, paddle.Tensor] | None:
    """(`conv2(relu6(bn2(conv(relu6(bn(expand(x)))))))`, its batch norm sums) through the
    expand pair op where `expand_covers(x, expand, bn, conv)` holds (the caller's check) and
    the projection runs a fused 1x1 op, else None."""
    n, _, h, w = x.shape
    y = _Output([n, expand.weight.shape[0], h, w], x.dtype, x.place)
    op = _pair_op(EXPAND_PAIR_OPS, _depthwise_output(y.shape, x, conv), bn2, conv2, bf16)
    if op is None:
        return None
    strides, pads = _conv_args(y, conv)
    xin, scale, bias, mean, var, weight = _inputs(x, bn, conv)
    expand_weight = expand.weight if xin is x else expand.weight.detach()
    outs = paddle._C_ops._run_custom_op(
        op, xin, expand_weight, scale, bias, mean, var, weight, *_inputs(x, bn2, conv2)[1:],
        strides, pads, float(bn._epsilon), float(bn._momentum), float(bn2._epsilon),
        float(bn2._momentum))
    return outs[0], outs[-1].detach()


SMALL_UNIT_OP = "mbv2_small_unit"
# Maps of at most this many pixels take the one op. Whole training steps at 32 px, batch
# 128, 2 threads, alternated in one process (medians of 8-12 rounds): with the 4x4 units
# taken too (16 against 7) x0.5 1.008, x1.0 1.035; with the 8x8 ones (64 against 16)
# x0.5 0.936 (one 12->72->12 unit at 8x8: 0.55-0.63x the ops apart, whose per-plane
# kernels pay there).
SMALL_UNIT_MAX_PIXELS = 16


def _plain_depthwise(conv: nn.Conv2D) -> bool:
    """A bias-free 3x3 depthwise conv, padding 1, stride 1 or 2 both ways, NCHW."""
    stride = _dw._stride2(conv._stride)
    return (conv._groups == conv._in_channels == conv._out_channels and conv.bias is None
            and tuple(conv._kernel_size) == (3, 3) and tuple(conv._dilation) == (1, 1)
            and _dw._pad4(conv._padding) == [1, 1, 1, 1] and stride in ([1, 1], [2, 2])
            and getattr(conv, "_data_format", "NCHW") == "NCHW")


class SmallUnitPlan(NamedTuple):
    """What the one op needs of a unit's layers that does not change between calls."""
    c_in: int
    stride: int
    convs: tuple  # the expand, depthwise and projection nn.Conv2D
    bns: tuple  # their nn.BatchNorm2D


# Attribute of the expand ConvBNLayer holding ((its unit's three convs), their
# SmallUnitPlan or None), worked out on the first call and again if a conv is replaced:
# the layer checks and the Layer attribute lookups (~1 us each through Layer.__getattr__)
# cost more than the op's own dispatch when they ran every call.
_PLAN_ATTR = "_mbv2_small_unit_plan"


def _unit_plan(expand: nn.Layer, depthwise: nn.Layer, linear: nn.Layer) -> SmallUnitPlan | None:
    e, d, p = expand._conv, depthwise._conv, linear._conv
    cached = expand.__dict__.get(_PLAN_ATTR)
    if cached is not None and cached[0] == (e, d, p):
        return cached[1]
    bns = (expand._batch_norm, depthwise._batch_norm, linear._batch_norm)
    ok = (_plain_1x1(e) and _plain_1x1(p) and _plain_depthwise(d)
          and d._in_channels == e._out_channels and p._in_channels == d._out_channels
          and all(getattr(bn, "_data_format", "NCHW") == "NCHW" and bn.weight is not None
                  and bn.bias is not None for bn in bns))
    plan = SmallUnitPlan(e._in_channels, _dw._stride2(d._stride)[0], (e, d, p), bns) if ok else None
    object.__setattr__(expand, _PLAN_ATTR, ((e, d, p), plan))
    return plan


def small_unit_plan(x: paddle.Tensor, expand: nn.Layer, depthwise: nn.Layer, linear: nn.Layer,
                    bf16: bool = False) -> SmallUnitPlan | None:
    """The plan `small_unit` runs the unit of these three ConvBNLayers on x with, as one
    op, or None: training-mode batch statistics in all three batch norms, float32 NCHW CPU
    input with maps of at most SMALL_UNIT_MAX_PIXELS pixels, the unit's usual conv shapes
    (bias-free 1x1s around a 3x3 depthwise conv, padding 1, stride 1 or 2), and a library
    built with MKL. bf16
    (mixed precision): None where either 1x1 product would run in bfloat16 apart (the op's
    products are float32)."""
    shape = x.shape
    if len(shape) != 4 or shape[2] * shape[3] > SMALL_UNIT_MAX_PIXELS:
        return None  # first: the cheap test that rules out the units on larger maps
    plan = _unit_plan(expand, depthwise, linear)
    if plan is None or shape[1] != plan.c_in or not paddle.in_dynamic_mode():
        return None
    n, _, h, w = shape
    ho, wo = (h - 1) // plan.stride + 1, (w - 1) // plan.stride + 1
    if n * h * w <= 1 or n * ho * wo <= 1:
        return None  # Paddle raises for one value per channel in training; let it
    if any(not bn.training or getattr(bn, "_use_global_stats", None) for bn in plan.bns):
        return None
    if x.dtype != paddle.float32 or not x.place.is_cpu_place():
        return None
    kernel = _dw.load_kernel()
    if kernel is None or not kernel.pointwise:
        return None
    if bf16 and kernel.pointwise_bf16:
        hidden, c_out = plan.convs[1]._in_channels, plan.convs[2]._out_channels
        if (_pw._rows_bf16_pays(plan.c_in, hidden, n * h * w)
                or _pw._rows_bf16_pays(hidden, c_out, n * ho * wo)):
            return None
    return plan


def small_unit(x: paddle.Tensor, plan: SmallUnitPlan) -> paddle.Tensor:
    """linear(depthwise(expand(x))) of an inverted residual unit (ReLU6, ReLU6, linear)
    through the one op, with what `small_unit_plan` gave; the running statistics of the
    three batch norms updated as the layers would."""
    grad = paddle.is_grad_enabled()
    args = [x if grad else x.detach()]
    for conv, bn in zip(plan.convs, plan.bns):
        cp, bp = conv._parameters, bn._parameters  # Layer.__getattr__ bypassed
        trio = (cp["weight"], bp["weight"], bp["bias"])
        args += trio if grad else [t.detach() for t in trio]  # no grad node under no_grad
        args += (bp["_mean"], bp["_variance"])
    bns = plan.bns
    outs = paddle._C_ops._run_custom_op(
        SMALL_UNIT_OP, *args, plan.stride,
        [float(bn._epsilon) for bn in bns], [float(bn._momentum) for bn in bns])
    return outs[0]
