"""mbv2's one-op CPU predictor (mbv2/ops/infer_net.cc, mbv2/ops/inference.py) against
Paddle's own ops in eval mode: widths whose channel counts are and are not multiples of 8,
both stem strides, odd image sizes, batches that do not split evenly, the program reader on
exported files, and what it says about a program it cannot run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest

from mbv2.model import MobileNetV2
from mbv2.ops import inference
from mbv2.runtime import cpu_flags

pytestmark = pytest.mark.skipif(not inference.available(),
                                reason="the kernels' library (with Paddle's MKL) is not built here")


def _net(scale: float, classes: int, stem_stride: int = 2, seed: int = 1) -> MobileNetV2:
    """A network in eval mode with batch norm statistics and affine terms away from their
    initial values (folding them is part of what is tested)."""
    paddle.seed(seed)
    net = MobileNetV2(class_num=classes, scale=scale, stem_stride=stem_stride)
    for layer in net.conv_bn_layers():
        bn = layer._batch_norm
        c = bn._mean.shape[0]
        bn._mean.set_value(paddle.randn([c]) * 0.2)
        bn._variance.set_value(paddle.rand([c]) + 0.5)
        bn.weight.set_value(paddle.rand([c]) + 0.5)
        bn.bias.set_value(paddle.randn([c]) * 0.2)
    net.eval()
    net.use_cpu_kernels(False)
    return net


def _reference(net: MobileNetV2, x: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return net(paddle.to_tensor(x)).numpy()


def _program_file(prefix: Path) -> Path:
    """The program file paddle.jit.save wrote: .json (PIR) or .pdmodel."""
    return next(p for p in (prefix.with_suffix(".json"), prefix.with_suffix(".pdmodel"))
                if p.exists())


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype("float32")


@pytest.mark.parametrize("scale, size, batch, stem_stride, classes", [
    (0.25, 32, 5, 2, 10),    # 8-16 channel layers, 1x1 maps at the end
    (0.5, 33, 3, 1, 7),      # odd size, stem stride 1, 7 classes
    (0.35, 64, 9, 2, 10),    # channel counts that are not multiples of 8
    (1.0, 56, 2, 2, 1000),   # the full widths
    (1.5, 17, 1, 2, 3),      # wider than 1, one image, maps down to 1x1 early
])
def test_matches_paddle_ops_in_eval_mode(scale, size, batch, stem_stride, classes):
    net = _net(scale, classes, stem_stride)
    x = _images(batch, size)
    got = inference.NetworkInference(net)(x).numpy()
    want = _reference(net, x)
    assert got.shape == want.shape == (batch, classes)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("scale, size, stem_stride", [(0.5, 32, 1), (0.35, 29, 2)])
def test_units_in_bands_of_one_row_match(monkeypatch, scale, size, stem_stride):
    """Large maps run a unit a band of rows at a time, the rows two bands share kept in
    the band buffer. A band budget of 1 KB makes every unit do so, one output row a band
    (the most band edges, stride 1 and 2), on maps small enough that a wrong row shows."""
    monkeypatch.setenv("MBV2_INFER_BAND_KB", "1")
    net = _net(scale, 10, stem_stride)
    x = _images(3, size)
    np.testing.assert_allclose(inference.NetworkInference(net)(x).numpy(), _reference(net, x),
                               rtol=1e-4, atol=1e-4 * np.abs(_reference(net, x)).max())


def test_large_maps_in_bands_match():
    """160 px: the first units' maps outgrow the default band budget (several bands)."""
    net = _net(0.5, 10)
    x = _images(3, 160)
    np.testing.assert_allclose(inference.NetworkInference(net)(x).numpy(), _reference(net, x),
                               rtol=1e-4, atol=1e-5)


def test_an_image_gets_the_same_logits_in_any_batch_and_thread_count():
    from mbv2.runtime import set_cpu_threads

    net = _net(0.5, 10)
    run = inference.NetworkInference(net)
    x = _images(7, 32)
    whole = run(x).numpy()
    alone = np.concatenate([run(x[i:i + 1]).numpy() for i in range(7)])
    np.testing.assert_allclose(alone, whole, rtol=1e-5, atol=1e-6)
    set_cpu_threads(1)
    try:
        one = run(x).numpy()
    finally:
        set_cpu_threads(2)
    np.testing.assert_allclose(one, whole, rtol=1e-5, atol=1e-6)


def test_two_networks_keep_their_own_packed_weights():
    """The op keeps MKL-packed weights per NetworkInference: a second network, or the same
    one after its weights changed (a new object), never runs on the first one's."""
    x = _images(2, 32)
    a, b = _net(0.5, 10, seed=1), _net(0.5, 10, seed=2)
    run_a, run_b = inference.NetworkInference(a), inference.NetworkInference(b)
    for _ in range(2):
        np.testing.assert_allclose(run_a(x).numpy(), _reference(a, x), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(run_b(x).numpy(), _reference(b, x), rtol=1e-4, atol=1e-5)
    w = a.conv2._first_block._expand_conv._conv.weight
    w.set_value(w.numpy() * 2)
    np.testing.assert_allclose(inference.NetworkInference(a)(x).numpy(), _reference(a, x),
                               rtol=1e-4, atol=1e-5)


def test_reads_an_exported_program(tmp_path):
    """The files mbv2.export writes (inference.json + .pdiparams, softmax at the end) read
    back as the network's layers; the op then gives the exported model's probabilities."""
    from paddle.static import InputSpec

    from mbv2.artifacts import WithSoftmax

    net = _net(0.35, 6)
    prefix = tmp_path / "inference"
    paddle.jit.save(WithSoftmax(net), str(prefix),
                    input_spec=[InputSpec([None, 3, None, None], "float32", "image")])
    model = _program_file(prefix)
    layers = inference.layers_of_program(model, prefix.with_suffix(".pdiparams"))
    assert paddle.in_dynamic_mode()  # reading it left the process as it was
    assert layers.softmax and len(layers.units) == 17
    assert [u.shortcut for u in layers.units].count(True) == 10
    assert [u.depthwise.stride for u in layers.units].count(2) == 4
    x = _images(3, 48)
    with paddle.no_grad():
        want = paddle.nn.functional.softmax(net(paddle.to_tensor(x))).numpy()
    got = inference.NetworkInference(layers)(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1, rtol=1e-5)


class _NotMobileNet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x):
        y = paddle.nn.functional.relu(self.conv(x))
        return self.fc(paddle.flatten(paddle.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_another_program_is_named_and_predict_falls_back(tmp_path):
    """A program that is not a MobileNetV2: NotMobileNetV2 naming the op; mbv2.predict's
    auto engine runs it in Paddle Inference and says why, engine=kernels refuses."""
    from paddle.static import InputSpec

    from mbv2.predict import ExportedPredictor

    prefix = tmp_path / "inference"
    paddle.jit.save(_NotMobileNet(), str(prefix),
                    input_spec=[InputSpec([None, 3, 16, 16], "float32")])
    model = _program_file(prefix)
    with pytest.raises(inference.NotMobileNetV2, match=r"op \d+ \(pd_op\.\w+\)"):
        inference.layers_of_program(model, prefix.with_suffix(".pdiparams"))
    predictor = ExportedPredictor(tmp_path, threads=2)
    assert predictor.engine == "paddle" and "as a MobileNetV2 (op " in predictor.why
    assert predictor(_images(2, 16)).shape == (2, 4)
    with pytest.raises(SystemExit, match="engine=kernels cannot run .*engine=paddle"):
        ExportedPredictor(tmp_path, threads=2, engine="kernels")


def test_an_unreadable_or_older_program_file_is_named(tmp_path):
    """A truncated .json and a .pdmodel (Paddle's older format, which PaddleClas exports
    before PIR used): NotMobileNetV2 naming the file, so predict's auto engine falls back."""
    (tmp_path / "inference.json").write_text('{"program": ')
    (tmp_path / "inference.pdiparams").write_bytes(b"")
    with pytest.raises(inference.NotMobileNetV2, match="could not load inference.json"):
        inference.layers_of_program(tmp_path / "inference.json", tmp_path / "inference.pdiparams")
    (tmp_path / "inference.pdmodel").write_bytes(b"\x08\x01")
    with pytest.raises(inference.NotMobileNetV2, match=r"inference.pdmodel is in Paddle's older"):
        inference.layers_of_program(tmp_path / "inference.pdmodel", tmp_path / "inference.pdiparams")


_THIN_TILES_SCRIPT = """
import sys
import numpy as np
from tests.test_ops_inference import _images, _net
from mbv2.ops import inference
assert inference.lanes() == int(sys.argv[2]), inference.lanes()
outs = [inference.NetworkInference(_net(s, 10))(_images(b, px)).numpy()
        for s, px, b in [(1.0, 48, 3), (0.35, 41, 2), (0.25, 32, 5)]]
np.savez(sys.argv[1], *outs)
"""


@pytest.mark.skipif("avx512f" not in cpu_flags(),
                    reason="no AVX-512 here: the AVX2 tiles are the only ones")
def test_avx512_kernels_give_the_avx2_kernels_bits(tmp_path):
    """The thin products (16-32 channel sides) and the depthwise convs run 16-lane vectors
    where the CPU has AVX-512 and 8-lane ones elsewhere (or with MBV2_INFER_AVX512=off,
    read once a process): the same sums in the same order, so the logits are the same
    bits, in partial column blocks and channel counts off 16 (24, 40, 56 at x0.35), partial
    row tiles, both strides and every edge of the map alike."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    got = {}
    for mode, lanes in (("on", 16), ("off", 8)):
        env = dict(os.environ, MBV2_INFER_AVX512=mode, PYTHONPATH=str(root))
        out = tmp_path / f"{mode}.npz"
        subprocess.run([sys.executable, "-c", _THIN_TILES_SCRIPT, str(out), str(lanes)], env=env,
                       cwd=root, check=True, capture_output=True)
        got[mode] = np.load(out)
    for name in got["on"].files:
        np.testing.assert_array_equal(got["on"][name], got["off"][name])
