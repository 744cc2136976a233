"""The C++ depthwise conv op against Paddle's own grouped conv: values, both gradients, every
code path (flat / channel-lane, strides, odd/even/tiny planes), the fallback routing, the
build cache and its failure modes, and a few training steps of MobileNetV2 with it."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import mbv2  # noqa: F401  (environment for Paddle's MKL)
import paddle
import paddle.nn.functional as F

from mbv2.model import MobileNetV2
from mbv2.ops import depthwise as dw

# the ops at the thread count the runs use (conftest.op_threads)
pytestmark = pytest.mark.usefixtures("op_threads")

ROOT = Path(__file__).resolve().parent.parent
HAVE_COMPILER = dw._compiler() is not None


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def run_both(fast_fn, n, c, h, w, stride, pad, seed=0):
    """(out, dx, dw) of `fast_fn` and of F.conv2d(groups=C) for the same data."""
    rng = np.random.default_rng(seed)
    xn = rng.standard_normal((n, c, h, w)).astype("float32")
    wn = rng.standard_normal((c, 1, 3, 3)).astype("float32")
    results, upstream = [], None
    for fn in (fast_fn, lambda x, wt: F.conv2d(x, wt, stride=stride, padding=pad, groups=c)):
        x = paddle.to_tensor(xn, stop_gradient=False)
        wt = paddle.to_tensor(wn, stop_gradient=False)
        y = fn(x, wt)
        if upstream is None:
            upstream = paddle.to_tensor(rng.standard_normal(y.shape).astype("float32"))
        (y * upstream).sum().backward()
        results.append((y.numpy(), x.grad.numpy(), wt.grad.numpy()))
    return results


SHAPES = [  # (n, c, h, w): odd/even, tiny, batch 1, one channel, > 64 channels, non-square
    (1, 1, 7, 7), (2, 3, 8, 8), (1, 70, 15, 16), (2, 5, 1, 1), (2, 5, 2, 2),
    (3, 9, 16, 15), (2, 4, 33, 34), (1, 2, 1, 5),
    # full 8-channel groups (the 8x8-transpose interleave) on wide odd planes, with the
    # scalar tail of a row and a ninth channel's partial group
    (2, 16, 37, 41), (1, 17, 9, 8),
]


CASES = [(shape, stride, pad) for shape in SHAPES for stride in (1, 2) for pad in (1, 0)
         if min(shape[2], shape[3]) + 2 * pad >= 3]  # else the kernel exceeds the input


@pytest.mark.parametrize("algo", [1, 2], ids=["flat", "lanes"])
@pytest.mark.parametrize("shape,stride,pad", CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_matches_paddle_conv(kernel, shape, stride, pad, algo):
    n, c, h, w = shape
    got, ref = run_both(lambda x, wt: kernel(x, wt, [stride, stride], [pad] * 4, algo),
                        n, c, h, w, stride, pad)
    for name, a, b in zip(("out", "dx", "dw"), got, ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-4, (name, rel_err(a, b))


# by shape (algo 0): one-pixel planes in and out take the single-tap path, others the
# shape's pick; stride 2 on a 1x1 plane is one pixel as well
@pytest.mark.parametrize("shape,stride", [((2, 5, 1, 1), 1), ((3, 17, 1, 1), 1),
                                          ((4, 40, 1, 1), 2), ((2, 9, 2, 2), 1),
                                          ((2, 9, 2, 2), 2)])
def test_shape_picked_paths_match_paddle_conv(kernel, shape, stride):
    n, c, h, w = shape
    got, ref = run_both(lambda x, wt: kernel(x, wt, [stride, stride], [1] * 4, 0),
                        n, c, h, w, stride, 1)
    for name, a, b in zip(("out", "dx", "dw"), got, ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-4, (name, rel_err(a, b))


# channel-lane outputs with planes of a multiple of 8 pixels (the ones that may stream):
# dense output rows (forward), row by row (input gradient), 16-wide and 8x8 planes, and
# 12-wide rows (the input gradient's plane at once, transposes spanning two rows)
@pytest.mark.parametrize("shape,stride", [((2, 16, 16, 16), 1), ((2, 16, 16, 16), 2),
                                          ((1, 24, 8, 24), 1), ((2, 16, 12, 12), 1),
                                          ((2, 16, 24, 12), 2)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_streamed_outputs_equal_cached_ones(kernel, shape, stride, monkeypatch):
    """Streamed stores (MBV2_STREAM_BYTES: every output from that size up; here all) give
    bit-identical out, dx and dw to normal stores."""
    n, c, h, w = shape
    fn = lambda x, wt: kernel(x, wt, [stride, stride], [1] * 4, 2)  # noqa: E731
    monkeypatch.setenv("MBV2_STREAM_BYTES", str(1 << 50))
    cached, ref = run_both(fn, n, c, h, w, stride, 1)
    monkeypatch.setenv("MBV2_STREAM_BYTES", "0")
    streamed, _ = run_both(fn, n, c, h, w, stride, 1)
    for name, a, b, r in zip(("out", "dx", "dw"), streamed, cached, ref):
        assert np.array_equal(a, b), name
        assert rel_err(a, r) <= 1e-4, name


@pytest.mark.parametrize("padding", [1, [1, 1], [1, 1, 1, 1], (1, 1)])
def test_public_fn_padding_forms(kernel, padding):
    """nn.Conv2D._padding arrives as int or list; all mean the same conv."""
    got, ref = run_both(lambda x, wt: dw.depthwise_conv2d(x, wt, 2, padding), 2, 96, 16, 16, 2, 1)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-4


def test_asymmetric_padding(kernel):
    x = paddle.randn([2, 6, 9, 10])
    wt = paddle.randn([6, 1, 3, 3])
    pad = [1, 0, 0, 1]
    ref = F.conv2d(x, wt, stride=1, padding=pad, groups=6)
    for algo in (1, 2):
        assert rel_err(kernel(x, wt, [1, 1], pad, algo).numpy(), ref.numpy()) <= 1e-4


@pytest.mark.parametrize("case", [
    dict(k=5, stride=1, padding=2), dict(k=3, stride=3, padding=1),
    dict(k=3, stride=1, padding="SAME"), dict(k=3, stride=1, padding=1, dtype="float64"),
])
def test_unsupported_shapes_fall_back(monkeypatch, case):
    def boom(*a, **kw):
        raise AssertionError("the custom op must not be used for this shape")

    monkeypatch.setattr(dw, "load_kernel", boom)
    dtype = case.get("dtype", "float32")
    x = paddle.randn([2, 4, 9, 9]).astype(dtype)
    wt = paddle.randn([4, 1, case["k"], case["k"]]).astype(dtype)
    y = dw.depthwise_conv2d(x, wt, case["stride"], case["padding"])
    ref = F.conv2d(x, wt, stride=case["stride"], padding=case["padding"], groups=4)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_no_grad(kernel):
    x = paddle.randn([2, 8, 6, 6])
    wt = paddle.create_parameter([8, 1, 3, 3], "float32")
    with paddle.no_grad():
        y = dw.depthwise_conv2d(x, wt, 1, 1)
    assert y.stop_gradient
    ref = F.conv2d(x, wt, stride=1, padding=1, groups=8)
    assert rel_err(y.numpy(), ref.numpy()) <= 1e-4


def test_mode_selection(kernel):
    from mbv2.ops import CPU_KERNELS, PADDLE_OPS, select_ops

    assert select_ops("off", "cpu") is PADDLE_OPS
    assert select_ops("auto", "gpu:0") is PADDLE_OPS
    assert select_ops("on", "gpu") is PADDLE_OPS
    assert select_ops("auto", "cpu") is CPU_KERNELS
    assert select_ops("on", "cpu") is CPU_KERNELS
    with pytest.raises(ValueError, match="auto, on or off"):
        select_ops("yes", "cpu")


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An empty in-process memo and a private cache dir, so a load really builds."""
    monkeypatch.setattr(dw, "_memo", {})
    monkeypatch.setattr(dw, "_registered", None)
    monkeypatch.setenv(dw.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path


def test_build_failure_warns_and_returns_none(fresh_loader, caplog):
    broken = fresh_loader / "broken.cc"
    broken.write_text('#include "paddle/extension.h"\nthis is not C++;\n')
    with pytest.warns(RuntimeWarning, match="fast depthwise conv unavailable"):
        assert dw.load_kernel(source=broken) is None
    # memoised: a second call neither rebuilds nor warns again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dw.load_kernel(source=broken) is None
    cache = fresh_loader / "cache"
    assert not [p for p in cache.iterdir() if p.is_dir()], "a failed build left a cache entry"


def test_no_compiler_warns_and_gives_none(fresh_loader, monkeypatch):
    monkeypatch.setattr(dw, "_compiler", lambda: None)
    from mbv2.ops import PADDLE_OPS, select_ops

    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert select_ops("on", "cpu") is PADDLE_OPS
    assert select_ops("off", "cpu") is PADDLE_OPS


def test_cache_reused_across_processes(kernel):
    """A new process finds the library this one built/loaded and does not compile."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "import mbv2; from mbv2.ops.depthwise import load_kernel\n"
            "k = load_kernel(); print('BUILT', k.built, k.so_path)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"BUILT False {kernel.so_path}" in proc.stdout
    assert proc.stdout.count("depthwise conv op loaded from cache") == 1


@pytest.mark.skipif(not os.environ.get("MBV2_TEST_SLOW"), reason="set MBV2_TEST_SLOW=1 (two builds)")
def test_concurrent_first_builds_do_not_collide(tmp_path):
    code = ("import mbv2; from mbv2.ops.depthwise import load_kernel\n"
            "import paddle; k = load_kernel(); x = paddle.randn([1, 2, 5, 5])\n"
            "print('OK', k.built, float(k(x, paddle.ones([2, 1, 3, 3]), [1, 1], [1] * 4).sum()))")
    env = dict(os.environ, **{dw.CACHE_ENV: str(tmp_path)})
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    built = sorted(o[0].split()[1] for o in outs)
    assert built == ["False", "True"], outs  # one compiled, the other waited and loaded
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def _twin_models():
    paddle.seed(7)
    a = MobileNetV2(class_num=10, scale=0.25)
    b = MobileNetV2(class_num=10, scale=0.25)
    b.set_state_dict(a.state_dict())
    return a, b


def _batches(n: int, batch: int = 8) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
    rng = np.random.default_rng(0)
    return [(paddle.to_tensor(rng.standard_normal((batch, 3, 32, 32)).astype("float32")),
             paddle.to_tensor(rng.integers(0, 10, (batch,)))) for _ in range(n)]


def _float64_twin(net: MobileNetV2) -> MobileNetV2:
    """The same network and weights in float64 (Paddle's own ops): a reference for how
    far float32 rounding alone moves the gradients."""
    paddle.set_default_dtype("float64")
    try:
        ref = MobileNetV2(class_num=net.class_num, scale=net.scale)
    finally:
        paddle.set_default_dtype("float32")
    ref.set_state_dict({k: paddle.to_tensor(v.numpy().astype("float64"))
                        for k, v in net.state_dict().items()})
    return ref


def test_train_step_gradients_match_native(kernel):
    """One train-mode step (batch-statistics BN): the losses agree, every parameter
    gradient is about as close to a float64 computation as Paddle's own float32 path is,
    the depthwise weight gradients closer still. (Through ~50 layers of
    train-mode BN, float32 rounding alone moves early gradients by ~1e-3 relative, and by
    how much depends on the MKL code path and the summation order: the AVX-512 GEMMs moved
    Paddle's own path to 1.1e-3 from the float64 result while the kernels stayed at 1.1e-4;
    with the batch norm sums taken by the convs that make their inputs, one expand batch
    norm's weight gradient here is 6.2e-3 from it and Paddle's 4.1e-3, 1.03e-2 apart. A
    wrong gradient is off by O(1).) Batch 16: at batch 8 the 1x1 maps' batch norms
    normalise over 8 values, and the same kernels landed 1e-2 from the float64 gradients
    in one process and 1e-4 in another (amplified through a near-degenerate channel)."""
    fast, native = _twin_models()
    ref = _float64_twin(native)
    assert fast.use_cpu_kernels(True)
    (x, y), = _batches(1, batch=16)
    grads, losses = [], []
    for net, inp in ((fast, x), (native, x), (ref, x.astype("float64"))):
        net.train()
        loss = F.cross_entropy(net(inp), y)
        loss.backward()
        losses.append(float(loss))
        grads.append({k: p.grad.numpy().astype("float64") for k, p in net.named_parameters()
                      if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0] == pytest.approx(losses[2], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() == grads[2].keys()
    for k, g in grads[2].items():
        # BN biases feeding another train-mode BN have a true gradient of 0: pure noise.
        # Each gradient is as close to the float64 one as Paddle's float32 path is, give or
        # take 5e-3: on near-degenerate channels both land 1e-3 to 3e-2 from it, apart
        # (batch 16, five other inputs: the kernels' largest distance 1.1e-3 to 3.2e-3,
        # Paddle's 1.8e-3 to 3.5e-2), where a wrong gradient is off by O(1).
        if np.linalg.norm(grads[1][k]) > 1e-3:
            fast_err, native_err = rel_err(grads[0][k], g), rel_err(grads[1][k], g)
            assert fast_err <= 2 * native_err + 5e-3, (k, fast_err, native_err)
    # The depthwise weight gradients closer: on six inputs (this one and five others) the
    # kernels' largest distance was 2.4e-5 to 6.5e-4 (this input, one layer behind a
    # near-degenerate channel; the batch statistics themselves as close to float64 as
    # before the convs took the sums) and Paddle's 2.8e-5 to 2.1e-2.
    dw_keys = [k for k in grads[1] if "_bottleneck_conv._conv.weight" in k]
    assert dw_keys
    for k in dw_keys:
        fast_err, native_err = rel_err(grads[0][k], grads[2][k]), rel_err(grads[1][k], grads[2][k])
        assert fast_err <= 2 * native_err + 1e-3, (k, fast_err, native_err)


def test_stem_folded_into_the_first_expand_conv(kernel, monkeypatch):
    """CpuKernels.stem_block folds the stem's ReLU6 batch norm into the first unit's expand
    conv (the fused 1x1 op normalises as it reads). Against the same kernels with the
    stem's batch norm op apart: the logits and every running statistic bit for bit (the
    same forward arithmetic), every gradient to float rounding (the batch norm backward
    sums in another order), on 16x16 and 32x32 stem maps."""
    from mbv2.ops import CpuKernels, Ops, fused

    calls = []
    real = fused.bn_relu6_pointwise

    def spy(x, bn, conv, op, sums=None):
        calls.append(bn)
        return real(x, bn, conv, op, sums)

    monkeypatch.setattr(fused, "bn_relu6_pointwise", spy)
    for size in (32, 64):
        folded, apart = _twin_models()
        rng = np.random.default_rng(size)
        x = paddle.to_tensor(rng.standard_normal((8, 3, size, size)).astype("float32"))
        y = paddle.to_tensor(rng.integers(0, 10, (8,)))
        runs = []
        for net, fold in ((folded, True), (apart, False)):
            with monkeypatch.context() as m:
                if not fold:
                    m.setattr(CpuKernels, "stem_block", Ops.stem_block)
                assert net.use_cpu_kernels(True)
                net.train()
                calls.clear()
                logits = net(x)
                took = any(bn is net.conv1._batch_norm for bn in calls)
                assert took == fold, (size, fold)
                F.cross_entropy(logits, y).backward()
                runs.append((logits.numpy(), {k: v.numpy() for k, v in net.state_dict().items()},
                             {k: p.grad.numpy() for k, p in net.named_parameters()
                              if p.grad is not None}))
        (l0, s0, g0), (l1, s1, g1) = runs
        assert np.array_equal(l0, l1)
        for k in s1:
            assert np.array_equal(s0[k], s1[k]), k
        assert g0.keys() == g1.keys()
        for k in g1:
            if np.linalg.norm(g1[k]) > 1e-3:  # BN biases before another BN: noise around 0
                assert rel_err(g0[k], g1[k]) < 1e-3, (size, k, rel_err(g0[k], g1[k]))


def test_training_matches_native(kernel):
    """4 SGD steps from the same weights: loss curves and updated depthwise weights agree.

    BN runs on its running statistics here: with batch 8 at 32 px the last stages are 1x1,
    train-mode BN normalises over 8 numbers, and the trajectory is chaotic (Paddle's own
    conv with a 1e-6 input change drifts 10 % in 3 steps), which would test nothing."""
    fast, native = _twin_models()
    assert fast.use_cpu_kernels(True)
    batches = _batches(4)
    curves = []
    for net in (fast, native):
        net.eval()
        opt = paddle.optimizer.SGD(learning_rate=0.5, parameters=net.parameters())
        losses = []
        for x, y in batches:
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.clear_grad()
            losses.append(float(loss))
        curves.append(losses)
    assert abs(curves[1][-1] - curves[1][0]) > 1e-3  # the weights did move
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-3)
    state_f, state_n = fast.state_dict(), native.state_dict()
    assert list(state_f) == list(state_n)
    for k in state_n:
        if "_bottleneck_conv._conv.weight" in k:
            assert rel_err(state_f[k].numpy(), state_n[k].numpy()) <= 1e-3, k


class _Images(paddle.io.Dataset):
    def __init__(self, n: int, classes: int):
        rng = np.random.default_rng(1)
        self.x = rng.standard_normal((n, 3, 32, 32)).astype("float32")
        self.y = (np.arange(n) % classes).astype("int64")[:, None]

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __len__(self) -> int:
        return len(self.x)


def test_works_in_model_fit(kernel):
    """paddle.Model.fit (hapi, dygraph): the depthwise weights get gradients and move."""
    paddle.seed(3)
    net = MobileNetV2(class_num=4, scale=0.25)
    assert net.use_cpu_kernels(True)
    layer = next(l for l in net.conv_bn_layers() if l._conv._groups > 1)
    before = layer._conv.weight.numpy().copy()
    data = _Images(16, 4)
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.Momentum(learning_rate=0.05, parameters=net.parameters()),
                  paddle.nn.CrossEntropyLoss())
    model.fit(data, batch_size=8, epochs=1, verbose=0)
    assert not np.allclose(layer._conv.weight.numpy(), before)
    out = model.predict_batch([data.x[:2]])[0]
    assert out.shape == (2, 4) and np.isfinite(out).all()


def test_global_avg_pool_as_mean_matches_paddle_pool():
    """The kernels' global average pool (a mean over the flattened plane): values and
    input gradient as AdaptiveAvgPool2D(1)."""
    from mbv2.ops import CPU_KERNELS, PADDLE_OPS

    pool = paddle.nn.AdaptiveAvgPool2D(1)
    x_np = np.random.default_rng(3).standard_normal((3, 20, 7, 5)).astype("float32")
    results = []
    for ops in (PADDLE_OPS, CPU_KERNELS):
        x = paddle.to_tensor(x_np, stop_gradient=False)
        y = ops.global_avg_pool(pool, x)
        (y * paddle.arange(60, dtype="float32").reshape([3, 20, 1, 1])).sum().backward()
        results.append((y.numpy(), x.grad.numpy()))
    for ref, got in zip(*results):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
