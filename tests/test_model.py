"""The network: PaddleClas keys and shapes, parameter counts, widths, reload."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from mbv2.model import (PADDLECLAS_BOTTLENECK, MobileNetV2, ModelConfigError, count_macs,
                        count_parameters, load_pretrained)


def test_paddleclas_state_dict_layout():
    net = MobileNetV2(class_num=1000, scale=1.0)
    sd = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert len(sd) == 262 + 5  # 52 conv+BN layers x 5 tensors, + 2 head, + ...
    expected = {
        "conv1._conv.weight": [32, 3, 3, 3],
        "conv1._batch_norm.weight": [32],
        "conv1._batch_norm._mean": [32],
        "conv1._batch_norm._variance": [32],
        "conv2._first_block._expand_conv._conv.weight": [32, 32, 1, 1],
        "conv2._first_block._bottleneck_conv._conv.weight": [32, 1, 3, 3],
        "conv2._first_block._linear_conv._conv.weight": [16, 32, 1, 1],
        "conv2._first_block._expand_conv._batch_norm._mean": [32],
        "conv3._first_block._expand_conv._conv.weight": [96, 16, 1, 1],
        "conv3.conv3_2._bottleneck_conv._conv.weight": [144, 1, 3, 3],
        "conv3.conv3_2._linear_conv._batch_norm.bias": [24],
        "conv5.conv5_4._expand_conv._conv.weight": [384, 64, 1, 1],
        "conv8._first_block._linear_conv._conv.weight": [320, 960, 1, 1],
        "conv9._conv.weight": [1280, 320, 1, 1],
        "conv9._batch_norm._variance": [1280],
        "out.weight": [1280, 1000],
        "out.bias": [1000],
    }
    for key, shape in expected.items():
        assert sd[key] == shape, key
    assert "conv2.conv2_2._expand_conv._conv.weight" not in sd  # n=1: no second unit
    assert "conv8.conv8_2._expand_conv._conv.weight" not in sd
    # structured names only: no global parameter names that would collide
    assert all(not k.startswith(("conv1_1", "fc10")) for k in sd)


@pytest.mark.parametrize("scale,count", [
    (0.25, 1_517_392), (0.5, 1_965_736), (1.0, 3_505_960), (2.0, 11_262_312)])
def test_trainable_parameter_counts(scale, count):
    assert count_parameters(MobileNetV2(class_num=1000, scale=scale)) == count


@pytest.mark.parametrize("scale", [0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
def test_output_shapes_across_widths(scale):
    net = MobileNetV2(class_num=7, scale=scale)
    net.eval()
    out = net(paddle.randn([2, 3, 32, 32]))
    assert out.shape == [2, 7]
    assert net.out.weight.shape[0] == (int(1280 * scale) if scale > 1 else 1280)


def test_custom_table_and_long_table():
    net = MobileNetV2(class_num=3, scale=0.5, bottleneck=[[1, 16, 1, 1], [4, 24, 2, 2], [4, 40, 1, 2]])
    net.eval()
    assert net(paddle.randn([1, 3, 40, 40])).shape == [1, 3]
    keys = net.state_dict().keys()
    assert "conv4._first_block._linear_conv._conv.weight" in keys and "conv9._conv.weight" in keys
    long = MobileNetV2(class_num=2, scale=0.25, bottleneck=[[1, 16, 1, 1]] * 8)
    assert "conv9._first_block._expand_conv._conv.weight" in long.state_dict()
    assert "conv10._conv.weight" in long.state_dict()  # the last conv moves to a free name


def test_two_instances_do_not_collide():
    a, b = MobileNetV2(class_num=5, scale=0.25), MobileNetV2(class_num=5, scale=0.25)
    names_a = {p.name for p in a.parameters()}
    names_b = {p.name for p in b.parameters()}
    assert not names_a & names_b
    b.set_state_dict(a.state_dict())
    x = paddle.randn([2, 3, 32, 32])
    a.eval(), b.eval()
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


@pytest.mark.parametrize("kwargs,key", [
    (dict(scale=0), "model.scale"),
    (dict(scale=-1.0), "model.scale"),
    (dict(scale=0.01), "model.scale"),
    (dict(bottleneck=[[1, 16, 1]]), r"model.bottleneck\[0\]"),
    (dict(bottleneck=[[1, 16, 1, 1], [6, 0, 2, 2]]), r"model.bottleneck\[1\]"),
    (dict(bottleneck=[[1, 16, 1, 1], [6, 2.5, 2, 2]]), r"model.bottleneck\[1\]"),
    (dict(scale=0.1, bottleneck=[[1, 16, 1, 1], [6, 8, 2, 2]]), r"model.bottleneck\[1\].*0 channels"),
    (dict(bottleneck=[]), "model.bottleneck"),
])
def test_invalid_architecture_names_the_key(kwargs, key):
    with pytest.raises(ModelConfigError, match=key):
        MobileNetV2(class_num=10, **kwargs)


def test_save_reload_identical_logits(tmp_path):
    paddle.seed(0)
    net = MobileNetV2(class_num=10, scale=0.25)
    net.eval()
    x = paddle.randn([3, 3, 32, 32])
    before = net(x).numpy()
    paddle.save(net.state_dict(), str(tmp_path / "w.pdparams"))
    paddle.seed(1)
    other = MobileNetV2(class_num=10, scale=0.25)
    other.set_state_dict(paddle.load(str(tmp_path / "w.pdparams")))
    other.eval()
    np.testing.assert_array_equal(before, other(x).numpy())


def test_pretrained_head_mismatch_is_skipped_and_reported(tmp_path, caplog):
    src = MobileNetV2(class_num=1000, scale=0.25)
    path = tmp_path / "MobileNetV2_x0_25_pretrained.pdparams"
    paddle.save(src.state_dict(), str(path))
    dst = MobileNetV2(class_num=10, scale=0.25)
    with caplog.at_level("INFO", logger="mbv2.model"):
        report = load_pretrained(dst, str(path))
    assert sorted(s.split(" ")[0] for s in report["skipped"]) == ["out.bias", "out.weight"]
    assert len(report["loaded"]) == len(dst.state_dict()) - 2
    np.testing.assert_array_equal(dst.conv1._conv.weight.numpy(), src.conv1._conv.weight.numpy())
    assert "skipped out.weight" in caplog.text and "loaded 265 of 267" in caplog.text


def test_pretrained_missing_file_names_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        load_pretrained(MobileNetV2(class_num=2, scale=0.25), str(tmp_path / "nope.pdparams"))


def test_macs_of_x1_at_224():
    # 300 M multiply-adds is MobileNetV2 x1.0's published figure at 224 px
    macs = count_macs(MobileNetV2(class_num=1000, scale=1.0), 224)
    assert 295e6 < macs < 320e6
    assert count_macs(MobileNetV2(class_num=1000, scale=0.5), 224) < macs / 3


def test_default_table_is_paddleclas():
    assert PADDLECLAS_BOTTLENECK == ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                  (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
