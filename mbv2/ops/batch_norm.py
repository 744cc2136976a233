"""Fused training-mode batch norm + optional ReLU6 on CPU (the `mbv2_batch_norm_act` op of
`batch_norm_act.cc`, built into the depthwise conv's library by `depthwise.load_kernel`).

`batch_norm_act(x, bn, act)` is `F.relu6(bn(x))` (or `bn(x)` without act) for a
`nn.BatchNorm2D` in training mode: batch statistics, biased batch variance, running
statistics updated in place as Paddle's CPU kernel does (momentum * running +
(1 - momentum) * batch). Anything the op does not cover (eval mode, global stats,
non-NCHW, non-float32, not CPU, no affine parameters, a single value per channel) goes to
Paddle's own ops, so the caller never has to check.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from mbv2.ops import depthwise as _dw

OP_NAME = "mbv2_batch_norm_act"


def _use_op(x: paddle.Tensor, bn: nn.BatchNorm2D) -> bool:
    if not bn.training or getattr(bn, "_use_global_stats", None):
        return False
    if getattr(bn, "_data_format", "NCHW") != "NCHW" or bn.weight is None or bn.bias is None:
        return False
    if x.dtype != paddle.float32 or len(x.shape) != 4 or not x.place.is_cpu_place():
        return False
    n, c, h, w = x.shape
    # Paddle raises for one value per channel in training; let it.
    return n * h * w > 1 and c > 0


def _native(x: paddle.Tensor, bn: nn.BatchNorm2D, act: bool) -> paddle.Tensor:
    y = bn(x)
    return F.relu6(y) if act else y


def batch_norm_act(x: paddle.Tensor, bn: nn.BatchNorm2D, act: bool) -> paddle.Tensor:
    """`relu6(bn(x))` if act else `bn(x)`, through the fused op where it applies."""
    if not _use_op(x, bn) or _dw.load_kernel() is None:
        return _native(x, bn, act)
    scale, bias = bn.weight, bn.bias
    if not paddle.is_grad_enabled() and paddle.in_dynamic_mode():
        # As in the depthwise wrapper: Paddle 3.3 builds a grad node for custom ops even
        # under no_grad, keeping the inputs alive, unless no input needs a gradient.
        x, scale, bias = x.detach(), scale.detach(), bias.detach()
    outs = paddle._C_ops._run_custom_op(OP_NAME, x, scale, bias, bn._mean, bn._variance,
                                        float(bn._epsilon), float(bn._momentum), bool(act))
    return outs[0]


def fused_batch_norm_fn():
    """`batch_norm_act` when the op library is available, else None (Paddle's ops)."""
    return batch_norm_act if _dw.load_kernel() is not None else None
