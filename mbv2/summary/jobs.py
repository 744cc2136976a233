"""Reading a sweep's job directories: one JobRow per job, and the order to read them in.

Every file is read as it is at this moment: metrics.json may be half written, the config
may hold interpolations nothing outside the run can resolve, and a job may have written
nothing at all. Each such case is data (a status and a reason), never an exception.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import Container, OmegaConf

CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
METRICS_FILE = "metrics.json"
OPTUNA_FILE = "optimization_results.yaml"

COMPLETED, RUNNING, FAILED = "completed", "running", "failed"
# a run that ended before its last epoch as planned (trainer.early_stop_patience) or was
# stopped by an Optuna pruner; cut short by SIGTERM or Ctrl-C (mbv2.run resumes them)
STOPPED_EARLY, PRUNED = "stopped_early", "pruned"
TERMINATED, INTERRUPTED = "terminated", "interrupted"
# the statuses whose best top-1 is a finished run's result (plotted, compared)
FINISHED = (COMPLETED, STOPPED_EARLY)
UNREADABLE, NO_METRICS = "unreadable", "no metrics"

# Config keys worth knowing when comparing jobs; those equal in all jobs are listed once,
# the others get a column (mbv2.summary.study). The data keys say whether accuracies
# compare at all; image size and classes fall back to what the run reported.
SETTING_KEYS = (
    "model.scale",
    "model.bottleneck",
    "optim.name",
    "optim.lr",
    "optim.weight_decay",
    "sched.name",
    "trainer.epochs",
    "trainer.batch_size",
    "data.name",
    "data.image_size",
    "data.num_classes",
)
# setting -> the metrics.json key a run reports it under, for configs that leave it None
# (digits and list data derive their number of classes)
_REPORTED_SETTINGS = {"data.image_size": "image_size", "data.num_classes": "num_classes"}

# Rows group by how much their numbers mean before any value sorts them: results
# (final or partial) first, then statuses that carry no trustworthy numbers.
_STATUS_TIER = {COMPLETED: 0, STOPPED_EARLY: 0, RUNNING: 0, PRUNED: 1, TERMINATED: 1,
                INTERRUPTED: 1, FAILED: 2, UNREADABLE: 3, NO_METRICS: 4}
_OTHER_STATUS_TIER = 1  # a status this module does not know, written by a newer run.py


class NoJobsError(FileNotFoundError):
    """The directory exists but holds no Hydra job directory (no .hydra/config.yaml)."""


@dataclass
class JobRow:
    """What one job directory says about its run; None wherever it does not say.

    Accuracies are fractions (0..1) as the run writes them; tables show percent.
    """

    job: str  # path relative to the summarised dir, '/'-separated; '.' for the dir itself
    path: Path
    overrides: list[str]
    status: str  # completed | running | failed | unreadable | no metrics | as written
    error: str | None = None  # failed: the run's message; unreadable: why
    scale: float | None = None
    lr: float | None = None
    optimizer: str | None = None
    params: int | None = None
    macs: int | None = None
    best_top1: float | None = None
    best_epoch: int | None = None  # the epoch best_top1 was measured after
    final_top1: float | None = None
    epochs_completed: int | None = None
    epochs_planned: int | None = None
    wall_seconds: float | None = None
    images_per_sec: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # SETTING_KEYS, resolved

    @property
    def status_text(self) -> str:
        """The status column: the status, and for failed/unreadable jobs the reason."""
        if self.error and self.status in (FAILED, UNREADABLE, TERMINATED, INTERRUPTED, PRUNED):
            return f"{self.status}: {self.error}"
        return self.status


# (value of a row, sorts descending); rows without the value go last within their tier
SORT_KEYS: dict[str, tuple[Callable[[JobRow], float | None], bool]] = {
    "best": (lambda r: r.best_top1, True),
    "final": (lambda r: r.final_top1, True),
    "macs": (lambda r: r.macs, False),
    "params": (lambda r: r.params, False),
    "scale": (lambda r: r.scale, False),
    "lr": (lambda r: r.lr, False),
    "wall": (lambda r: r.wall_seconds, False),
    "speed": (lambda r: r.images_per_sec, True),
}
SORT_CHOICES = (*SORT_KEYS, "job")  # job: directory order, 2 before 10, status ignored


# ----------------------------------------------------------------------------- values


def _as_float(value: Any) -> float | None:
    """A finite float from a number or numeric string, else None (bad data is blank)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_int(value: Any) -> int | None:
    """An int from an integral number or string, else None."""
    number = _as_float(value)
    return int(number) if number is not None and number.is_integer() else None


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _error_line(error: Any) -> str | None:
    """The line of a run's error worth a table cell.

    Usually the first line; when the run stored a whole traceback its first line is only
    'Traceback (most recent call last):' and the last line names the exception.
    """
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    if not lines:
        return None
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


# ----------------------------------------------------------------------------- files


def _read_metrics(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics, None); (None, None) when there is no file; (None, why) when unreadable.

    The run may be writing the file this very moment, so every failure is data.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not text.strip():
        return None, "empty file"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"JSON is a {type(data).__name__}, not an object"
    return data, None


def _read_overrides(path: Path) -> list[str]:
    """The job's override strings; [] when the file is missing or not a YAML list."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    return [str(item) for item in data] if isinstance(data, list) else []


@functools.cache
def _overrides_parser() -> OverridesParser:
    return OverridesParser.create()


def _override_values(overrides: Iterable[str]) -> dict[str, Any]:
    """key -> value of `key=value`, `+key=value` and `++key=value` overrides, parsed by
    Hydra's own override grammar (`0.5` a float, `[a,b]` a list, quotes removed).

    They stand in for config values whose interpolation cannot be resolved here.
    Deletions (`~key`) and sweeps (`a=1,2`: not one value) say nothing. A line Hydra
    cannot parse (edited by hand, or another Hydra's syntax) still counts, with the text
    after its first '=' as the value.
    """
    values: dict[str, Any] = {}
    for line in overrides:
        try:
            (override,) = _overrides_parser().parse_overrides([line])
        except HydraException:
            key, sep, raw = line.partition("=")
            key = key.lstrip("+")
            if sep and key and not key.startswith("~"):
                values[key] = raw
            continue
        if not (override.is_delete() or override.is_sweep_override()):
            values[override.key_or_group] = override.value()
    return values


def _read_settings(path: Path, overrides: list[str]) -> dict[str, Any]:
    """SETTING_KEYS from the composed config, each resolved when it can be.

    The config is saved unresolved: `${hydra:...}` and mbv2's resolvers are unknown
    outside the run, so such a key falls back to the job's override for it, or None.
    """
    try:
        cfg = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - a malformed config of any kind must not stop the summary
        cfg = None
    fallback = _override_values(overrides)
    settings: dict[str, Any] = {}
    for key in SETTING_KEYS:
        value = (
            OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
            if isinstance(cfg, Container)
            else None
        )
        if isinstance(value, Container):
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except Exception:  # noqa: BLE001 - an unresolvable element: keep it as written
                value = OmegaConf.to_container(value, resolve=False)
        settings[key] = fallback.get(key) if value is None else value
    return settings


def read_job(root: Path, job_dir: Path) -> JobRow:
    """One JobRow from a job directory, whatever state its files are in."""
    relative = job_dir.relative_to(root).as_posix()
    overrides = _read_overrides(job_dir / OVERRIDES_FILE)
    settings = _read_settings(job_dir / CONFIG_FILE, overrides)
    metrics, problem = _read_metrics(job_dir / METRICS_FILE)
    row = JobRow(
        job=relative,
        path=job_dir,
        overrides=overrides,
        status=NO_METRICS,
        scale=_as_float(settings["model.scale"]),
        lr=_as_float(settings["optim.lr"]),
        optimizer=_as_str(settings["optim.name"]),
        epochs_planned=_as_int(settings["trainer.epochs"]),
        settings=settings,
    )
    if problem is not None:
        row.status, row.error = UNREADABLE, problem
    if metrics is None:
        return row
    row.status = str(metrics.get("status") or "unknown")
    if row.status in (FAILED, TERMINATED, INTERRUPTED, PRUNED):
        row.error = _error_line(metrics.get("error"))
    row.params = _as_int(metrics.get("params_trainable"))
    row.macs = _as_int(metrics.get("macs"))
    row.best_top1 = _as_float(metrics.get("best_eval_acc_top1"))
    row.final_top1 = _as_float(metrics.get("final_eval_acc_top1"))
    row.epochs_completed = _as_int(metrics.get("epochs_completed"))
    row.epochs_planned = _as_int(metrics.get("epochs_planned")) or row.epochs_planned
    row.wall_seconds = _as_float(metrics.get("wall_seconds"))
    row.images_per_sec = _as_float(metrics.get("train_images_per_sec"))
    row.best_epoch = _as_int(metrics.get("best_epoch"))
    for key, reported in _REPORTED_SETTINGS.items():
        if settings.get(key) is None:
            settings[key] = _as_int(metrics.get(reported))
    return row


def scan(root: Path) -> tuple[list[Path], list[Path]]:
    """(job dirs, Optuna result files) at or below root.

    A job dir is not searched further: it holds checkpoints and logs, not other jobs.
    Hidden dirs (.hydra, .git, .venv) are skipped; symlinks are not followed.
    """
    jobs: list[Path] = []
    optuna: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if OPTUNA_FILE in filenames:
            optuna.append(here / OPTUNA_FILE)
        if (here / CONFIG_FILE).is_file():
            jobs.append(here)
            dirnames.clear()
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return jobs, optuna


# ----------------------------------------------------------------------------- order


def _natural_key(text: str) -> tuple[Any, ...]:
    """Sort key under which job '2' precedes job '10' (Hydra numbers jobs 0, 1, ...)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def sort_rows(rows: Iterable[JobRow], by: str = "best") -> list[JobRow]:
    """Rows ordered for reading: results first by `by`, then failed, unreadable, missing.

    `by` is one of SORT_CHOICES; `job` is plain directory order.
    """
    if by == "job":
        return sorted(rows, key=lambda r: _natural_key(r.job))
    if by not in SORT_KEYS:
        raise ValueError(f"unknown sort key {by!r}; choose from {', '.join(SORT_CHOICES)}")
    value_of, descending = SORT_KEYS[by]

    def key(row: JobRow) -> tuple[Any, ...]:
        value = value_of(row)
        rank = 0.0 if value is None else (-value if descending else value)
        tier = _STATUS_TIER.get(row.status, _OTHER_STATUS_TIER)
        return tier, value is None, rank, _natural_key(row.job)

    return sorted(rows, key=key)


def collect(root: Path) -> list[JobRow]:
    """Every job at or below root, best top-1 first.

    Raises FileNotFoundError when root is not a directory; [] when it holds no jobs.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    jobs, _ = scan(root)
    return sort_rows(read_job(root, job_dir) for job_dir in jobs)
