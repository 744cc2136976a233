"""The fused batch norm + ReLU6 -> depthwise conv op (`mbv2.ops.fused`) against the two ops
it replaces (`batch_norm_act`, then `depthwise_conv2d`): bit-identical outputs, gradients
and running statistics over the shapes it covers, Paddle's own ops within rounding, and the
network using it where it applies (and only there)."""
from __future__ import annotations

import numpy as np
import pytest

import mbv2  # noqa: F401  (environment for Paddle's MKL)
import paddle
import paddle.nn.functional as F

from mbv2.model import MobileNetV2
from mbv2.ops import CPU_KERNELS, fused
from mbv2.ops import batch_norm as fbn

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")


def _layers(c: int, stride: int, rng) -> tuple[paddle.nn.BatchNorm2D, paddle.nn.Conv2D]:
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


def run(shape, stride, fuse: bool, seed=0):
    """[z, dx, dgamma, dbeta, dweight, running mean, running var]: fused op or the two ops."""
    rng = np.random.default_rng(seed)
    xn = (rng.standard_normal(shape) * 2 + 1).astype("float32")
    bn, conv = _layers(shape[1], stride, rng)
    x = paddle.to_tensor(xn, stop_gradient=False)
    if fuse:
        assert fused.covers(x, bn, conv)
        z = fused.bn_relu6_depthwise(x, bn, conv)
    else:
        z = CPU_KERNELS.conv(conv, fbn.batch_norm_act(x, bn, True))
    up = rng.standard_normal(z.shape).astype("float32")
    (z * paddle.to_tensor(up)).sum().backward()
    return [z.numpy(), x.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy(),
            conv.weight.grad.numpy(), bn._mean.numpy(), bn._variance.numpy()]


NAMES = ("z", "dx", "dgamma", "dbeta", "dweight", "running_mean", "running_var")
# (n, c, h, w), stride: full and partial channel groups, rows under and over a vector, odd
# plane sizes (pixel tails in both batch norm passes), the fixed plane sizes (4x4, 8x8,
# 16x16), planes of 56x56 and up (whole channels a thread), stride 2, a wide plane with
# few channels at stride 2 (the channel-lane path takes it by stride)
CASES = [((2, 8, 8, 8), 1), ((3, 11, 4, 4), 1), ((2, 16, 16, 16), 2), ((2, 5, 9, 11), 1),
         ((1, 24, 7, 7), 2), ((2, 9, 57, 59), 1), ((1, 8, 56, 56), 2), ((2, 3, 40, 40), 2),
         ((4, 20, 3, 3), 1)]


@pytest.mark.parametrize("shape,stride", CASES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else f"s{v}")
def test_fused_op_is_bit_identical_to_the_two_ops(kernel, shape, stride):
    got, ref = run(shape, stride, True), run(shape, stride, False)
    for name, a, b in zip(NAMES, got, ref):
        assert a.shape == b.shape, name
        assert np.array_equal(a, b, equal_nan=True), (name, float(np.abs(a - b).max()))


def test_threads_keep_their_own_channel_groups(kernel):
    """Many channel groups a thread, the threads changing groups at different times: each
    thread normalises with its own group's scale and shift (coefficients shared between
    threads once mixed groups here, and only sometimes: hence the repeats)."""
    for seed in range(4):
        got, ref = run((8, 96, 8, 8), 1, True, seed), run((8, 96, 8, 8), 1, False, seed)
        for name, a, b in zip(NAMES, got, ref):
            assert np.array_equal(a, b), (seed, name)


def test_fused_op_matches_paddle(kernel):
    """Against Paddle's batch_norm, relu6 and conv2d (float rounding apart)."""
    shape, stride = (2, 12, 14, 14), 1
    got = run(shape, stride, True)
    rng = np.random.default_rng(0)
    xn = (rng.standard_normal(shape) * 2 + 1).astype("float32")
    bn, conv = _layers(shape[1], stride, rng)
    x = paddle.to_tensor(xn, stop_gradient=False)
    z = conv(F.relu6(bn(x)))
    up = rng.standard_normal(z.shape).astype("float32")
    (z * paddle.to_tensor(up)).sum().backward()
    ref = [z.numpy(), x.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy(),
           conv.weight.grad.numpy(), bn._mean.numpy(), bn._variance.numpy()]
    for name, a, b in zip(NAMES, got, ref):
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
        assert err <= 1e-4, (name, err)


def test_streamed_outputs_equal_cached_ones(kernel, monkeypatch):
    """The fused op's outputs through streamed stores (MBV2_STREAM_BYTES=0: all of them)
    equal the normal stores'."""
    shape, stride = (2, 16, 16, 16), 1
    monkeypatch.setenv("MBV2_STREAM_BYTES", str(1 << 50))
    cached = run(shape, stride, True)
    monkeypatch.setenv("MBV2_STREAM_BYTES", "0")
    streamed = run(shape, stride, True)
    for name, a, b in zip(NAMES, streamed, cached):
        assert np.array_equal(a, b), name


def test_covers_only_what_the_op_takes(kernel):
    rng = np.random.default_rng(1)
    bn, conv = _layers(16, 1, rng)
    x = paddle.randn([2, 16, 8, 8])
    assert fused.covers(x, bn, conv)
    assert not fused.covers(paddle.randn([2, 16, 2, 2]), bn, conv)  # planes under 8 pixels
    bn.eval()
    assert not fused.covers(x, bn, conv)  # running statistics: the inference op's business
    bn.train()
    bn3, conv3 = _layers(3, 1, rng)
    assert not fused.covers(paddle.randn([2, 3, 40, 40]), bn3, conv3)  # the flat path's shape
    assert not fused.covers(x.astype("float64"), bn, conv)


def test_network_uses_the_fused_op_in_training(kernel, monkeypatch):
    """A training forward of the network runs the fused op for its expand -> depthwise pairs
    and gives the same loss and gradients as with it turned off; eval mode never calls it."""
    calls = []
    real = paddle._C_ops._run_custom_op
    monkeypatch.setattr(paddle._C_ops, "_run_custom_op",
                        lambda name, *a: calls.append(name) or real(name, *a))
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype("float32"))

    def loss_and_grads(fuse: bool):
        monkeypatch.setattr(fused, "covers", real_covers if fuse else (lambda *a: False))
        paddle.seed(4)
        net = MobileNetV2(class_num=10, scale=0.5)
        assert net.use_cpu_kernels(True)
        net.train()
        calls.clear()
        loss = net(x).mean()
        loss.backward()
        used = calls.count(fused.OP_NAME)
        # gradients of the trainable parameters, and the running statistics
        state = [p.grad.numpy() if not p.stop_gradient else p.numpy() for p in net.parameters()]
        return float(loss), state, used, net

    real_covers = fused.covers
    loss_f, grads_f, used_f, net = loss_and_grads(True)
    loss_u, grads_u, used_u, _ = loss_and_grads(False)
    # x0.5 at 32 px: the expand -> depthwise pairs on planes of 8 pixels and up (16x16 .. 4x4)
    assert used_f >= 5 and used_u == 0
    assert loss_f == loss_u
    for a, b in zip(grads_f, grads_u):
        assert np.array_equal(a, b)
    net.eval()
    calls.clear()
    with paddle.no_grad():
        net(x)
    assert fused.OP_NAME not in calls


def test_layers_with_forward_hooks_run_as_layers(kernel, monkeypatch):
    """A forward hook on a unit's expand layer sees its output: that unit runs its layers
    one by one, the other units keep the fused op."""
    calls = []
    real = paddle._C_ops._run_custom_op
    monkeypatch.setattr(paddle._C_ops, "_run_custom_op",
                        lambda name, *a: calls.append(name) or real(name, *a))
    paddle.seed(5)
    net = MobileNetV2(class_num=10, scale=0.5)
    assert net.use_cpu_kernels(True)
    net.train()
    x = paddle.randn([2, 3, 32, 32])
    net(x)
    before = calls.count(fused.OP_NAME)
    seen = []
    unit = net.conv3._first_block  # 16x16 planes at 32 px: fused without the hook
    unit._expand_conv.register_forward_post_hook(lambda layer, inp, out: seen.append(out.shape))
    calls.clear()
    net(x)
    assert seen and seen[0][1] == unit._bottleneck_conv._conv._in_channels
    assert calls.count(fused.OP_NAME) == before - 1
