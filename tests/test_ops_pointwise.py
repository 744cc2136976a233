"""1x1 convolutions as matrix products: same values and gradients as conv2d."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from mbv2.model import MobileNetV2
from mbv2.ops.pointwise import pointwise_conv2d

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")


# 1x1 and 2x2: batch-in-rows product; 3x3 and up: the op (or, without it, the batched
# product up to 16x16 and conv2d beyond)
@pytest.mark.parametrize("n,c_in,c_out,hw", [(8, 16, 24, 1), (3, 32, 7, 2), (1, 5, 9, 2),
                                              (4, 8, 16, 3), (2, 6, 4, 8), (2, 8, 12, 16),
                                              (1, 4, 6, 17)])
def test_matches_conv2d_forward_and_gradients(n, c_in, c_out, hw):
    check_against_conv2d(n, c_in, c_out, hw, hw, seed=0)


def check_against_conv2d(n, c_in, c_out, h, w, seed):
    """pointwise_conv2d's output and input/weight gradients match F.conv2d's; returns
    the random input and weight used and conv2d's output."""
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal((n, c_in, h, w)).astype("float32")
    w_np = rng.standard_normal((c_out, c_in, 1, 1)).astype("float32")
    g_np = rng.standard_normal((n, c_out, h, w)).astype("float32")
    results = []
    for fn in (lambda x, wt: F.conv2d(x, wt), pointwise_conv2d):
        x = paddle.to_tensor(x_np, stop_gradient=False)
        wt = paddle.to_tensor(w_np, stop_gradient=False)
        y = fn(x, wt)
        (y * paddle.to_tensor(g_np)).sum().backward()
        results.append((y.numpy(), x.grad.numpy(), wt.grad.numpy()))
    for ref, got in zip(results[0], results[1]):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    return x_np, w_np, results[0][0]


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


@pytest.fixture
def op_calls(monkeypatch) -> list[str]:
    """The names of the custom ops run while the test runs (skips without the 1x1 op)."""
    from mbv2.ops import depthwise as dw

    kernel = dw.load_kernel()
    if kernel is None or not kernel.pointwise:
        pytest.skip("the pointwise op needs a compiler and Paddle's MKL")
    calls: list[str] = []
    run = paddle._C_ops._run_custom_op
    monkeypatch.setattr(paddle._C_ops, "_run_custom_op",
                        lambda name, *a: calls.append(name) or run(name, *a))
    return calls


# maps over 2x2: the op for expansions and on maps up to 28x28, and (with AVX-512) for
# projections on larger maps, conv2d for those elsewhere; odd plane sizes cross the op's
# 1024-pixel blocks unevenly. With AVX-512 the weight gradient of maps from 56x56 up and
# of projections from 28x28 up is the op's dot-product kernel: 57x57 and 29x29 here, with
# channel counts that leave partial 4-row and 6-row tiles and pixel tails. 64 and 70
# output channels on 33x33 maps: the backward's copy of each block of dy (64 rows and up on
# planes over one block, CopyGradientBlock in pointwise_conv.cc).
@pytest.mark.parametrize("n,c_in,c_out,hw", [(2, 4, 24, 17), (3, 24, 8, 28), (2, 16, 40, 40),
                                              (2, 40, 16, 33), (1, 3, 5, 37), (4, 12, 8, 3),
                                              (2, 6, 10, 2), (1, 7, 13, 57), (2, 30, 7, 29),
                                              (1, 17, 6, 56), (2, 8, 64, 33), (1, 16, 70, 33)])
def test_maps_match_conv2d_and_take_the_op_where_it_wins(n, c_in, c_out, hw, op_calls):
    import mbv2.ops.pointwise as pw

    test_matches_conv2d_forward_and_gradients(n, c_in, c_out, hw)
    expected = hw * hw > pw.MAX_PLANE and (c_out >= c_in
                                           or hw * hw <= pw._projection_plane_limit())
    assert (pw.OP_NAME in op_calls) == expected


def test_projections_on_large_maps_take_the_op_only_with_avx512(monkeypatch, op_calls):
    import mbv2.ops.pointwise as pw

    x = paddle.ones([1, 32, 40, 40])
    w = paddle.ones([16, 32, 1, 1])
    for flags, expected in ((set(), False), ({"avx512f"}, True)):
        pw._projection_plane_limit.cache_clear()
        monkeypatch.setattr(pw, "cpu_flags", lambda f=flags: f)
        op_calls.clear()
        pw.pointwise_conv2d(x, w)
        assert (pw.OP_NAME in op_calls) == expected
    pw._projection_plane_limit.cache_clear()  # the real flags again after the test


# maps of 1 to 4 pixels, square or not: the rows op (the batch packed into a GEMM's rows)
@pytest.mark.parametrize("n,c_in,c_out,h,w", [(3, 5, 6, 1, 3), (2, 4, 9, 2, 1), (4, 7, 3, 1, 1),
                                               (2, 9, 17, 2, 2), (1, 3, 4, 1, 2)])
def test_small_maps_take_the_rows_op(n, c_in, c_out, h, w, op_calls):
    import mbv2.ops.pointwise as pw

    x_np, w_np, ref = check_against_conv2d(n, c_in, c_out, h, w, seed=5)
    assert op_calls == [pw.ROWS_OP_NAME]
    with paddle.no_grad():
        np.testing.assert_allclose(pointwise_conv2d(paddle.to_tensor(x_np),
                                                    paddle.to_tensor(w_np)).numpy(),
                                   ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw", [8, 20])
def test_op_without_grad_and_fallback_without_mkl(monkeypatch, hw):
    """no_grad through the op; without it, the batched product (8x8) or conv2d (20x20)."""
    from mbv2.ops import depthwise as dw

    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.standard_normal((2, 8, hw, hw)).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal((16, 8, 1, 1)).astype("float32"))
    ref = F.conv2d(x, w).numpy()
    with paddle.no_grad():
        np.testing.assert_allclose(pointwise_conv2d(x, w).numpy(), ref, rtol=1e-5, atol=1e-5)
    kernel = dw.load_kernel()
    if kernel is not None:  # a library built without MKL has no op: conv2d instead
        monkeypatch.setattr(kernel, "pointwise", False)
        monkeypatch.setattr(paddle._C_ops, "_run_custom_op",
                            lambda *a: pytest.fail("custom op called without MKL"))
        np.testing.assert_allclose(pointwise_conv2d(x, w).numpy(), ref, rtol=1e-5, atol=1e-5)


# stride 2 / 1, outputs from 16x16 to 70x70 (several 1,024-pixel blocks and a tail; rows
# of 17 and 51 outputs at stride 2 take the 16-wide AVX-512 gather and its scalar tail)
@pytest.mark.parametrize("stride,hw,x_grad", [(2, 32, False), (1, 70, False), (2, 33, False),
                                              (2, 101, False), (1, 17, True), (2, 33, True)])
def test_stem_ops_match_conv2d(stride, hw, x_grad, op_calls):
    """The stem (3 -> 8, 3x3, pad 1): through the stem op when the input needs no
    gradient (im2col inside the op, the weight's gradient only), through unfold and the 1x1
    op when it does: values, the weight's gradient and, where wanted, the input's."""
    from mbv2.ops.pointwise import OP_NAME, STEM_OP_NAME, stem_conv2d

    rng = np.random.default_rng(4)
    x_np = rng.standard_normal((3, 3, hw, hw)).astype("float32")
    out = (hw - 1) // stride + 1
    g = paddle.to_tensor(rng.standard_normal((3, 8, out, out)).astype("float32"))
    conv = paddle.nn.Conv2D(3, 8, 3, stride, 1, bias_attr=False)
    results = []
    for fn in (conv, lambda x: stem_conv2d(x, conv)):
        x = paddle.to_tensor(x_np, stop_gradient=not x_grad)
        y = fn(x)
        (y * g).sum().backward()
        results.append([y.numpy(), conv.weight.grad.numpy()] + ([x.grad.numpy()] if x_grad else []))
        conv.clear_gradients()
    assert op_calls == [OP_NAME if x_grad else STEM_OP_NAME]
    for ref, got in zip(*results):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    with paddle.no_grad():
        x = paddle.to_tensor(x_np)
        np.testing.assert_allclose(stem_conv2d(x, conv).numpy(), conv(x).numpy(), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("stride,hw", [(2, 32), (1, 70), (2, 101)])
def test_stem_sums_op_gives_its_outputs_sums(stride, hw, op_calls):
    """`stem_conv2d_sums`: the stem op's output and weight gradient, and that output's
    batch norm sums (about its first pixel, taken block by block) as summed from the
    output; through the plain routes (None) where the input needs a gradient."""
    from mbv2.ops.pointwise import STEM_SUMS_OP_NAME, stem_conv2d_sums

    rng = np.random.default_rng(hw)
    x = paddle.to_tensor(rng.standard_normal((3, 3, hw, hw)).astype("float32"))
    conv = paddle.nn.Conv2D(3, 8, 3, stride, 1, bias_attr=False)
    y, sums = stem_conv2d_sums(x, conv)
    assert op_calls == [STEM_SUMS_OP_NAME]
    ref = conv(x)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    g = paddle.to_tensor(rng.standard_normal(ref.shape).astype("float32"))
    (y * g).sum().backward()
    got_dw = conv.weight.grad.numpy()
    conv.clear_gradients()
    (ref * g).sum().backward()
    np.testing.assert_allclose(got_dw, conv.weight.grad.numpy(), rtol=1e-4, atol=1e-3)
    s, out = sums.numpy(), y.numpy()
    assert s[-1] == 1.0  # taken
    shift = s[16:24]
    np.testing.assert_allclose(shift, out[0, :, 0, 0], rtol=1e-5, atol=1e-6)  # to rounding
    d = out.transpose(1, 0, 2, 3).reshape(8, -1).astype("float64") - shift[:, None]
    np.testing.assert_allclose(s[:8], d.sum(1), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(s[8:16], (d * d).sum(1), rtol=1e-4, atol=1e-2)
    x.stop_gradient = False
    assert stem_conv2d_sums(x, conv)[1] is None


# The thin-input product (ThinBlock in pointwise_conv.cc: x with 8 or 16 channels, on
# AVX-512 CPUs): odd maps (a masked tail in every block), maps over one 1,024-pixel block,
# streamed stores with the batch norm sums taken from its registers, and cached stores with
# the sums taken from the rows it wrote.
@pytest.mark.parametrize("c_in,c_out,h,w", [(8, 48, 13, 11), (16, 96, 33, 35), (16, 40, 9, 7),
                                            (8, 144, 28, 28)])
@pytest.mark.parametrize("stream", [False, True])
def test_thin_inputs_match_conv2d_and_give_their_sums(c_in, c_out, h, w, stream, monkeypatch):
    from mbv2.ops.pointwise import pointwise_conv2d_sums
    # the op streams its output from this many bytes up
    monkeypatch.setenv("MBV2_STREAM_BYTES", "0" if stream else str(1 << 40))
    check_against_conv2d(2, c_in, c_out, h, w, seed=c_in)
    rng = np.random.default_rng(c_out)
    x = paddle.to_tensor(rng.standard_normal((3, c_in, h, w)).astype("float32"))
    wt = paddle.to_tensor(rng.standard_normal((c_out, c_in, 1, 1)).astype("float32"))
    y, sums = pointwise_conv2d_sums(x, wt)
    ref = F.conv2d(x, wt).numpy()
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-4)
    s = sums.numpy()
    assert s[-1] == 1.0  # taken
    shift = s[2 * c_out:3 * c_out]
    d = ref.transpose(1, 0, 2, 3).reshape(c_out, -1).astype("float64") - shift[:, None]
    np.testing.assert_allclose(s[:c_out], d.sum(1), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(s[c_out:2 * c_out], (d * d).sum(1), rtol=1e-4, atol=1e-2)
