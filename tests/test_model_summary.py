"""The per-layer summary (`python -m mbv2.model`) and pretrained files as PaddleClas users
have them: a prefix without `.pdparams`, and `model.pretrained_strict`."""
from __future__ import annotations

import csv

import numpy as np
import paddle
import pytest
from omegaconf import OmegaConf

from mbv2.model import (MobileNetV2, build_model, count_macs, count_parameters,
                        layer_summary, load_pretrained, write_summary_csv)
from mbv2.model.summary import leaf_layers
from tests.conftest import ROOT, run_cli

CUSTOM_TABLE = [[1, 16, 1, 1], [4, 24, 2, 2], [4, 40, 1, 2]]


@pytest.mark.parametrize("scale,size,table", [
    (0.25, 32, None), (0.5, 32, None), (1.0, 224, None), (1.5, 32, None),
    (0.75, 224, CUSTOM_TABLE), (0.5, 32, CUSTOM_TABLE)])
def test_summary_adds_up_to_the_counts(scale, size, table):
    net = MobileNetV2(class_num=10, scale=scale, bottleneck=table)
    rows = layer_summary(net, size)
    assert sum(r["params"] for r in rows) == count_parameters(net)
    assert sum(r["macs"] for r in rows) == count_macs(net, size)
    assert len(rows) == len(leaf_layers(net))
    assert len({r["name"] for r in rows}) == len(rows)


def test_rows_in_forward_order_with_shapes():
    net = MobileNetV2(class_num=10, scale=1.0)
    rows = layer_summary(net, 224)
    assert [r["name"] for r in rows[:3]] == [
        "conv1._conv", "conv1._batch_norm", "conv2._first_block._expand_conv._conv"]
    first = rows[0]
    assert (first["type"], first["output_shape"], first["params"], first["macs"]) == (
        "Conv2D", [1, 32, 112, 112], 32 * 3 * 3 * 3, 32 * 112 * 112 * 27)
    assert rows[1]["params"] == 64 and rows[1]["macs"] == 0  # BN: weight + bias, no MACs
    by_name = {r["name"]: r for r in rows}
    assert by_name["conv3.conv3_2._bottleneck_conv._conv"]["output_shape"] == [1, 144, 56, 56]
    assert by_name["conv9._conv"]["output_shape"] == [1, 1280, 7, 7]
    assert [r["name"] for r in rows[-2:]] == ["pool2d_avg", "out"]
    assert rows[-2]["output_shape"] == [1, 1280, 1, 1] and rows[-1]["output_shape"] == [1, 10]


def test_pool_not_run_on_a_1x1_map_keeps_its_place():
    rows = layer_summary(MobileNetV2(class_num=3, scale=0.25), 32)
    assert [r["name"] for r in rows[-3:]] == ["conv9._batch_norm", "pool2d_avg", "out"]
    assert rows[-2]["output_shape"] is None and rows[-3]["output_shape"] == [1, 1280, 1, 1]


def test_summary_leaves_mode_and_ops_as_they_were():
    net = MobileNetV2(class_num=3, scale=0.25)
    net.train()
    ops = net.ops
    layer_summary(net, 32)
    assert net.training and net.ops is ops


def test_csv_has_a_header_and_a_line_per_layer(tmp_path):
    net = MobileNetV2(class_num=5, scale=0.25, bottleneck=CUSTOM_TABLE)
    rows = layer_summary(net, 64)
    path = write_summary_csv(rows, tmp_path / "run" / "model_summary.csv")
    with open(path, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["name", "type", "output_shape", "params", "macs"]
    assert len(lines) == len(rows) + 1 == len(leaf_layers(net)) + 1
    assert lines[1] == ["conv1._conv", "Conv2D", "[1, 8, 32, 32]", "216", str(8 * 32 * 32 * 27)]
    assert sum(int(line[4]) for line in lines[1:]) == count_macs(net, 64)


def test_cli_prints_rows_and_the_totals_line():
    proc = run_cli(["model.scale=0.5", "data.image_size=64"], cwd=ROOT, module="mbv2.model",
                   timeout=120)
    net = MobileNetV2(class_num=1000, scale=0.5)
    params, macs = count_parameters(net), count_macs(net, 64)
    totals = [line for line in proc.stdout.splitlines() if line.startswith("total:")]
    assert len(totals) == 1
    assert f"{params:,} trainable params" in totals[0] and f"{macs:,} MACs" in totals[0]
    assert f"{2 * macs:,} FLOPs" in totals[0] and "at 64 px" in totals[0]
    assert "1000 classes" in proc.stdout and "conv2._first_block._expand_conv._conv" in proc.stdout


def test_cli_bad_override_is_one_line_naming_the_key():
    proc = run_cli(["model.scale=abc"], cwd=ROOT, module="mbv2.model", timeout=120, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.scale" in lines[0] and "Traceback" not in proc.stderr


def test_prefix_path_loads(tmp_path):
    src = MobileNetV2(class_num=10, scale=0.25)
    (tmp_path / "model_data").mkdir()
    paddle.save(src.state_dict(), str(tmp_path / "model_data" / "57.pdparams"))
    dst = MobileNetV2(class_num=10, scale=0.25)
    report = load_pretrained(dst, str(tmp_path / "model_data" / "57"))
    assert not report["skipped"] and not report["missing"]
    np.testing.assert_array_equal(dst.conv1._conv.weight.numpy(), src.conv1._conv.weight.numpy())
    with pytest.raises(FileNotFoundError, match="model.pretrained.*58.pdparams"):
        load_pretrained(dst, str(tmp_path / "model_data" / "58"))


@pytest.fixture
def x1_file(tmp_path):
    path = tmp_path / "MobileNetV2_pretrained.pdparams"
    paddle.save(MobileNetV2(class_num=1000, scale=1.0).state_dict(), str(path))
    return path


def test_not_strict_loads_what_fits_of_another_width_with_one_warning(x1_file, caplog):
    src = paddle.load(str(x1_file))
    dst = MobileNetV2(class_num=1000, scale=0.5)
    with caplog.at_level("INFO", logger="mbv2.model"):
        report = load_pretrained(dst, str(x1_file), strict=False)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "x1.0" in warnings[0].getMessage() and "32 output channels" in warnings[0].getMessage()
    assert "conv9._batch_norm.weight" in report["loaded"]  # 1280 wide at both widths
    np.testing.assert_array_equal(dst.conv9._batch_norm.weight.numpy(),
                                  src["conv9._batch_norm.weight"].numpy())
    with pytest.raises(ValueError, match="pretrained_strict=false"):
        load_pretrained(MobileNetV2(class_num=1000, scale=0.5), str(x1_file), strict=True)


def test_build_model_reads_pretrained_strict(x1_file, cfg_factory):
    prefix = str(x1_file)[: -len(".pdparams")]
    strict = cfg_factory(["model.scale=0.5", f"model.pretrained={prefix}", "model.cpu_kernels=off"])
    with pytest.raises(ValueError, match="backbone tensors fit this model"):
        build_model(strict.model, num_classes=1000)
    lenient = cfg_factory(["model.scale=0.5", f"model.pretrained={prefix}",
                              "model.pretrained_strict=false", "model.cpu_kernels=off"])
    assert build_model(lenient.model, num_classes=1000).scale == 0.5
    # a config saved before the key existed: strict
    saved = {k: v for k, v in OmegaConf.to_container(lenient.model).items() if k != "pretrained_strict"}
    with pytest.raises(ValueError, match="backbone tensors fit this model"):
        build_model(OmegaConf.create(saved), num_classes=1000)
