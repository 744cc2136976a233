"""mbv2.summary.grid (the study report) on synthetic job dirs, and the study presets.

No paddle and no training: the job dirs are YAML/JSON files in tmp_path laid out as Hydra
and mbv2.run write them, for a 2 widths x 2 LRs x 2 seeds grid with known numbers: one
run failed (its partial top-1 must not be averaged in) and one never started.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from mbv2 import summary
from mbv2.summary import grid as grid_mod

CONFIG = """\
model:
  name: mobilenet_v2
  scale: {scale}
  stem_stride: {stem}
optim:
  name: momentum
  lr: {lr}
sched:
  name: cosine
trainer:
  epochs: 15
  batch_size: 64
  seed: {seed}
data:
  name: digits
  image_size: 32
run_dir: ${{hydra:runtime.output_dir}}
"""
PARAMS = {0.5: 700_000, 1.0: 2_200_000}
MACS = {0.5: 6_000_000, 1.0: 80_000_000}
# (scale, lr, seed) -> (best top-1, train img/s, wall s); (0.5, 0.01, 1) never started
RUNS = {
    (0.5, 0.01, 0): (0.50, 800.0, 100.0),
    (0.5, 0.1, 0): (0.60, 900.0, 110.0),
    (0.5, 0.1, 1): (0.62, 1000.0, 120.0),
    (1.0, 0.01, 0): (0.66, 300.0, 400.0),
    (1.0, 0.01, 1): (0.70, 330.0, 410.0),
    (1.0, 0.1, 0): (0.71, 360.0, 420.0),
}
FAILED_JOB = "model.scale=1.0,optim.lr=0.1,trainer.seed=1"


def write_job(path: Path, config: dict[str, Any], overrides: list[str],
              metrics: dict[str, Any]) -> None:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(CONFIG.format(**config))
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / "metrics.json").write_text(json.dumps(metrics))


def finished(scale: float, best: float, speed: float, wall: float, macs: int | None = None):
    return {"status": "completed", "best_eval_acc_top1": best, "final_eval_acc_top1": best,
            "epochs_completed": 15, "epochs_planned": 15, "params_trainable": PARAMS[scale],
            "macs": macs or MACS[scale], "train_images_per_sec": speed, "wall_seconds": wall}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    root = tmp_path / "outputs" / "studies" / "width_lr_digits"
    for (scale, lr, seed), numbers in [*RUNS.items(), ((1.0, 0.1, 1), None)]:
        sweep = [f"model.scale={scale}", f"optim.lr={lr}", f"trainer.seed={seed}"]
        metrics = finished(scale, *numbers) if numbers else {
            "status": "failed", "error": "FloatingPointError: loss is nan at step 12",
            "best_eval_acc_top1": 0.05, "params_trainable": PARAMS[scale],
            "macs": MACS[scale], "wall_seconds": 50.0}
        write_job(root / ",".join(sweep), {"scale": scale, "lr": lr, "seed": seed, "stem": 2},
                  ["experiment=study_width_lr", *sweep], metrics)
    return root


def table_rows(md: str) -> dict[str, list[str]]:
    """The report's table: first cell -> the row's cells, the header under 'header'."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {"header": rows[0], **{row[0]: row for row in rows[1:]}}


def test_cells_are_mean_and_sample_std_with_best_marked(study: Path, tmp_path: Path) -> None:
    result = summary.write_study_report(study, tmp_path / "res" / "width_lr_digits")
    md = result["md"].read_text()
    table = table_rows(md)
    assert table["header"] == ["scale", "params", "MACs (M)", "lr=0.01", "lr=0.1",
                               "train img/s", "wall s/run"]
    # 0.50 alone; 0.60, 0.62 -> 61 ± 1.41 (sample std); 0.66, 0.70 -> 68 ± 2.83
    assert table["0.5"] == ["0.5", "700,000", "6.00", "50.00 (n=1)", "**61.00 ± 1.41** (n=2)",
                            "900.0", "110"]
    # the failed run's 5 % is not averaged in: 71 (n=1), the best of its row and overall
    assert table["1"] == ["1", "2,200,000", "80.00", "68.00 ± 2.83 (n=2)", "**71.00** (n=1) ★",
                          "330.0", "410"]
    assert md.count("★") == 2  # the cell, and the legend explaining it
    grid = result["grid"]
    assert grid.stats("1", "0.1") == (71.0, None, 1)
    assert grid.best() == {("1", "0.1")} and grid.best("0.5") == {("0.5", "0.1")}
    assert (grid.completed, grid.planned) == (6, 8)


def test_failed_and_missing_runs_are_listed_not_averaged(study: Path, tmp_path: Path) -> None:
    md = summary.write_study_report(study, tmp_path / "r")["md"].read_text()
    assert "- **Runs:** 6 completed of 8 planned (2 not in the table, listed below)" in md
    left_out = md.split("## Runs not in the table", 1)[1]
    assert "2 of 8 planned runs are not averaged in:" in left_out
    assert f"- `{FAILED_JOB}`: failed: FloatingPointError: loss is nan at step 12" in left_out
    assert "- `model.scale=0.5,optim.lr=0.01,trainer.seed=1`: no job dir: never started" in left_out


def test_header_says_data_seeds_runs_time_and_how_to_reproduce(study: Path,
                                                               tmp_path: Path) -> None:
    md = summary.write_study_report(study, tmp_path / "r")["md"].read_text()
    assert md.startswith("# scale x lr over seeds: studies/width_lr_digits\n")
    assert "- **Data:** digits, 32 px" in md
    assert "- **Epochs:** 15; **image size:** 32 px; **seeds** (`trainer.seed`): 0, 1" in md
    assert "- **Total wall time:** 27 min" in md  # 1610 s, the failed run's 50 s included
    assert "- **Date:** " in md and "`optim.name=momentum`" in md
    assert "- **Reproduce:** `python -m mbv2.run experiment=study_width_lr`" in md
    assert f"- **Rebuild this report:** `python -m mbv2.summary grid {study}" in md
    assert grid_mod.NOTES_HEADING in md and grid_mod.TODO_LINE in md
    assert "![best top-1 vs MACs](r.png)" in md


def test_cli_writes_both_files_and_a_rebuild_keeps_the_notes(study: Path, tmp_path: Path,
                                                            capsys) -> None:
    out = tmp_path / "results" / "width_lr_digits"
    args = ["grid", str(study), "--rows", "model.scale", "--cols", "optim.lr", "--out", str(out)]
    assert summary.main(args) == 0
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    assert "**71.00** (n=1) ★" in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.size == (1140, 660)
    md.write_text(md.read_text().replace(grid_mod.TODO_LINE, "Measured: lr 0.1 wins."))
    assert summary.main(args) == 0
    text = md.read_text()
    assert "Measured: lr 0.1 wins." in text and grid_mod.TODO_LINE not in text
    assert text.count(grid_mod.NOTES_HEADING) == 1 and "## Runs not in the table" in text
    assert summary.main(["grid", str(tmp_path / "nowhere")]) == 2


def test_python_m_grid_imports_no_paddle(study: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli" / "study"
    code = ("import runpy, sys; sys.argv = ['mbv2.summary', 'grid', sys.argv[1], '--out', "
            "sys.argv[2]]\ntry:\n    runpy.run_module('mbv2.summary', run_name='__main__')\n"
            "except SystemExit as e:\n    print('rc', e.code, 'paddle' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(study), str(out)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "rc 0 False" in proc.stdout, proc.stderr
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


def test_grid_as_first_argument_with_only_old_options_is_a_dir(study: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    write_job(tmp_path / "grid" / "job", {"scale": 0.5, "lr": 0.1, "seed": 0, "stem": 2}, [],
              finished(0.5, 0.6, 900.0, 10.0))
    monkeypatch.chdir(tmp_path)
    assert summary.main(["grid", "--sort", "lr", "--no-plot"]) == 0
    assert (tmp_path / "grid" / "summary.md").is_file()


def test_macs_that_change_with_the_col_are_shown_per_col(tmp_path: Path) -> None:
    root = tmp_path / "stem"
    # stem stride only in the saved config (not an override): read from there
    for scale, stem, best in [(0.5, 1, 0.80), (0.5, 2, 0.80), (1.0, 1, 0.90), (1.0, 2, 0.85)]:
        macs = MACS[scale] * (4 if stem == 1 else 1)
        write_job(root / f"s{scale}_{stem}", {"scale": scale, "lr": 0.1, "seed": 0, "stem": stem},
                  [f"model.scale={scale}", "trainer.seed=0"],
                  finished(scale, best, 100.0 * stem, 10.0 * stem, macs))
    result = summary.write_study_report(root, tmp_path / "s", cols="model.stem_stride")
    table = table_rows(result["md"].read_text())
    assert table["header"][2] == "MACs (M) (stem stride 1 / 2)"
    assert table["header"][3:5] == ["stem stride=1", "stem stride=2"]
    # equal means are both the best of their row; the grid's best is starred
    assert table["0.5"] == ["0.5", "700,000", "24.00 / 6.00", "**80.00** (n=1)",
                            "**80.00** (n=1)", "100.0 / 200.0", "10 / 20"]
    assert table["1"][3:5] == ["**90.00** (n=1) ★", "85.00 (n=1)"]
    assert "`python -m mbv2.run -m trainer.seed=0 model.scale=0.5,1.0`" in result["md"].read_text()
    assert result["png"].is_file()


def _hydra_config(cfg_factory, name: str):
    cfg = cfg_factory([f"experiment={name}"], return_hydra_config=True)
    return cfg, cfg.hydra


@pytest.mark.parametrize("name, cols, planned", [("study_width_lr", "optim.lr", 90),
                                                ("study_stem_stride", "model.stem_stride", 36)])
def test_study_presets_compose(cfg_factory, name: str, cols: str, planned: int) -> None:
    cfg, hydra = _hydra_config(cfg_factory, name)
    assert cfg.data.name == "digits" and str(hydra.mode) == "RunMode.MULTIRUN"
    assert hydra.sweep.dir == f"outputs/studies/{name.removeprefix('study_')}_digits"
    assert "joblib" in hydra.launcher._target_.lower() and hydra.launcher.n_jobs == 2
    params = hydra.sweeper.params
    assert params["model.scale"] == "0.25,0.5,0.75,1.0,1.5,2.0"
    assert params["trainer.seed"] == "0,1,2" and cols in params
    assert grid_mod.planned_runs(params, [f"experiment={name}"]) == planned
    # the report runs first: Hydra calls on_multirun_end in reverse, SweepEnd may exit 1
    assert list(hydra.callbacks) == ["sweep_end", "study_report"]
    report = instantiate(hydra.callbacks.study_report)
    assert isinstance(report, summary.StudyReport)
    assert (report.out, report.rows, report.cols) == (
        f"experiments/results/{name.removeprefix('study_')}_digits", "model.scale", cols)


def test_width_lr_grid_and_stem_stride_lr(cfg_factory) -> None:
    _, hydra = _hydra_config(cfg_factory, "study_width_lr")
    assert hydra.sweeper.params["optim.lr"] == "0.003,0.01,0.03,0.1,0.3"
    # a key swept on the command line replaces the preset's
    assert grid_mod.planned_runs(hydra.sweeper.params, ["trainer.seed=0,1"]) == 60
    cfg, _ = _hydra_config(cfg_factory, "study_stem_stride")
    assert cfg.optim.lr == 0.03  # the best LR of study_width_lr at every width


def test_callback_writes_the_report_when_the_multirun_ends(study: Path, tmp_path: Path,
                                                           caplog) -> None:
    config = OmegaConf.create({"hydra": {
        "sweep": {"dir": str(study)},
        "overrides": {"task": ["experiment=study_width_lr"], "hydra": ["hydra.sweep.dir=d"]},
        "sweeper": {"params": {"model.scale": "0.5,1.0", "optim.lr": "0.01,0.1",
                               "trainer.seed": "0,1,2"}}}})
    out = tmp_path / "results" / "width_lr_digits"
    summary.StudyReport(out=str(out)).on_multirun_end(config)
    md = out.with_suffix(".md").read_text()
    assert "6 completed of 12 planned" in md and "--planned 12" in md
    assert "- `4 more planned runs`: no job dir: never started" in md
    assert "`python -m mbv2.run experiment=study_width_lr hydra.sweep.dir=d`" in md
    assert out.with_suffix(".png").is_file()
    config.hydra.sweep.dir = str(tmp_path / "nowhere")
    summary.StudyReport(out=str(out)).on_multirun_end(config)  # logs, never raises
    assert "study report not written" in caplog.text
