"""`key=value` command lines for the tools beside run.py (eval, predict, export).

They read a finished run rather than compose one, so they need no Hydra output dir; the
arguments still look like Hydra overrides and are checked against a dataclass by
OmegaConf: a misspelt or mistyped key fails with the key named.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import fields
from typing import Any, Callable, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mbv2.runtime import configure_process

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
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise SystemExit(f"{prog}: {str(e).splitlines()[0]} (see --help)") from None


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
    except (CheckpointError, DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def entry_point(schema: type[T], runner: Callable[[T], Any], prog: str,
                usage: str) -> Callable[[Sequence[str] | None], None]:
    """The `main(argv=None)` of a `python -m mbv2.<tool>` module."""
    def main(argv: Sequence[str] | None = None) -> None:
        run_entry(schema, runner, prog, usage, argv)

    main.__doc__ = f"python -m {prog} {usage}"
    return main

