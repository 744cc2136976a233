"""What a network costs: trainable parameters and multiply-adds per image."""
from __future__ import annotations

import paddle
import paddle.nn as nn

from mbv2.model.network import MobileNetV2


def count_parameters(net: nn.Layer, trainable_only: bool = True) -> int:
    """Parameter count; batch-norm running statistics are buffers and never counted."""
    total = 0
    for p in net.parameters():
        if trainable_only and p.stop_gradient:
            continue
        n = 1
        for d in p.shape:
            n *= int(d)
        total += n
    return total


def count_macs(net: MobileNetV2, image_size: int) -> int:
    """Multiply-adds of one image of `image_size` x `image_size`: convs and the head."""
    macs = 0
    hooks = []

    def conv_hook(layer, inputs, output):
        nonlocal macs
        _, c_out, h, w = output.shape
        k = layer.weight.shape  # [c_out, c_in/groups, kh, kw]
        macs += int(c_out) * int(h) * int(w) * int(k[1]) * int(k[2]) * int(k[3])

    def linear_hook(layer, inputs, output):
        nonlocal macs
        macs += int(layer.weight.shape[0]) * int(layer.weight.shape[1])

    for m in net.sublayers():
        if isinstance(m, nn.Conv2D):
            hooks.append(m.register_forward_post_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_post_hook(linear_hook))
    was_training = net.training
    net.eval()
    try:  # the hooks sit on nn.Conv2D, which only Paddle's own ops call
        with net.reference_ops(), paddle.no_grad():
            net(paddle.zeros([1, 3, image_size, image_size], dtype="float32"))
    finally:
        for h in hooks:
            h.remove()
        if was_training:
            net.train()
    return macs
