"""The study behind a sweep: its journal, sampler and pruner, the trials a killed sweep
left RUNNING, the results file, and the trial identity a job gets.

The study lives in `<sweep dir>/optuna.journal` (Optuna's journal file storage, which
several processes may share: the sweeper asks and tells, each job reports its epochs).
A job learns which trial it is from `MBV2_OPTUNA_TRIAL` (set per job through
`hydra.job.env_set`), urlsafe base64 of a JSON object, so Hydra's override grammar reads
it as one plain string. Optuna is imported inside the functions only.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mbv2.files import write_text_atomic

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna.journal"
RESULTS_FILE = "optimization_results.yaml"
TRIAL_ENV = "MBV2_OPTUNA_TRIAL"
# user attrs of a trial: the sweeper process that runs it, and why it is not counted
OWNER_ATTR = "mbv2_sweeper"
INTERRUPTED_ATTR = "mbv2_interrupted"
RETRY_ATTR = "mbv2_retry_of"


@dataclass
class TrialSpec:
    """What a job needs to report to its trial."""

    journal: str
    study_name: str
    trial_number: int
    direction: str = "maximize"
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})

    def encode(self) -> str:
        raw = json.dumps(self.__dict__, sort_keys=True, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "TrialSpec":
        text = text.strip().strip("'\"")
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return cls(**json.loads(raw))

    def env_override(self) -> str:
        return f"++hydra.job.env_set.{TRIAL_ENV}='{self.encode()}'"


def trial_spec_from_env() -> TrialSpec | None:
    text = os.environ.get(TRIAL_ENV)
    return TrialSpec.decode(text) if text else None


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError("hydra/sweeper=mbv2_optuna needs Optuna >= 4: pip install -e .[sweep]") \
            from None
    if int(optuna.__version__.split(".")[0]) < 4:
        raise ImportError(f"hydra/sweeper=mbv2_optuna needs Optuna >= 4 (journal storage), "
                          f"found {optuna.__version__}: pip install -e .[sweep]")
    return optuna


def journal_storage(path: str | Path) -> Any:
    optuna = require_optuna()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_pruner(spec: dict[str, Any]) -> Any:
    """An Optuna pruner from {"name": ..., settings}; the job and the sweeper build the same."""
    optuna = require_optuna()
    p = optuna.pruners
    name = spec.get("name", "none")
    if name == "none":
        return p.NopPruner()
    if name == "median":
        return p.MedianPruner(n_startup_trials=int(spec["n_startup_trials"]),
                              n_warmup_steps=int(spec["n_warmup_steps"]))
    if name == "successive_halving":
        return p.SuccessiveHalvingPruner(min_resource=spec["min_resource"],
                                         reduction_factor=int(spec["reduction_factor"]))
    if name == "hyperband":
        return p.HyperbandPruner(min_resource=int(spec["min_resource"]),
                                 max_resource=spec["max_resource"],
                                 reduction_factor=int(spec["reduction_factor"]))
    raise ValueError(f"hydra.sweeper.pruner={name!r}: use none, median, successive_halving "
                     f"or hyperband")


def make_sampler(name: str, seed: int | None, grid: dict[str, list[Any]] | None) -> Any:
    optuna = require_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ValueError(f"hydra.sweeper.sampler={name!r}: use tpe, random or grid")


def existing_trials(storage: Any, study_name: str) -> int:
    """How many trials the journal already holds for `study_name` (0: a new study)."""
    try:
        return storage.get_n_trials(storage.get_study_id_from_name(study_name))
    except KeyError:
        return 0


def trial_id(storage: Any, study_name: str, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study_name), number)


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_elsewhere(owner_tag: str | None) -> bool:
    """Whether the sweeper process `host:pid` still runs (another process on this host)."""
    host, _, pid = (owner_tag or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(study: Any, storage: Any) -> list[int]:
    """Trials left RUNNING by a sweeper that no longer runs: marked FAIL (and interrupted,
    so they do not count towards n_trials) and enqueued again with the same params, so
    this sweep retries exactly them first. Returns their numbers."""
    optuna = require_optuna()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if _alive_elsewhere(t.user_attrs.get(OWNER_ATTR)):
            raise RuntimeError(f"trial {t.number} of study {study.study_name} is running in "
                               f"process {t.user_attrs[OWNER_ATTR]}: one sweeper per sweep dir")
        tid = trial_id(storage, study.study_name, t.number)
        storage.set_trial_user_attr(tid, INTERRUPTED_ATTR, True)
        storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={RETRY_ATTR: t.number})
        recovered.append(t.number)
    if recovered:
        log.warning("study %s: trials %s were left running by a stopped sweep; marked failed "
                    "and queued again with the same params", study.study_name, recovered)
    return recovered


def counted(trials: list[Any]) -> list[Any]:
    """The finished trials that count towards n_trials (an interrupted one does not: its
    retry does)."""
    return [t for t in trials if t.state.is_finished() and not t.user_attrs.get(INTERRUPTED_ATTR)]


def state_counts(trials: list[Any]) -> dict[str, int]:
    counts = Counter("interrupted" if t.user_attrs.get(INTERRUPTED_ATTR) else t.state.name.lower()
                     for t in trials)
    keys = ("complete", "pruned", "fail", "interrupted", "running", "waiting")
    return {("failed" if k == "fail" else k): counts.get(k, 0) for k in keys}


def write_results(study: Any, path: Path, n_trials: int, values_of: Any) -> dict[str, Any]:
    """optimization_results.yaml: the best trial so far and how many trials are in which
    state. `values_of(trial)`: the params as its job got them."""
    optuna = require_optuna()
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if done else None
    results = {
        "name": study.study_name,
        "direction": study.direction.name.lower(),
        "best_params": values_of(best) if best else None,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "n_trials": n_trials,
        "trials": state_counts(trials),
        "journal": JOURNAL_FILE,
    }
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(results)))
    return results
