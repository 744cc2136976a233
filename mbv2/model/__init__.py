"""The network and what is built from the `model` config.

`network` is MobileNetV2 as PaddleClas 2.3 lays it out; `counting` its parameters and
MACs; `pretrained` loading a `.pdparams` file by key. `build_model` is the one reader of
the `model.*` keys.
"""
from __future__ import annotations

from mbv2.model.counting import count_macs, count_parameters
from mbv2.model.network import (PADDLECLAS_BOTTLENECK, ConvBNLayer, MobileNetV2,
                                ModelConfigError, check_architecture)
from mbv2.model.pretrained import load_pretrained
from mbv2.ops import select_ops

__all__ = ["PADDLECLAS_BOTTLENECK", "ConvBNLayer", "MobileNetV2", "ModelConfigError",
           "build_model", "check_architecture", "count_macs", "count_parameters",
           "load_pretrained"]


def build_model(cfg, num_classes: int, device: str = "cpu", weights_follow: bool = False) -> MobileNetV2:
    """The network the `model` config describes, on the ops `model.cpu_kernels` picks for
    `device`. `model.class_num` null takes `num_classes` (the data's).

    `weights_follow`: trained weights will be loaded next (eval, export, predict), so the
    head has `num_classes` outputs whatever the config says and `model.pretrained` is not
    read."""
    if weights_follow or cfg.class_num is None:
        class_num = num_classes
    else:
        class_num = int(cfg.class_num)
    bottleneck = [list(row) for row in cfg.bottleneck] if cfg.bottleneck is not None else None
    net = MobileNetV2(class_num=class_num, scale=float(cfg.scale), bottleneck=bottleneck)
    if cfg.pretrained and not weights_follow:
        load_pretrained(net, str(cfg.pretrained))
    net.use_ops(select_ops(str(_kernel_mode(cfg)), device))
    return net


def _kernel_mode(cfg) -> str:
    """`model.cpu_kernels`; a run saved before the key was renamed has `fast_depthwise`."""
    mode = cfg.get("cpu_kernels")
    return mode if mode is not None else cfg.get("fast_depthwise", "auto")
