"""The batch norm + depthwise conv pair the fused-op tests run (`test_ops_fused.py`,
`test_ops_fused_expand.py`), with statistics and weights that reach every branch."""
from __future__ import annotations

import paddle


def bn_depthwise_layers(c: int, stride: int, rng) -> tuple[paddle.nn.BatchNorm2D, paddle.nn.Conv2D]:
    """A training-mode BatchNorm2D(c) and a bias-free 3x3 depthwise Conv2D(c) of `stride`
    (padding 1), their values drawn from `rng`."""
    bn = paddle.nn.BatchNorm2D(c)
    # gammas of both signs, a zero and a tiny one; betas that clamp some channels at 0 or 6
    gam = rng.uniform(0.3, 2.0, c) * rng.choice([1, -1], c)
    gam[0] = 0.0
    if c > 1:
        gam[1] = 1e-4
    bn.weight.set_value(gam.astype("float32"))
    bn.bias.set_value(rng.uniform(-1.0, 5.0, c).astype("float32"))
    bn._mean.set_value(rng.standard_normal(c).astype("float32"))
    bn._variance.set_value(rng.uniform(0.5, 2.0, c).astype("float32"))
    bn.train()
    conv = paddle.nn.Conv2D(c, c, 3, stride=stride, padding=1, groups=c, bias_attr=False)
    conv.weight.set_value(rng.standard_normal((c, 1, 3, 3)).astype("float32"))
    return bn, conv
