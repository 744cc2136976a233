"""The `paddle.Model.fit` callbacks of a run, one job each.

* `NanGuard`: a NaN/inf training loss stops the run with an error naming the step,
  instead of training on garbage;
* `EmaUpdate`: the weights' moving average after every optimizer step;
* `EvalAndCheckpoint`: after each epoch, evaluate (every `eval_freq` epochs and after the
  last; the EMA weights too), hand the results to the tracker, then checkpoint.
The tracker itself (`tracking.RunTracker`) is the fourth: VisualDL, metrics.json, the log.
"""
from __future__ import annotations

import math
from typing import Any

from paddle.callbacks import Callback

from mbv2.train.checkpoint import Checkpointer, capture_rng
from mbv2.train.ema import ModelEma
from mbv2.train.tracking import RunTracker, scalar_value


class NonFiniteLossError(FloatingPointError):
    pass


class NanGuard(Callback):
    """Stops the run at the first non-finite training loss (put it before the tracker)."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, step, logs=None):
        loss = scalar_value((logs or {})["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {step + 1} of this process's epoch "
                f"{self.epoch + 1}; the run stopped. Lower optim.lr, add sched.warmup_epochs "
                f"or optim.grad_clip")


class EmaUpdate(Callback):
    def __init__(self, ema: ModelEma):
        super().__init__()
        self.ema = ema

    def on_train_batch_end(self, step, logs=None):
        self.ema.update()  # after the optimizer step of this batch


class _MeanEvalLoss(Callback):
    """paddle.Model reports the last eval batch's loss; this keeps the mean over images."""

    def __init__(self):
        super().__init__()
        self.total, self.count = 0.0, 0

    def on_eval_batch_end(self, step, logs=None):
        n = int((logs or {}).get("batch_size", 1))
        self.total += scalar_value(logs["loss"]) * n
        self.count += n

    @property
    def mean(self) -> float:
        return self.total / max(1, self.count)


class EvalAndCheckpoint(Callback):
    """Evaluating here rather than through fit's eval_data keeps eval_freq counted in the
    run's epochs on resume (fit counts from 0 on every call) and puts the epoch's eval
    result into its checkpoint."""

    def __init__(self, tracker: RunTracker, checkpointer: Checkpointer, val_data,
                 ema: ModelEma | None, epochs: int, eval_freq: int, batch_size: int,
                 num_workers: int):
        super().__init__()
        self.tracker, self.checkpointer, self.val_data, self.ema = tracker, checkpointer, val_data, ema
        self.epochs, self.eval_freq = epochs, eval_freq
        # verbose 0: the epoch line gives the (mean) eval loss; Paddle would print its last batch's
        self.loader_args = {"batch_size": batch_size, "num_workers": num_workers}

    def evaluate(self) -> dict[str, float]:
        mean_loss = _MeanEvalLoss()
        logs = self.model.evaluate(self.val_data, callbacks=[mean_loss], verbose=0, **self.loader_args)
        return {"loss": mean_loss.mean, "acc_top1": scalar_value(logs["acc_top1"]),
                "acc_top5": scalar_value(logs["acc_top5"])}

    def on_epoch_end(self, epoch, logs=None):
        epoch = self.tracker.epoch + 1  # 1-based, counted over the whole run
        metric = None
        if (epoch - 1) % self.eval_freq == 0 or epoch == self.epochs:
            result = self.evaluate()
            metric = result["acc_top1"]
            self.tracker.record_eval("eval", epoch, result)
            if self.ema is not None:
                with self.ema.applied():
                    self.tracker.record_eval("eval_ema", epoch, self.evaluate())
        self.tracker.flush()  # the records up to here belong to this checkpoint
        extra: dict[str, Any] = {"ema": self.ema.state_dict() if self.ema is not None else None,
                                 "rng": capture_rng(), "tracker": self.tracker.state_dict()}
        path = self.checkpointer.save(self.model, epoch, self.tracker.global_step, metric, extra)
        self.tracker.record_checkpoint(epoch, path)
