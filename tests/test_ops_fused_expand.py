"""The expand 1x1 conv + batch norm + ReLU6 + depthwise conv as one op
(`fused.expand_bn_relu6_depthwise`) against the 1x1 op and the fused batch norm ->
depthwise op it replaces: forward, gradients and running statistics (bit for bit where the
arithmetic is the same, to rounding for the 1x1 conv's gradients, also on inputs far from
zero), and where the network takes it (`fused.expand_covers`)."""
from __future__ import annotations

import numpy as np
import pytest

import mbv2  # noqa: F401  (environment for Paddle's MKL)
import paddle

from mbv2.ops import depthwise as dw
from mbv2.ops import fused
from mbv2.ops import pointwise as pw
from tests.fused_layers import bn_depthwise_layers

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")


def run_expand(shape, c_exp, stride, merged: bool, seed=0, offset=1.0):
    """[z, sums, dx, dweight (expand), dgamma, dbeta, dweight (depthwise), running mean,
    running var] of x -> 1x1 expand -> relu6(bn) -> depthwise: the one op or the two ops
    (the 1x1 op giving its output's sums, then the fused batch norm -> depthwise op)."""
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor((rng.standard_normal(shape) + offset).astype("float32"), stop_gradient=False)
    expand = paddle.nn.Conv2D(shape[1], c_exp, 1, bias_attr=False)
    expand.weight.set_value((rng.standard_normal((c_exp, shape[1], 1, 1)) * 0.5).astype("float32"))
    bn, conv = bn_depthwise_layers(c_exp, stride, rng)
    if merged:
        z, sums = fused.expand_bn_relu6_depthwise(x, expand, bn, conv)
    else:
        y, ysums = pw.pointwise_conv2d_sums(x, expand.weight)
        assert ysums is not None  # the per-block op, as the one op runs
        z, sums = fused.bn_relu6_depthwise(y, bn, conv, ysums)
    up = rng.standard_normal(z.shape).astype("float32")
    (z * paddle.to_tensor(up)).sum().backward()
    return [z.numpy(), sums.numpy(), x.grad.numpy(), expand.weight.grad.numpy(),
            bn.weight.grad.numpy(), bn.bias.grad.numpy(), conv.weight.grad.numpy(),
            bn._mean.numpy(), bn._variance.numpy()]


EXPAND_NAMES = ("z", "sums", "dx", "dweight_expand", "dgamma", "dbeta", "dweight", "running_mean",
                "running_var")
# (n, c_in, h, w), c_out, stride: MobileNetV2's expansion 6 on maps of 28x28 and up (strides
# 1 and 2), odd maps (pixel tails in the blocks, the channel-lane path's rows), channel
# groups left partial, a map over one 1,024-pixel block per image (and one with 64
# expanded channels there, whose backward copies each block of gm first), and maps in cache
EXPAND_CASES = [((2, 8, 28, 28), 48, 1), ((2, 8, 28, 28), 48, 2), ((2, 5, 29, 31), 30, 1),
                ((1, 4, 45, 45), 20, 2), ((1, 8, 33, 33), 64, 2), ((2, 16, 9, 11), 20, 1),
                ((3, 12, 8, 8), 72, 1)]


@pytest.mark.parametrize("shape,c_exp,stride", EXPAND_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_expand_op_matches_the_two_ops(kernel, shape, c_exp, stride):
    """The one op computes what the 1x1 op and the fused op compute: the forward, the batch
    norm's and the depthwise conv's gradients bit for bit (the same arithmetic); the 1x1
    conv's gradients, taken from dy's terms apart (M x, the Gram matrix), to rounding."""
    got, ref = run_expand(shape, c_exp, stride, True), run_expand(shape, c_exp, stride, False)
    for name, a, b in zip(EXPAND_NAMES, got, ref):
        assert a.shape == b.shape, name
        if name in ("dx", "dweight_expand"):
            # per input channel (dx) or output row (dweight): none hides in another's norm
            axis = 1 if name == "dx" else 0
            for ch in range(a.shape[axis]):
                ac, bc = np.take(a, ch, axis), np.take(b, ch, axis)
                assert np.abs(ac - bc).max() <= 2e-5 * max(np.abs(bc).max(), 1e-3), (name, ch)
            continue
        assert np.array_equal(a, b, equal_nan=True), (name, float(np.abs(a - b).max()))


def test_expand_op_keeps_its_accuracy_on_offset_inputs(kernel):
    """The 1x1 gradients' terms B W (x x^T) and C0 (sum x)^T cancel where the expand
    conv's outputs sit far from zero: inputs at mean 4 (outputs ~5x their spread) stay
    within float32 rounding of the two ops."""
    got = run_expand((2, 8, 28, 28), 48, 1, True, seed=3, offset=4.0)
    ref = run_expand((2, 8, 28, 28), 48, 1, False, seed=3, offset=4.0)
    for name, a, b in zip(EXPAND_NAMES, got, ref):
        if name in ("dx", "dweight_expand"):
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), name


def test_expand_op_covers_only_where_it_pays(kernel):
    """Training-mode batch norms, the float32 per-block 1x1 op, expansion 4 and up, maps
    of 28x28 and up (fused.EXPAND_MIN_*); everything else runs the ops apart."""
    rng = np.random.default_rng(0)
    bn, conv = bn_depthwise_layers(48, 1, rng)
    expand = paddle.nn.Conv2D(8, 48, 1, bias_attr=False)
    x = paddle.randn([2, 8, 28, 28])
    assert fused.expand_covers(x, expand, bn, conv)
    assert not fused.expand_covers(paddle.randn([2, 8, 27, 28]), expand, bn, conv)  # map
    assert not fused.expand_covers(paddle.randn([2, 16, 28, 28]), paddle.nn.Conv2D(16, 48, 1, bias_attr=False), bn, conv)  # expansion 3
    assert not fused.expand_covers(x, paddle.nn.Conv2D(8, 48, 1), bn, conv)  # a bias
    bn.eval()
    assert not fused.expand_covers(x, expand, bn, conv)  # running statistics
    bn.train()
    # where mixed precision gives the expand conv the bfloat16 op, the ops stay apart
    bn_wide, conv_wide = bn_depthwise_layers(192, 1, rng)
    wide = paddle.nn.Conv2D(32, 192, 1, bias_attr=False)
    x_wide = paddle.randn([2, 32, 28, 28])
    assert fused.expand_covers(x_wide, wide, bn_wide, conv_wide)
    if dw.load_kernel().pointwise_bf16:
        assert pw.block_op(x_wide, wide.weight, True) == pw.BF16_OP_NAME
        assert not fused.expand_covers(x_wide, wide, bn_wide, conv_wide, bf16=True)
