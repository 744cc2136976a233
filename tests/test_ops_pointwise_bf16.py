"""Mixed precision on CPU (`trainer.amp`): the 1x1 op's bfloat16 variant against float32
conv2d, its rounding, which layers take it, and the switch that turns it on."""
from __future__ import annotations

import logging

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import mbv2.ops.pointwise as pw
from mbv2 import ops
from mbv2.ops import depthwise as dw
from mbv2.runtime import cpu_flags, has_bf16

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")


@pytest.fixture(scope="module")
def bf16_op():
    kernel = dw.load_kernel()
    if kernel is None or not kernel.pointwise_bf16:
        pytest.skip("the bfloat16 op needs a compiler, Paddle's MKL and its oneDNN")
    if not has_bf16():  # oneDNN's bfloat16 GEMM may refuse a CPU without them
        pytest.skip("the bfloat16 op runs only where the CPU has bfloat16 dot products")
    return lambda x, w: paddle._C_ops._run_custom_op(pw.BF16_OP_NAME, x, w)[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _both(fn, x_np, w_np, g_np):
    x = paddle.to_tensor(x_np, stop_gradient=False)
    wt = paddle.to_tensor(w_np, stop_gradient=False)
    y = fn(x, wt)
    (y * paddle.to_tensor(g_np)).sum().backward()
    return y.numpy(), x.grad.numpy(), wt.grad.numpy()


# odd channel counts, a plane under one vector (3x3), rows with a 16-lane tail (5x5 = 25),
# more than one 1,024-pixel block with a tail (33x33), and a map where the weight gradient
# is the float32 dot-product kernel on AVX-512 (57x57)
@pytest.mark.parametrize("n,c_in,c_out,hw", [(2, 5, 7, 3), (3, 33, 17, 5), (2, 40, 24, 33),
                                              (1, 9, 20, 57), (4, 64, 96, 7)])
def test_bf16_op_matches_conv2d_within_bfloat16_rounding(bf16_op, n, c_in, c_out, hw):
    rng = np.random.default_rng(hw)
    x_np = rng.standard_normal((n, c_in, hw, hw)).astype("float32")
    w_np = rng.standard_normal((c_out, c_in, 1, 1)).astype("float32")
    g_np = rng.standard_normal((n, c_out, hw, hw)).astype("float32")
    ref = _both(lambda x, w: F.conv2d(x, w), x_np, w_np, g_np)
    got = _both(bf16_op, x_np, w_np, g_np)
    # the op's float32 dot-product kernel takes the weight gradient (AVX-512) from 56x56 up
    # and of projections from 28x28 up (UseDotKernel in pointwise_conv.cc)
    dw_fp32 = "avx512f" in cpu_flags() and (hw * hw >= 56 * 56
                                            or (hw * hw >= 28 * 28 and c_out < c_in))
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert a.shape == b.shape, name
        err = _rel(a, b)
        if name == "dw" and dw_fp32:
            assert err < 1e-5, (name, err)
        else:  # bfloat16 keeps 8 significant bits: ~0.2 % per operand, float32 sums
            assert 1e-5 < err < 1e-2, (name, err)


def test_bf16_op_rounds_to_nearest_even(bf16_op):
    """1 + 2^-8 lies halfway between the bfloat16 neighbours 1 and 1 + 2^-7 and goes to the
    even one (1); 1 + 3 * 2^-8 goes up to 1 + 2^-6; values with 8 significant bits stay
    exact. 19 pixels: the vector conversion and its scalar tail."""
    vals = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1.5, 3.0 + 2 ** -7, -0.375,
                     1 + 2 ** -9, 1 + 2 ** -8 + 2 ** -20] * 3, "float32")[:19]
    want = np.array([1.0, 1 + 2 ** -6, -1.0, 1.5, 3.0, -0.375, 1.0, 1 + 2 ** -7] * 3,
                    "float32")[:19]
    x = paddle.to_tensor(vals.reshape(1, 1, 1, 19))
    w = paddle.ones([1, 1, 1, 1])
    with paddle.no_grad():
        y = bf16_op(x, w).numpy().ravel()
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("c_in,c_out,hw,routed", [(64, 384, 14, True), (160, 960, 7, True),
                                                   (32, 192, 28, True), (16, 96, 28, False),
                                                   (32, 192, 14, False), (960, 160, 4, False),
                                                   (24, 144, 56, False)])
def test_only_layers_where_bf16_pays_take_it(bf16_op, monkeypatch, c_in, c_out, hw, routed):
    calls: list[str] = []
    run = paddle._C_ops._run_custom_op
    monkeypatch.setattr(paddle._C_ops, "_run_custom_op",
                        lambda name, *a: calls.append(name) or run(name, *a))
    x = paddle.randn([2, c_in, hw, hw])
    w = paddle.randn([c_out, c_in, 1, 1])
    fp32 = pw.pointwise_conv2d(x, w).numpy()
    calls.clear()
    y = pw.pointwise_conv2d(x, w, bf16=True).numpy()
    assert (pw.BF16_OP_NAME in calls) == routed
    if routed:
        assert 1e-5 < _rel(y, fp32) < 1e-2
    else:
        np.testing.assert_array_equal(y, fp32)


# maps up to 2x2: the rows op's variant, from 10M multiply-adds in the batch's product
@pytest.mark.parametrize("n,c_in,c_out,h,w,routed", [(16, 160, 960, 1, 1, True),
                                                     (8, 96, 576, 2, 2, True),
                                                     (3, 33, 40, 1, 2, False),
                                                     (64, 96, 24, 2, 2, False)])
def test_small_maps_take_the_rows_variant_where_it_pays(bf16_op, monkeypatch, n, c_in, c_out,
                                                        h, w, routed):
    calls: list[str] = []
    run = paddle._C_ops._run_custom_op
    monkeypatch.setattr(paddle._C_ops, "_run_custom_op",
                        lambda name, *a: calls.append(name) or run(name, *a))
    if routed:  # a batch big enough for the threshold, values checked against conv2d
        n = max(n, -(-pw.ROWS_BF16_MIN_MACS // (h * w * c_in * c_out)))
    rng = np.random.default_rng(n)
    x_np = rng.standard_normal((n, c_in, h, w)).astype("float32")
    w_np = rng.standard_normal((c_out, c_in, 1, 1)).astype("float32")
    g_np = rng.standard_normal((n, c_out, h, w)).astype("float32")
    ref = _both(lambda x, wt: F.conv2d(x, wt), x_np, w_np, g_np)
    calls.clear()
    got = _both(lambda x, wt: pw.pointwise_conv2d(x, wt, bf16=True), x_np, w_np, g_np)
    assert (pw.ROWS_BF16_OP_NAME in calls) == routed
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        err = _rel(a, b)
        assert (1e-5 < err < 1e-2) if routed else err < 1e-5, (name, err)


def test_mixed_precision_needs_kernels_a_bf16_cpu_and_onednn(monkeypatch):
    assert ops.mixed_precision(ops.PADDLE_OPS) == (ops.PADDLE_OPS, "it needs mbv2's CPU "
                                                   "kernels (model.cpu_kernels auto or on)")
    monkeypatch.setattr(ops, "has_bf16", lambda: False)
    got, why = ops.mixed_precision(ops.CPU_KERNELS)
    assert got is ops.CPU_KERNELS and "no bfloat16 dot products" in why
    monkeypatch.setattr(ops, "has_bf16", lambda: True)
    kernel = dw.load_kernel()
    if kernel is None:
        pytest.skip("no op library here")
    monkeypatch.setattr(kernel, "pointwise_bf16", False)
    got, why = ops.mixed_precision(ops.CPU_KERNELS)
    assert got is ops.CPU_KERNELS and "without Paddle's oneDNN" in why
    monkeypatch.setattr(kernel, "pointwise_bf16", True)
    assert ops.mixed_precision(ops.CPU_KERNELS) == (ops.CPU_KERNELS_BF16, "")


def test_trainer_amp_on_cpu_switches_the_network(caplog):
    from mbv2.model import MobileNetV2
    from mbv2.train.setup import cpu_mixed_precision

    net = MobileNetV2(class_num=4, scale=0.25)
    if not net.use_cpu_kernels(True):
        pytest.skip("no op library here")
    with caplog.at_level(logging.INFO, logger="mbv2.train.setup"):
        cpu_mixed_precision(net, "O1")
    if ops.mixed_precision(ops.CPU_KERNELS)[1]:  # this machine cannot: a warning, FP32 kept
        assert net.ops is ops.CPU_KERNELS and "is ignored on this CPU" in caplog.text
        return
    assert has_bf16() and net.ops is ops.CPU_KERNELS_BF16 and net.ops.name == "cpu_kernels_bf16"
    assert "trainer.amp=O1 on CPU" in caplog.text
    with net.reference_ops():  # export and MAC counting still see Paddle's ops
        assert net.ops is ops.PADDLE_OPS
    assert net.ops is ops.CPU_KERNELS_BF16
