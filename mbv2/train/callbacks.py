"""The `paddle.Model.fit` callbacks of a run, one job each.

* `NanGuard`: a NaN/inf training loss stops the run with an error naming the step,
  instead of training on garbage;
* `EmaUpdate`: the weights' moving average after every optimizer step;
* `EvalAndCheckpoint`: after each epoch, evaluate (every `eval_freq` epochs and after the
  last; the EMA weights too), hand the results to the tracker, then checkpoint;
* `EarlyStop`: `patience` evaluated epochs without a better eval top-1 end the run;
* `StopOnSignal`: SIGTERM (what SLURM sends before preemption) ends the run at the next
  step boundary with status `terminated`; the last epoch's checkpoint is what a rerun
  resumes from.
The tracker itself (`tracking.RunTracker`) is the fourth: VisualDL, metrics.json, the log.
"""
from __future__ import annotations

import math
from typing import Any

from paddle.callbacks import Callback

from mbv2.lifecycle import Terminated
from mbv2.train.checkpoint import Checkpointer, capture_rng
from mbv2.train.ema import ModelEma
from mbv2.train.pruning import pruning_callback
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


def _check_weights_finite(net, epoch: int) -> None:
    """A NaN/inf weight must never reach a checkpoint (eval, export and predict would then
    report confident scores from it)."""
    import paddle

    with paddle.no_grad():
        bad = [name for name, p in net.named_parameters() if not bool(paddle.isfinite(p).all())]
    if bad:
        raise NonFiniteLossError(
            f"{len(bad)} weight tensor(s) hold NaN/inf after epoch {epoch} (first: {bad[0]}); "
            f"this epoch was not checkpointed. Lower optim.lr, add sched.warmup_epochs or "
            f"optim.grad_clip")


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
        _check_weights_finite(self.model.network, epoch)
        if (epoch - 1) % self.eval_freq == 0 or epoch == self.epochs:
            result = self.evaluate()
            metric = result["acc_top1"]
            if not math.isfinite(result["loss"]):
                raise NonFiniteLossError(
                    f"eval loss is {result['loss']} after epoch {epoch}: the weights have "
                    f"diverged, so this epoch was not checkpointed (the last checkpoint stays "
                    f"the last good one). Lower optim.lr, add sched.warmup_epochs or optim.grad_clip")
            self.tracker.record_eval("eval", epoch, result)
            if self.ema is not None:
                with self.ema.applied():
                    self.tracker.record_eval("eval_ema", epoch, self.evaluate())
        self.tracker.flush()  # the records up to here belong to this checkpoint
        extra: dict[str, Any] = {"ema": self.ema.state_dict() if self.ema is not None else None,
                                 "rng": capture_rng(), "tracker": self.tracker.state_dict()}
        path = self.checkpointer.save(self.model, epoch, self.tracker.global_step, metric, extra)
        self.tracker.record_checkpoint(epoch, path)


class EarlyStop(Callback):
    """Ends training once `patience` epochs have passed since the best eval top-1 (only
    evaluated epochs count as chances to improve); the tracker records the epoch."""

    def __init__(self, tracker: RunTracker, patience: int):
        super().__init__()
        self.tracker, self.patience = tracker, patience

    def on_epoch_end(self, epoch, logs=None):
        m = self.tracker.metrics
        epoch = self.tracker.epoch + 1
        if m.get("last_eval_epoch") != epoch or m.get("best_epoch") is None:
            return
        if epoch - int(m["best_epoch"]) >= self.patience and epoch < self.tracker.epochs:
            m["stopped_early_epoch"] = epoch
            self.model.stop_training = True


class StopOnSignal(Callback):
    """SIGTERM sets a flag; the next finished training step raises `Terminated`. A second
    SIGTERM ends the process at once (Python's default)."""

    def __init__(self):
        super().__init__()
        self.received: int | None = None
        self._previous = None

    def _handler(self, signum, frame):
        import signal

        self.received = signum
        signal.signal(signum, signal.SIG_DFL)

    def on_train_begin(self, logs=None):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_end(self, step, logs=None):
        if self.received is not None:
            raise Terminated(f"signal {self.received} received; stopped after step {step + 1}")

    def on_train_end(self, logs=None):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def run_callbacks(trainer, tracker: RunTracker, checkpointer: Checkpointer, val_data,
                  ema: ModelEma | None) -> list[Callback]:
    """A run's fit callbacks, in the order they must see each step and epoch (the `trainer`
    config's keys read here): signal and NaN checks first, the tracker, the EMA update,
    eval + checkpoint, then what may end training after an evaluated epoch."""
    callbacks: list[Callback] = [StopOnSignal(), NanGuard(), tracker]
    if ema is not None:
        callbacks.append(EmaUpdate(ema))
    callbacks.append(EvalAndCheckpoint(tracker, checkpointer, val_data, ema, int(trainer.epochs),
                                       int(trainer.eval_freq), int(trainer.batch_size),
                                       int(trainer.num_workers)))
    if trainer.early_stop_patience:
        callbacks.append(EarlyStop(tracker, int(trainer.early_stop_patience)))
    pruning = pruning_callback(tracker)  # inside an mbv2_optuna trial with a pruner
    if pruning is not None:
        callbacks.append(pruning)
    return callbacks

