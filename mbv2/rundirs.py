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
from mbv2.files import write_text_atomic

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


def _fixed_keys(argv: list[str]) -> set[str]:
    """Keys the command line sets to one value for every job (not a sweep list/range)."""
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # not Hydra's syntax after all: name jobs by all their overrides
        return set()
    single = {o.key_or_group for o in parsed if not o.is_sweep_override()}
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    return single - swept


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _launch_fixed_keys() -> set[str]:
    try:
        launch = os.environ.get(LAUNCH_ARGS_ENV)
        return _fixed_keys(json.loads(launch) if launch else sys.argv[1:])
    except ValueError:
        return set()


def job_dir_name(task_overrides: Any, exclude_keys: Any = ()) -> str:
    """A sweep job's directory name: the overrides that vary across the sweep
    (`model.scale=0.5,optim.lr=0.1`). Keys the command line fixes for every job are left
    out; with nothing left, all overrides are used."""
    excluded = set(exclude_keys or ())
    items = sorted(str(o) for o in task_overrides if _override_key(str(o)) not in excluded)
    fixed = _launch_fixed_keys()
    varying = [o for o in items if _override_key(o) not in fixed]
    return ",".join(varying or items) or "default"


def varying_keys(task_overrides: Any, sweep: bool) -> list[str]:
    """The config keys this job was given that its siblings differ in (a sweep), or every
    key the command line set (a single run); Hydra's own and the resume keys left out."""
    keys = [_override_key(str(o)) for o in task_overrides]
    keys = [k for k in keys if not k.startswith("hydra.") and k != "trainer.resume"
            and "." in k]
    if sweep:
        fixed = _launch_fixed_keys()
        keys = [k for k in keys if k not in fixed]
    return list(dict.fromkeys(keys))


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
    skip = ("trainer.resume=", "hydra.run.dir=")
    original = [str(o) for o in OmegaConf.load(recorded) if not str(o).startswith(skip)]
    now = [a for a in argv[1:] if not a.startswith(skip)]
    if any(a in ("-m", "--multirun") for a in now):
        raise SystemExit("trainer.resume continues one run; it cannot be part of a sweep (-m)")
    return [argv[0], *original, *now, f"trainer.resume={_quote(str(ckpt))}",
            f"hydra.run.dir={_quote(str(run_dir))}"]


def register_resolvers() -> None:
    """The run-dir resolvers conf/hydra/default.yaml uses; idempotent."""
    if not OmegaConf.has_resolver("mbv2_unique_dir"):
        OmegaConf.register_new_resolver("mbv2_unique_dir", unique_dir, use_cache=True)
        OmegaConf.register_new_resolver("mbv2_job_dir_name", job_dir_name)
