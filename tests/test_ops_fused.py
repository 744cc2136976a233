"""The fused batch norm + ReLU6 -> conv ops (`mbv2.ops.fused`) against the two ops each
replaces (`batch_norm_act`, then `depthwise_conv2d` or `pointwise_conv2d`): the same
outputs, gradients and running statistics over the shapes they cover (bit for bit where the
arithmetic is the same), Paddle's own ops within rounding, and the network using them where
they apply (and only there)."""
from __future__ import annotations

import numpy as np
import pytest

import mbv2  # noqa: F401  (environment for Paddle's MKL)
import paddle
import paddle.nn.functional as F

from mbv2.model import MobileNetV2
from mbv2.ops import CPU_KERNELS, fused
from mbv2.ops import batch_norm as fbn
from mbv2.ops import depthwise as dw
from mbv2.ops import pointwise as pw
from tests.fused_layers import bn_depthwise_layers

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")


def run(shape, stride, fuse: bool, seed=0):
    """[z, dx, dgamma, dbeta, dweight, running mean, running var]: fused op or the two ops."""
    rng = np.random.default_rng(seed)
    xn = (rng.standard_normal(shape) * 2 + 1).astype("float32")
    bn, conv = bn_depthwise_layers(shape[1], stride, rng)
    x = paddle.to_tensor(xn, stop_gradient=False)
    if fuse:
        assert fused.depthwise_covers(x, bn, conv)
        z, _ = fused.bn_relu6_depthwise(x, bn, conv)
    else:
        z = CPU_KERNELS.conv(conv, fbn.batch_norm_act(x, bn, True))
    up = rng.standard_normal(z.shape).astype("float32")
    (z * paddle.to_tensor(up)).sum().backward()
    return [z.numpy(), x.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy(),
            conv.weight.grad.numpy(), bn._mean.numpy(), bn._variance.numpy()]


NAMES = ("z", "dx", "dgamma", "dbeta", "dweight", "running_mean", "running_var")
# summed in another order by the fused op (the batch norm backward's sums are taken as the
# conv backward makes its input gradient): float rounding apart; the rest bit for bit
SUMMED = ("dx", "dgamma", "dbeta")


def assert_matches_the_two_ops(got, ref, where=""):
    for name, a, b in zip(NAMES, got, ref):
        assert a.shape == b.shape, name
        if name not in SUMMED:
            assert np.array_equal(a, b, equal_nan=True), (where, name, float(np.abs(a - b).max()))
            continue
        if a.ndim == 1:  # dgamma, dbeta: sums that may cancel, against the largest
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (where, name)
            continue
        # dx per channel: a channel with a small gradient must not hide in the norm
        for ch in range(a.shape[1]):
            ac, bc = a[:, ch], b[:, ch]
            assert np.abs(ac - bc).max() <= 1e-5 * max(np.abs(bc).max(), 1e-3), (where, name, ch)

# (n, c, h, w), stride: full and partial channel groups, rows under and over a vector, odd
# plane sizes (pixel tails in both batch norm passes), the fixed plane sizes (4x4, 8x8,
# 16x16), planes of 56x56 and up (whole channels a thread), stride 2, a wide plane with
# few channels at stride 2 (the channel-lane path takes it by stride)
CASES = [((2, 8, 8, 8), 1), ((3, 11, 4, 4), 1), ((2, 16, 16, 16), 2), ((2, 5, 9, 11), 1),
         ((1, 24, 7, 7), 2), ((2, 9, 57, 59), 1), ((1, 8, 56, 56), 2), ((2, 3, 40, 40), 2),
         ((4, 20, 3, 3), 1)]


@pytest.mark.parametrize("shape,stride", CASES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else f"s{v}")
def test_fused_op_matches_the_two_ops(kernel, shape, stride):
    got, ref = run(shape, stride, True), run(shape, stride, False)
    assert_matches_the_two_ops(got, ref)


def test_threads_keep_their_own_channel_groups(kernel):
    """Many channel groups a thread, the threads changing groups at different times: each
    thread normalises with its own group's scale and shift (coefficients shared between
    threads once mixed groups here, and only sometimes: hence the repeats)."""
    for seed in range(4):
        got, ref = run((8, 96, 8, 8), 1, True, seed), run((8, 96, 8, 8), 1, False, seed)
        assert_matches_the_two_ops(got, ref, f"seed {seed}")


def test_fused_op_matches_paddle(kernel):
    """Against Paddle's batch_norm, relu6 and conv2d (float rounding apart)."""
    shape, stride = (2, 12, 14, 14), 1
    got = run(shape, stride, True)
    rng = np.random.default_rng(0)
    xn = (rng.standard_normal(shape) * 2 + 1).astype("float32")
    bn, conv = bn_depthwise_layers(shape[1], stride, rng)
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
    bn, conv = bn_depthwise_layers(16, 1, rng)
    x = paddle.randn([2, 16, 8, 8])
    assert fused.depthwise_covers(x, bn, conv)
    assert not fused.depthwise_covers(paddle.randn([2, 16, 2, 2]), bn, conv)  # planes under 8 pixels
    bn.eval()
    assert not fused.depthwise_covers(x, bn, conv)  # running statistics: the inference op's business
    bn.train()
    bn3, conv3 = bn_depthwise_layers(3, 1, rng)
    assert not fused.depthwise_covers(paddle.randn([2, 3, 40, 40]), bn3, conv3)  # the flat path's shape
    assert not fused.depthwise_covers(x.astype("float64"), bn, conv)


def test_network_uses_the_fused_ops_in_training(kernel, monkeypatch):
    """A training step of the network runs the fused ops for its units' pairs (the expand
    conv joining the depthwise one where it pays: here on every map, which at 32 px it
    takes nowhere by default) and gives the loss, gradients and running statistics of the
    ops run apart (to float rounding: the fused ops sum in other orders); eval mode calls
    none of them."""
    monkeypatch.setattr(fused, "EXPAND_MIN_PLANE", 0)
    calls = []
    real = paddle._C_ops._run_custom_op
    monkeypatch.setattr(paddle._C_ops, "_run_custom_op",
                        lambda name, *a: calls.append(name) or real(name, *a))
    # batch 16: with 4 images the last stages' batch norms see 4 values a channel and
    # amplify any rounding difference 100-fold (1e-7 in each fused op's output became 3e-4
    # in the logits)
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((16, 3, 32, 32)).astype("float32"))
    real_covers, real_pointwise = fused.depthwise_covers, fused.pointwise_op
    fused_ops = (fused.OP_NAME, fused.EXPAND_OP, *fused.POINTWISE_OPS.values())
    # the pair ops on every unit they cover: the 4x4 ones would otherwise run as one op
    # (small_unit, tested in test_ops_small_unit.py)
    monkeypatch.setattr(fused, "SMALL_UNIT_MAX_PIXELS", 0)

    def step(depthwise: bool, pointwise: bool):
        monkeypatch.setattr(fused, "depthwise_covers", real_covers if depthwise else (lambda *a: False))
        monkeypatch.setattr(fused, "pointwise_op", real_pointwise if pointwise else (lambda *a: None))
        paddle.seed(4)
        net = MobileNetV2(class_num=10, scale=0.5)
        assert net.use_cpu_kernels(True)
        net.train()
        calls.clear()
        logits = net(x)
        logits.mean().backward()
        used = {op: calls.count(op) for op in fused_ops}
        grads = [p.grad.numpy() for p in net.parameters() if not p.stop_gradient]
        stats = [p.numpy() for p in net.parameters() if p.stop_gradient]  # running mean, var
        return logits.numpy(), (grads, stats), used, net

    logits_a, state_a, used_a, _ = step(False, False)
    logits_d, state_d, used_d, _ = step(True, False)
    logits_f, state_f, used_f, net = step(True, True)
    # x0.5 at 32 px: the pairs on planes of 8 pixels and up (16x16 .. 3x3 maps)
    assert used_a == dict.fromkeys(fused_ops, 0)
    assert used_d[fused.OP_NAME] + used_d[fused.EXPAND_OP] >= 5 and used_d[fused.EXPAND_OP] >= 2
    assert all(used_f[op] == used_d[op] for op in (fused.OP_NAME, fused.EXPAND_OP))
    assert used_f[fused.POINTWISE_OPS[pw.OP_NAME]] >= 5
    # some gradients are sums that cancel to ~0 (a linear BN's bias before the next BN):
    # their rounding is measured against the largest gradient, not their own size
    floor = 1e-4 * max(np.linalg.norm(b) for b in state_a[0])
    stats_floor = 1e-6 * max(np.linalg.norm(b) for b in state_a[1])
    for logits, (grads, stats) in ((logits_d, state_d), (logits_f, state_f)):
        assert np.abs(logits - logits_a).max() <= 1e-4 * np.abs(logits_a).max()
        for a, b in zip(grads, state_a[0]):
            assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + floor
        for a, b in zip(stats, state_a[1]):  # a running mean may be ~0 as well
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + stats_floor
    net.eval()
    calls.clear()
    with paddle.no_grad():
        net(x)
    assert not set(fused_ops) & set(calls)


def run_pointwise(shape, c_out, fuse: bool, bf16: bool = False, seed=0):
    """[y, dx, dgamma, dbeta, dweight, running mean, running var] of relu6(bn(x)) -> 1x1
    conv: the fused op or the two ops."""
    rng = np.random.default_rng(seed)
    xn = (rng.standard_normal(shape) * 2 + 1).astype("float32")
    bn, _ = bn_depthwise_layers(shape[1], 1, rng)
    conv = paddle.nn.Conv2D(shape[1], c_out, 1, bias_attr=False)
    conv.weight.set_value((rng.standard_normal((c_out, shape[1], 1, 1)) * 0.3).astype("float32"))
    x = paddle.to_tensor(xn, stop_gradient=False)
    if fuse:
        op = fused.pointwise_op(x, bn, conv, bf16)
        assert op == fused.POINTWISE_OPS[pw.BF16_OP_NAME if bf16 else pw.OP_NAME]
        y, ysums = fused.bn_relu6_pointwise(x, bn, conv, op)
        _check_sums(y.numpy(), ysums.numpy(), shift_tol=2e-2 if bf16 else 1e-4)
    else:
        y = pw.pointwise_conv2d(fbn.batch_norm_act(x, bn, True), conv.weight, bf16=bf16)
    up = rng.standard_normal(y.shape).astype("float32")
    (y * paddle.to_tensor(up)).sum().backward()
    return [y.numpy(), x.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy(),
            conv.weight.grad.numpy(), bn._mean.numpy(), bn._variance.numpy()]


# (n, c_in, h, w), c_out: projections and expansions, odd maps (pixel tails), maps over one
# 1024-pixel block (a partial last block), 28x28 and 56x56 projections (the op's own
# weight-gradient kernel on AVX-512 CPUs), 3x3 maps (the smallest it takes)
POINTWISE_CASES = [((2, 16, 8, 8), 8), ((3, 12, 9, 11), 40), ((2, 24, 35, 35), 16),
                   ((2, 48, 28, 28), 16), ((1, 32, 56, 56), 8), ((4, 40, 3, 3), 24),
                   ((2, 8, 16, 16), 48)]


@pytest.mark.parametrize("shape,c_out", POINTWISE_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_pointwise_fused_op_matches_the_two_ops(kernel, shape, c_out):
    """The same values (the products' rounding apart), the running statistics exactly."""
    if pw.block_op(paddle.zeros(shape), paddle.zeros([c_out, shape[1], 1, 1])) is None:
        pytest.skip("the 1x1 op is not used for this shape here (no MKL, or no AVX-512)")
    got, ref = run_pointwise(shape, c_out, True), run_pointwise(shape, c_out, False)
    for name, a, b in zip(NAMES, got, ref):
        assert a.shape == b.shape, name
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
        assert err <= 1e-5, (name, err)
    for name, a, b in zip(NAMES[-2:], got[-2:], ref[-2:]):
        assert np.array_equal(a, b), name


def test_pointwise_fused_op_bf16(kernel):
    """trainer.amp: the bfloat16 variant where the 1x1 op would take its bfloat16 products,
    the same values as the two ops with bfloat16 products (to bfloat16 rounding)."""
    k = dw.load_kernel()
    if not k.pointwise_bf16:
        pytest.skip("no bfloat16 op here (needs Paddle's oneDNN)")
    shape, c_out = (2, 64, 14, 14), 384
    got, ref = run_pointwise(shape, c_out, True, True), run_pointwise(shape, c_out, False, True)
    for name, a, b in zip(NAMES, got, ref):
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
        assert err <= 1e-5, (name, err)


def _check_sums(y: np.ndarray, sums: np.ndarray, shift_tol: float = 1e-4):
    """sums = [sum (y - K), sum (y - K)^2, K] per channel, K one of the channel's values,
    then 1 (taken). shift_tol: how near K is to y's first pixel, relative to that pixel
    and the channel's spread; bfloat16 products make y from rounded operands and K from
    the float32 ones."""
    c = y.shape[1]
    assert sums.dtype == np.float64 and sums.shape == (3 * c + 1,)
    assert sums[-1] == 1.0
    k = sums[2 * c:3 * c]
    yd = y.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1) - k[:, None]
    np.testing.assert_allclose(sums[:c], yd.sum(1), rtol=1e-5, atol=1e-4 * np.abs(yd).max())
    np.testing.assert_allclose(sums[c:2 * c], (yd * yd).sum(1), rtol=1e-5)
    # a shift near the data (the first output pixel) keeps the float sums exact enough
    spread = y.transpose(1, 0, 2, 3).reshape(c, -1).std(1)
    first = np.abs(y[0, :, 0, 0])
    assert np.all(np.abs(k - y[0, :, 0, 0]) <= shift_tol * (1 + first + spread))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_producer_sums_feed_the_fused_ops(kernel, bf16, monkeypatch):
    """expand 1x1 (its output's sums) -> fused depthwise op (reads them instead of summing
    its input; gives its own output's sums) -> fused 1x1 op (reads those): each sum is
    right, and the chain computes what the ops summing for themselves compute, whether the
    outputs are streamed to memory (MBV2_STREAM_BYTES=0: all of them) or not."""
    if bf16 and not dw.load_kernel().pointwise_bf16:
        pytest.skip("no bfloat16 op here (needs Paddle's oneDNN)")
    monkeypatch.setenv("MBV2_STREAM_BYTES", "0")
    rng = np.random.default_rng(6)
    x = paddle.to_tensor(rng.standard_normal((3, 32, 14, 14)).astype("float32"))
    w_expand = paddle.to_tensor((rng.standard_normal((64, 32, 1, 1)) * 0.3).astype("float32"))
    if pw.block_op(x, w_expand, bf16) is None:
        pytest.skip("the 1x1 op is not used here")
    y, sums = pw.pointwise_conv2d_sums(x, w_expand, bf16)
    assert np.array_equal(y.numpy(), pw.pointwise_conv2d(x, w_expand, bf16).numpy())
    _check_sums(y.numpy(), sums.numpy())
    bn1, conv = bn_depthwise_layers(64, 1, rng)
    bn2, _ = bn_depthwise_layers(64, 1, rng)
    proj = paddle.nn.Conv2D(64, 32, 1, bias_attr=False)
    proj.weight.set_value((rng.standard_normal((32, 64, 1, 1)) * 0.3).astype("float32"))
    out = []
    for given in (True, False):
        for b in (bn1, bn2):  # the same running statistics for both chains
            b._mean.set_value(np.zeros(64, "float32"))
            b._variance.set_value(np.ones(64, "float32"))
        z, zsums = fused.bn_relu6_depthwise(y, bn1, conv, sums if given else None)
        _check_sums(z.numpy(), zsums.numpy())
        op = fused.pointwise_op(z, bn2, proj, bf16)
        assert op is not None
        p, psums = fused.bn_relu6_pointwise(z, bn2, proj, op, zsums if given else None)
        _check_sums(p.numpy(), psums.numpy(), shift_tol=2e-2 if bf16 else 1e-4)
        out.append([z.numpy(), p.numpy(), bn1._mean.numpy(), bn1._variance.numpy(),
                    bn2._mean.numpy(), bn2._variance.numpy()])
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_sums_not_given_or_not_taken_are_summed_by_the_fused_op(kernel):
    """Every producer takes its output's sums (their last element 1); the fused op given
    none, or sums whose taken flag is 0, sums its input itself: the same output and running
    statistics as with the producer's sums."""
    rng = np.random.default_rng(7)
    x = paddle.to_tensor(rng.standard_normal((2, 16, 8, 8)).astype("float32"))
    w = paddle.to_tensor((rng.standard_normal((32, 16, 1, 1)) * 0.3).astype("float32"))
    if pw.block_op(x, w) is None:
        pytest.skip("the 1x1 op is not used here")
    bn, conv = bn_depthwise_layers(32, 1, rng)
    y, sums = pw.pointwise_conv2d_sums(x, w)
    assert sums.numpy()[-1] == 1.0
    out = []
    for given in (sums, None, paddle.zeros_like(sums)):
        bn._mean.set_value(np.zeros(32, "float32"))
        bn._variance.set_value(np.ones(32, "float32"))
        z, zsums = fused.bn_relu6_depthwise(y, bn, conv, given)
        assert zsums.numpy()[-1] == 1.0
        out.append((z.numpy(), bn._mean.numpy(), bn._variance.numpy()))
    for got in out[1:]:
        for a, b in zip(got, out[0]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pointwise_op_covers_only_what_it_takes(kernel):
    rng = np.random.default_rng(3)
    bn, _ = bn_depthwise_layers(16, 1, rng)
    conv = paddle.nn.Conv2D(16, 8, 1, bias_attr=False)
    x = paddle.randn([2, 16, 8, 8])
    if pw.block_op(x, conv.weight) is None:
        pytest.skip("the 1x1 op is not used here")
    assert fused.pointwise_op(x, bn, conv) == fused.POINTWISE_OPS[pw.OP_NAME]
    assert fused.pointwise_op(paddle.randn([2, 16, 2, 2]), bn, conv) is None  # the rows op's maps
    strided = paddle.nn.Conv2D(16, 8, 1, stride=2, bias_attr=False)
    assert fused.pointwise_op(x, bn, strided) is None
    bn.eval()
    assert fused.pointwise_op(x, bn, conv) is None


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
