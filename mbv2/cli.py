"""`key=value` command lines for the tools beside run.py (eval, predict, export).

They read a finished run rather than compose one, so they need no Hydra output dir; the
arguments still look like Hydra overrides and are checked against a dataclass by
OmegaConf: a misspelt or mistyped key fails with the key named.
"""
from __future__ import annotations

import errno
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mbv2.files import unwritable_reason
from mbv2.runtime import DeviceError, configure_process

T = TypeVar("T")


def parse_args(schema: type[T], argv: Sequence[str], prog: str, usage: str) -> T:
    """`key=value` arguments into `schema`; `--help` prints `usage` and the keys."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        keys = "\n".join(f"  {f.name}" for f in fields(schema))  # type: ignore[arg-type]
        print(f"usage: python -m {prog} {usage}\nkeys:\n{keys}")
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"{prog}: arguments are key=value; got {bad}. See --help")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise SystemExit(f"{prog}: {', '.join(missing)} must be given ({usage})")
        args = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise SystemExit(f"{prog}: {str(e).splitlines()[0]} (see --help)") from None
    _check_args(args, prog)
    return args  # type: ignore[return-value]


POSITIVE_ARGS = ("batch_size", "threads", "topk", "opset")


def _check_args(args: Any, prog: str) -> None:
    """What a type cannot say: counts >= 1, and an output dir that can be a dir and be
    written - each a sentence naming the argument, before anything runs."""
    for name in POSITIVE_ARGS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"{prog}: {name}={value} must be >= 1")
    out = getattr(args, "out", None)
    if out:
        _check_output_dir(Path(out).expanduser(), prog)


def _check_output_dir(path: Path, prog: str) -> None:
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{prog}: out={path} is a file; give a directory (it is created if missing)")
    probe = path
    while not probe.exists():
        probe = probe.parent
    why = unwritable_reason(probe)
    if why:
        raise SystemExit(f"{prog}: out={path}: {probe} is not writable ({why}); give a "
                         f"directory you can write")


# write failures a user fixes on their side (space, quota, permissions, a read-only mount)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EFBIG})


def default_output_dir(path: Path, prog: str) -> Path:
    """The default output dir inside a run dir (`<run dir>/eval`, `/export`), created, or
    a sentence: a run dir on a read-only mount or someone else's copy refuses it, and an
    explicit `out=` (checked with the arguments) is the way out. Checked before the work,
    not after it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        why = unwritable_reason(path)
    except OSError as e:
        why = e.strerror or str(e)
    if why:
        raise SystemExit(f"{prog}: cannot write {path}, the default out= inside the run dir "
                         f"({why}); give out=<a directory you can write>")
    return path


def run_entry(schema: type[T], runner: Callable[[T], Any], prog: str, usage: str,
              argv: Sequence[str] | None = None) -> None:
    """Parse `key=value` arguments into `schema` and call `runner` with them; errors a
    user can act on end the process with their message, not a traceback. The process is
    set up (`runtime.configure_process`) before anything imports paddle."""
    configure_process()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = parse_args(schema, sys.argv[1:] if argv is None else argv, prog, usage)
    from mbv2.data import DataError
    from mbv2.train.checkpoint import CheckpointError

    try:
        runner(args)
    except (CheckpointError, DataError, DeviceError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise SystemExit(f"error: {e.filename or 'a file'}: cannot write it ({e.strerror}); "
                         f"free space there or give out=<another directory>") from None


def entry_point(schema: type[T], runner: Callable[[T], Any], prog: str,
                usage: str) -> Callable[[Sequence[str] | None], None]:
    """The `main(argv=None)` of a `python -m mbv2.<tool>` module."""
    def main(argv: Sequence[str] | None = None) -> None:
        run_entry(schema, runner, prog, usage, argv)

    main.__doc__ = f"python -m {prog} {usage}"
    return main


def compose_run_config(overrides: Sequence[str], prog: str):
    """The config `python -m mbv2.run <overrides>` would run, composed with Hydra's compose
    API (for tools beside run.py that build what a run builds); a bad override ends the
    process with one line naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from mbv2.config import CONF_DIR, register_configs
    from mbv2.rundirs import register_resolvers

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name=prog):
            return hydra_compose("config", overrides=list(overrides))
    except HydraException as e:
        raise SystemExit(f"{prog}: {_one_line(e, overrides)}") from None


def _one_line(error: Exception, overrides: Sequence[str]) -> str:
    """Hydra's message, its cause (OmegaConf's reason, e.g. `could not be converted to
    Float`) and the override it could not parse, on one line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text.rstrip('.')}: {str(cause).strip().splitlines()[0]}"
    if type(error).__name__ == "OverrideParseException":
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_override(override)
            except Exception:
                return f"cannot parse the override {override!r}: {text}"
    return text

