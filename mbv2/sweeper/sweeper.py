"""The Hydra sweeper: an Optuna study whose trials are mbv2 jobs.

Each batch asks the study for `n_jobs` trials, launches them through the configured
launcher (basic: one after another in this process; joblib: in parallel), reads every
job's outcome from its `metrics.json` and tells it to the study, then rewrites
`optimization_results.yaml`. A job reports its evaluated epochs to its own trial and may be
pruned from inside `fit` (mbv2.train.pruning); this process only reads what the job left.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from mbv2.sweeper.config import DIRECTIONS, PRUNERS, SAMPLERS
from mbv2.sweeper.space import Param, grid_space, parse_space
from mbv2.sweeper.study import (JOURNAL_FILE, OWNER_ATTR, RESULTS_FILE, TrialSpec, counted,
                                existing_trials, journal_storage, make_pruner, make_sampler,
                                owner, recover_stale, require_optuna, trial_id, write_results)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"  # mbv2.train.tracking.METRICS_FILE, without importing paddle
# a run that trained to its end (or stopped early on purpose) has a value to tell
FINISHED = ("completed", "stopped_early")


def _read_metrics(ret: Any) -> tuple[dict[str, Any], Path | None]:
    """The job's metrics.json (empty when it never got that far) and its output dir."""
    out = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret is not None and \
        ret.hydra_cfg is not None else None
    if out is None:
        return {}, None
    try:
        return json.loads((Path(out) / METRICS_FILE).read_text()), Path(out)
    except (OSError, ValueError):
        return {}, Path(out)


def trial_outcome(ret: Any) -> tuple[str, float | None, dict[str, Any], Path | None]:
    """(COMPLETE | PRUNED | FAIL, the value to tell, the job's metrics.json, its dir).
    The job's return value is its best eval/acc_top1 (None: it failed); a finished job
    without one is told its metrics.json best_eval_acc_top1."""
    metrics, out = _read_metrics(ret)
    status = metrics.get("status")
    if ret is None or ret.status == JobStatus.FAILED:  # an exception escaped the job
        return "FAIL", None, metrics, out
    if status == "pruned":
        return "PRUNED", None, metrics, out
    value = ret.return_value if status in FINISHED else None
    if value is None and status in FINISHED:
        value = metrics.get("best_eval_acc_top1")
    try:
        if value is not None and math.isfinite(float(value)):
            return "COMPLETE", float(value), metrics, out
    except (TypeError, ValueError):
        pass
    return "FAIL", None, metrics, out


class OptunaSweeper(Sweeper):
    """`hydra/sweeper=mbv2_optuna`: an Optuna (>= 4) study kept in
    `<sweep dir>/optuna.journal`, continued by a rerun into the same sweep dir, with
    pruning from inside `fit` and optimization_results.yaml after every batch."""

    def __init__(self, study_name: str, direction: str, n_trials: int, n_jobs: int,
                 seed: int | None, sampler: str, pruner: str, pruner_settings: Any,
                 max_failure_rate: float, params: Any) -> None:
        for key, value, allowed in (("direction", direction, DIRECTIONS),
                                    ("sampler", sampler, SAMPLERS), ("pruner", pruner, PRUNERS)):
            if value not in allowed:
                raise ValueError(f"hydra.sweeper.{key}={value!r}: use {' | '.join(allowed)}")
        if n_trials < 1 or n_jobs < 1 or not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError("hydra.sweeper: n_trials and n_jobs must be >= 1, "
                             "max_failure_rate in [0, 1]")
        self.study_name, self.direction, self.seed = study_name, direction, seed
        self.n_trials, self.n_jobs, self.max_failure_rate = int(n_trials), int(n_jobs), max_failure_rate
        self.sampler_name = sampler
        settings = OmegaConf.to_container(pruner_settings, resolve=True) \
            if isinstance(pruner_settings, DictConfig) else dict(pruner_settings or {})
        self.pruner_spec = {"name": pruner, **settings}
        self.params = OmegaConf.to_container(params, resolve=True) \
            if isinstance(params, DictConfig) else dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        require_optuna()  # before any job starts: the error names the sweep extra
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    # -- the study -------------------------------------------------------------------
    def _open_study(self, space: list[Param]) -> tuple[Any, Any]:
        optuna = require_optuna()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = journal_storage(self.sweep_dir / JOURNAL_FILE)
        before = existing_trials(storage, self.study_name)
        # a continued study must not replay the first run's random start-up proposals
        seed = None if self.seed is None else int(self.seed) + before
        grid = grid_space(space) if self.sampler_name == "grid" else None
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, direction=self.direction,
            sampler=make_sampler(self.sampler_name, seed, grid),
            pruner=make_pruner(self.pruner_spec), load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise ValueError(f"study {self.study_name} in {self.sweep_dir / JOURNAL_FILE} was "
                             f"created to {study.direction.name.lower()}, not {self.direction}")
        log.info("Optuna study %s (%s, sampler %s, pruner %s): %d trials in %s", self.study_name,
                 self.direction, self.sampler_name, self.pruner_spec["name"], before,
                 self.sweep_dir / JOURNAL_FILE)
        return study, storage

    def _target(self, space: list[Param]) -> int:
        if self.sampler_name != "grid":
            return self.n_trials
        size = math.prod(len(v) for v in grid_space(space).values())
        if size < self.n_trials:
            log.info("sampler=grid: %d trials, the size of the grid", size)
        return min(self.n_trials, size)

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        space, fixed = parse_space(self.params, arguments)
        if not space:
            raise ValueError("hydra/sweeper=mbv2_optuna: nothing to search; give "
                             "hydra.sweeper.params or sweep overrides such as "
                             "optim.lr='tag(log, interval(0.001, 0.1))'")
        study, storage = self._open_study(space)
        recover_stale(study, storage)
        n_trials = self._target(space)
        results = self._save(study, space, n_trials)
        job_idx = len(study.trials)
        while (todo := n_trials - len(counted(study.get_trials(deepcopy=False)))) > 0:
            batch = [study.ask({p.name: p.distribution for p in space})
                     for _ in range(min(self.n_jobs, todo))]
            self._run_batch(study, storage, batch, space, fixed, job_idx)
            job_idx += len(batch)
            results = self._save(study, space, n_trials)
            failed = results["trials"]["failed"]
            if failed > self.max_failure_rate * n_trials:
                raise RuntimeError(f"study {self.study_name}: {failed} of {n_trials} trials "
                                   f"failed, more than max_failure_rate="
                                   f"{self.max_failure_rate}; see the failed jobs' logs")
        log.info("study %s: best value %s with %s (%s)", self.study_name, results["best_value"],
                 results["best_params"], self.sweep_dir / RESULTS_FILE)
        return results

    def _save(self, study: Any, space: list[Param], n_trials: int) -> dict[str, Any]:
        by_name = {p.name: p for p in space}

        def values_of(trial: Any) -> dict[str, Any]:
            return {k: by_name[k].value(v) if k in by_name else v for k, v in trial.params.items()}

        return write_results(study, self.sweep_dir / RESULTS_FILE, n_trials, values_of)

    # -- one batch -------------------------------------------------------------------
    def _job_overrides(self, trials: list[Any], space: list[Param],
                       fixed: list[str]) -> tuple[list[list[str]], list[int]]:
        """One job per distinct set of params (TPE may propose one twice in a batch; two
        jobs in one job dir would clash); `which[i]`: the job of trials[i]."""
        jobs: list[list[str]] = []
        first: dict[tuple[str, ...], int] = {}
        which = []
        for t in trials:
            t.set_user_attr(OWNER_ATTR, owner())
            params = tuple(p.override(t.params[p.name]) for p in space)
            if params not in first:
                first[params] = len(jobs)
                spec = TrialSpec(str((self.sweep_dir / JOURNAL_FILE).resolve()), self.study_name,
                                 t.number, self.direction, self.pruner_spec)
                jobs.append([*params, *fixed, spec.env_override()])
            which.append(first[params])
        return jobs, which

    def _run_batch(self, study: Any, storage: Any, trials: list[Any], space: list[Param],
                   fixed: list[str], job_idx: int) -> None:
        jobs, which = self._job_overrides(trials, space, fixed)
        try:
            self.validate_batch_is_legal(jobs)
        except Exception:
            for t in trials:
                study.tell(t, state=require_optuna().trial.TrialState.FAIL)
            raise
        try:
            returns: Sequence[Any] = self.launcher.launch(jobs, initial_job_idx=job_idx)
        except Exception as e:  # a launcher that lost its workers: the batch failed
            log.error("launching trials %s failed: %s", [t.number for t in trials], e)
            returns = [None] * len(jobs)
        for t, job in zip(trials, which):
            self._tell(study, storage, t, returns[job])

    def _tell(self, study: Any, storage: Any, trial: Any, ret: Any) -> None:
        optuna = require_optuna()
        state, value, metrics, out = trial_outcome(ret)
        tid = trial_id(storage, self.study_name, trial.number)
        # epochs the job did not report itself (pruning off, a job resumed or returned
        # from an earlier run): the learning curve from its history, for the pruner and
        # the dashboard
        reported = storage.get_trial(tid).intermediate_values
        for h in metrics.get("history") or []:
            if h.get("eval_acc_top1") is not None and int(h["epoch"]) not in reported:
                storage.set_trial_intermediate_value(tid, int(h["epoch"]), float(h["eval_acc_top1"]))
        if out is not None:
            trial.set_user_attr("mbv2_job_dir", out.name)
        trial.set_user_attr("mbv2_status", metrics.get("status", "missing"))
        try:
            study.tell(trial, state=getattr(optuna.trial.TrialState, state),
                       values=None if value is None else [value])
        except RuntimeError as e:  # GridSampler stops "the optimize loop" after its last point
            if "Study.stop" not in str(e):
                raise
        log.info("trial %d: %s%s, job %s%s", trial.number, state.lower(),
                 "" if value is None else f" {value:.4f}", out.name if out else "?",
                 f" ({metrics['error']})" if metrics.get("error") else "")
