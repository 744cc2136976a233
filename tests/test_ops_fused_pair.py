"""The depthwise conv -> relu6(batch norm) -> projection 1x1 conv pair as one op
(`fused.depthwise_pointwise`, `fused.expand_depthwise_pointwise`) against the fused ops it
joins (`bn_relu6_depthwise` or `expand_bn_relu6_depthwise`, then `bn_relu6_pointwise`):
forward, every gradient and both batch norms' running statistics (bit for bit where the
arithmetic is the same vector code, to rounding where a channel group or a plane's tail
takes the scalar path), where the network takes it, and a whole network's gradients with
and without it."""
from __future__ import annotations

import numpy as np
import pytest

import mbv2  # noqa: F401  (environment for Paddle's MKL)
import paddle

from mbv2.model import MobileNetV2
from mbv2.ops import depthwise as dw
from mbv2.ops import fused
from mbv2.ops import pointwise as pw
from tests.fused_layers import bn_depthwise_layers

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")


def projection_layers(c: int, c_out: int, rng) -> tuple[paddle.nn.BatchNorm2D, paddle.nn.Conv2D]:
    """The projection's batch norm (gammas of both signs, betas clamping some channels at 0
    or 6) and its bias-free 1x1 conv."""
    bn, _ = bn_depthwise_layers(c, 1, rng)
    conv = paddle.nn.Conv2D(c, c_out, 1, bias_attr=False)
    conv.weight.set_value((rng.standard_normal((c_out, c, 1, 1)) * 0.3).astype("float32"))
    return bn, conv


def run_pair(shape, c_hidden, c_out, stride, merged: bool, expand: bool, bf16=False, seed=0):
    """The output, every gradient and both running statistics of [expand ->] relu6(bn) ->
    depthwise -> relu6(bn2) -> projection, through the pair op (merged) or the ops apart."""
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor((rng.standard_normal(shape) + 0.5).astype("float32"), stop_gradient=False)
    ex = None
    if expand:
        ex = paddle.nn.Conv2D(shape[1], c_hidden, 1, bias_attr=False)
        ex.weight.set_value((rng.standard_normal((c_hidden, shape[1], 1, 1)) * 0.5).astype("float32"))
    bn, conv = bn_depthwise_layers(c_hidden, stride, rng)
    bn2, conv2 = projection_layers(c_hidden, c_out, rng)
    if expand:
        assert fused.expand_covers(x, ex, bn, conv, bf16)
        if merged:
            res = fused.expand_depthwise_pointwise(x, ex, bn, conv, bn2, conv2, bf16)
            assert res is not None
            p, psums = res
            psums = psums.numpy()
        else:
            z, sums = fused.expand_bn_relu6_depthwise(x, ex, bn, conv)
    else:
        assert fused.depthwise_covers(x, bn, conv)
        if merged:
            res = fused.depthwise_pointwise(x, bn, conv, bn2, conv2, None, bf16)
            assert res is not None
            p, psums = res
            psums = psums.numpy()
        else:
            z, sums = fused.bn_relu6_depthwise(x, bn, conv)
    if not merged:
        op = fused.pointwise_op(z, bn2, conv2, bf16)
        assert op is not None
        p, psums = fused.bn_relu6_pointwise(z, bn2, conv2, op, sums)
        psums = psums.numpy()  # the projection output's batch norm sums (batch_norm_act's)
    up = rng.standard_normal(p.shape).astype("float32")
    (p * paddle.to_tensor(up)).sum().backward()
    out = {"p": p.numpy(), "dx": x.grad.numpy(), "dgamma": bn.weight.grad.numpy(),
           "dbeta": bn.bias.grad.numpy(), "dweight": conv.weight.grad.numpy(),
           "dgamma2": bn2.weight.grad.numpy(), "dbeta2": bn2.bias.grad.numpy(),
           "dweight2": conv2.weight.grad.numpy(), "mean": bn._mean.numpy(),
           "var": bn._variance.numpy(), "mean2": bn2._mean.numpy(), "var2": bn2._variance.numpy(),
           "psums": psums}
    if expand:
        out["dweight_expand"] = ex.weight.grad.numpy()
    return out


# (n, c, h, w) of the depthwise conv's input (or the expand conv's), hidden and output
# channels, stride, expand: full channel groups at 28x28 and 56x56 (strides 1 and 2), a
# partial group, odd maps (plane tails, rows not a multiple of 8), and the expand pair
PAIR_CASES = [((2, 16, 28, 28), 16, 8, 1, False), ((2, 24, 56, 56), 24, 8, 2, False),
              ((2, 12, 29, 31), 12, 5, 1, False), ((2, 8, 28, 28), 48, 8, 1, True),
              ((1, 4, 57, 59), 20, 6, 2, True)]


def _exact(case) -> bool:
    """Whether every channel group is full and every depthwise output plane a multiple of
    8 pixels: then both paths run the same vector code, so the same bits."""
    (n, c, h, w), hidden, _, stride, _ = case
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    return hidden % 8 == 0 and (ho * wo) % 8 == 0


@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[1]}-{c[2]}-s{c[3]}" + ("-expand" if c[4] else ""))
def test_pair_op_matches_the_ops_apart(kernel, case):
    """The forward and running statistics bit for bit; the gradients bit for bit where the
    dz the depthwise backward makes as it reads (DyFold) runs the in-place pass's vector
    arithmetic, else to float rounding."""
    shape, hidden, c_out, stride, expand = case
    got = run_pair(shape, hidden, c_out, stride, True, expand)
    ref = run_pair(shape, hidden, c_out, stride, False, expand)
    assert got.keys() == ref.keys()
    for name in ref:
        a, b = got[name], ref[name]
        assert a.shape == b.shape, name
        if name in ("p", "psums", "mean", "var", "mean2", "var2", "dgamma2", "dbeta2",
                    "dweight2") or _exact(case):
            assert np.array_equal(a, b, equal_nan=True), (name, float(np.abs(a - b).max()))
        else:
            assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-3), name
        assert np.isfinite(a).all() and np.abs(a).max() > 0, name


def test_pair_op_bf16_matches_the_ops_apart(kernel):
    """With mixed precision the pair takes the bfloat16 projection op, as apart."""
    if not dw.load_kernel().pointwise_bf16:
        pytest.skip("op library built without oneDNN's bfloat16 GEMM")
    shape, hidden, c_out = (2, 192, 28, 28), 192, 64
    rng = np.random.default_rng(0)
    bn2, conv2 = projection_layers(hidden, c_out, rng)
    z = paddle.randn([2, hidden, 28, 28])
    assert fused.pointwise_op(z, bn2, conv2, True) == "mbv2_bn_relu6_pointwise_bf16"
    got = run_pair(shape, hidden, c_out, 1, True, False, bf16=True)
    ref = run_pair(shape, hidden, c_out, 1, False, False, bf16=True)
    for name in ref:
        assert np.array_equal(got[name], ref[name], equal_nan=True), name


def test_pair_op_covers_only_where_it_pays(kernel):
    """Depthwise outputs of 28x28 and up (fused.PAIR_MIN_PLANE) with a fused projection
    op; else None, and the caller runs the ops apart."""
    rng = np.random.default_rng(1)
    bn, conv = bn_depthwise_layers(16, 1, rng)
    bn2, conv2 = projection_layers(16, 8, rng)
    assert fused.depthwise_pointwise(paddle.randn([2, 16, 28, 28]), bn, conv, bn2, conv2, None) is not None
    assert fused.depthwise_pointwise(paddle.randn([2, 16, 27, 28]), bn, conv, bn2, conv2, None) is None
    bn_s2, conv_s2 = bn_depthwise_layers(16, 2, rng)
    # stride 2: the output's plane counts (56x56 -> 28x28 takes it, 54x54 -> 27x27 not)
    assert fused.depthwise_pointwise(paddle.randn([1, 16, 56, 56]), bn_s2, conv_s2, bn2, conv2, None) is not None
    assert fused.depthwise_pointwise(paddle.randn([1, 16, 54, 54]), bn_s2, conv_s2, bn2, conv2, None) is None
    bn2.eval()  # running statistics in the projection's batch norm: no fused 1x1 op
    assert fused.depthwise_pointwise(paddle.randn([2, 16, 28, 28]), bn, conv, bn2, conv2, None) is None


def _network_grads(pair: bool, monkeypatch) -> tuple[dict, list[str]]:
    with monkeypatch.context() as m:
        if not pair:
            m.setattr(fused, "PAIR_OPS", {})
            m.setattr(fused, "EXPAND_PAIR_OPS", {})
        calls = []
        real = paddle._C_ops._run_custom_op
        m.setattr(paddle._C_ops, "_run_custom_op", lambda name, *a: (calls.append(name), real(name, *a))[1])
        paddle.seed(3)
        net = MobileNetV2(class_num=10, scale=0.25)
        net.use_cpu_kernels(True)
        net.train()
        x = paddle.to_tensor(np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype("float32"))
        out = net(x)
        (out * out).mean().backward()
        got = {"out": out.numpy()}
        for name, p in net.named_parameters():
            if p.grad is not None:
                got[name] = p.grad.numpy()
        return got, calls


def test_network_gradients_with_the_pair_op(kernel, monkeypatch):
    """x0.25 at 64 px (units with 32x32 depthwise outputs take the pair, the rest the ops
    apart): the same outputs and gradients as with the ops apart everywhere."""
    got, calls = _network_grads(True, monkeypatch)
    ref, ref_calls = _network_grads(False, monkeypatch)
    assert "mbv2_bn_relu6_depthwise_pointwise" in calls
    assert not any(c.endswith("depthwise_pointwise") for c in ref_calls)
    assert got.keys() == ref.keys()
    np.testing.assert_array_equal(got["out"], ref["out"])
    for name in ref:
        a, b = got[name], ref[name]
        assert np.abs(a - b).max() <= 1e-4 * max(np.abs(b).max(), 1e-6), name
