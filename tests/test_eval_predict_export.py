"""eval, export and predict as a user runs them, on one tiny trained run (with EMA and
trainer.amp, which CPU ignores): files, numbers and agreement between the paths."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from visualdl import LogReader

from tests.conftest import ROOT, TINY, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli([*TINY, "trainer.epochs=2", "optim.lr=0.05", "trainer.ema_decay=0.9",
             "trainer.amp=O1", f"hydra.run.dir={run_dir}"], cwd=ROOT)
    return run_dir


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    proc = run_cli(["ckpt=" + str(trained)], cwd=ROOT, module="mbv2.export")
    assert "exported" in proc.stdout
    return trained / "export"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """PNG and JPEG files in the fake data's class colours, plus one broken file."""
    d = tmp_path_factory.mktemp("images")
    palette = np.random.default_rng(12345).integers(0, 256, size=(4, 3))  # as data=fake
    rng = np.random.default_rng(0)
    for i in range(6):
        noise = rng.integers(0, 256, size=(40, 48, 3))
        img = (0.5 * noise + 0.5 * palette[i % 4]).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def test_amp_is_ignored_on_cpu_and_ema_is_logged(trained):
    assert "trainer.amp=O1 is ignored on cpu" in (trained / "run.log").read_text()
    reader = LogReader(file_path=str(trained / "vdlrecords.mbv2.log"))
    assert [r.id for r in reader.get_data("scalar", "eval_ema/acc_top1")] == [1, 2]
    m = json.loads((trained / "metrics.json").read_text())
    assert 0 <= m["final_eval_ema_acc_top1"] <= 1 and m["best_eval_acc_top1"] is not None


def test_eval_writes_json_png_and_an_image_of_the_run(trained):
    proc = run_cli([f"ckpt={trained}"], cwd=ROOT, module="mbv2.eval")
    assert "top-1" in proc.stdout
    out = trained / "eval"
    result = json.loads((out / "eval.json").read_text())
    confusion = np.asarray(result["confusion_matrix"])
    assert confusion.shape == (4, 4) and confusion.sum() == 20 == result["num_images"]
    assert [c["images"] for c in result["per_class"]] == confusion.sum(axis=1).tolist() == [5] * 4
    assert result["acc_top1"] == pytest.approx(np.trace(confusion) / 20)
    # the last checkpoint is the final epoch: eval reproduces the run's own numbers
    m = json.loads((trained / "metrics.json").read_text())
    assert result["acc_top1"] == pytest.approx(m["final_eval_acc_top1"], abs=1e-6)
    assert result["loss"] == pytest.approx(m["final_eval_loss"], rel=1e-4)
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    # the matrix is an image of the run itself: no records file of eval's own, the
    # training records stay the only ones, their scalars untouched
    assert not list(out.glob("vdlrecords.*"))
    assert [p.name for p in trained.glob("vdlrecords.*")] == ["vdlrecords.mbv2.log"]
    reader = LogReader(file_path=str(trained / "vdlrecords.mbv2.log"))
    tags = reader.get_tags()
    assert "eval/confusion_matrix" in tags["image"]
    assert not [t for t in tags["scalar"] if t.startswith("val/")]
    assert [r.id for r in reader.get_data("scalar", "eval/acc_top1")] == [1, 2]


def test_eval_train_split_with_data_override_and_ema(trained):
    run_cli([f"ckpt={trained}/checkpoints/best", "split=train", "ema=true", "data.num_samples=32"],
            cwd=ROOT, module="mbv2.eval")
    result = json.loads((trained / "eval" / "eval_train.json").read_text())
    assert result["split"] == "train" and result["ema"] is True and result["num_images"] == 32
    assert (trained / "eval" / "confusion_matrix_train.png").is_file()
    bad = run_cli([f"ckpt={trained}", "data.num_sampels=3"], cwd=ROOT, module="mbv2.eval", check=False)
    assert bad.returncode != 0 and "num_sampels" in bad.stderr


def test_export_writes_inference_model_and_preprocessing(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"model.json", "model.pdiparams", "class_names.txt", "preprocess.json"} <= names
    pre = json.loads((exported / "preprocess.json").read_text())
    assert pre["image_size"] == 32 and pre["resize_short"] == 37 and len(pre["mean"]) == 3
    assert (exported / "class_names.txt").read_text().splitlines() == [f"class_{i}" for i in range(4)]
    # the program uses Paddle's depthwise conv, not the mbv2 custom op
    assert "mbv2_depthwise" not in (exported / "model.json").read_text()


def _top1(csv_path: Path) -> dict[str, str]:
    rows = list(csv.DictReader(open(csv_path)))
    return {Path(r["file"]).name: r["class_name"] for r in rows if r["rank"] == "1"}


def test_predict_exported_and_checkpoint_agree(exported, trained, images, tmp_path):
    proc = run_cli([f"model={exported}", f"inputs={images}", "topk=3", f"out={tmp_path / 'a'}"],
                   cwd=ROOT, module="mbv2.predict")
    assert "6 images predicted, 1 unreadable" in proc.stdout and "broken.png" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "a" / "predictions.csv")))
    assert sum(1 for r in rows if r["error"]) == 1 and "broken.png" in next(r["file"] for r in rows if r["error"])
    assert sum(1 for r in rows if r["rank"] == "1") == 6 and sum(1 for r in rows if r["rank"]) == 18
    run_cli([f"model={trained}", f"inputs={images}/*.png", f"out={tmp_path / 'b'}"],
            cwd=ROOT, module="mbv2.predict")
    exported_top1, dygraph_top1 = _top1(tmp_path / "a" / "predictions.csv"), _top1(tmp_path / "b" / "predictions.csv")
    assert dygraph_top1 and all(exported_top1[f] == c for f, c in dygraph_top1.items())


def test_predictor_and_dygraph_outputs_within_1e4(exported, trained, images):
    import paddle

    from mbv2.artifacts import restore_run
    from mbv2.data import build_transforms, load_image
    from mbv2.predict import DygraphPredictor, ExportedPredictor

    net, cfg, names, _, _ = restore_run(trained)
    transform = build_transforms(cfg.data, train=False)
    batch = np.stack([transform(load_image(p)) for p in sorted(images.glob("img*"))])
    fast = ExportedPredictor(exported, threads=2)(batch)
    slow = DygraphPredictor(net)(batch)
    assert fast.shape == (6, 4)
    np.testing.assert_allclose(fast, slow, atol=1e-4)
    # and the probabilities are the softmax of the dygraph eval logits
    with paddle.no_grad():
        logits = net(paddle.to_tensor(batch)).numpy()
    assert (fast.argmax(1) == logits.argmax(1)).all()


def test_onnx_without_paddle2onnx_says_what_to_install(trained):
    import importlib.util

    if importlib.util.find_spec("paddle2onnx") is not None:
        pytest.skip("paddle2onnx is installed here")
    proc = run_cli([f"ckpt={trained}", "format=onnx"], cwd=ROOT, module="mbv2.export", check=False)
    assert proc.returncode != 0 and "pip install paddle2onnx" in proc.stderr
