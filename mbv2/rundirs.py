"""Where runs and sweeps land, and what a run dir must say to be rerun or resumed.

* Single runs: `outputs/runs/<date>/<time>_<overrides>`; sweeps:
  `outputs/sweeps/<date>/<time>/<the overrides that vary across the sweep>`
  (conf/hydra/default.yaml). Two resolvers name them: `mbv2_unique_dir` makes a dir
  unique by creating it (an exclusive mkdir, -2, -3, ... when the name is taken), and
  `mbv2_job_dir_name` names a sweep job by what varies between jobs.
* Under paddle.distributed.launch rank 0 chooses the dir and every rank gets its choice
  (`distributed.shared_choice`).
* `command.sh` in every run dir reruns the job; `resume_argv` turns
  `trainer.resume=<run dir>` into the run's own command line.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mbv2.distributed import shared_choice
from mbv2.files import unwritable_reason, write_text_atomic
from mbv2.lifecycle import holds_run

_UNIQUE_DIRS: dict[str, str] = {}


def unique_dir(base: str, suffix: str = "") -> str:
    """`base` + `_suffix`, made unique on disk by creating it (an exclusive mkdir), so
    two runs or sweeps started in the same second never share a directory. Cached per
    process because Hydra resolves the output dir more than once. Under
    paddle.distributed.launch rank 0 chooses and every rank gets its choice."""
    name = f"{base}_{suffix}" if suffix else base
    if name not in _UNIQUE_DIRS:
        _UNIQUE_DIRS[name] = shared_choice(lambda: _create_unique(name))
    return _UNIQUE_DIRS[name]


def _create_unique(name: str) -> str:
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    candidate, i = name, 1
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            i += 1
            candidate = f"{name}-{i}"


# The launching process records its command-line arguments here (`run.cli`); sweep jobs,
# also those a launcher runs in other processes (joblib, submitit), inherit the
# environment. Without it (Hydra's main called another way) the process's own argv is used.
LAUNCH_ARGS_ENV = "MBV2_LAUNCH_ARGS"


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@functools.lru_cache(maxsize=8)
def _parse_launch(launch: str) -> tuple | None:
    """The launch command's overrides, parsed by Hydra's own parser; None when they are
    not Hydra's syntax (then jobs are named by all their overrides)."""
    try:
        argv = json.loads(launch)
        return tuple(OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")]))
    except Exception:
        return None


def _launch_overrides() -> tuple:
    launch = os.environ.get(LAUNCH_ARGS_ENV) or json.dumps(sys.argv[1:])
    return _parse_launch(launch) or ()


def _launch_fixed_keys() -> set[str]:
    """Keys the command line sets to one value for every job (not a sweep list/range)."""
    parsed = _launch_overrides()
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    return {o.key_or_group for o in parsed if not o.is_sweep_override()} - swept


# Keys whose values are paths: a job name holds the last component, not the whole path
# (a path would turn into nested folders); the composed config in .hydra/ has it in full.
PATH_KEYS = frozenset({"data.root", "data.train_list", "data.val_list", "data.class_names",
                       "data.archive", "model.pretrained"})


def _short_path(key: str, value: str, swept: dict[str, list[str]]) -> str:
    """`/data/flowers/` -> `flowers`; with a short hash of the full path when two values
    the command line sweeps over end the same (`/d1/data,/d2/data`)."""
    name = Path(value.rstrip("/")).name or "root"
    others = [Path(v.rstrip("/")).name for v in swept.get(key, [])]
    if others.count(name) > 1:
        name = f"{name}-{hashlib.sha1(value.encode()).hexdigest()[:6]}"
    return name


def _launch_sweeps() -> dict[str, list[str]]:
    """key -> the values the launch command sweeps it over (`data.root=/a,/b`)."""
    return {o.key_or_group: [str(v) for v in o.sweep_string_iterator()]
            for o in _launch_overrides() if o.is_sweep_override()}


def _job_items(task_overrides: Any, exclude_keys: Any) -> list[str]:
    excluded = set(exclude_keys or ()) - PATH_KEYS
    swept = _launch_sweeps()
    items = []
    for override in sorted(str(o) for o in task_overrides):
        key = _override_key(override)
        if key in excluded:
            continue
        if key in PATH_KEYS and "=" in override:
            override = f"{key}={_short_path(key, override.split('=', 1)[1], swept)}"
        items.append(override)
    return items


def job_dir_name(task_overrides: Any, exclude_keys: Any = (), sweep_dir: str | None = None) -> str:
    """A sweep job's directory name: the overrides that vary across the sweep
    (`model.scale=0.5,optim.lr=0.1`; a path by its last component). Keys the command line
    fixes for every job are left out; with nothing left, all overrides are used.

    Never another job's dir: when `sweep_dir/<name>` already holds a job with other
    overrides (a rerun with changed settings, two paths that shorten alike), the name gets
    -2, -3, ... A dir whose job has the same overrides is this job's own: a rerun of the
    sweep continues it (see `lifecycle`)."""
    items = _job_items(task_overrides, exclude_keys)
    fixed = _launch_fixed_keys()
    varying = [o for o in items if _override_key(o) not in fixed]
    name = ",".join(varying or items) or "default"
    if sweep_dir is None:
        return name
    mine = [str(o) for o in task_overrides]
    candidate, i = name, 1
    while True:
        recorded = Path(sweep_dir) / candidate / ".hydra" / "overrides.yaml"
        if not recorded.is_file() or _recorded_overrides(recorded) == mine:
            return candidate
        i += 1
        candidate = f"{name}-{i}"


def _recorded_overrides(path: Path) -> list[str] | None:
    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # unreadable: not provably this job's
        return None


def varying_keys(task_overrides: Any, sweep: bool) -> list[str]:
    """The config keys this sweep job was given that its siblings differ in; Hydra's own
    and the resume keys left out. A single run has none: VisualDL shows it with the core
    hyper-parameters, so its own overrides do not add columns that are empty for every
    sweep job beside it."""
    if not sweep:
        return []
    keys = [_override_key(str(o)) for o in task_overrides]
    keys = [k for k in keys if not k.startswith("hydra.") and k != "trainer.resume" and "." in k]
    fixed = _launch_fixed_keys()
    return list(dict.fromkeys(k for k in keys if k not in fixed))


def run_name(run_dir: Path, sweep_subdir: str | None) -> str:
    """The name VisualDL shows for a run, unique under outputs/ and still readable: the
    sweep's date/time plus what varies (`2026-12-01/09-30-00/model.scale=0.5,optim.lr=0.1`),
    or a single run's date/time_overrides. Two sweeps with the same grid no longer share
    names, so neither hides the other."""
    if sweep_subdir:
        return "/".join([*run_dir.parent.parts[-2:], sweep_subdir])
    return "/".join(run_dir.parts[-2:])


def write_rerun_command(run_dir: Path) -> None:
    """The command line that reproduces this job, beside its resolved config."""
    hc = HydraConfig.get()
    # a resumed run's command line carries trainer.resume; the rerun is a fresh run
    overrides = [o for o in hc.overrides.task if not o.startswith("trainer.resume=")]
    cmd = ["python", "-m", "mbv2.run", *overrides]
    text = (f"#!/bin/sh\n# reruns this job into a new run dir; started as: "
            f"{shlex.join(sys.argv)}\ncd {shlex.quote(hc.runtime.cwd)} && {shlex.join(cmd)}\n")
    write_text_atomic(run_dir / "command.sh", text)


def _quote(value: str) -> str:
    """A Hydra override value that may hold `,` `=` or spaces (default run dir names do)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_argv(argv: list[str]) -> list[str]:
    """`trainer.resume=<run dir or checkpoint>` alone recreates the run: Hydra composes
    from conf/ and the command line, so the run's own overrides (.hydra/overrides.yaml)
    go first, then any given now, and hydra.run.dir points back at the run dir."""
    given = [a for a in argv[1:] if a.startswith("trainer.resume=")]
    if not given or given[-1] == "trainer.resume=null":
        return argv
    # here, not at the top: paddle must load after runtime.configure_process()
    from mbv2.train.checkpoint import CheckpointError, resolve_checkpoint, run_dir_of

    try:
        ckpt = resolve_checkpoint(given[-1].split("=", 1)[1].strip("'\""))
    except CheckpointError as e:
        raise SystemExit(f"trainer.resume: {e}") from None
    run_dir = run_dir_of(ckpt)
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        raise SystemExit(f"trainer.resume: {recorded} is missing, so the run's settings are "
                         f"unknown; resume a run dir written by mbv2.run")
    # only the run's own config keys and group choices are replayed, never hydra.* (a
    # crafted .hydra/overrides.yaml must not redirect the run or its callbacks)
    skip = ("trainer.resume=", "hydra.", "+hydra.", "++hydra.", "~hydra.")
    original = [str(o) for o in OmegaConf.load(recorded) if not str(o).startswith(skip)]
    now = [a for a in argv[1:] if not a.startswith(skip)]
    if any(a in ("-m", "--multirun") for a in now):
        raise SystemExit("trainer.resume continues one run; it cannot be part of a sweep (-m)")
    # Hydra leaves the run's .hydra/ record alone (a resume that fails changes nothing);
    # train() records the resume's own overrides there once the checkpoint fits
    return [argv[0], *original, *now, f"trainer.resume={_quote(str(ckpt))}",
            f"hydra.run.dir={_quote(str(run_dir))}", "hydra.output_subdir=null"]


def _given(argv: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1].strip("'\"") for a in argv[1:] if a.startswith(f"{key}=")]
    return values[-1] if values else None


def check_explicit_dirs(argv: list[str]) -> None:
    """The dir a run or sweep will write (an explicit hydra.run.dir / hydra.sweep.dir, a
    resumed run's own dir, or ./outputs) that cannot be a directory or cannot be written
    (a read-only mount, no permission): one sentence before Hydra starts, instead of its
    logging set-up failing on run.log."""
    resumed = _given(argv, "trainer.resume") not in (None, "null")
    checked = False
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        value = _given(argv, key)
        if value is None:
            continue
        checked = True
        path = Path(value).expanduser()
        blocker = next((p for p in [path, *path.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise SystemExit(f"{key}={value}: {blocker} is a file, not a directory; give a "
                             f"directory path (it is created if missing)")
        why = unwritable_reason(blocker)
        if why and resumed and key == "hydra.run.dir":
            raise SystemExit(f"trainer.resume: the run dir {path} cannot be written ({why}); a "
                             f"resume continues in the run's own dir: copy it somewhere "
                             f"writable and resume the copy")
        if why:
            raise SystemExit(f"{key}={value}: {blocker} cannot be written ({why}); give a "
                             f"directory you can write")
    if not checked and not resumed:  # a resume writes into its run dir (checked once named)
        outputs = Path.cwd() / "outputs"  # conf/hydra/default.yaml's dirs start there
        target = outputs if outputs.is_dir() else Path.cwd()
        why = unwritable_reason(target)
        if why:
            raise SystemExit(f"{target}: cannot {'write' if target == outputs else 'create outputs/'} "
                             f"here ({why}); run from a directory you can write, or give "
                             f"hydra.run.dir=<dir> (hydra.sweep.dir=<dir> with -m)")


def record_subdir(output_dir: str) -> str | None:
    """hydra.output_subdir of a job (conf/hydra/default.yaml): `.hydra`, or None - Hydra
    leaves `.hydra/` alone - where `output_dir` already holds a run. A rerun into such a
    dir (a sweep rerun after a conf/ file was edited, an explicit hydra.run.dir) must not
    replace that run's record before lifecycle.plan_job has decided (skip, continue, or
    refuse); a job that then trains there records its own (setup.record_run)."""
    return None if holds_run(Path(output_dir)) else ".hydra"


def register_resolvers() -> None:
    """The run-dir resolvers conf/hydra/default.yaml uses; idempotent."""
    if not OmegaConf.has_resolver("mbv2_unique_dir"):
        OmegaConf.register_new_resolver("mbv2_unique_dir", unique_dir, use_cache=True)
        OmegaConf.register_new_resolver("mbv2_job_dir_name", job_dir_name)
        OmegaConf.register_new_resolver("mbv2_record_subdir", record_subdir)
