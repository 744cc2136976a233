"""eval, export and predict as a user runs them, on one tiny trained run (with EMA and
trainer.amp: mixed precision where the CPU has bfloat16 dot products, else ignored):
files, numbers and agreement between the paths."""
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


def test_amp_on_cpu_says_what_it_did_and_ema_is_logged(trained):
    from mbv2.ops import CPU_KERNELS, mixed_precision

    log = (trained / "run.log").read_text()
    why_not = mixed_precision(CPU_KERNELS)[1]
    if why_not:  # no bfloat16 here (or no kernels): float32, and the log says why
        assert f"trainer.amp=O1 is ignored on this CPU: {why_not}" in log
    else:
        assert "trainer.amp=O1 on CPU: 1x1 convs multiply bfloat16" in log
        assert "(cpu_kernels_bf16)" in log
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
    # the names PaddleClas's deploy predictor opens, its label map and its config
    assert {"inference.json", "inference.pdiparams", "class_names.txt", "class_id_map.txt",
            "preprocess.json", "inference_cls.yaml"} <= names
    assert (exported / "class_id_map.txt").read_text().splitlines() == [f"{i} class_{i}" for i in range(4)]
    pre = json.loads((exported / "preprocess.json").read_text())
    assert pre["image_size"] == 32 and pre["resize_short"] == 37 and len(pre["mean"]) == 3
    assert (exported / "class_names.txt").read_text().splitlines() == [f"class_{i}" for i in range(4)]
    # the program uses Paddle's depthwise conv, not the mbv2 custom op
    assert "mbv2_depthwise" not in (exported / "inference.json").read_text()


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


@pytest.mark.parametrize("engine", ["kernels", "paddle"])
def test_predictor_and_dygraph_outputs_within_1e4(exported, trained, images, engine):
    """Both engines of an exported dir (mbv2's CPU predictor, Paddle Inference) give the
    dygraph network's probabilities; auto picks mbv2's where the kernels are built."""
    import paddle

    from mbv2.artifacts import restore_run
    from mbv2.data import build_transforms, load_image
    from mbv2.ops.inference import available
    from mbv2.predict import DygraphPredictor, ExportedPredictor

    if engine == "kernels" and not available():
        pytest.skip("the kernels' library is not built here")
    net, cfg, names, _, _ = restore_run(trained)
    transform = build_transforms(cfg.data, train=False)
    batch = np.stack([transform(load_image(p)) for p in sorted(images.glob("img*"))])
    predictor = ExportedPredictor(exported, threads=2, engine=engine)
    assert predictor.engine == engine
    assert ExportedPredictor(exported, threads=2).engine == ("kernels" if available() else "paddle")
    fast = predictor(batch)
    slow = DygraphPredictor(net)(batch)
    assert fast.shape == (6, 4)
    np.testing.assert_allclose(fast, slow, atol=1e-4)
    # and the probabilities are the softmax of the dygraph eval logits
    with paddle.no_grad():
        logits = net(paddle.to_tensor(batch)).numpy()
    assert (fast.argmax(1) == logits.argmax(1)).all()


def test_predict_bf16_matches_fp32_or_says_the_cpu_lacks_it(exported, trained, images, tmp_path):
    """precision=bf16 runs oneDNN's bfloat16 kernels: same top-1 as FP32 and probabilities
    within bf16's rounding; on a CPU without bf16 dot products, one line naming the key.
    A checkpoint (dygraph) with bf16 says to export first."""
    from mbv2.runtime import has_bf16

    args = [f"model={exported}", f"inputs={images}", "precision=bf16", f"out={tmp_path / 'h'}"]
    if not has_bf16():
        proc = run_cli(args, cwd=ROOT, module="mbv2.predict", check=False)
        assert proc.returncode != 0 and "precision=bf16" in proc.stderr
        assert "Traceback" not in proc.stderr
        return
    run_cli(args, cwd=ROOT, module="mbv2.predict")
    run_cli([f"model={exported}", f"inputs={images}", f"out={tmp_path / 'f'}"], cwd=ROOT,
            module="mbv2.predict")
    assert _top1(tmp_path / "h" / "predictions.csv") == _top1(tmp_path / "f" / "predictions.csv")
    from mbv2.data import build_transforms, load_image
    from mbv2.artifacts import restore_run
    from mbv2.predict import ExportedPredictor

    _, cfg, _, _, _ = restore_run(trained)
    transform = build_transforms(cfg.data, train=False)
    batch = np.stack([transform(load_image(p)) for p in sorted(images.glob("img*"))])
    fp32 = ExportedPredictor(exported, threads=2)(batch)
    bf16 = ExportedPredictor(exported, threads=2, precision="bf16")(batch)
    assert not np.array_equal(fp32, bf16)  # the bf16 kernels really ran
    np.testing.assert_allclose(bf16, fp32, atol=0.1)  # digits: at most 0.064 seen
    proc = run_cli([f"model={trained}", f"inputs={images}", "precision=bf16"], cwd=ROOT,
                   module="mbv2.predict", check=False)
    assert proc.returncode != 0 and "export" in proc.stderr and "Traceback" not in proc.stderr


def test_onnx_without_paddle2onnx_says_what_to_install(trained):
    import importlib.util

    if importlib.util.find_spec("paddle2onnx") is not None:
        pytest.skip("paddle2onnx is installed here")
    proc = run_cli([f"ckpt={trained}", "format=onnx"], cwd=ROOT, module="mbv2.export", check=False)
    assert proc.returncode != 0 and "pip install paddle2onnx" in proc.stderr


# -- PaddleClas's deploy pipeline, rewritten from its documented behaviour ---------------
def _paddleclas_preprocess(path: Path, ops: list[dict]) -> np.ndarray:
    """DecodeImage (RGB) -> ResizeImage(resize_short: both sides scaled and rounded) ->
    CropImage (corner at floor((side - size) / 2)) -> NormalizeImage ((x * scale - mean) /
    std) -> ToCHWImage, as inference_cls.yaml lists them."""
    img = Image.open(path).convert("RGB")
    for op in ops:
        (name, args), = op.items()
        if name == "ResizeImage":
            assert args["backend"] == "pil" and args["interpolation"] == "bilinear"
            w, h = img.size
            percent = args["resize_short"] / min(w, h)
            img = img.resize((int(round(w * percent)), int(round(h * percent))), Image.BILINEAR)
        elif name == "CropImage":
            w, h = img.size
            x0, y0 = (w - args["size"]) // 2, (h - args["size"]) // 2
            img = img.crop((x0, y0, x0 + args["size"], y0 + args["size"]))
        elif name == "NormalizeImage":
            arr = (np.asarray(img).astype("float32") * args["scale"] - np.asarray(args["mean"], "float32")) \
                / np.asarray(args["std"], "float32")
        elif name == "ToCHWImage":
            arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype="float32")


def _paddleclas_topk(probs: np.ndarray, topk: int, label_map: Path) -> list[tuple[int, str, float]]:
    names = {}
    for line in label_map.read_text().splitlines():
        i, _, name = line.partition(" ")
        names[int(i)] = name
    order = probs.argsort()[-topk:][::-1]
    return [(int(i), names[int(i)], float(probs[i])) for i in order]


def test_paddleclas_deploy_pipeline_gives_mbv2_predicts_answer(exported, images, tmp_path):
    import yaml
    from paddle import inference

    cfg = yaml.safe_load((exported / "inference_cls.yaml").read_text())
    ops = cfg["PreProcess"]["transform_ops"]
    config = inference.Config(str(exported / "inference.json"), str(exported / "inference.pdiparams"))
    config.disable_gpu()
    predictor = inference.create_predictor(config)
    run_cli([f"model={exported}", f"inputs={images}", "topk=4", f"out={tmp_path}"],
            cwd=ROOT, module="mbv2.predict")
    ours = {}
    for r in csv.DictReader(open(tmp_path / "predictions.csv")):
        if r["rank"]:
            ours.setdefault(Path(r["file"]).name, []).append((int(r["class_id"]), r["class_name"], float(r["score"])))
    for path in sorted(images.glob("img*")):
        x = _paddleclas_preprocess(path, ops)[None]
        handle = predictor.get_input_handle(predictor.get_input_names()[0])
        handle.reshape(list(x.shape))
        handle.copy_from_cpu(x)
        predictor.run()
        probs = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()[0]
        theirs = _paddleclas_topk(probs, 4, exported / cfg["PostProcess"]["Topk"]["class_id_map_file"])
        mine = ours[path.name]
        assert [c for c, _, _ in theirs] == [c for c, _, _ in mine], path.name
        assert [n for _, n, _ in theirs] == [n for _, n, _ in mine]
        np.testing.assert_allclose([p for *_, p in theirs], [p for *_, p in mine], atol=1e-4)


def _scores(csv_path: Path) -> dict[tuple[str, str], tuple[str, float]]:
    return {(Path(r["file"]).name, r["rank"]): (r["class_name"], float(r["score"]))
            for r in csv.DictReader(open(csv_path)) if r["rank"]}


def _paddleclas_export(exported: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    """A copy of `exported` as PaddleClas leaves one (program and parameters only), and
    its deploy config laid out as PaddleClas's tree has it (the class map a relative path)."""
    import shutil

    import yaml

    from mbv2 import artifacts

    bare = tmp_path / "paddleclas_export"
    bare.mkdir()
    for f in exported.glob(f"{artifacts.MODEL_PREFIX}.*"):
        shutil.copy(f, bare / f.name)
    pre = artifacts.read_preprocess(exported)
    (tmp_path / "deploy" / "labels").mkdir(parents=True)
    (tmp_path / "deploy" / "configs").mkdir(parents=True)
    shutil.copy(exported / artifacts.LABEL_MAP_FILE, tmp_path / "deploy" / "labels" / "my_labels.txt")
    doc = {"Global": {"inference_model_dir": str(bare), "batch_size": 1, "use_gpu": False},
           "PreProcess": {"transform_ops": [
               {"ResizeImage": {"resize_short": pre["resize_short"]}},
               {"CropImage": {"size": pre["center_crop"]}},
               {"NormalizeImage": {"scale": "1.0/255.0", "mean": pre["mean"], "std": pre["std"],
                                   "order": ""}},
               {"ToCHWImage": None}]},
           "PostProcess": {"main_indicator": "Topk",
                           "Topk": {"topk": 3, "class_id_map_file": "../labels/my_labels.txt"}}}
    config = tmp_path / "deploy" / "configs" / "inference_cls.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return bare, config, doc


def test_a_paddleclas_export_predicts_with_paddleclas_deploy_config(exported, images, tmp_path):
    """A model PaddleClas exported is the program and parameters alone; its deploy config
    (inference_cls.yaml, as PaddleClas ships it: scale as the string "1.0/255.0", the
    class map a path relative to the config) says the rest. mbv2.predict with config=
    gives the classes and scores mbv2's own export record gives; without one, and with
    an op it cannot apply, a sentence that names the file and key."""
    import yaml

    bare, config, doc = _paddleclas_export(exported, tmp_path)
    run_cli([f"model={exported}", f"inputs={images}", "topk=3", f"out={tmp_path / 'own'}"],
            cwd=ROOT, module="mbv2.predict")
    proc = run_cli([f"model={bare}", f"inputs={images}", "topk=3", f"config={config}",
                    f"out={tmp_path / 'pc'}"], cwd=ROOT, module="mbv2.predict")
    assert "resizes with OpenCV" in proc.stderr  # PaddleClas's default backend, said
    own, pc = _scores(tmp_path / "own" / "predictions.csv"), _scores(tmp_path / "pc" / "predictions.csv")
    assert own.keys() == pc.keys() and len(own) == 18
    for key, (name, score) in own.items():
        assert pc[key][0] == name and pc[key][1] == pytest.approx(score, abs=1e-5), key

    # the model's training config (ppcls/configs/...: an Infer section) says the same
    train_cfg = tmp_path / "MobileNetV2.yaml"
    train_cfg.write_text(yaml.safe_dump({"Arch": {"name": "MobileNetV2"}, "Infer": {
        "transforms": [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
                       *doc["PreProcess"]["transform_ops"]],
        "PostProcess": {"name": "Topk", "topk": 3,
                        "class_id_map_file": str(tmp_path / "deploy" / "labels" / "my_labels.txt")}}}))
    run_cli([f"model={bare}", f"inputs={images}", "topk=3", f"config={train_cfg}",
             f"out={tmp_path / 'train_cfg'}"], cwd=ROOT, module="mbv2.predict")
    assert _scores(tmp_path / "train_cfg" / "predictions.csv") == pc

    proc = run_cli([f"model={bare}", f"inputs={images}"], cwd=ROOT, module="mbv2.predict", check=False)
    assert proc.returncode != 0 and "config=<PaddleClas>/deploy/configs/inference_cls.yaml" in proc.stderr
    doc["PreProcess"]["transform_ops"][1] = {"RandCropImage": {"size": 32}}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli([f"model={bare}", f"inputs={images}", f"config={config}"], cwd=ROOT,
                   module="mbv2.predict", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{config}: PreProcess.transform_ops[1].RandCropImage is not an op" in proc.stderr


def test_a_32px_export_runs_at_224px(exported):
    from mbv2.predict import ExportedPredictor

    probs = ExportedPredictor(exported, threads=2)(np.random.default_rng(0).standard_normal(
        (2, 3, 224, 224)).astype("float32"))
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_eval_resize_rounds_as_paddleclas_does():
    from mbv2.data.transforms import CenterCrop, ResizeShort

    img = Image.new("RGB", (403, 300))
    assert ResizeShort(256)(img).size == (344, 256)  # 403 * 256/300 = 343.9 -> 344 (not 343)
    assert CenterCrop(224)(Image.new("RGB", (345, 256))).getbbox() is None  # corner (60, 16)
    crop = CenterCrop(2)(Image.fromarray(np.arange(25, dtype=np.uint8).reshape(5, 5)))
    assert np.asarray(crop).tolist() == [[6, 7], [11, 12]]  # floor((5 - 2) / 2) = 1

