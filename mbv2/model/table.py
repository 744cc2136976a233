"""PaddleClas 2.3's MobileNetV2 bottleneck table, in a module that imports nothing, so the
PyTorch reference (mbv2.bench.torch_side) builds the same network where Paddle is absent
(a GPU machine with PyTorch only: python -m mbv2.bench.gpu)."""
from __future__ import annotations

# (t, c, n, s): expansion factor, output channels, units, stride of the first unit. The
# one copy of the table: `model.bottleneck: null` (the default) means this.
PADDLECLAS_BOTTLENECK: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
