"""1x1 convolutions as matrix products: same values and gradients as conv2d."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from mbv2.model import MobileNetV2
from mbv2.ops.pointwise import pointwise_conv2d


# 1x1 and 2x2: batch-in-rows product; 3x3 .. 16x16: batched product; 17x17: conv2d
@pytest.mark.parametrize("n,c_in,c_out,hw", [(8, 16, 24, 1), (3, 32, 7, 2), (1, 5, 9, 2),
                                              (4, 8, 16, 3), (2, 6, 4, 8), (2, 8, 12, 16),
                                              (1, 4, 6, 17)])
def test_matches_conv2d_forward_and_gradients(n, c_in, c_out, hw):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((n, c_in, hw, hw)).astype("float32")
    w_np = rng.standard_normal((c_out, c_in, 1, 1)).astype("float32")
    g_np = rng.standard_normal((n, c_out, hw, hw)).astype("float32")
    results = []
    for fn in (lambda x, w: F.conv2d(x, w), pointwise_conv2d):
        x = paddle.to_tensor(x_np, stop_gradient=False)
        w = paddle.to_tensor(w_np, stop_gradient=False)
        y = fn(x, w)
        (y * paddle.to_tensor(g_np)).sum().backward()
        results.append((y.numpy(), x.grad.numpy(), w.grad.numpy()))
    for ref, got in zip(results[0], results[1]):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_model_logits_unchanged_with_fast_paths():
    paddle.seed(3)
    net = MobileNetV2(class_num=10, scale=0.5)
    net.eval()
    x = paddle.randn([4, 3, 32, 32])
    ref = net(x).numpy()
    if net.use_cpu_kernels(True):  # the 1x1 path is pure Paddle; the other kernels may be absent
        assert net.ops.name == "cpu_kernels"
        np.testing.assert_allclose(net(x).numpy(), ref, rtol=1e-4, atol=1e-4)
    net.use_cpu_kernels(False)
    assert net.ops.name == "paddle"
    np.testing.assert_allclose(net(x).numpy(), ref, rtol=1e-4, atol=1e-4)
