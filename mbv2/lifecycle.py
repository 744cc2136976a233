"""What happens to a run dir across processes: one process at a time, never a finished run
trained over, an interrupted one continued, and a sweep that ends telling the truth.

* `RunDirLock`: an exclusive lock file in the run dir while a process trains there; a
  second process fails at once, naming the holder's PID (the OS drops the lock when the
  holder dies, so a killed run never leaves the dir locked).
* `plan_job`: what a job does with the dir it was given. Empty: train. Holding a run of the
  same composed config: completed -> return its recorded best top-1 without training;
  unfinished with a checkpoint -> resume from it; unfinished without one -> train again
  from the start. Holding a run of another config -> error, naming the dir and the choices.
  A rerun of a sweep's command with `hydra.sweep.dir=<its dir>` is how a sweep is resumed.
* `SweepEnd` (a Hydra callback, conf/hydra/default.yaml): one closing line with every job's
  outcome; exit status 1 when any job failed or refused its dir (`note_refused`: a rerun
  whose job dir holds a run of another config, or one in use, trains nothing there, and
  the old run's "completed" must not read as this launch's result); before a rerun into a
  sweep dir, a `multirun.yaml` that the new launch would change is kept beside it
  (`keep_sweep_record`).
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

LOCK_FILE = ".mbv2.lock"
METRICS_FILE = "metrics.json"
RESOLVED_CONFIG = "config_resolved.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.pdckpt"
# statuses of a run that ended as planned: a rerun returns its result
FINISHED = ("completed", "stopped_early", "pruned")


class Terminated(BaseException):
    """SIGTERM arrived: the run (and a sweep around it) stops at the next step boundary.
    BaseException, like KeyboardInterrupt, so a sweep does not carry on with its next job."""


class RunDirError(RuntimeError):
    """A run dir that cannot be used now; the message names it and what to do."""


class RunDirLock:
    """`with RunDirLock(run_dir):` - held while this process trains in `run_dir`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunDirError(
                f"{self.path.parent} is in use: process {holder} is training there. Wait for "
                f"it to end, stop it, or give this run another dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock; the file stays (no unlink race)
            self._fd = None


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds (part of) a training run."""
    return (run_dir / METRICS_FILE).is_file() or (run_dir / "checkpoints").is_dir()


@dataclass
class JobPlan:
    action: str  # "train", "resume" or "done"
    best: float | None = None
    reason: str = ""


# how a run is carried out, not what it trains: a rerun may change them
RUN_ONLY_KEYS = ("resume", "cpu_threads", "num_workers", "verbose")


def _comparable(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in RUN_ONLY_KEYS:
        plain.get("trainer", {}).pop(key, None)
    return plain


def _config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def plan_job(run_dir: Path, cfg: DictConfig) -> JobPlan:
    """What a job does with `run_dir` (see the module docstring)."""
    if not holds_run(run_dir):
        return JobPlan("train")
    import json

    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        metrics = {}
    recorded = run_dir / RESOLVED_CONFIG
    if recorded.is_file():
        diff = _config_differences(_comparable(OmegaConf.load(recorded)), _comparable(cfg))
        if diff:
            raise RunDirError(
                f"{run_dir} holds another run (its config differs: {'; '.join(diff[:5])}). "
                f"Nothing was changed there. Continue that run with trainer.resume={run_dir}, "
                f"or give this one another dir (a new hydra.run.dir / hydra.sweep.dir)")
    status = metrics.get("status")
    if status in FINISHED and metrics.get("best_eval_acc_top1") is not None:
        return JobPlan("done", float(metrics["best_eval_acc_top1"]),
                       f"already {status} (best top-1 {metrics['best_eval_acc_top1']:.4f})")
    if (run_dir / LAST_CHECKPOINT).is_file():
        return JobPlan("resume", reason=f"unfinished ({status}): resuming from its last checkpoint")
    return JobPlan("train", reason=f"unfinished ({status}) with no checkpoint: training from the start")


ATTEMPT_FILES = ("metrics.json", "vdlrecords.mbv2.log", "config_resolved.yaml", "curves.png",
                 "bad_images.tsv", "class_names.txt")


def set_aside_attempt(run_dir: Path) -> Path:
    """An attempt that ended before its first checkpoint: its files move to
    `.attempts/<time>/` (nothing deleted; VisualDL does not read them there), so the run
    starts clean instead of appending to half an epoch's records."""
    import time

    dest = run_dir / ".attempts" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ATTEMPT_FILES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, dest / (name.replace("vdlrecords.", "records.")))
    log.info("%s: the earlier attempt's files are in %s", run_dir, dest)
    return dest


def parallel_jobs(hydra_cfg: Any) -> int:
    """How many jobs of this sweep run at once on this machine: joblib's n_jobs (-1: one per
    core), else 1."""
    launcher = hydra_cfg.get("launcher") or {}
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    if n_jobs < 0:
        n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return max(1, n_jobs)


# in a sweep dir: one note per job of the current launch that refused its dir
REFUSED_DIR = ".mbv2_refused"


def note_refused(job_dir: Path, reason: str) -> None:
    """Job `job_dir` of a sweep refused its dir (RunDirError): noted beside the jobs, in the
    sweep dir, for SweepEnd; the job dir itself stays as it was."""
    from mbv2.files import write_text_atomic

    notes = job_dir.parent / REFUSED_DIR
    notes.mkdir(exist_ok=True)
    write_text_atomic(notes / f"{job_dir.name}.txt", reason)


def _take_refused(sweep_dir: Path) -> dict[str, str]:
    """job name -> reason, for the jobs this launch refused; the notes are consumed."""
    import shutil

    notes = Path(sweep_dir) / REFUSED_DIR
    out = {p.stem: p.read_text() for p in sorted(notes.glob("*.txt"))}
    shutil.rmtree(notes, ignore_errors=True)
    return out


SWEEP_RECORD = "multirun.yaml"


def keep_sweep_record(sweep_dir: Path, new_text: str) -> Path | None:
    """Before Hydra's sweeper rewrites `<sweep>/multirun.yaml` for a rerun into the same dir
    (it saves the launch's config there, `new_text`): a record that says something else (the
    sweep extended, another setting) is kept as `multirun.<time it was written>.yaml`, so the
    launches that made the jobs stay on record. Returns the kept copy, if any."""
    import shutil
    import time

    record = sweep_dir / SWEEP_RECORD
    try:
        if record.read_text() == new_text:
            return None
    except OSError:  # no record yet
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(record.stat().st_mtime))
    kept = sweep_dir / f"multirun.{stamp}.yaml"
    i = 1
    while kept.exists():
        i += 1
        kept = sweep_dir / f"multirun.{stamp}-{i}.yaml"
    shutil.copy2(record, kept)
    log.info("%s: the previous launch's record is kept as %s", record, kept.name)
    return kept


def job_outcomes(sweep_dir: Path) -> dict[str, str]:
    """job name -> status, for every job dir below `sweep_dir` (a dir with .hydra/)."""
    import json

    out = {}
    for job in sorted(p.parent for p in Path(sweep_dir).glob("*/.hydra")):
        try:
            out[job.name] = json.loads((job / METRICS_FILE).read_text()).get("status", "unknown")
        except (OSError, ValueError):
            out[job.name] = "no metrics.json"
    return out


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.2
    _HydraCallback = object


class SweepEnd(_HydraCallback):
    """After a multirun: one line with every job's outcome; exit status 1 if any failed or
    refused its dir."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        _take_refused(sweep_dir)  # notes of a launch killed before its end
        keep_sweep_record(sweep_dir, OmegaConf.to_yaml(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        refused = _take_refused(sweep_dir)
        outcomes = job_outcomes(sweep_dir)
        outcomes.update(dict.fromkeys(refused, "refused"))
        counts: dict[str, int] = {}
        for status in outcomes.values():
            counts[status] = counts.get(status, 0) + 1
        bad = sorted(n for n, s in outcomes.items() if s not in FINISHED)
        text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        line = f"sweep {sweep_dir}: {len(outcomes)} jobs: {text}"
        if bad:
            line += f"; not finished: {', '.join(bad)}"
        line += f". Table: python -m mbv2.summary {sweep_dir}"
        if refused:
            line += "\n" + "\n".join(f"  refused {n}: {r}" for n, r in refused.items())
        log.info(line)
        print(line, flush=True)
        if bad:
            raise SystemExit(1)
