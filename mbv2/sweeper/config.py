"""The structured config of `hydra/sweeper=mbv2_optuna` (no optuna needed to load it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

# Hydra instantiates only sweepers whose `_target_` lies in the `hydra_plugins` package;
# `register_sweeper` registers mbv2's class with Hydra under this name (see __init__.py).
PLUGIN_MODULE = "hydra_plugins.mbv2_optuna_sweeper"
PLUGIN_TARGET = f"{PLUGIN_MODULE}.MBV2OptunaSweeper"

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
DIRECTIONS = ("maximize", "minimize")


@dataclass
class PrunerSettings:
    """Settings of `pruner`; each pruner reads its own. A step is an evaluated epoch.

    median: no trial is pruned before `n_startup_trials` trials completed, nor in its
    first `n_warmup_steps` epochs; it checks after every evaluated epoch.
    successive_halving, hyperband: `min_resource` epochs before the first rung ("auto"
    or an int; hyperband needs an int), `reduction_factor` between rungs; hyperband:
    `max_resource`, the epochs of a full trial ("auto": the longest one seen)."""

    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    min_resource: Any = 1
    reduction_factor: int = 3
    max_resource: Any = "auto"


@dataclass
class MBV2OptunaSweeperConf:
    _target_: str = PLUGIN_TARGET
    study_name: str = "mbv2"
    # a job returns its best eval/acc_top1
    direction: str = "maximize"
    # the study's total: a rerun into the same sweep dir runs only the trials missing
    n_trials: int = 20
    # trials launched per batch through hydra/launcher (joblib runs them in parallel)
    n_jobs: int = 1
    seed: Optional[int] = None
    # tpe | random | grid (grid: choice(...) params only)
    sampler: str = "tpe"
    # none | median | successive_halving | hyperband
    pruner: str = "none"
    pruner_settings: PrunerSettings = field(default_factory=PrunerSettings)
    # stop the study once more than this share of n_trials failed (1.0: never)
    max_failure_rate: float = 0.5
    # config key -> choice(a,b) | interval(a,b) | tag(log, interval(a,b)) | range(a,b[,step])
    # (range stops before b, as in Hydra) | a plain value (fixed for every trial)
    params: Dict[str, str] = field(default_factory=dict)
