"""MobileNetV2 laid out as PaddleClas 2.3 builds it, so its pretrained weights load.

Structure and state-dict keys follow PaddleClas (`conv1`, `conv2._first_block`,
`conv3.conv3_2`, ..., `conv9`, `out`); the bottleneck table is data, one row per block.
Parameters get no global names, so any number of instances can live in one process.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

log = logging.getLogger(__name__)

# (t, c, n, s): expansion factor, output channels, units, stride of the first unit.
DEFAULT_BOTTLENECK: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNLayer(nn.Layer):
    """Conv (no bias) + batch norm, ReLU6 unless the caller asks for a linear output."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, groups: int = 1):
        super().__init__()
        self._conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, groups=groups, bias_attr=False)
        self._batch_norm = nn.BatchNorm2D(out_channels)
        self._depthwise = groups == in_channels == out_channels and groups > 1
        self._pointwise = kernel_size == 1 and stride == 1 and groups == 1
        self._fast_depthwise = None  # set by MobileNetV2.set_fast_depthwise
        self._fast_pointwise = None  # fn(x, weight) for 1x1 convs; same setter
        # fn(y, batch_norm, act) for BN (+ ReLU6), or None; same setter.
        self._fast_batch_norm = None

    def forward(self, x, if_act: bool = True):
        if self._fast_depthwise is not None and self._depthwise:
            conv = self._conv
            y = self._fast_depthwise(x, conv.weight, conv._stride[0], conv._padding)
        elif self._fast_pointwise is not None and self._pointwise:
            y = self._fast_pointwise(x, self._conv.weight)
        else:
            y = self._conv(x)
        if self._fast_batch_norm is not None:
            return self._fast_batch_norm(y, self._batch_norm, if_act)
        y = self._batch_norm(y)
        return F.relu6(y) if if_act else y


class InvertedResidualUnit(nn.Layer):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1, with an optional identity shortcut."""

    def __init__(self, in_channels: int, expand_from: int, out_channels: int, stride: int,
                 expansion: int):
        super().__init__()
        hidden = int(round(expand_from * expansion))
        self._expand_conv = ConvBNLayer(in_channels, hidden, 1, 1, 0)
        self._bottleneck_conv = ConvBNLayer(hidden, hidden, 3, stride, 1, groups=hidden)
        self._linear_conv = ConvBNLayer(hidden, out_channels, 1, 1, 0)

    def forward(self, x, ifshortcut: bool):
        y = self._expand_conv(x, if_act=True)
        y = self._bottleneck_conv(y, if_act=True)
        y = self._linear_conv(y, if_act=False)
        return paddle.add(x, y) if ifshortcut else y


class InvresiBlocks(nn.Layer):
    """One bottleneck row: a strided first unit without shortcut, then n-1 residual units."""

    def __init__(self, in_channels: int, t: int, c: int, n: int, s: int, name: str):
        super().__init__()
        self._first_block = InvertedResidualUnit(in_channels, in_channels, c, s, t)
        self._block_list = [
            self.add_sublayer(f"{name}_{i + 1}", InvertedResidualUnit(c, c, c, 1, t))
            for i in range(1, n)
        ]

    def forward(self, x):
        y = self._first_block(x, ifshortcut=False)
        for unit in self._block_list:
            y = unit(y, ifshortcut=True)
        return y


class ModelConfigError(ValueError):
    """A model setting that cannot build a network; the message names the config key."""


def check_architecture(scale: float, bottleneck: Sequence[Sequence[Any]]) -> list[tuple[int, int, int, int]]:
    """Validate `model.scale` and `model.bottleneck`; return the table as int tuples."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ModelConfigError(f"model.scale must be a number > 0, got {scale!r}")
    if int(32 * scale) < 1:
        raise ModelConfigError(
            f"model.scale={scale} shrinks conv1 to int(32*{scale}) = 0 channels; use a scale >= 1/32")
    rows = list(bottleneck)
    if not rows:
        raise ModelConfigError("model.bottleneck is empty; give rows of [t, c, n, s]")
    table = []
    for i, row in enumerate(rows):
        where = f"model.bottleneck[{i}]"
        values = list(row) if isinstance(row, Sequence) and not isinstance(row, str) else None
        if values is None or len(values) != 4:
            raise ModelConfigError(f"{where} = {row!r} must be a row of four ints [t, c, n, s]")
        for name, v in zip("tcns", values):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ModelConfigError(
                    f"{where} = {list(values)}: {name} must be a positive int, got {v!r}")
        t, c, n, s = values
        if int(c * scale) < 1:
            raise ModelConfigError(
                f"{where} = {list(values)}: int({c}*scale={scale}) = 0 channels; "
                f"raise c or model.scale")
        table.append((t, c, n, s))
    return table


class MobileNetV2(nn.Layer):
    """MobileNetV2 with width multiplier `scale` and a (t, c, n, s) bottleneck table."""

    def __init__(self, class_num: int = 1000, scale: float = 1.0,
                 bottleneck: Sequence[Sequence[int]] | None = None):
        super().__init__()
        table = check_architecture(scale, DEFAULT_BOTTLENECK if bottleneck is None else bottleneck)
        if isinstance(class_num, bool) or not isinstance(class_num, int) or class_num < 1:
            raise ModelConfigError(f"model.class_num must be a positive int, got {class_num!r}")
        self.scale, self.class_num, self.bottleneck = scale, class_num, table
        in_c = int(32 * scale)
        self.conv1 = ConvBNLayer(3, in_c, 3, 2, 1)
        self.block_list = []
        for i, (t, c, n, s) in enumerate(table, start=2):
            name = f"conv{i}"
            out_c = int(c * scale)
            self.block_list.append(self.add_sublayer(name, InvresiBlocks(in_c, t, out_c, n, s, name)))
            in_c = out_c
        self.out_c = int(1280 * scale) if scale > 1.0 else 1280
        # PaddleClas calls the last conv "conv9"; a table of more than 7 rows already uses
        # that name for a block, so there it takes the next free number.
        last_name = "conv9" if len(table) <= 7 else f"conv{len(table) + 2}"
        self.add_sublayer(last_name, ConvBNLayer(in_c, self.out_c, 1, 1, 0))
        self._last_name = last_name
        self.pool2d_avg = nn.AdaptiveAvgPool2D(1)
        self.out = nn.Linear(self.out_c, class_num)

    def forward(self, x):
        y = self.conv1(x, if_act=True)
        for block in self.block_list:
            y = block(y)
        y = getattr(self, self._last_name)(y, if_act=True)
        if tuple(y.shape[2:]) != (1, 1):  # a 1x1 map (32 px input) is its own average
            y = self.pool2d_avg(y)
        y = paddle.flatten(y, start_axis=1, stop_axis=-1)
        return self.out(y)

    def depthwise_layers(self) -> list[ConvBNLayer]:
        return [m for m in self.sublayers() if isinstance(m, ConvBNLayer) and m._depthwise]

    def set_fast_depthwise(self, fn) -> None:
        """Route every depthwise conv through `fn(x, weight, stride, padding)`, or back to
        Paddle's own op with None. Parameters and state-dict keys are untouched.

        With a function, the 1x1 convs on small maps also become one matrix product
        (`mbv2.ops.pointwise`) and every ConvBNLayer gets the fused batch
        norm + ReLU6 ops of `mbv2.ops.batch_norm` (when its library is available: batch
        statistics in training, running statistics in eval mode under no_grad); None
        restores Paddle's conv2d, batch_norm and relu6."""
        for layer in self.depthwise_layers():
            layer._fast_depthwise = fn
        pointwise = None
        if fn is not None:
            from mbv2.ops.pointwise import pointwise_conv2d as pointwise
        for layer in self.sublayers():
            if isinstance(layer, ConvBNLayer) and layer._pointwise:
                layer._fast_pointwise = pointwise
        bn_fn = None
        if fn is not None:
            try:
                from mbv2.ops.batch_norm import fused_batch_norm_fn
            except ImportError:  # kernel package absent: Paddle's own ops
                fused_batch_norm_fn = None
            if fused_batch_norm_fn is not None:
                bn_fn = fused_batch_norm_fn()
        self.set_fast_batch_norm(bn_fn)

    def set_fast_batch_norm(self, fn) -> None:
        """BN (+ ReLU6) of every ConvBNLayer through `fn(y, bn, act)`, or Paddle's
        batch_norm and relu6 with None."""
        for layer in self.sublayers():
            if isinstance(layer, ConvBNLayer):
                layer._fast_batch_norm = fn


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
    conv_bn = [m for m in net.sublayers() if isinstance(m, ConvBNLayer)]
    saved = [(l._fast_depthwise, l._fast_pointwise, l._fast_batch_norm) for l in conv_bn]
    net.set_fast_depthwise(None)  # hooks sit on nn.Conv2D, so use Paddle's path here
    try:
        with paddle.no_grad():
            net(paddle.zeros([1, 3, image_size, image_size], dtype="float32"))
    finally:
        for h in hooks:
            h.remove()
        for l, (dw, pw, bn) in zip(conv_bn, saved):
            l._fast_depthwise, l._fast_pointwise, l._fast_batch_norm = dw, pw, bn
        if was_training:
            net.train()
    return macs


def load_pretrained(net: nn.Layer, path: str) -> dict[str, list[str]]:
    """Load a `.pdparams` file (PaddleClas or mbv2) by key; keys whose shape differs
    (a 1000-class head into a 10-class model) or that the model lacks are skipped and
    reported, never an error."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.pretrained={path!r}: no such file; give the path of a .pdparams file")
    try:
        state = paddle.load(path)
    except Exception as e:  # paddle raises several types for a damaged file
        raise ValueError(f"model.pretrained={path!r}: cannot read weights ({e})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = net.state_dict()
    loaded, skipped = [], []
    usable = {}
    for key, value in state.items():
        if key not in own:
            skipped.append(f"{key} (not in model)")
        elif list(value.shape) != list(own[key].shape):
            skipped.append(f"{key} (shape {list(value.shape)} != model {list(own[key].shape)})")
        else:
            usable[key] = value
            loaded.append(key)
    missing = [k for k in own if k not in usable]
    with warnings.catch_warnings():  # paddle warns per absent key; the log below says it once
        warnings.simplefilter("ignore")
        net.set_state_dict(usable)
    log.info("pretrained %s: loaded %d of %d model tensors", path, len(loaded), len(own))
    for s in skipped:
        log.info("pretrained: skipped %s", s)
    for k in missing:
        if k not in {s.split(" ")[0] for s in skipped}:
            log.info("pretrained: %s not in file, left as initialised", k)
    return {"loaded": loaded, "skipped": skipped, "missing": missing}


def build_model(cfg, num_classes: int, device: str = "cpu") -> MobileNetV2:
    """The network described by the `model` config. `model.class_num` null takes the
    data's class count; `model.fast_depthwise` picks the depthwise conv kernel."""
    class_num = int(cfg.class_num) if cfg.class_num is not None else num_classes
    bottleneck = [list(row) for row in cfg.bottleneck] if cfg.bottleneck is not None else None
    net = MobileNetV2(class_num=class_num, scale=float(cfg.scale), bottleneck=bottleneck)
    if cfg.pretrained:
        load_pretrained(net, str(cfg.pretrained))
    try:
        from mbv2.ops.depthwise import fast_depthwise_fn
    except ImportError:  # kernel package absent: Paddle's own op
        fast_depthwise_fn = None
    if fast_depthwise_fn is not None:
        net.set_fast_depthwise(fast_depthwise_fn(str(cfg.fast_depthwise), device))
    return net
