"""mbv2's CPU predictor in bf16 (`NetworkInference(..., "bf16")`, `mbv2.predict
precision=bf16`): every 1x1 conv multiplies bfloat16-rounded activations and weights with
float32 sums. Checked against a numpy forward of the same packed weights that rounds
exactly those operands (round to nearest even) and keeps the rest float32, and against the
FP32 op (near it, and not equal to it: the products really are bf16)."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from mbv2.ops import inference
from tests.test_ops_inference import _images, _net

pytestmark = [
    pytest.mark.skipif(not inference.available(),
                       reason="the kernels' library (with Paddle's MKL) is not built here"),
]
needs_bf16 = pytest.mark.skipif(inference.available() and inference.bf16_why_not() is not None,
                                reason="this CPU has no AVX512-BF16")


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even), as float32."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def _forward(spec: list[int], weights: np.ndarray, x: np.ndarray, bf16: bool) -> np.ndarray:
    """The op's network in numpy, channels-last, from pack_layers' (spec, weights)."""
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = weights[pos:pos + n].reshape(shape).astype(np.float32)
        pos += n
        return out

    def mm(a, w):  # a 1x1 conv: [..., k] x [k, n]
        if bf16:
            a, w = _bf16(a), _bf16(w)
        return np.matmul(a, w, dtype=np.float32)

    relu6 = lambda v: np.clip(v, 0, 6)  # noqa: E731
    c, s, units = spec[1], spec[2], spec[3]
    ws, bs = take(27, c), take(c)
    n, _, h, w = x.shape
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    cols = [pad[:, ci, ky:ky + (ho - 1) * s + 1:s, kx:kx + (wo - 1) * s + 1:s]
            for ci in range(3) for ky in range(3) for kx in range(3)]
    a = relu6(np.matmul(np.stack(cols, -1), ws, dtype=np.float32) + bs)  # the stem stays FP32
    for u in range(units):
        ci, hid, co, stride, shortcut = spec[4 + 5 * u:9 + 5 * u]
        we, be, wd, bd, wp, bp = take(ci, hid), take(hid), take(9, hid), take(hid), \
            take(hid, co), take(co)
        e = relu6(mm(a, we) + be)
        hh, ww = e.shape[1:3]
        ho, wo = (hh - 1) // stride + 1, (ww - 1) // stride + 1
        ep = np.pad(e, ((0, 0), (1, 1), (1, 1), (0, 0)))
        d = np.zeros((n, ho, wo, hid), np.float32) + bd
        for ky in range(3):
            for kx in range(3):
                d += ep[:, ky:ky + (ho - 1) * stride + 1:stride,
                        kx:kx + (wo - 1) * stride + 1:stride] * wd[ky * 3 + kx]
        y = mm(relu6(d), wp) + bp
        a = y + a if shortcut else y
    last, classes = spec[4 + 5 * units], spec[5 + 5 * units]
    wl, bl = take(a.shape[-1], last), take(last)
    pooled = relu6(mm(a, wl) + bl).mean(axis=(1, 2))
    wf, bf = take(last, classes), take(classes)
    assert pos == weights.size
    return pooled @ wf + bf  # the classifier stays FP32


@needs_bf16
@pytest.mark.parametrize("scale, size, stem_stride", [
    (0.25, 32, 2),   # 8-24 channels: one partial vector of 16 outputs, K of 8
    (0.35, 41, 1),   # odd size, channel counts that are not multiples of 16
    (1.0, 32, 2),    # the full widths: 64-wide column blocks, K up to 960
])
def test_bf16_products_match_a_rounded_reference(scale, size, stem_stride):
    """Per image, the logits' distance to the rounded reference against the distance
    rounding puts between the reference and the exact (FP32) forward. An activation within
    float32 noise of a bfloat16 rounding boundary may round the other way here than in
    numpy, and through the layers after it that moves an image's logits by up to half the
    rounding's own effect (measured over seeds and widths); an image without such a flip
    matches to 1e-4 of it. A wrong product moves every image by the whole effect or more."""
    net = _net(scale, 10, stem_stride)
    x = _images(6, size)
    run = inference.NetworkInference(net, "bf16")
    got = run(x).numpy()
    fp32 = inference.NetworkInference(net)(x).numpy()
    spec, weights = inference.pack_layers(run.layers)
    want = _forward(spec, weights, x, bf16=True)
    exact = _forward(spec, weights, x, bf16=False)
    np.testing.assert_allclose(fp32, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    effect = np.abs(want - exact).max(axis=1)  # what rounding to bf16 does, per image
    assert (effect > 5e-4 * np.abs(exact).max(axis=1)).all()
    off = np.abs(got - want).max(axis=1) / effect
    assert off.min() < 0.01 and off.max() < 0.75, off
    assert (np.abs(got - fp32).max(axis=1) > 0.25 * effect).all()  # the op did round


@needs_bf16
def test_bf16_in_bands_and_any_batch_match():
    """Bands of one row (the most band edges) and images alone give the batch's logits."""
    net = _net(0.5, 10)
    x = _images(4, 40)
    whole = inference.NetworkInference(net, "bf16")(x).numpy()
    alone = np.concatenate([inference.NetworkInference(net, "bf16")(x[i:i + 1]).numpy()
                            for i in range(4)])
    np.testing.assert_allclose(alone, whole, rtol=1e-5, atol=1e-6)
    mp = pytest.MonkeyPatch()
    mp.setenv("MBV2_INFER_BAND_KB", "1")
    try:
        banded = inference.NetworkInference(net, "bf16")(x).numpy()
    finally:
        mp.undo()
    np.testing.assert_allclose(banded, whole, rtol=1e-5, atol=1e-6)


@needs_bf16
def test_fp32_and_bf16_of_one_network_keep_their_own_weights():
    """The op keeps packed weights per network and precision: alternating calls of the two
    never mix them."""
    net = _net(0.5, 10)
    x = _images(2, 32)
    f32, b16 = inference.NetworkInference(net), inference.NetworkInference(net, "bf16")
    first = f32(x).numpy(), b16(x).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(f32(x).numpy(), first[0])
        np.testing.assert_array_equal(b16(x).numpy(), first[1])


def test_bf16_without_the_instructions_or_an_unknown_precision_is_named(monkeypatch):
    import mbv2.runtime

    net = _net(0.25, 4)
    with pytest.raises(ValueError, match="precision='fp16': choose one of fp32, bf16"):
        inference.NetworkInference(net, "fp16")
    monkeypatch.setattr(mbv2.runtime, "cpu_flags", lambda: {"avx2", "avx512f"})
    with pytest.raises(ValueError, match="precision='bf16': .*AVX512-BF16"):
        inference.NetworkInference(net, "bf16")


@needs_bf16
def test_predict_runs_bf16_in_mbv2s_predictor(tmp_path):
    """`mbv2.predict precision=bf16` on an exported dir: engine=auto takes mbv2's predictor
    (its bf16 products), the probabilities close to Paddle Inference's FP32 ones."""
    from paddle.static import InputSpec

    from mbv2.artifacts import WithSoftmax
    from mbv2.predict import ExportedPredictor

    net = _net(0.35, 6)
    paddle.jit.save(WithSoftmax(net), str(tmp_path / "inference"),
                    input_spec=[InputSpec([None, 3, None, None], "float32", "image")])
    x = _images(3, 48)
    bf16 = ExportedPredictor(tmp_path, threads=2, precision="bf16")
    assert bf16.engine == "kernels" and bf16.kernels.precision == "bf16"
    fp32 = ExportedPredictor(tmp_path, threads=2, engine="paddle")
    got, want = bf16(x), fp32(x)
    np.testing.assert_allclose(got.sum(1), 1, rtol=1e-5)
    assert np.abs(got - want).max() < 0.02
    assert not np.array_equal(got, ExportedPredictor(tmp_path, threads=2)(x))


needs_amx = pytest.mark.skipif(not inference.amx(),
                               reason="no AMX tiles here (CPU, kernel or MBV2_AMX=off)")


@needs_amx
@pytest.mark.parametrize("scale, size, batch", [
    (0.25, 32, 3),   # K of 8-24 (one tile, mostly zero padding), 3 images: partial row tiles
    (0.35, 41, 2),   # channel counts off 16 and 32: partial column tiles and masks
    (1.0, 64, 2),    # K up to 960 (30 tiles), 1280 outputs in the last conv
])
def test_amx_tiles_match_the_dot_product_kernels(monkeypatch, scale, size, batch):
    """Where the CPU has AMX the bf16 products run on its tiles; with MBV2_AMX=off on the
    AVX512-BF16 kernels. The same bfloat16 operands summed in float32 in another order, so
    an image's logits differ from the dot products' by float32 noise (1e-4 of what rounding
    to bfloat16 does to them), or, where an activation sat on a rounding boundary and went
    the other way, by up to a fifth of that (measured: 0.05-0.18 at x1.0). A wrong tile
    (stride, offset, padding) moves them by the whole effect or more. Not the same bits:
    the tiles really ran."""
    net = _net(scale, 10)
    x = _images(batch, size)
    tiles = inference.NetworkInference(net, "bf16")(x).numpy()
    monkeypatch.setenv("MBV2_AMX", "off")
    assert not inference.amx()
    dots = inference.NetworkInference(net, "bf16")(x).numpy()
    fp32 = inference.NetworkInference(net)(x).numpy()
    effect = np.abs(dots - fp32).max(axis=1)
    assert (effect > 0).all()
    off = np.abs(tiles - dots).max(axis=1) / effect
    assert off.max() < 0.5, off
    assert not np.array_equal(tiles, dots)
    monkeypatch.delenv("MBV2_AMX")
    np.testing.assert_array_equal(inference.NetworkInference(net, "bf16")(x).numpy(), tiles)
