"""MobileNetV2 laid out as PaddleClas 2.3 builds it, so its pretrained weights load.

Structure and state-dict keys follow PaddleClas (`conv1`, `conv2._first_block`,
`conv3.conv3_2`, ..., `conv9`, `out`); the bottleneck table is data, one row per block.
Parameters get no global names, so any number of instances can live in one process.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import paddle
import paddle.nn as nn

from mbv2.model.table import PADDLECLAS_BOTTLENECK
from mbv2.ops import PADDLE_OPS, Ops, select_ops


class ConvBNLayer(nn.Layer):
    """Conv (no bias) + batch norm, ReLU6 unless the caller asks for a linear output.

    The arithmetic runs through the network's `Ops` (Paddle's own ops, or mbv2's CPU
    kernels: `MobileNetV2.use_cpu_kernels`); parameters and keys are the same either way."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, groups: int = 1):
        super().__init__()
        self._conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, groups=groups, bias_attr=False)
        self._batch_norm = nn.BatchNorm2D(out_channels)
        self._ops: Ops = PADDLE_OPS

    def forward(self, x, if_act: bool = True):
        return self._ops.conv_bn(self._conv, self._batch_norm, x, if_act)


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
        y = self._expand_conv._ops.inverted_residual(self._expand_conv, self._bottleneck_conv,
                                                     self._linear_conv, x)
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
        return self.after_first(self._first_block(x, ifshortcut=False))

    def after_first(self, y):
        """The residual units after the first, on the first unit's output y."""
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
                 bottleneck: Sequence[Sequence[int]] | None = None, stem_stride: int = 2):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ModelConfigError(f"model.stem_stride must be 1 or 2, got {stem_stride!r}")
        table = check_architecture(scale, PADDLECLAS_BOTTLENECK if bottleneck is None else bottleneck)
        if isinstance(class_num, bool) or not isinstance(class_num, int) or class_num < 1:
            raise ModelConfigError(f"model.class_num must be a positive int, got {class_num!r}")
        self.scale, self.class_num, self.bottleneck = scale, class_num, table
        in_c = int(32 * scale)
        # conv1's stride: 2 as PaddleClas; 1 keeps twice the resolution through the network
        # (small images: 32 px reaches the last stage at 2x2 instead of 1x1). Same weights.
        self.conv1 = ConvBNLayer(3, in_c, 3, stem_stride, 1)
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
        y = self.ops.stem_block(self.conv1, self.block_list[0], x)
        for block in self.block_list[1:]:
            y = block(y)
        y = getattr(self, self._last_name)(y, if_act=True)
        # a 1x1 map (32 px input) is its own average: skipped in dygraph only, so an exported
        # program keeps the pool and takes any input size
        if not (paddle.in_dynamic_mode() and tuple(y.shape[2:]) == (1, 1)):
            y = self.ops.global_avg_pool(self.pool2d_avg, y)
        y = paddle.flatten(y, start_axis=1, stop_axis=-1)
        return self.out(y)

    def conv_bn_layers(self) -> list[ConvBNLayer]:
        return [m for m in self.sublayers() if isinstance(m, ConvBNLayer)]

    @property
    def ops(self) -> Ops:
        """What the conv + BN layers run on now (`.name`: paddle or cpu_kernels)."""
        return self.conv1._ops

    def use_ops(self, ops: Ops) -> None:
        for layer in self.conv_bn_layers():
            layer._ops = ops

    def use_cpu_kernels(self, on: bool = True) -> bool:
        """mbv2's CPU kernels for every conv + BN layer (on), or Paddle's own ops (off).
        Returns whether the kernels are in use: False when they cannot be built here."""
        self.use_ops(select_ops("on" if on else "off", "cpu"))
        return self.ops is not PADDLE_OPS

    @contextlib.contextmanager
    def reference_ops(self) -> Iterator[None]:
        """Paddle's own ops inside the block (MAC-counting hooks, export), the network's
        previous choice after it."""
        before = self.ops
        self.use_ops(PADDLE_OPS)
        try:
            yield
        finally:
            self.use_ops(before)
