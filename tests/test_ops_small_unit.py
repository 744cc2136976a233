"""A whole inverted residual unit on maps of at most 16 pixels as one op (`fused.small_unit`,
`small_unit.cc`) against the same unit on Paddle's own ops and on a float64 twin: outputs,
every gradient and the three batch norms' running statistics over the shapes it covers
(strides 1 and 2, square and oblong maps, inputs far from zero), and where the network
takes it (training on 4x4, 2x2 and 1x1 maps) and where not (eval mode, hooks, larger maps,
mixed precision where a product would run in bfloat16)."""
from __future__ import annotations

import numpy as np
import pytest

import mbv2  # noqa: F401  (environment for Paddle's MKL)
import paddle
import paddle.nn.functional as F

from mbv2.model import MobileNetV2
from mbv2.model.network import InvertedResidualUnit
from mbv2.ops import CPU_KERNELS, CPU_KERNELS_BF16, PADDLE_OPS, fused

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")


def make_unit(c_in, c_out, expansion, stride, ops, rng, dtype="float32"):
    """An InvertedResidualUnit on `ops` with random weights and batch norm parameters (so
    that a wrong scale, shift or running statistic cannot hide behind 1s and 0s)."""
    paddle.set_default_dtype(dtype)
    try:
        unit = InvertedResidualUnit(c_in, c_in, c_out, stride, expansion)
    finally:
        paddle.set_default_dtype("float32")
    for layer in (unit._expand_conv, unit._bottleneck_conv, unit._linear_conv):
        layer._ops = ops
        conv, bn = layer._conv, layer._batch_norm
        conv.weight.set_value((rng.standard_normal(conv.weight.shape) * 0.4).astype(dtype))
        bn.weight.set_value((rng.uniform(0.5, 1.5, bn.weight.shape)).astype(dtype))
        bn.bias.set_value((rng.standard_normal(bn.bias.shape) * 0.5).astype(dtype))
        bn._mean.set_value((rng.standard_normal(bn._mean.shape) * 0.1).astype(dtype))
        bn._variance.set_value((rng.uniform(0.5, 2.0, bn._variance.shape)).astype(dtype))
    unit.train()
    return unit


LAYERS = ("_expand_conv", "_bottleneck_conv", "_linear_conv")


def run_unit(shape, c_out, expansion, stride, ops, seed=0, offset=0.0, dtype="float32"):
    """{name: array} of one training-mode forward + backward of a unit: the output, x's
    gradient, each layer's weight / gamma / beta gradients and running statistics."""
    rng = np.random.default_rng(seed)
    unit = make_unit(shape[1], c_out, expansion, stride, ops, rng, dtype)
    xn = rng.standard_normal(shape) + offset
    x = paddle.to_tensor(xn.astype(dtype), stop_gradient=False)
    y = unit(x, False)
    up = rng.standard_normal(y.shape).astype(dtype)
    (y * paddle.to_tensor(up)).sum().backward()
    out = {"y": y.numpy(), "dx": x.grad.numpy()}
    for name in LAYERS:
        layer = getattr(unit, name)
        conv, bn = layer._conv, layer._batch_norm
        out[f"{name}.dweight"] = conv.weight.grad.numpy()
        out[f"{name}.dgamma"] = bn.weight.grad.numpy()
        out[f"{name}.dbeta"] = bn.bias.grad.numpy()
        out[f"{name}.running_mean"] = bn._mean.numpy()
        out[f"{name}.running_var"] = bn._variance.numpy()
    return out


def rel_err(a, b):
    return float(np.abs(a.astype("float64") - b).max() / max(np.abs(b).max(), 1e-12))


# (n, c_in, h, w), c_out, expansion, stride: MobileNetV2's units at 32 px (4x4, 2x2 and 1x1
# maps, strided 4x4 -> 2x2 and 2x2 -> 1x1 ones, x0.5 and x1.0 widths), channel counts off
# the 16-float boundaries the threads split on, oblong and odd maps, a batch of 2
CASES = [((16, 32, 2, 2), 32, 6, 1), ((16, 48, 2, 2), 80, 6, 2), ((16, 80, 1, 1), 80, 6, 1),
         ((8, 16, 4, 4), 16, 6, 1), ((8, 16, 4, 4), 32, 6, 2), ((4, 12, 3, 5), 10, 6, 2),
         ((8, 20, 1, 1), 36, 6, 1), ((6, 10, 2, 3), 14, 3, 1), ((6, 10, 3, 2), 12, 6, 2),
         ((5, 9, 1, 3), 9, 1, 2), ((2, 12, 1, 2), 8, 4, 1)]
IDS = ["x".join(map(str, s)) + f"-{c}-t{t}-s{st}" for s, c, t, st in CASES]


@pytest.mark.parametrize("shape,c_out,expansion,stride", CASES, ids=IDS)
def test_one_op_matches_paddles_ops(kernel, shape, c_out, expansion, stride):
    """The op computes what Paddle's conv2d, batch_norm and relu6 compute, to float32
    rounding, for every output and gradient; and is as close to a float64 computation
    of the same unit as Paddle's own float32 ops are (a wrong term is off by O(1))."""
    probe = make_unit(shape[1], c_out, expansion, stride, CPU_KERNELS, np.random.default_rng(0))
    assert fused.small_unit_plan(paddle.zeros(shape), probe._expand_conv, probe._bottleneck_conv,
                                 probe._linear_conv) is not None
    got = run_unit(shape, c_out, expansion, stride, CPU_KERNELS)
    ref = run_unit(shape, c_out, expansion, stride, PADDLE_OPS)
    exact = run_unit(shape, c_out, expansion, stride, PADDLE_OPS, dtype="float64")
    assert got.keys() == ref.keys() == exact.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        err, paddle_err = rel_err(got[name], exact[name]), rel_err(ref[name], exact[name])
        assert err <= 4 * paddle_err + 1e-5, (name, err, paddle_err)


def test_one_op_keeps_its_accuracy_on_offset_inputs(kernel):
    """Inputs at mean 5 (the batch norm statistics' shift against cancellation): still
    within float32 rounding of the float64 unit."""
    args = ((16, 32, 2, 2), 32, 6, 1)
    got = run_unit(*args, CPU_KERNELS, seed=4, offset=5.0)
    ref = run_unit(*args, PADDLE_OPS, seed=4, offset=5.0)
    exact = run_unit(*args, PADDLE_OPS, seed=4, offset=5.0, dtype="float64")
    for name in ref:
        err, paddle_err = rel_err(got[name], exact[name]), rel_err(ref[name], exact[name])
        assert err <= 4 * paddle_err + 1e-5, (name, err, paddle_err)


def test_one_op_is_deterministic(kernel):
    """Two runs from the same state give the same bits (the threads split channels, never
    a sum)."""
    a = run_unit((16, 48, 2, 2), 80, 6, 2, CPU_KERNELS, seed=2)
    b = run_unit((16, 48, 2, 2), 80, 6, 2, CPU_KERNELS, seed=2)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_no_grad_forward_updates_statistics_without_a_grad_node(kernel):
    """Under no_grad (a train-mode forward that records nothing) the op gives the same
    output and running statistics and leaves nothing for autograd."""
    rng = np.random.default_rng(5)
    x = paddle.to_tensor(rng.standard_normal((16, 32, 2, 2)).astype("float32"))
    units = [make_unit(32, 32, 6, 1, ops, np.random.default_rng(1)) for ops in (CPU_KERNELS, PADDLE_OPS)]
    with paddle.no_grad():
        ys = [u(x, False) for u in units]
    assert ys[0].stop_gradient
    np.testing.assert_allclose(ys[0].numpy(), ys[1].numpy(), rtol=1e-4, atol=1e-4)
    for name in LAYERS:
        bn0, bn1 = getattr(units[0], name)._batch_norm, getattr(units[1], name)._batch_norm
        np.testing.assert_allclose(bn0._mean.numpy(), bn1._mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn0._variance.numpy(), bn1._variance.numpy(), rtol=1e-4)


def _count_calls(monkeypatch):
    calls = []
    real = fused.small_unit

    def counting(x, plan):
        calls.append(tuple(x.shape))
        return real(x, plan)

    monkeypatch.setattr(fused, "small_unit", counting)
    return calls


def test_network_takes_the_op_on_small_maps_in_training_only(kernel, monkeypatch):
    """At 32 px the units on 4x4, 2x2 and 1x1 maps (13 of the 17) run as one op in
    training; those on 8x8 maps and larger keep their ops; eval mode runs none through it; the training
    step's gradients agree with Paddle's ops."""
    calls = _count_calls(monkeypatch)
    paddle.seed(0)
    net = MobileNetV2(class_num=10, scale=0.25)
    ref = MobileNetV2(class_num=10, scale=0.25)
    ref.set_state_dict(net.state_dict())
    assert net.use_cpu_kernels(True)
    x = paddle.randn([8, 3, 32, 32])
    y = paddle.randint(0, 10, [8])
    losses = []
    for model in (net, ref):
        model.train()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(float(loss))
    assert len(calls) == 13 and all(s[2] * s[3] <= 16 for s in calls), calls
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (k, p), q in zip(net.named_parameters(), ref.parameters()):
        if q.grad is not None and np.linalg.norm(q.grad.numpy()) > 1e-3:
            assert rel_err(p.grad.numpy(), q.grad.numpy()) <= 1e-2, k
    calls.clear()
    net.eval()
    with paddle.no_grad():
        net(x)
    assert calls == []


def test_hooks_and_frozen_statistics_keep_the_ops_apart(kernel, monkeypatch):
    """A forward hook on a layer of the unit (its calls must be seen) or a batch norm on
    global statistics sends the unit through its layers."""
    calls = _count_calls(monkeypatch)
    unit = make_unit(16, 16, 6, 1, CPU_KERNELS, np.random.default_rng(0))
    x = paddle.randn([8, 16, 2, 2])
    seen = []
    handle = unit._bottleneck_conv.register_forward_post_hook(lambda layer, i, o: seen.append(1))
    unit(x, True)
    handle.remove()
    assert seen and calls == []
    unit(x, True)
    assert len(calls) == 1
    unit._linear_conv._batch_norm._use_global_stats = True
    unit(x, True)
    assert len(calls) == 1


def test_mixed_precision_keeps_bf16_products_apart(kernel):
    """Under mixed precision the op (float32 products) is taken only where neither 1x1
    product would run in bfloat16 apart."""
    if not kernel.pointwise_bf16:
        pytest.skip("no bfloat16 ops in this build")
    from mbv2.ops import pointwise as pw

    big = make_unit(96, 96, 6, 1, CPU_KERNELS_BF16, np.random.default_rng(0))
    small = make_unit(8, 8, 6, 1, CPU_KERNELS_BF16, np.random.default_rng(0))
    xb, xs = paddle.zeros([128, 96, 2, 2]), paddle.zeros([4, 8, 2, 2])
    assert pw._rows_bf16_pays(96, 576, 512)
    assert fused.small_unit_plan(xb, big._expand_conv, big._bottleneck_conv, big._linear_conv, True) is None
    assert fused.small_unit_plan(xb, big._expand_conv, big._bottleneck_conv, big._linear_conv) is not None
    assert fused.small_unit_plan(xs, small._expand_conv, small._bottleneck_conv, small._linear_conv,
                                 True) is not None


def test_one_value_a_channel_goes_to_paddle(kernel):
    """A batch of one 1x1 map leaves one value a channel: not the op's (Paddle's
    batch_norm raises for it in training, as it does without the kernels)."""
    unit = make_unit(8, 8, 6, 1, CPU_KERNELS, np.random.default_rng(0))
    assert fused.small_unit_plan(paddle.zeros([1, 8, 1, 1]), unit._expand_conv,
                                 unit._bottleneck_conv, unit._linear_conv) is None
    assert fused.small_unit_plan(paddle.zeros([2, 8, 1, 1]), unit._expand_conv,
                                 unit._bottleneck_conv, unit._linear_conv) is not None
