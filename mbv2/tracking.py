"""Everything a run records: VisualDL scalars and hparams, metrics.json, the epoch log.

One `LogWriter` per run dir, with a fixed file name: VisualDL shows only the newest records
file of a directory, and a fixed name lets a resumed run append to the same records.
Train scalars use the global step as x-axis; eval scalars use the epoch (1-based).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from paddle.callbacks import Callback

log = logging.getLogger(__name__)

RECORDS_FILE = "vdlrecords.mbv2.log"
METRICS_FILE = "metrics.json"
HPARAM_METRICS = ["eval/acc_top1", "eval/loss"]


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _scalar(value) -> float:
    """paddle.Model logs the loss as a one-element list; metrics as floats."""
    if isinstance(value, (list, tuple, np.ndarray)):
        value = np.asarray(value).reshape(-1)[0]
    return float(value)


class NonFiniteLossError(FloatingPointError):
    pass


class RunTracker(Callback):
    """Logs to VisualDL, keeps metrics.json current and prints one line per epoch.

    Also the run's guard against divergence: a NaN/inf training loss stops the run with
    an error instead of training on garbage."""

    def __init__(self, run_dir: str | Path, run_name: str, hparams: dict[str, Any],
                 static_metrics: dict[str, Any], log_freq: int, epochs: int):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.hparams = hparams
        self.log_freq = log_freq
        self.epochs = epochs
        self.writer = None
        self.global_step = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.metrics: dict[str, Any] = {
            "status": "running", "run_name": run_name, "epochs_planned": epochs,
            "epochs_completed": 0, "best_eval_acc_top1": None, "best_epoch": None,
            "final_eval_acc_top1": None, **static_metrics,
        }
        self._start = time.perf_counter()
        self._epoch_start = 0.0
        self._epoch_images = 0
        self._epoch_seconds: list[tuple[int, float]] = []  # (images, seconds) per epoch
        self._eval_loss_sum = 0.0
        self._eval_count = 0
        self._last_train: dict[str, float] = {}
        self.save()

    # -- lifecycle -------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        from visualdl import LogWriter  # imported late: it pulls in matplotlib

        self.writer = LogWriter(logdir=str(self.run_dir), file_name=RECORDS_FILE,
                                display_name=self.run_name)
        self.writer.add_hparams(self.hparams, list(HPARAM_METRICS))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._epoch_images = 0
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, step, logs=None):
        logs = logs or {}
        loss = _scalar(logs["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at epoch {self.epoch + 1}, step {step + 1} "
                f"(global step {self.global_step + 1}); the run stopped. Lower optim.lr, add "
                f"sched.warmup_epochs or optim.grad_clip")
        self.global_step += 1
        self._epoch_images += int(logs.get("batch_size", 0))
        self._last_train = {"loss": loss, "acc_top1": _scalar(logs["acc_top1"]),
                            "acc_top5": _scalar(logs["acc_top5"])}
        if self.global_step % self.log_freq == 0:
            for key, value in self._last_train.items():
                self.writer.add_scalar(f"train/{key}", value, self.global_step)
            self.writer.add_scalar("train/lr", float(self.model._optimizer.get_lr()), self.global_step)

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._epoch_start
        self._epoch_seconds.append((self._epoch_images, seconds))
        self.metrics["epochs_completed"] = epoch + 1
        self.metrics["train_images_per_sec"] = self.train_images_per_sec()
        self.metrics["final_train_loss"] = self._last_train.get("loss")
        self.history.append({"epoch": epoch + 1, "train_loss": self._last_train.get("loss"),
                             "train_acc_top1": self._last_train.get("acc_top1"),
                             "train_seconds": round(seconds, 3)})

    def on_eval_begin(self, logs=None):
        self._eval_loss_sum, self._eval_count = 0.0, 0

    def on_eval_batch_end(self, step, logs=None):
        n = int((logs or {}).get("batch_size", 1))
        self._eval_loss_sum += _scalar(logs["loss"]) * n
        self._eval_count += n

    def on_eval_end(self, logs=None):
        logs = logs or {}
        # paddle.Model reports the last eval batch's loss; VisualDL gets the mean
        result = {"loss": self._eval_loss_sum / max(1, self._eval_count),
                  "acc_top1": _scalar(logs["acc_top1"]), "acc_top5": _scalar(logs["acc_top5"])}
        self.record_eval(self.epoch + 1, result)

    def record_eval(self, epoch: int, result: dict[str, float]) -> None:
        for key, value in result.items():
            self.writer.add_scalar(f"eval/{key}", value, epoch)
        m = self.metrics
        if m["best_eval_acc_top1"] is None or result["acc_top1"] > m["best_eval_acc_top1"]:
            m["best_eval_acc_top1"], m["best_epoch"] = result["acc_top1"], epoch
        m["final_eval_acc_top1"] = result["acc_top1"]
        m["final_eval_acc_top5"] = result["acc_top5"]
        m["final_eval_loss"] = result["loss"]
        m["last_eval_epoch"] = epoch
        if self.history and self.history[-1]["epoch"] == epoch:
            self.history[-1].update({f"eval_{k}": v for k, v in result.items()})
        self.writer.flush()
        self.log_epoch(epoch)
        self.save()

    def log_epoch(self, epoch: int) -> None:
        h = self.history[-1] if self.history else {}
        lr = float(self.model._optimizer.get_lr()) if self.model else float("nan")
        log.info("epoch %d/%d  train loss %.4f acc %.4f | eval loss %.4f top1 %.4f top5 %.4f "
                 "(best %.4f @%d) | %.1f s, %.0f img/s, lr %.3g",
                 epoch, self.epochs, h.get("train_loss") or float("nan"),
                 h.get("train_acc_top1") or float("nan"), h.get("eval_loss", float("nan")),
                 h.get("eval_acc_top1", float("nan")), h.get("eval_acc_top5", float("nan")),
                 self.metrics["best_eval_acc_top1"], self.metrics["best_epoch"],
                 h.get("train_seconds", float("nan")),
                 self._epoch_seconds[-1][0] / max(1e-9, self._epoch_seconds[-1][1]) if self._epoch_seconds else 0.0,
                 lr)

    # -- results ---------------------------------------------------------------------
    def train_images_per_sec(self) -> float:
        """Training throughput; the first epoch (warm-up, allocator growth) is left out
        when there are later ones. Evaluation is never inside these timings."""
        epochs = self._epoch_seconds[1:] if len(self._epoch_seconds) > 1 else self._epoch_seconds
        images = sum(n for n, _ in epochs)
        seconds = sum(s for _, s in epochs)
        return images / seconds if seconds > 0 else 0.0

    def save(self) -> None:
        self.metrics["wall_seconds"] = round(time.perf_counter() - self._start, 3)
        self.metrics["history"] = self.history
        write_json_atomic(self.run_dir / METRICS_FILE, self.metrics)

    def finish(self, status: str, error: str | None = None) -> dict[str, Any]:
        self.metrics["status"] = status
        if error:
            self.metrics["error"] = error
        self.save()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.metrics
