"""Checkpoints of a run: `last` after every epoch and `best` by eval/acc_top1.

Each checkpoint is the pair `<name>.pdparams` (model) + `<name>.pdopt` (optimizer and LR
schedule) that `paddle.Model.save` writes. Writes go to a temporary name first and are
renamed into place, so a crash mid-save never leaves a broken checkpoint behind.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import paddle
from paddle.callbacks import Callback

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
SUFFIXES = (".pdparams", ".pdopt")


def save_atomic(model: paddle.Model, path: Path) -> None:
    """`paddle.Model.save(path)` into a temporary prefix, then rename each file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    model.save(str(tmp))
    for suffix in SUFFIXES:
        written = Path(str(tmp) + suffix)
        if written.exists():
            os.replace(written, str(path) + suffix)


class Checkpointer(Callback):
    """Saves `last` at each epoch end and `best` when eval/acc_top1 improves."""

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.best: float | None = None

    def on_epoch_end(self, epoch, logs=None):
        save_atomic(self.model, self.dir / "last")

    def on_eval_end(self, logs=None):
        acc = float((logs or {}).get("acc_top1", float("nan")))
        if self.best is None or acc > self.best:
            self.best = acc
            save_atomic(self.model, self.dir / "best")
            log.info("checkpoint: best eval/acc_top1 %.4f -> %s", acc, self.dir / "best.pdparams")
