"""CPU kernels for MobileNetV2's conv + batch-norm layers, behind one switch.

A `ConvBNLayer` runs conv -> batch norm -> ReLU6 through an `Ops` object:

* `PADDLE_OPS`: Paddle's own conv2d, batch_norm and relu6 - the reference every kernel is
  tested against, and what GPUs, exported models and MAC counting use;
* `CPU_KERNELS`: mbv2's JIT-built C++ ops (`depthwise`: 3x3 depthwise conv, `batch_norm`:
  fused batch norm + ReLU6 in training and eval), 1x1 convs on small maps as one matrix
  product and on large ones as per-block MKL GEMMs (`pointwise`), and the global average
  pool as a mean over the flattened plane. In training, an inverted residual unit's two
  batch norm + ReLU6 outputs, and the stem's, are folded into the convs that read them
  (`fused`: those activations are never written), and on maps of 28x28 and up the expand
  conv joins the depthwise one (`fused.expand_bn_relu6_depthwise`: its output's gradient
  is never formed); on maps of 16 pixels and under (4x4 to 1x1) the whole unit is one op
  (`fused.small_unit`). Each wrapper sends a shape it does not cover to Paddle's op.
  `CPU_KERNELS_BF16`: the same with the 1x1 products in bfloat16 (`trainer.amp` on CPU,
  `mixed_precision`).

The network holds the switch (`MobileNetV2.use_cpu_kernels(on)`, `reference_ops()`);
`select_ops(mode, device)` turns the `model.cpu_kernels` setting into an `Ops`.
"""
from __future__ import annotations

import logging
import warnings

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from mbv2.ops import fused
from mbv2.ops.batch_norm import batch_norm_act
from mbv2.ops.depthwise import depthwise_conv2d, load_kernel
from mbv2.ops.pointwise import (pointwise_conv2d, pointwise_conv2d_sums, stem_conv2d,
                                 stem_conv2d_sums)
from mbv2.runtime import has_bf16

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


class Ops:
    """Paddle's own ops: conv2d, batch_norm, relu6."""

    name = "paddle"

    def conv_bn(self, conv: nn.Conv2D, bn: nn.BatchNorm2D, x, act: bool):
        y = bn(conv(x))
        return F.relu6(y) if act else y

    def inverted_residual(self, expand: nn.Layer, depthwise: nn.Layer, linear: nn.Layer, x):
        """An inverted residual unit's three ConvBNLayers (ReLU6, ReLU6, linear), before
        its shortcut."""
        return linear(depthwise(expand(x, if_act=True), if_act=True), if_act=False)

    def stem_block(self, stem: nn.Layer, block: nn.Layer, x):
        """`block(stem(x))`: the network's stem ConvBNLayer (ReLU6) and its first
        bottleneck row (InvresiBlocks)."""
        return block(stem(x, if_act=True))

    def global_avg_pool(self, pool: nn.AdaptiveAvgPool2D, x):
        """`pool(x)` for the network's AdaptiveAvgPool2D(1)."""
        return pool(x)


class CpuKernels(Ops):
    """mbv2's CPU kernels; the wrappers fall back to Paddle's ops for what they do not cover.
    bf16: the 1x1 convs with products large enough to gain multiply bfloat16 copies of
    their operands (`pointwise` picks them; mixed precision on CPU: `mixed_precision`)."""

    def __init__(self, bf16: bool = False):
        self.bf16 = bf16
        self.name = "cpu_kernels_bf16" if bf16 else "cpu_kernels"

    def conv(self, conv: nn.Conv2D, x):
        """`conv(x)` for the network's bias-free convs, through the kernels."""
        if _is_depthwise(conv):
            return depthwise_conv2d(x, conv.weight, conv._stride[0], conv._padding)
        if _is_pointwise(conv):
            return pointwise_conv2d(x, conv.weight, bf16=self.bf16)
        return stem_conv2d(x, conv)

    def conv_sums(self, conv: nn.Conv2D, x, bn: nn.BatchNorm2D):
        """(`self.conv(conv, x)`, its output's sums for `bn` or None): a 1x1 conv's per-block
        op and the stem op take them as they write their output (`pointwise_conv2d_sums`,
        `stem_conv2d_sums`) where `bn` normalises with batch statistics (training)."""
        if not fused.batch_stats(bn) or _is_depthwise(conv):
            return self.conv(conv, x), None
        if _is_pointwise(conv):
            return pointwise_conv2d_sums(x, conv.weight, bf16=self.bf16)
        return stem_conv2d_sums(x, conv)

    def conv_bn(self, conv: nn.Conv2D, bn: nn.BatchNorm2D, x, act: bool):
        y, sums = self.conv_sums(conv, x, bn)
        return batch_norm_act(y, bn, act, sums)

    def inverted_residual(self, expand: nn.Layer, depthwise: nn.Layer, linear: nn.Layer, x):
        """As Ops', with each ReLU6 batch norm folded into the conv after it where a fused
        op covers the pair (`fused`). Layers with forward hooks run as layers, so the hooks
        see their calls."""
        if _hooked(expand) or _hooked(depthwise) or _hooked(linear):
            return super().inverted_residual(expand, depthwise, linear, x)
        plan = fused.small_unit_plan(x, expand, depthwise, linear, self.bf16)
        if plan is not None:
            return fused.small_unit(x, plan)
        p, sums = self._to_projection(expand, depthwise, linear, x)
        return batch_norm_act(p, linear._batch_norm, False, sums)

    def _to_projection(self, expand: nn.Layer, depthwise: nn.Layer, linear: nn.Layer, x):
        """(the unit's projection conv output before its batch norm, that output's batch
        norm sums or None): the depthwise -> projection pair as one op where it applies
        (`fused.depthwise_pointwise`, `fused.expand_depthwise_pointwise`), else the ops
        apart."""
        bn, conv = expand._batch_norm, depthwise._conv
        bn2, conv2 = depthwise._batch_norm, linear._conv
        if fused.batch_stats(bn) and fused.expand_covers(x, expand._conv, bn, conv, self.bf16):
            p = fused.expand_depthwise_pointwise(x, expand._conv, bn, conv, bn2, conv2, self.bf16)
            if p is not None:
                return p
            z, sums = fused.expand_bn_relu6_depthwise(x, expand._conv, bn, conv)
            return self._projection(z, sums, depthwise, linear)
        y, sums = self.conv_sums(expand._conv, x, bn)
        return self._expanded_to_projection(y, sums, expand, depthwise, linear)

    def _expanded_to_projection(self, y, sums, expand: nn.Layer, depthwise: nn.Layer,
                                linear: nn.Layer):
        """`_to_projection` from the expand conv's output y (before its batch norm) and
        y's batch norm sums or None."""
        bn, conv = expand._batch_norm, depthwise._conv
        if fused.depthwise_covers(y, bn, conv):
            p = fused.depthwise_pointwise(y, bn, conv, depthwise._batch_norm, linear._conv, sums,
                                          self.bf16)
            if p is not None:
                return p
            z, sums = fused.bn_relu6_depthwise(y, bn, conv, sums)
        else:
            z, sums = self.conv(conv, batch_norm_act(y, bn, True)), None
        return self._projection(z, sums, depthwise, linear)

    def _projection(self, z, sums, depthwise: nn.Layer, linear: nn.Layer):
        """The projection conv's output from the depthwise conv's output z (before its
        batch norm, whose sums `sums` are or None) and its batch norm sums or None."""
        bn2, conv2 = depthwise._batch_norm, linear._conv
        op = fused.pointwise_op(z, bn2, conv2, self.bf16)
        if op is not None:
            return fused.bn_relu6_pointwise(z, bn2, conv2, op, sums)
        return self.conv(conv2, batch_norm_act(z, bn2, True)), None

    def stem_block(self, stem: nn.Layer, block: nn.Layer, x):
        """As Ops', with the stem's ReLU6 batch norm folded into the first unit's expand
        conv where the fused 1x1 op covers it (`fused.pointwise_op`; training), so the
        stem's normalised output, as large as the unit's widest map, is neither written
        nor read back, nor is its gradient. Not where the unit runs as one op or with the
        expand conv joined to the depthwise one (the usual path then), nor with forward
        hooks on the layers involved."""
        unit = block._first_block
        layers = (stem, block, unit, unit._expand_conv, unit._bottleneck_conv, unit._linear_conv)
        expand = unit._expand_conv
        if any(_hooked(layer) for layer in layers) or not fused.batch_stats(stem._batch_norm):
            return super().stem_block(stem, block, x)
        y, stem_sums = self.conv_sums(stem._conv, x, stem._batch_norm)
        op = fused.pointwise_op(y, stem._batch_norm, expand._conv, self.bf16)
        # y stands in for the stem's output in the checks: the same shape, dtype and place
        if (op is None or fused.small_unit_plan(y, expand, unit._bottleneck_conv,
                                                unit._linear_conv, self.bf16) is not None
                or fused.expand_covers(y, expand._conv, expand._batch_norm,
                                       unit._bottleneck_conv._conv, self.bf16)):
            return block.after_first(
                unit(batch_norm_act(y, stem._batch_norm, True, stem_sums), ifshortcut=False))
        # e's sums: only the fused ops read them, and only with batch statistics
        e, sums = fused.bn_relu6_pointwise(y, stem._batch_norm, expand._conv, op, stem_sums)
        p, sums = self._expanded_to_projection(e, sums, expand, unit._bottleneck_conv,
                                               unit._linear_conv)
        return block.after_first(batch_norm_act(p, unit._linear_conv._batch_norm, False, sums))

    def global_avg_pool(self, pool: nn.AdaptiveAvgPool2D, x):
        # A mean over the flattened plane: Paddle's CPU pool2d took 1.96 ms forward +
        # backward at 32x1280x7x7 against 1.04 (and 2.4 ms against 0.34 at 128x1280x1x1);
        # x.mean([2, 3]) took 24 ms there. Static graphs (export) keep the pool.
        if not paddle.in_dynamic_mode() or not x.place.is_cpu_place():
            return pool(x)
        n, c, h, w = x.shape
        return x.reshape([n, c, h * w]).mean(2, keepdim=True).reshape([n, c, 1, 1])


def _is_depthwise(conv: nn.Conv2D) -> bool:
    return conv._groups == conv._in_channels == conv._out_channels and conv._groups > 1


def _is_pointwise(conv: nn.Conv2D) -> bool:
    return conv._groups == 1 and tuple(conv._kernel_size) == (1, 1) and tuple(conv._stride) == (1, 1)


def _hooked(layer: nn.Layer) -> bool:
    return bool(getattr(layer, "_forward_pre_hooks", None) or getattr(layer, "_forward_post_hooks", None))


PADDLE_OPS = Ops()
CPU_KERNELS = CpuKernels()
CPU_KERNELS_BF16 = CpuKernels(bf16=True)


def mixed_precision(ops: Ops) -> tuple[Ops, str]:
    """(the ops that multiply in bfloat16 in place of `ops`, "") for mixed precision on
    CPU, or (`ops`, why not): needs the kernels, a CPU with bfloat16 dot products
    (AVX512-BF16 or AMX) and the op library built with Paddle's oneDNN."""
    if ops is not CPU_KERNELS:
        return ops, "it needs mbv2's CPU kernels (model.cpu_kernels auto or on)"
    if not has_bf16():
        return ops, "this CPU has no bfloat16 dot products (AVX512-BF16 or AMX)"
    kernel = load_kernel()
    if kernel is None or not kernel.pointwise_bf16:
        return ops, "the kernels were built without Paddle's oneDNN (libdnnl)"
    return CPU_KERNELS_BF16, ""


def select_ops(mode: str, device: str) -> Ops:
    """`model.cpu_kernels` -> the ops a network on `device` runs with.

    auto and on use the kernels on CPU; on GPU both give Paddle's ops (cuDNN is fast
    there). A failed kernel build gives a warning (from `load_kernel`) and Paddle's ops."""
    if mode not in MODES:
        raise ValueError(f"model.cpu_kernels must be auto, on or off, got {mode!r}")
    if mode == "off":
        return PADDLE_OPS
    if not str(device).lower().startswith("cpu"):
        if mode == "on":
            log.info("mbv2's kernels are CPU-only; %s uses Paddle's ops", device)
        return PADDLE_OPS
    if load_kernel() is None:
        if mode == "on":
            warnings.warn("model.cpu_kernels=on but the kernels are unavailable; using "
                          "Paddle's ops", RuntimeWarning, stacklevel=2)
        return PADDLE_OPS
    return CPU_KERNELS
