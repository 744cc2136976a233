"""Writing a sweep's summary into its dir, and the `python -m mbv2.summary` command.

Besides the table, summary.md (and the terminal) get the notes that put it in context:
how many jobs are in which state, the settings all jobs share, and what an Optuna sweeper
reported as its best parameters.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mbv2.summary.jobs import (
    CONFIG_FILE,
    SETTING_KEYS,
    SORT_CHOICES,
    JobRow,
    NoJobsError,
    read_job,
    scan,
    sort_rows,
)
from mbv2.summary.plot import plot_summary
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


def _format_setting(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _shared_settings(rows: Sequence[JobRow]) -> list[str]:
    """`key=value` for each setting every job has, with one value: the sweep's context."""
    shared: list[str] = []
    for key in SETTING_KEYS:
        values = [row.settings.get(key) for row in rows]
        if values and all(v is not None and v == values[0] for v in values):
            shared.append(f"{key}={_format_setting(values[0])}")
    return shared


def _counts(rows: Sequence[JobRow]) -> str:
    counts = Counter(row.status for row in rows)
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"{len(rows)} job{'s' if len(rows) != 1 else ''}: {parts}"


def _markdown(
    title: str, notes: Sequence[str], shared: Sequence[str], rows: Sequence[JobRow], png: bool
) -> str:
    """summary.md: title, notes, shared settings, the table and (if drawn) the plot."""
    md = [f"# Summary of {title}", "", *(f"{note}  " for note in notes), ""]
    if shared:
        md += ["Shared settings:", "", *(f"- `{item}`" for item in shared), ""]
    md += [format_table(rows), ""]
    if png:
        md += [f"![best top-1 vs MACs]({PNG_NAME})", ""]
    return "\n".join(md)


def write_summary(root: Path, plot: bool = True, sort: str = "best") -> dict[str, Any]:
    """Write summary.csv, summary.md and (if plot and a job completed) summary.png into root.

    Returns {"csv": Path, "md": Path, "png": Path | None, "rows": [JobRow], "notes": [str]}.
    Raises FileNotFoundError when root is not a directory, NoJobsError (a subclass) when
    no job dir is at or below it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    job_dirs, optuna_files = scan(root)
    if not job_dirs:
        raise NoJobsError(f"no job directories (containing {CONFIG_FILE.as_posix()}) in {root}")
    rows = sort_rows((read_job(root, d) for d in job_dirs), sort)
    title = root.resolve().name or str(root.resolve())

    png = root / PNG_NAME if plot and plot_summary(rows, root / PNG_NAME, title) else None
    notes = [_counts(rows), *_optuna_lines(root, optuna_files)]
    if plot and png is None:
        notes.append("No completed job reports both MACs and accuracy yet: no plot written.")

    csv_path = root / CSV_NAME
    write_csv(rows, csv_path)
    md_path = root / MD_NAME
    md_path.write_text(
        _markdown(title, notes, _shared_settings(rows), rows, png is not None), encoding="utf-8"
    )
    return {"csv": csv_path, "md": md_path, "png": png, "rows": rows, "notes": notes}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 when jobs were summarised, 2 when the dir is missing or holds none."""
    parser = argparse.ArgumentParser(
        prog="python -m mbv2.summary",
        description="Summarise the Hydra jobs at or below DIR into DIR/summary.{csv,md,png}.",
    )
    parser.add_argument("dir", type=Path, help="a sweep dir, an outputs dir or a single job dir")
    parser.add_argument(
        "--sort",
        choices=SORT_CHOICES,
        default="best",
        help="order of the rows (default: best top-1); failed and missing jobs stay last",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write summary.png")
    args = parser.parse_args(argv)
    try:
        result = write_summary(args.dir, plot=not args.no_plot, sort=args.sort)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the summary into {args.dir}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(result["notes"]))
    print(format_table(result["rows"]))
    written = [result["csv"], result["md"]] + ([result["png"]] if result["png"] else [])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
