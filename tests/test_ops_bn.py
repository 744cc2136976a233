"""The fused training-mode batch norm + ReLU6 op against Paddle's batch_norm and relu6:
output, dx, dgamma, dbeta and the running statistics, over odd and tiny shapes, and the
model switch that turns it on with the depthwise op."""
from __future__ import annotations

import numpy as np
import pytest

import mbv2  # noqa: F401  (environment for Paddle's MKL)
import paddle
import paddle.nn.functional as F

from mbv2.model import ConvBNLayer, MobileNetV2
from mbv2.ops import batch_norm as fbn
from mbv2.ops import depthwise as dw

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _bn(c: int, rng) -> paddle.nn.BatchNorm2D:
    bn = paddle.nn.BatchNorm2D(c)
    bn.weight.set_value(rng.uniform(0.5, 2.0, c).astype("float32"))
    bn.bias.set_value(rng.uniform(-1.0, 3.0, c).astype("float32"))
    bn._mean.set_value(rng.standard_normal(c).astype("float32"))
    bn._variance.set_value(rng.uniform(0.5, 2.0, c).astype("float32"))
    bn.train()
    return bn


def run_both(shape, act, seed=0):
    """[y, dx, dgamma, dbeta, running mean, running var] of the op and of Paddle."""
    n, c, h, w = shape
    results = []
    for fused in (True, False):
        rng = np.random.default_rng(seed)
        xn = (rng.standard_normal(shape) * 2 + 1).astype("float32")
        up = rng.standard_normal(shape).astype("float32")
        bn = _bn(c, rng)
        x = paddle.to_tensor(xn, stop_gradient=False)
        if fused:
            y = fbn.batch_norm_act(x, bn, act)
        else:
            y = F.relu6(bn(x)) if act else bn(x)
        (y * paddle.to_tensor(up)).sum().backward()
        results.append([y.numpy(), x.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy(),
                        bn._mean.numpy(), bn._variance.numpy()])
    return results


SHAPES = [  # (n, c, h, w): HW=1, batch 1 with HW>1, one channel, > 64 channels, odd sizes,
    # and planes of 56x56 and up (whole channels per thread)
    (8, 70, 1, 1), (4, 6, 2, 2), (1, 5, 7, 9), (3, 1, 4, 4), (2, 130, 3, 5), (5, 3, 11, 13),
    (2, 9, 16, 16), (3, 5, 57, 59), (1, 3, 56, 56),
    # the plane sizes the forward compiles in (4x4, 8x8, 16x16: FixedPlane), with more
    # planes than threads and channels that do not divide them evenly
    (5, 7, 4, 4), (3, 10, 8, 8), (4, 3, 16, 16),
]


@pytest.mark.parametrize("act", [True, False], ids=["relu6", "linear"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_paddle_batch_norm(kernel, shape, act):
    got, ref = run_both(shape, act)
    for name, a, b in zip(("y", "dx", "dgamma", "dbeta", "running_mean", "running_var"), got, ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-4, (name, rel_err(a, b))


@pytest.mark.parametrize("plane", [(9, 11), (57, 56)], ids=["9x11", "57x56"])
@pytest.mark.parametrize("act", [True, False], ids=["relu6", "linear"])
def test_gradients_for_every_kind_of_gamma(kernel, act, plane):
    """gamma 0, tiny, negative, and a beta that dwarfs gamma all give Paddle's gradients,
    channel by channel. (A backward pass that reads gamma * xhat off y - beta instead of
    x - mean, to stream one tensor less, fails this on the gamma=1e-4, beta=2 channel.)"""
    gammas = np.array([1.0, 0.0, 1e-4, -0.7, 0.01, 2.5, -3e-3, 0.3], "float32")
    betas = np.array([0.5, 1.0, 2.0, 0.2, 3.0, -1.0, 0.0, 80.0], "float32")
    c = len(gammas)
    rng = np.random.default_rng(5)
    xn = (rng.standard_normal((3, c, *plane)) * 2 + 1).astype("float32")
    up = rng.standard_normal(xn.shape).astype("float32")
    out = []
    for fused in (True, False):
        bn = paddle.nn.BatchNorm2D(c)
        bn.weight.set_value(gammas)
        bn.bias.set_value(betas)
        bn.train()
        x = paddle.to_tensor(xn, stop_gradient=False)
        y = fbn.batch_norm_act(x, bn, act) if fused else (F.relu6(bn(x)) if act else bn(x))
        (y * paddle.to_tensor(up)).sum().backward()
        out.append([x.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy()])
    for name, a, b in zip(("dx", "dgamma", "dbeta"), *out):
        assert rel_err(a, b) <= 1e-4, (name, rel_err(a, b))
        # per channel too: a channel with a small gradient must not hide in the norm
        for ch in range(c):
            ac, bc = (a[:, ch], b[:, ch]) if a.ndim == 4 else (a[ch:ch + 1], b[ch:ch + 1])
            assert np.abs(ac - bc).max() <= 1e-4 * max(np.abs(bc).max(), 1e-2), (name, ch)


# hw % 8 == 0 and at least 8 pixels: the gated planes that may stream (mid-size planes in
# plane order, 56x56 channel by channel), plus a plane that never does (hw % 8 != 0)
@pytest.mark.parametrize("shape", [(2, 9, 16, 16), (2, 3, 56, 56), (3, 5, 57, 59)],
                         ids=lambda s: "x".join(map(str, s)))
def test_streamed_outputs_equal_cached_ones(kernel, shape, monkeypatch):
    """With every output over MBV2_STREAM_BYTES bytes written by streamed stores (here all
    of them), y, dx and the gate-masked gradients are bit-identical to the normal stores."""
    monkeypatch.setenv("MBV2_STREAM_BYTES", str(1 << 50))
    cached, ref = run_both(shape, True)
    monkeypatch.setenv("MBV2_STREAM_BYTES", "0")
    streamed, _ = run_both(shape, True)
    for name, a, b, r in zip(("y", "dx", "dgamma", "dbeta", "running_mean", "running_var"),
                             streamed, cached, ref):
        assert np.array_equal(a, b), name
        assert rel_err(a, r) <= 1e-4, name


def test_streamed_outputs_are_aligned_for_the_stream_path(kernel):
    """The stream path needs 32-byte aligned outputs; Paddle's CPU allocations are, so the
    test above runs it (an unaligned output quietly takes the normal stores)."""
    bn = _bn(9, np.random.default_rng(0))
    for _ in range(4):
        x = paddle.randn([2, 9, 16, 16])
        x.stop_gradient = False
        y = fbn.batch_norm_act(x, bn, True)
        assert y.data_ptr() % 32 == 0
        y.sum().backward()
        assert x.grad.data_ptr() % 32 == 0


def test_running_stats_use_biased_variance(kernel):
    """Paddle's CPU kernel: running = 0.9 * running + 0.1 * batch, with the biased
    variance; check against numpy too, so that both cannot drift together."""
    rng = np.random.default_rng(3)
    xn = rng.standard_normal((4, 3, 3, 3)).astype("float32") * 3
    bn = _bn(3, rng)
    m0, v0 = bn._mean.numpy().copy(), bn._variance.numpy().copy()
    fbn.batch_norm_act(paddle.to_tensor(xn), bn, True)
    np.testing.assert_allclose(bn._mean.numpy(), 0.9 * m0 + 0.1 * xn.mean((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 * v0 + 0.1 * xn.var((0, 2, 3)), rtol=1e-5)


def test_falls_back_where_no_op_applies(kernel, monkeypatch):
    """Eval mode with gradients on (the inference op has none) and one value per channel
    in training go to Paddle's own ops."""
    def boom(*a, **kw):
        raise AssertionError("the custom op must not be used here")

    monkeypatch.setattr(paddle._C_ops, "_run_custom_op", boom)
    rng = np.random.default_rng(0)
    bn = _bn(4, rng)
    x = paddle.to_tensor(rng.standard_normal((2, 4, 3, 3)).astype("float32"), stop_gradient=False)
    bn.eval()
    y = fbn.batch_norm_act(x, bn, True)
    np.testing.assert_allclose(y.numpy(), F.relu6(bn(x)).numpy())
    y.sum().backward()  # a gradient reaches x through Paddle's ops
    assert x.grad is not None
    bn.train()  # one value per channel: Paddle's own op decides what that means
    x1 = paddle.to_tensor(rng.standard_normal((1, 4, 1, 1)).astype("float32"))
    assert fbn.batch_norm_act(x1, bn, True).shape == [1, 4, 1, 1]


@pytest.mark.parametrize("act", [True, False], ids=["relu6", "linear"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eval_no_grad_matches_paddle(kernel, shape, act, monkeypatch):
    """Eval mode under no_grad: the one-pass inference op, with the running statistics,
    gives Paddle's batch_norm (+ relu6) and leaves the statistics alone."""
    rng = np.random.default_rng(2)
    bn = _bn(shape[1], rng)
    bn.eval()
    x = paddle.to_tensor((rng.standard_normal(shape) * 2 + 1).astype("float32"))
    stats = (bn._mean.numpy().copy(), bn._variance.numpy().copy())
    calls = []
    real = paddle._C_ops._run_custom_op
    monkeypatch.setattr(paddle._C_ops, "_run_custom_op",
                        lambda name, *a: calls.append(name) or real(name, *a))
    with paddle.no_grad():
        got = fbn.batch_norm_act(x, bn, act)
        ref = F.relu6(bn(x)) if act else bn(x)
    assert calls == [fbn.INFER_OP_NAME]
    assert got.stop_gradient
    assert rel_err(got.numpy(), ref.numpy()) <= 1e-5
    np.testing.assert_array_equal(bn._mean.numpy(), stats[0])
    np.testing.assert_array_equal(bn._variance.numpy(), stats[1])


def test_eval_model_matches_native(kernel):
    """A whole model in eval mode under no_grad (evaluation, dygraph prediction): the
    kernels give Paddle's logits."""
    paddle.seed(3)
    fast = MobileNetV2(class_num=10, scale=0.5)
    native = MobileNetV2(class_num=10, scale=0.5)
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype("float32"))
    fast.train()
    fast(x)  # non-trivial running statistics
    native.set_state_dict(fast.state_dict())
    assert fast.use_cpu_kernels(True)
    fast.eval()
    native.eval()
    with paddle.no_grad():
        assert rel_err(fast(x).numpy(), native(x).numpy()) <= 1e-4


def test_no_grad(kernel):
    rng = np.random.default_rng(1)
    bn = _bn(5, rng)
    x = paddle.to_tensor(rng.standard_normal((3, 5, 4, 4)).astype("float32"))
    with paddle.no_grad():
        y = fbn.batch_norm_act(x, bn, True)
    assert y.stop_gradient


def test_model_switch(kernel):
    """use_cpu_kernels(True) puts every ConvBNLayer on the kernels, False back on Paddle's
    ops, reference_ops() for a block only; state-dict keys are unaffected."""
    from mbv2.ops import CPU_KERNELS, PADDLE_OPS

    net = MobileNetV2(class_num=10, scale=0.25)
    layers = [m for m in net.sublayers() if isinstance(m, ConvBNLayer)]
    keys = list(net.state_dict())
    assert all(l._ops is PADDLE_OPS for l in layers)  # a new network: Paddle's ops
    assert net.use_cpu_kernels(True)
    assert all(l._ops is CPU_KERNELS for l in layers)
    assert list(net.state_dict()) == keys
    with net.reference_ops():
        assert all(l._ops is PADDLE_OPS for l in layers)
    assert all(l._ops is CPU_KERNELS for l in layers)
    assert not net.use_cpu_kernels(False)
    assert all(l._ops is PADDLE_OPS for l in layers)


def test_train_step_running_stats_match_native(kernel):
    """One train-mode forward of the whole model: every running mean/var as Paddle's."""
    paddle.seed(7)
    fast = MobileNetV2(class_num=10, scale=0.25)
    native = MobileNetV2(class_num=10, scale=0.25)
    native.set_state_dict(fast.state_dict())
    assert fast.use_cpu_kernels(True)
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype("float32"))
    for net in (fast, native):
        net.train()
        net(x)
    sf, sn = fast.state_dict(), native.state_dict()
    for k in sn:
        if k.endswith("._mean") or k.endswith("._variance"):
            # (means behind a linear BN are ~1e-9 on both sides: atol)
            np.testing.assert_allclose(sf[k].numpy(), sn[k].numpy(), rtol=1e-4, atol=1e-6,
                                       err_msg=k)


def _producer_sums(xn: np.ndarray, taken: float = 1.0) -> np.ndarray:
    """x's batch norm sums as a conv that made x hands them on (OutputSums::Finish): per
    channel sum (x - K), sum (x - K)^2, K (the channel's first value), then the taken flag."""
    c = xn.shape[1]
    k = xn[0, :, 0, 0].astype("float64")
    d = xn.transpose(1, 0, 2, 3).reshape(c, -1).astype("float64") - k[:, None]
    return np.concatenate([d.sum(1), (d * d).sum(1), k, [taken]])


# small planes (the per-image path), the mid-size plane order and 56x56 and up
@pytest.mark.parametrize("shape", [(4, 6, 2, 2), (3, 5, 11, 13), (2, 9, 16, 16), (2, 3, 57, 59)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", [True, False])
def test_given_sums_stand_for_the_statistics_pass(kernel, shape, act):
    """With x's sums given (as the projection's fused ops give them) the op makes no
    statistics pass of its own and computes what it computes summing x itself: output,
    gradients and running statistics to float rounding; sums whose taken flag is 0 are
    ignored (summed here)."""
    rng = np.random.default_rng(11)
    xn = (rng.standard_normal(shape) * 2 + 1).astype("float32")
    up = rng.standard_normal(shape).astype("float32")
    out = []
    for sums in (None, _producer_sums(xn), _producer_sums(xn, taken=0.0)):
        bn = _bn(shape[1], np.random.default_rng(3))
        x = paddle.to_tensor(xn, stop_gradient=False)
        y = fbn.batch_norm_act(x, bn, act, None if sums is None else paddle.to_tensor(sums))
        (y * paddle.to_tensor(up)).sum().backward()
        out.append([y.numpy(), x.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy(),
                    bn._mean.numpy(), bn._variance.numpy()])
    for got in out[1:]:
        for a, b in zip(got, out[0]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(np.abs(b).max(), 1.0))


def test_given_sums_of_the_wrong_size_are_an_error(kernel):
    bn = _bn(4, np.random.default_rng(0))
    x = paddle.randn([2, 4, 8, 8])
    with pytest.raises(Exception, match="3 C \\+ 1"):
        fbn.batch_norm_act(x, bn, True, paddle.zeros([12], dtype="float64"))
