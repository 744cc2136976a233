"""Fused batch norm + optional ReLU6 on CPU (the `mbv2_batch_norm_act` and
`mbv2_batch_norm_act_infer` ops of `batch_norm_act.cc`, built into the depthwise conv's
library by `depthwise.load_kernel`).

`batch_norm_act(x, bn, act)` is `F.relu6(bn(x))` (or `bn(x)` without act) for a
`nn.BatchNorm2D`:
* training mode: batch statistics, biased batch variance, running statistics updated in
  place as Paddle's CPU kernel does (momentum * running + (1 - momentum) * batch);
* eval mode (or global stats) without gradients (`paddle.no_grad`, as in evaluation and
  dygraph prediction): one pass with the running statistics. Paddle's CPU batch_norm and
  relu6 are single-threaded separate passes: measured here, x1.0 at 32 px batch 128,
  they were ~12 of a 39 ms eval-mode forward.
Anything the ops do not cover (eval mode with gradients, static graphs, non-NCHW,
non-float32, not CPU, no affine parameters, a single value per channel in training) goes
to Paddle's own ops, so the caller never has to check.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from mbv2.ops import depthwise as _dw

OP_NAME = "mbv2_batch_norm_act"
INFER_OP_NAME = "mbv2_batch_norm_act_infer"


def _covered(x: paddle.Tensor, bn: nn.BatchNorm2D) -> bool:
    if getattr(bn, "_data_format", "NCHW") != "NCHW" or bn.weight is None or bn.bias is None:
        return False
    return x.dtype == paddle.float32 and len(x.shape) == 4 and x.place.is_cpu_place()


def _batch_stats(bn: nn.BatchNorm2D) -> bool:
    return bool(bn.training) and not getattr(bn, "_use_global_stats", None)


def _use_op(x: paddle.Tensor, bn: nn.BatchNorm2D) -> bool:
    if not _batch_stats(bn) or not _covered(x, bn):
        return False
    n, c, h, w = x.shape
    # Paddle raises for one value per channel in training; let it.
    return n * h * w > 1 and c > 0


def _use_infer_op(x: paddle.Tensor, bn: nn.BatchNorm2D) -> bool:
    # The inference op has no gradient: only where autograd records nothing.
    return (not _batch_stats(bn) and not paddle.is_grad_enabled() and paddle.in_dynamic_mode()
            and _covered(x, bn))


def _native(x: paddle.Tensor, bn: nn.BatchNorm2D, act: bool) -> paddle.Tensor:
    y = bn(x)
    return F.relu6(y) if act else y


def batch_norm_act(x: paddle.Tensor, bn: nn.BatchNorm2D, act: bool,
                   sums: paddle.Tensor | None = None) -> paddle.Tensor:
    """`relu6(bn(x))` if act else `bn(x)`, through the fused ops where they apply. sums:
    x's batch norm sums as the op that made x took them (a fused op's OutSums, float64 [3 C
    + 1]), so training-mode statistics need no pass over x; None: summed here."""
    if _use_infer_op(x, bn) and _dw.load_kernel() is not None:
        outs = paddle._C_ops._run_custom_op(
            INFER_OP_NAME, x.detach(), bn.weight.detach(), bn.bias.detach(), bn._mean.detach(),
            bn._variance.detach(), float(bn._epsilon), bool(act))
        return outs[0]
    if not _use_op(x, bn) or _dw.load_kernel() is None:
        return _native(x, bn, act)
    scale, bias = bn.weight, bn.bias
    if not paddle.is_grad_enabled() and paddle.in_dynamic_mode():
        # As in the depthwise wrapper: Paddle 3.3 builds a grad node for custom ops even
        # under no_grad, keeping the inputs alive, unless no input needs a gradient.
        x, scale, bias = x.detach(), scale.detach(), bias.detach()
    outs = paddle._C_ops._run_custom_op(OP_NAME, x, scale, bias, bn._mean, bn._variance, sums,
                                        float(bn._epsilon), float(bn._momentum), bool(act))
    return outs[0]
