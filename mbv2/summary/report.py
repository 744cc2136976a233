"""Writing a sweep's summary into its dir, and the `python -m mbv2.summary` command (and
its `grid` sub-command: a study's rows x cols table over seeds, mbv2.summary.grid).

Besides the table, summary.md (and the terminal) get the notes that put it in context:
a heading naming the dir, the data and what varies (the plot's title too), a warning when
the jobs trained on different data (also on stderr), how many jobs are in which state,
the settings all jobs share (listed once; the table has no column for them), and what an
Optuna sweeper reported as its best parameters.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mbv2.summary.jobs import (
    CONFIG_FILE,
    SORT_CHOICES,
    JobRow,
    NoJobsError,
    read_job,
    scan,
    sort_rows,
)
from mbv2.summary.plot import plot_summary
from mbv2.summary.study import Study, describe, where_name
from mbv2.summary.table import format_table, write_csv

CSV_NAME, MD_NAME, PNG_NAME = "summary.csv", "summary.md", "summary.png"


def _optuna_lines(root: Path, files: Iterable[Path]) -> list[str]:
    """One line per Optuna result file: best value and params (or each Pareto solution)."""
    lines: list[str] = []
    for path in files:
        where = path.parent.relative_to(root).as_posix()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            lines.append(f"Optuna results in {where} unreadable: {exc}")
            continue
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("best_params"), dict):
            params = ", ".join(f"{k}={v}" for k, v in data["best_params"].items())
            lines.append(f"Optuna best in {where}: value={data.get('best_value')} with {params}")
        for solution in data.get("solutions") or []:
            if isinstance(solution, dict) and isinstance(solution.get("params"), dict):
                params = ", ".join(f"{k}={v}" for k, v in solution["params"].items())
                values = solution.get("values")
                lines.append(f"Optuna Pareto solution in {where}: values={values} with {params}")
    return lines


def _counts(rows: Sequence[JobRow]) -> str:
    counts = Counter(row.status for row in rows)
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"{len(rows)} job{'s' if len(rows) != 1 else ''}: {parts}"


def _markdown(study: Study, notes: Sequence[str], png: bool) -> str:
    """summary.md: heading, warning, notes, shared settings, the table and the plot."""
    md = [f"# {study.headline()}", ""]
    warning = study.warning()
    if warning:
        md += [f"> **{warning}**", ""]
    md += [*(f"{note}  " for note in notes), ""]
    shared = study.shared_lines()
    if shared:
        md += [f"Shared settings (all {len(study.rows)} jobs; no column below):", ""]
        md += [*(f"- `{item}`" for item in shared), ""]
    md += [format_table(study.rows, study), ""]
    if png:
        md += [f"![best top-1 vs MACs]({PNG_NAME})", ""]
    return "\n".join(md)


def write_summary(root: Path, plot: bool = True, sort: str = "best",
                  out: Path | None = None) -> dict[str, Any]:
    """Write summary.csv, summary.md and (if plot and a job completed) summary.png into
    `out` (default: root).

    Returns {"csv": Path, "md": Path, "png": Path | None, "rows": [JobRow], "notes": [str],
    "study": Study, "warnings": [str], "write_error": OSError | None}; warnings (mixed
    data) are also atop summary.md. A dir that cannot be written (a read-only archive of
    a sweep) still gives the rows and study, with the error in "write_error" and the
    paths None. Raises FileNotFoundError when root is not a directory, NoJobsError (a
    subclass) when no job dir is at or below it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    job_dirs, optuna_files = scan(root)
    if not job_dirs:
        raise NoJobsError(f"no job directories (containing {CONFIG_FILE.as_posix()}) in {root}")
    rows = sort_rows((read_job(root, d) for d in job_dirs), sort)
    study = describe(rows, where_name(root))
    out = Path(out) if out is not None else root
    notes = [_counts(rows), *_optuna_lines(root, optuna_files)]
    warnings = [w for w in (study.warning(),) if w]
    result = {"csv": None, "md": None, "png": None, "rows": rows, "notes": notes,
              "study": study, "warnings": warnings, "write_error": None}
    try:
        out.mkdir(parents=True, exist_ok=True)
        png = out / PNG_NAME if plot and plot_summary(rows, out / PNG_NAME, study) else None
        if plot and png is None:
            notes.append("No completed job reports both MACs and accuracy yet: no plot written.")
        csv_path = out / CSV_NAME
        write_csv(rows, csv_path)
        md_path = out / MD_NAME
        md_path.write_text(_markdown(study, notes, png is not None), encoding="utf-8")
    except OSError as exc:
        result["write_error"] = exc
        return result
    result.update(csv=csv_path, md=md_path, png=png)
    return result


def _print_summary(result: dict[str, Any]) -> None:
    """The terminal's summary: warnings on stderr; heading, notes, shared settings, table."""
    study: Study = result["study"]
    for warning in result["warnings"]:
        print(warning, file=sys.stderr)
    print(study.headline())
    print("\n".join(result["notes"]))
    shared = study.shared_lines()
    if shared:
        print(textwrap.fill("Shared settings: " + ", ".join(shared), 100,
                            subsequent_indent="  ", break_long_words=False))
    print(format_table(study.rows, study))
    written = [p for p in (result["csv"], result["md"], result["png"]) if p]
    if written:
        print("wrote " + ", ".join(str(p) for p in written))


def grid_main(argv: Sequence[str]) -> int:
    """`python -m mbv2.summary grid DIR [--rows KEY] [--cols KEY] [--out PREFIX] ...`: 0 when
    written, 2 when DIR is missing or holds no job."""
    from mbv2.summary import grid

    parser = argparse.ArgumentParser(
        prog="python -m mbv2.summary grid",
        description="A study's report: OUT.md (per ROWS x COLS cell the mean ± std of the "
        "best top-1 over the seeds) and OUT.png (top-1 vs MACs, the Pareto front).",
    )
    parser.add_argument("dir", type=Path, help="the study's sweep dir")
    parser.add_argument("--rows", default="model.scale", help="the rows' config key (model.scale)")
    parser.add_argument("--cols", default="optim.lr", help="the columns' config key (optim.lr)")
    parser.add_argument("--seed-key", default=grid.SEED_KEY,
                        help=f"the key a cell's runs differ in ({grid.SEED_KEY})")
    parser.add_argument("--out", type=Path, help="writes OUT.md and OUT.png (default: DIR/grid)")
    parser.add_argument("--planned", type=int,
                        help="the runs the study was to have (default: every rows x cols x seed)")
    parser.add_argument("--command", help="the command that reproduces the study (default: "
                        "from the overrides its jobs share)")
    parser.add_argument("--title", help="the report's heading (default: rows x cols over seeds)")
    parser.add_argument("--no-plot", action="store_true", help="do not write OUT.png")
    args = parser.parse_args(argv)
    try:
        result = grid.write_study_report(
            args.dir, args.out or args.dir / "grid", args.rows, args.cols, args.seed_key,
            args.planned, args.command, title=args.title, plot=not args.no_plot)
    except OSError as exc:  # FileNotFoundError included: no such dir, or no job in it
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, FileNotFoundError) else 1
    print(grid.format_grid_table(result["grid"]))
    print("wrote " + ", ".join(str(p) for p in (result["md"], result["png"]) if p))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 when jobs were summarised, 2 when the dir is missing or holds none.

    A first argument `grid` followed by anything but this command's options is the grid
    sub-command (grid_main); `grid [--sort KEY] [--no-plot]` is still a dir named grid."""
    given = list(sys.argv[1:] if argv is None else argv)
    sort_values = {i + 1 for i, arg in enumerate(given) if arg == "--sort"}
    own = [arg in ("--sort", "--no-plot") or arg.startswith("--sort=") or i in sort_values
           for i, arg in enumerate(given)]
    if given[:1] == ["grid"] and not all(own[1:] or [True]):
        return grid_main(given[1:])
    parser = argparse.ArgumentParser(
        prog="python -m mbv2.summary",
        description="Summarise the Hydra jobs at or below DIR into DIR/summary.{csv,md,png}.",
        epilog="python -m mbv2.summary grid DIR --rows KEY --cols KEY --out PREFIX: a study's "
        "rows x cols table over seeds and its plot (see grid --help).",
    )
    parser.add_argument("dir", type=Path, help="a sweep dir, an outputs dir or a single job dir")
    parser.add_argument(
        "--sort",
        choices=SORT_CHOICES,
        default="best",
        help="order of the rows (default: best top-1); failed and missing jobs stay last",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write summary.png")
    parser.add_argument("--out", type=Path,
                        help="where summary.{csv,md,png} go (default: DIR; for a sweep you "
                        "cannot write, such as a read-only archive)")
    args = parser.parse_args(given)
    try:
        result = write_summary(args.dir, plot=not args.no_plot, sort=args.sort, out=args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_summary(result)
    error = result["write_error"]
    if error is not None:  # the table is shown above; the files are what failed
        where = args.out or args.dir
        print(f"error: the table above was not saved: cannot write {error.filename or where} "
              f"({error.strerror or error}); give --out <a directory you can write>",
              file=sys.stderr)
        return 1
    return 0
