"""Everything a run records: VisualDL scalars and hparams, metrics.json, the epoch log.

One `LogWriter` per run dir, with a fixed file name: VisualDL shows only the newest records
file of a directory, and a fixed name lets a resumed run append to the same records.
Train scalars use the global step as x-axis; eval scalars use the epoch (1-based).

Resume: the tracker's state (steps, history, timings) travels in the checkpoint, and the
records file is cut back to the checkpoint (`truncate_records`) before the resumed run
appends. Cutting back, rather than buffering an epoch's scalars until the checkpoint, is
what stays right whichever moment the process dies: records flushed after the checkpoint
(the killed epoch's, or its eval written just before the checkpoint rename) are dropped
and logged again, so no step is duplicated or missing.
"""
from __future__ import annotations

import logging
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
from paddle.callbacks import Callback

from mbv2.files import write_bytes_atomic, write_json_atomic
from mbv2.train.curves import CurvesPlotter

log = logging.getLogger(__name__)

RECORDS_FILE = "vdlrecords.mbv2.log"
METRICS_FILE = "metrics.json"
# VisualDL's HParams views show each metric's last value: eval/best (the best top-1 so
# far, every evaluation) and eval/last (the final top-1, once the run ends) give best and
# final side by side; eval/loss ends at the final loss. Short names: see
# config.CORE_HPARAMS (a long axis name freezes the parallel-coordinates view).
BEST_TAG, LAST_TAG = "eval/best", "eval/last"
HPARAM_METRICS = [BEST_TAG, LAST_TAG, "eval/loss"]
CURVES_FILE = "curves.png"
# scalar tag prefixes whose x-axis is the global step (train/) or the epoch (the others)
STEPPED_TAGS = ("train/", "eval/", "eval_ema/")


def scalar_value(value) -> float:
    """paddle.Model logs the loss as a one-element list; metrics as floats."""
    if isinstance(value, (list, tuple, np.ndarray)):
        value = np.asarray(value).reshape(-1)[0]
    return float(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class _NullWriter:
    """Stands in for the LogWriter on ranks that must not write (VisualDL's own
    write_to_disk=False writer cannot take hparams)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def truncate_records(path: str | Path, max_step: int, max_epoch: int) -> int:
    """Rewrite a VisualDL records file keeping train scalars up to global step `max_step`
    and eval scalars (`eval/*`, `eval_ema/*`, x-axis = epoch) up to `max_epoch`; other
    records (run metadata, hparams) stay. A record cut short by a kill is dropped.
    Returns how many records were removed. Written to a temporary name, then renamed."""
    from visualdl.proto import record_pb2

    path = Path(path)
    raw = path.read_bytes()
    kept, removed, pos = [], 0, 0
    while pos + 8 <= len(raw):
        (size,) = struct.unpack_from("<Q", raw, pos)
        frame = raw[pos:pos + 8 + size]
        pos += 8 + size
        if pos > len(raw):  # a record the killed process only half wrote
            removed += 1
            break
        record = record_pb2.Record()
        record.ParseFromString(frame[8:])
        scalars = [v for v in record.values if v.tag.startswith(STEPPED_TAGS)]
        if all(v.id <= (max_step if v.tag.startswith("train/") else max_epoch) for v in scalars):
            kept.append(frame)
        else:
            removed += 1
    write_bytes_atomic(path, b"".join(kept))
    return removed


class RunTracker(Callback):
    """Logs to VisualDL, keeps metrics.json current and prints one line per epoch.

    As a fit callback it sees the training batches and epochs; evaluation results come in
    through `record_eval`, checkpoints through `record_checkpoint`."""

    def __init__(self, run_dir: str | Path, run_name: str, hparams: dict[str, Any],
                 static_metrics: dict[str, Any], log_freq: int, epochs: int,
                 write: bool = True):
        super().__init__()
        # In a data-parallel run every rank tracks but only
        # rank 0 writes: one records file and one metrics.json per run dir.
        self.write = write
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
        self._last_train: dict[str, float] = {}
        self._epoch_loss = [0.0, 0]  # sum of batch loss x batch size, images
        self._epoch_lr = float("nan")  # the LR of the epoch's last step
        # fit numbers the epochs it runs from 0; a resumed run adds the epochs already done
        self.epoch_offset = 0
        self._resumed = False
        self._wall_before = 0.0  # wall seconds of the run's earlier processes (resume)
        self.curves = CurvesPlotter(self.run_dir / CURVES_FILE, run_name)
        self.save()

    # -- resume ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry so a resumed run continues this record exactly."""
        return {"global_step": self.global_step, "epoch": self.epoch + 1,
                "history": [dict(h) for h in self.history],
                "metrics": {k: v for k, v in self.metrics.items() if k != "history"},
                "epoch_seconds": [list(x) for x in self._epoch_seconds],
                "wall_seconds": self._wall_before + time.perf_counter() - self._start}

    def resume(self, state: dict[str, Any], checkpoint: str) -> None:
        """Continue from a checkpoint's tracker state: later epochs count on from there and
        the records file loses whatever was logged after the checkpoint."""
        self.global_step = int(state["global_step"])
        self.epoch = self.epoch_offset = int(state["epoch"])
        self.history = [dict(h) for h in state["history"]]
        self._epoch_seconds = [tuple(x) for x in state["epoch_seconds"]]
        self._wall_before = float(state["wall_seconds"])
        self._start = time.perf_counter()
        kept = {k: v for k, v in state["metrics"].items()
                if k not in ("status", "epochs_planned", "error", "wall_seconds")}
        self.metrics.update(kept)
        self.metrics.setdefault("resumed", []).append(
            {"from_checkpoint": checkpoint, "epoch": self.epoch_offset,
             "global_step": self.global_step})
        records = self.run_dir / RECORDS_FILE
        if self.write and records.exists():
            removed = truncate_records(records, self.global_step, self.epoch_offset)
            log.info("resume: %s cut back to step %d / epoch %d (%d later records dropped)",
                     records, self.global_step, self.epoch_offset, removed)
        self._resumed = True
        self.save()

    # -- lifecycle -------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        from visualdl import LogWriter  # imported late: it pulls in matplotlib

        self.writer = (LogWriter(logdir=str(self.run_dir), file_name=RECORDS_FILE,
                                 display_name=self.run_name) if self.write else _NullWriter())
        if not self._resumed:  # the records file already holds them
            self.writer.add_hparams(self.hparams, list(HPARAM_METRICS))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + self.epoch_offset
        self._epoch_images = 0
        self._epoch_loss = [0.0, 0]
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, step, logs=None):
        logs = logs or {}
        loss = scalar_value(logs["loss"])
        self.global_step += 1
        batch = int(logs.get("batch_size", 0))
        self._epoch_images += batch
        self._epoch_loss[0] += loss * max(batch, 1)
        self._epoch_loss[1] += max(batch, 1)
        # fit's LRScheduler callback steps after this one: this is the LR the step used
        self._epoch_lr = float(self.model._optimizer.get_lr())
        self._last_train = {"loss": loss, "acc_top1": scalar_value(logs["acc_top1"]),
                            "acc_top5": scalar_value(logs["acc_top5"])}
        if self.global_step % self.log_freq == 0:
            for key, value in self._last_train.items():
                self.writer.add_scalar(f"train/{key}", value, self.global_step)
            self.writer.add_scalar("train/lr", self._epoch_lr, self.global_step)

    def on_epoch_end(self, epoch, logs=None):
        epoch = epoch + self.epoch_offset
        seconds = time.perf_counter() - self._epoch_start
        self._epoch_seconds.append((self._epoch_images, seconds))
        self.metrics["epochs_completed"] = epoch + 1
        self.metrics["train_images_per_sec"] = self.train_images_per_sec()
        # the epoch's mean over its images (paddle.Model's logs hold the last step's)
        loss = self._epoch_loss[0] / self._epoch_loss[1] if self._epoch_loss[1] else None
        self.metrics["final_train_loss"] = loss
        self.history.append({"epoch": epoch + 1, "train_loss": loss,
                             "train_acc_top1": self._last_train.get("acc_top1"),
                             "lr": self._epoch_lr, "train_seconds": round(seconds, 3),
                             "train_images_per_sec": round(self._epoch_images / max(seconds, 1e-9), 1)})

    def record_eval(self, tag: str, epoch: int, result: dict[str, float]) -> None:
        """An evaluation of 1-based `epoch`: `tag` eval (the model's weights) or eval_ema
        (kept apart: best_epoch and the epoch line follow the model's own weights)."""
        for key, value in result.items():
            self.writer.add_scalar(f"{tag}/{key}", value, epoch)
        m = self.metrics
        best = m.get(f"best_{tag}_acc_top1")
        if best is None or result["acc_top1"] > best:
            m[f"best_{tag}_acc_top1"] = best = result["acc_top1"]
            if tag == "eval":
                m["best_epoch"] = epoch
        self.writer.add_scalar(f"{tag}/best", best, epoch)
        for key, value in result.items():
            m[f"final_{tag}_{key}"] = value
        if self.history and self.history[-1]["epoch"] == epoch:
            self.history[-1].update({f"{tag}_{k}": v for k, v in result.items()})
        self.writer.flush()
        if tag == "eval":
            m["last_eval_epoch"] = epoch
            self.log_epoch(epoch)
        self.save()

    def record_checkpoint(self, epoch: int, path: Path) -> None:
        """The end of an epoch: its checkpoint is written; curves.png is redrawn."""
        self.metrics["last_checkpoint"] = {"epoch": epoch, "global_step": self.global_step,
                                           "path": str(path)}
        self.save()
        if self.write:
            self.curves.update(self.history, final=epoch == self.epochs)

    def log_epoch(self, epoch: int) -> None:
        """One line: the epoch's mean train loss, the eval (mean) loss and top-1/top-5, the
        best so far, time, speed and the LR the epoch ended on."""
        h = self.history[-1] if self.history else {}
        nan = float("nan")
        log.info("epoch %d/%d  train loss %.4f acc %.4f | eval loss %.4f top1 %.4f top5 %.4f "
                 "(best %.4f @%d) | %.1f s, %.0f img/s, lr %.3g",
                 epoch, self.epochs, h.get("train_loss") or nan, h.get("train_acc_top1") or nan,
                 h.get("eval_loss", nan), h.get("eval_acc_top1", nan), h.get("eval_acc_top5", nan),
                 self.metrics["best_eval_acc_top1"], self.metrics["best_epoch"],
                 h.get("train_seconds", nan), h.get("train_images_per_sec", 0.0), h.get("lr", nan))

    # -- results ---------------------------------------------------------------------
    def train_images_per_sec(self) -> float:
        """Training throughput; the first epoch (warm-up, allocator growth) is left out
        when there are later ones. Evaluation is never inside these timings."""
        epochs = self._epoch_seconds[1:] if len(self._epoch_seconds) > 1 else self._epoch_seconds
        images = sum(n for n, _ in epochs)
        seconds = sum(s for _, s in epochs)
        return images / seconds if seconds > 0 else 0.0

    def flush(self) -> None:
        """Everything logged so far onto disk (before a checkpoint claims it)."""
        if self.writer is not None:
            self.writer.flush()

    def save(self) -> None:
        self.metrics["wall_seconds"] = round(self._wall_before + time.perf_counter() - self._start, 3)
        self.metrics["history"] = self.history
        if self.write:
            write_json_atomic(self.run_dir / METRICS_FILE, self.metrics)

    def finish(self, status: str, error: str | None = None) -> dict[str, Any]:
        self.metrics["status"] = status
        if error:
            self.metrics["error"] = error
        self.save()
        if self.writer is not None:
            if self.metrics.get("final_eval_acc_top1") is not None:
                self.writer.add_scalar(LAST_TAG, self.metrics["final_eval_acc_top1"],
                                       int(self.metrics["last_eval_epoch"]))
            self.writer.close()
            self.writer = None
        if self.write:
            self.curves.update(self.history, final=True)
            m = self.metrics
            log.info("run %s %s%s: best top-1 %s at epoch %s, final top-1 %s, %d of %d epochs; "
                     "%s", self.run_name, status, f" ({error})" if error and status == "failed" else "",
                     _fmt(m["best_eval_acc_top1"]), m["best_epoch"],
                     _fmt(m["final_eval_acc_top1"]), m["epochs_completed"], self.epochs,
                     self.run_dir / METRICS_FILE)
        return self.metrics
