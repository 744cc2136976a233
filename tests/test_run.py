"""End to end: `python -m mbv2.run` as a subprocess on tiny data, read back as a user would
(VisualDL records through visualdl.LogReader, metrics.json, checkpoints, run dirs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from visualdl import LogReader

from mbv2.rundirs import unique_dir
from tests.conftest import ROOT, TINY, run_cli

pytestmark = pytest.mark.slow


def _records(run_dir: Path) -> LogReader:
    files = sorted(run_dir.glob("vdlrecords.*"))
    assert len(files) == 1, f"one records file per run dir, found {files}"
    return LogReader(file_path=str(files[0]))


def _hparams(reader: LogReader) -> dict:
    (record,) = reader.get_data("hyper_parameters", "hparam")
    out = {}
    for info in record.hparam.hparamInfos:
        out[info.name] = getattr(info, info.WhichOneof("type"))
    metrics = [m.name for m in record.hparam.metricInfos]
    return {"values": out, "metrics": metrics}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli([*TINY, "trainer.epochs=2", "optim.lr=0.05", f"hydra.run.dir={run_dir}"], cwd=ROOT)
    return run_dir


def test_run_writes_metrics(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["status"] == "completed"
    assert m["epochs_completed"] == 2 and m["epochs_planned"] == 2
    for key in ("best_eval_acc_top1", "final_eval_acc_top1"):
        assert 0.0 <= m[key] <= 1.0
    assert m["best_eval_acc_top1"] >= m["final_eval_acc_top1"]
    from mbv2.model import MobileNetV2, count_macs, count_parameters

    net = MobileNetV2(class_num=4, scale=0.25)
    assert m["params_trainable"] == count_parameters(net)
    assert m["macs"] == count_macs(net, 32)
    assert m["train_images_per_sec"] > 0 and m["wall_seconds"] > 0
    assert [h["epoch"] for h in m["history"]] == [1, 2]


def test_run_writes_visualdl_records(tiny_run):
    reader = _records(tiny_run)
    scalars = set(reader.get_tags()["scalar"])
    assert {"train/loss", "train/acc_top1", "train/acc_top5", "train/lr",
            "eval/loss", "eval/acc_top1", "eval/acc_top5"} <= scalars
    # 48 images / batch 16 = 3 steps per epoch, 2 epochs, log_freq 1
    assert [r.id for r in reader.get_data("scalar", "train/loss")] == [1, 2, 3, 4, 5, 6]
    lrs = [r.value for r in reader.get_data("scalar", "train/lr")]
    # the LR each step trained with: one epoch (3 steps) of linear warm-up from 0, then
    # cosine from optim.lr down, stepped every iteration
    assert lrs[:4] == pytest.approx([0.0, 0.05 / 3, 0.1 / 3, 0.05], rel=1e-4)
    assert lrs[3:] == sorted(lrs[3:], reverse=True) and lrs[-1] < 0.02
    assert [r.id for r in reader.get_data("scalar", "eval/acc_top1")] == [1, 2]
    m = json.loads((tiny_run / "metrics.json").read_text())
    final = reader.get_data("scalar", "eval/acc_top1")[-1].value
    assert final == pytest.approx(m["final_eval_acc_top1"], abs=1e-6)
    hp = _hparams(reader)
    # short undotted names (VisualDL reads dots as nested paths and leaves such cells empty;
    # an axis name wider than its column freezes the parallel-coordinates view)
    assert hp["values"]["scale"] == pytest.approx(0.25)
    assert hp["values"]["lr"] == pytest.approx(0.05)
    assert hp["values"]["optim"] == "momentum" and hp["values"]["data"] == "fake"
    assert hp["values"]["epochs"] == 2 and hp["values"]["img_size"] == 32
    # a single run shows the core set only; null values are left out, not "null"
    from mbv2.config import CORE_HPARAMS

    assert set(hp["values"]) == set(CORE_HPARAMS) - {"ema"}
    assert all(len(k) <= 9 and "." not in k for k in hp["values"])
    assert hp["metrics"] == ["eval/best", "eval/last", "eval/loss"]
    best = [r.value for r in reader.get_data("scalar", "eval/best")]
    assert best[-1] == pytest.approx(m["best_eval_acc_top1"], abs=1e-6)
    (last,) = reader.get_data("scalar", "eval/last")  # once, when the run ended
    assert last.id == 2 and last.value == pytest.approx(m["final_eval_acc_top1"], abs=1e-6)
    assert best == sorted(best)  # the running best: its last value is the best


def test_run_dir_contents(tiny_run):
    for name in ("checkpoints/best.pdparams", "checkpoints/best.pdopt",
                 "checkpoints/last.pdparams", "checkpoints/last.pdopt", "class_names.txt",
                 "command.sh", ".hydra/config.yaml", "config_resolved.yaml", "run.log",
                 "model_summary.csv"):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "class_names.txt").read_text().splitlines() == [f"class_{i}" for i in range(4)]
    import csv

    rows = list(csv.DictReader((tiny_run / "model_summary.csv").open()))
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert sum(int(r["params"]) for r in rows) == m["params_trainable"]
    assert sum(int(r["macs"]) for r in rows) == m["macs"]
    assert "python -m mbv2.run" in (tiny_run / "command.sh").read_text()
    log = (tiny_run / "run.log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log
    # one eval loss per epoch line (the mean over the split), the
    # epoch's mean train loss, and the LR the epoch's last step used (not the 0 after it)
    m = json.loads((tiny_run / "metrics.json").read_text())
    line = next(x for x in log.splitlines() if "epoch 2/2" in x)
    assert line.count("loss") == 2 and f"eval loss {m['final_eval_loss']:.4f}" in line
    assert f"train loss {m['history'][-1]['train_loss']:.4f}" in line
    assert "lr 0 " not in line + " " and m["history"][-1]["lr"] > 0
    closing = log.strip().splitlines()[-1]
    assert f"best top-1 {m['best_eval_acc_top1']:.4f}" in closing
    assert str(tiny_run / "metrics.json") in closing
    # curves.png: loss, top-1 and LR per epoch
    from PIL import Image

    with Image.open(tiny_run / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 600


def test_same_seed_same_metrics(tiny_run, tmp_path):
    again = tmp_path / "again"
    run_cli([*TINY, "trainer.epochs=2", "optim.lr=0.05", f"hydra.run.dir={again}"], cwd=ROOT)
    a = json.loads((tiny_run / "metrics.json").read_text())
    b = json.loads((again / "metrics.json").read_text())
    for key in ("best_eval_acc_top1", "final_eval_acc_top1", "final_eval_loss", "final_train_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_default_run_dir_is_readable_and_unique(tmp_path):
    run_cli([*TINY, "trainer.epochs=1"], cwd=tmp_path)
    (day,) = (tmp_path / "outputs" / "runs").iterdir()
    (run,) = day.iterdir()
    # Hydra sorts the overrides in the name
    assert run.name.endswith("_" + ",".join(sorted(TINY + ["trainer.epochs=1"])))
    assert (run / "metrics.json").is_file()


def test_unique_dir_never_shares(tmp_path):
    base = str(tmp_path / "12-00-00")
    first = unique_dir(base, "model.scale=0.5")
    from mbv2 import rundirs

    rundirs._UNIQUE_DIRS.clear()  # a second process starting in the same second
    second = unique_dir(base, "model.scale=0.5")
    assert first != second and Path(first).is_dir() and Path(second).is_dir()
    assert Path(second).name == "12-00-00_model.scale=0.5-2"


def test_bad_value_fails_before_training_with_key(tmp_path):
    proc = run_cli([*TINY, "optim.lr=-1", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert "optim.lr=-1" in proc.stderr and "must be > 0" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_installed_entry_point(tmp_path):
    import subprocess
    import sys

    script = Path(sys.executable).parent / "mbv2-run"
    proc = subprocess.run([str(script), "--cfg", "job", "model.scale=0.75"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "scale: 0.75" in proc.stdout


def test_cfg_job_prints_whole_config():
    proc = run_cli(["--cfg", "job"], cwd=ROOT)
    for section in ("model:", "data:", "optim:", "sched:", "trainer:"):
        assert section in proc.stdout
    assert "scale:" in proc.stdout
