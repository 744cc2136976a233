"""Pruning an Optuna trial from inside `fit`: after each evaluated epoch the job reports
its eval/acc_top1 to its trial, and stops when the study's pruner gives up on it.

The trial's identity comes from `MBV2_OPTUNA_TRIAL`, which `hydra/sweeper=mbv2_optuna`
sets per job (`hydra.job.env_set`): the journal, the study, the trial number and the
pruner with its settings, so this process loads the study with the pruner the sweeper
uses. Put the callback after the eval/checkpoint one (the epoch's checkpoint is saved
before a prune), and end the run on `TrialPruned` with status `pruned`:

    callbacks.append(pruning_callback(tracker))      # None outside a pruned study
    ...
    except TrialPruned: tracker.finish("pruned")

A study that cannot be reached (journal gone, trial already finished) turns pruning off
for the run with a warning; training goes on.
"""
from __future__ import annotations

import logging
from typing import Any

from paddle.callbacks import Callback

from mbv2 import distributed
from mbv2.sweeper.study import TRIAL_ENV, TrialSpec, trial_spec_from_env

log = logging.getLogger(__name__)


class TrialPruned(Exception):
    """The study's pruner stopped this trial (a hopeless one); not a failure."""


class OptunaPruning(Callback):
    """Reports each evaluated epoch's top-1 to the trial and raises `TrialPruned` when the
    pruner says so. Rank 0 asks; in a data-parallel run every rank gets its answer."""

    def __init__(self, tracker: Any, spec: TrialSpec):
        super().__init__()
        self.tracker, self.spec = tracker, spec
        self._trial: Any = None
        self._off = False

    def _open_trial(self) -> Any:
        import optuna

        from mbv2.sweeper.study import journal_storage, make_pruner, trial_id

        s = self.spec
        storage = journal_storage(s.journal)
        study = optuna.load_study(study_name=s.study_name, storage=storage,
                                  pruner=make_pruner(s.pruner),
                                  sampler=optuna.samplers.RandomSampler())
        return optuna.trial.Trial(study, trial_id(storage, s.study_name, s.trial_number))

    def _should_prune(self, epoch: int, value: float) -> bool:
        if self._off or not distributed.is_primary():
            return False
        try:
            if self._trial is None:
                self._trial = self._open_trial()
            self._trial.report(value, epoch)
            return bool(self._trial.should_prune())
        except Exception as e:  # pruning is advice: never the reason a run fails
            log.warning("trial %d: reporting epoch %d to study %s failed (%s: %s); pruning is "
                        "off for this run", self.spec.trial_number, epoch, self.spec.study_name,
                        type(e).__name__, e)
            self._off = True
            return False

    def on_epoch_end(self, epoch, logs=None):
        done = self.tracker.epoch + 1  # 1-based, over the whole run (resume included)
        metrics = self.tracker.metrics
        value = metrics.get("final_eval_acc_top1")
        if metrics.get("last_eval_epoch") != done or value is None:
            return  # no evaluation this epoch (eval_freq)
        prune = self._should_prune(done, float(value))
        if distributed.world_size() > 1:
            prune = _from_rank0(prune)
        if prune:
            raise TrialPruned(f"trial {self.spec.trial_number} of study {self.spec.study_name} "
                              f"pruned at epoch {done} (top-1 {float(value):.4f})")


def _from_rank0(flag: bool) -> bool:
    import paddle
    import paddle.distributed as dist

    t = paddle.to_tensor([int(flag)], dtype="int32")
    dist.broadcast(t, src=0)
    return bool(int(t.numpy()[0]))


def pruning_callback(tracker: Any) -> Callback | None:
    """The pruning callback of a job the Optuna sweeper launched with a pruner; else None."""
    try:
        spec = trial_spec_from_env()
    except ValueError as e:
        log.warning("%s is not a trial this run can read (%s); no pruning", TRIAL_ENV, e)
        return None
    if spec is None or spec.pruner.get("name", "none") == "none":
        return None
    return OptunaPruning(tracker, spec)
