"""Synthetic sweep job dirs laid out as Hydra and mbv2.run write them, shared by the
summary tests (`test_summary.py`: reading rules; `test_summary_study.py`: the table's
columns and the plot)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

CONFIG = """\
model:
  name: mobilenet_v2
  scale: {scale}
  bottleneck:
    - [1, 16, 1, 1]
    - [6, 24, 2, 2]
optim:
  name: momentum
  lr: {lr}
  weight_decay: 4.0e-05
sched:
  name: cosine
trainer:
  epochs: 10
  batch_size: ${{data.batch}}
data:
  name: {data}
  image_size: {image_size}
  batch: 64
run_dir: ${{hydra:runtime.output_dir}}
"""


def make_job(
    path: Path,
    scale: float | str,
    lr: float | str,
    metrics: dict[str, Any] | str | None,
    overrides: list[str] | None = None,
    data: str = "digits",
    image_size: int = 32,
) -> Path:
    """A Hydra job dir: .hydra/config.yaml, .hydra/overrides.yaml and maybe metrics.json.

    metrics may be a dict (valid JSON), a str (written verbatim) or None (no file).
    """
    (path / ".hydra").mkdir(parents=True)
    config = CONFIG.format(scale=scale, lr=lr, data=data, image_size=image_size)
    (path / ".hydra" / "config.yaml").write_text(config)
    if overrides is None:
        overrides = [f"model.scale={scale}", f"optim.lr={lr}"]
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if isinstance(metrics, dict):
        (path / "metrics.json").write_text(json.dumps(metrics))
    elif isinstance(metrics, str):
        (path / "metrics.json").write_text(metrics)
    return path


def completed(best: float, final: float, params: int, macs: int) -> dict[str, Any]:
    return {
        "status": "completed",
        "best_eval_acc_top1": best,
        "final_eval_acc_top1": final,
        "best_epoch": 9,
        "epochs_completed": 10,
        "epochs_planned": 10,
        "params_trainable": params,
        "macs": macs,
        "image_size": 32,
        "train_images_per_sec": 812.5,
        "wall_seconds": 123.4,
        "run_name": "x",
    }


# (dir, scale, lr, best, final, params, macs): a 2 widths x 2 LRs grid
GRID = [
    ("model.scale=0.5,optim.lr=0.1", 0.5, 0.1, 0.62, 0.60, 700_000, 6_000_000),
    ("model.scale=0.5,optim.lr=0.01", 0.5, 0.01, 0.55, 0.54, 700_000, 6_000_000),
    ("model.scale=1.0,optim.lr=0.1", 1.0, 0.1, 0.71, 0.70, 2_200_000, 80_000_000),
    ("model.scale=1.0,optim.lr=0.01", 1.0, 0.01, 0.66, 0.65, 2_200_000, 80_000_000),
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def make_sweep(tmp_path: Path) -> Path:
    """A sweep still running: 4 completed, 1 failed, 1 running, 1 unstarted, 1 corrupt."""
    root = tmp_path / "sweeps" / "2024-05-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for name, scale, lr, best, final, params, macs in GRID:
        make_job(root / name, scale, lr, completed(best, final, params, macs))
    make_job(
        root / "model.scale=1.4,optim.lr=0.1",
        1.4,
        0.1,
        {
            "status": "failed",
            "error": "RuntimeError: out of memory\nwhile allocating 2 GiB",
            "epochs_completed": 1,
            "epochs_planned": 10,
        },
    )
    make_job(
        root / "model.scale=0.75,optim.lr=0.1",
        0.75,
        0.1,
        {
            "status": "running",
            "best_eval_acc_top1": 0.40,
            "epochs_completed": 2,
            "epochs_planned": 10,
            "macs": 40_000_000,
        },
    )
    make_job(root / "model.scale=0.35,optim.lr=0.1", 0.35, 0.1, None)
    make_job(root / "model.scale=0.25,optim.lr=0.1", 0.25, 0.1, '{"status": "compl')
    return root
