"""The network and what is built from the `model` config.

`network` is MobileNetV2 as PaddleClas 2.3 lays it out; `counting` its parameters and
MACs; `summary` both per layer; `pretrained` loading a `.pdparams` file by key.
`build_model` is the one reader of the `model.*` keys.

The submodules load on first use, not on `import mbv2.model`: `python -m mbv2.model`
(the per-layer summary) imports this package before its `__main__`, which has to set the
process up (`mbv2.runtime.configure_process`) before paddle is imported.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mbv2.model.counting import count_macs, count_parameters
    from mbv2.model.network import ConvBNLayer, MobileNetV2, ModelConfigError, check_architecture
    from mbv2.model.pretrained import load_pretrained
    from mbv2.model.summary import layer_summary, write_summary_csv
    from mbv2.model.table import PADDLECLAS_BOTTLENECK

# public name -> the submodule that defines it
_LAZY = {
    "count_macs": "counting", "count_parameters": "counting",
    "PADDLECLAS_BOTTLENECK": "table", "ConvBNLayer": "network", "MobileNetV2": "network",
    "ModelConfigError": "network", "check_architecture": "network",
    "load_pretrained": "pretrained",
    "layer_summary": "summary", "write_summary_csv": "summary",
}

__all__ = ["PADDLECLAS_BOTTLENECK", "ConvBNLayer", "MobileNetV2", "ModelConfigError",
           "build_model", "build_network", "check_architecture", "count_macs",
           "count_parameters", "layer_summary", "load_pretrained", "write_summary_csv"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def build_network(cfg, class_num: int) -> MobileNetV2:
    """The architecture `model.scale`, `model.bottleneck` and `model.stem_stride` describe,
    with a head of `class_num` outputs, on Paddle's own ops; no weights loaded."""
    from mbv2.model.network import MobileNetV2

    bottleneck = [list(row) for row in cfg.bottleneck] if cfg.bottleneck is not None else None
    # a config saved before model.stem_stride existed: PaddleClas's stride 2
    return MobileNetV2(class_num=class_num, scale=float(cfg.scale), bottleneck=bottleneck,
                       stem_stride=int(cfg.get("stem_stride", 2)))


def build_model(cfg, num_classes: int, device: str = "cpu", weights_follow: bool = False) -> MobileNetV2:
    """The network the `model` config describes, on the ops `model.cpu_kernels` picks for
    `device`. `model.class_num` null takes `num_classes` (the data's).

    `model.pretrained` (a `.pdparams` file or its prefix) is loaded, strictly unless
    `model.pretrained_strict` is false (see `load_pretrained`).

    `weights_follow`: trained weights will be loaded next (eval, export, predict), so the
    head has `num_classes` outputs whatever the config says and `model.pretrained` is not
    read."""
    from mbv2.model.pretrained import load_pretrained
    from mbv2.ops import select_ops

    if weights_follow or cfg.class_num is None:
        class_num = num_classes
    else:
        class_num = int(cfg.class_num)
    net = build_network(cfg, class_num)
    if cfg.pretrained and not weights_follow:
        # a config saved before the key existed has no pretrained_strict: strict, as then
        load_pretrained(net, str(cfg.pretrained), strict=bool(cfg.get("pretrained_strict", True)))
    net.use_ops(select_ops(str(_kernel_mode(cfg)), device))
    return net


def _kernel_mode(cfg) -> str:
    """`model.cpu_kernels`; a run saved before the key was renamed has `fast_depthwise`."""
    mode = cfg.get("cpu_kernels")
    return mode if mode is not None else cfg.get("fast_depthwise", "auto")
