"""One table and one plot for a sweep: `python -m mbv2.summary <dir> [--sort KEY] [--no-plot]`.

A width x LR sweep leaves one Hydra job directory per run; opening metrics.json files one
at a time shows neither which width/LR wins, nor which jobs failed, nor the trade-off of
accuracy against compute. This module reads every job directory below a sweep or outputs
dir (finished, running, failed or never started) and writes into that dir:

- summary.csv: one row per job, plain numbers, for pandas or a spreadsheet;
- summary.md: the same table aligned (also printed), with counts and shared settings;
- summary.png: best top-1 against MACs per completed job, with its Pareto front.

It runs while a sweep is still training, so it tolerates half-written metrics.json files,
configs with interpolations it cannot resolve (Hydra's or mbv2's own resolvers), and jobs
that never wrote anything. It imports no paddle, and matplotlib only when it plots, so it
answers in well under a second.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import Container, OmegaConf

CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
METRICS_FILE = "metrics.json"
OPTUNA_FILE = "optimization_results.yaml"
CSV_NAME, MD_NAME, PNG_NAME = "summary.csv", "summary.md", "summary.png"

COMPLETED, RUNNING, FAILED = "completed", "running", "failed"
UNREADABLE, NO_METRICS = "unreadable", "no metrics"

# Config keys worth knowing when comparing jobs; those equal in all jobs are listed once.
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
)

# Rows group by how much their numbers mean before any value sorts them: results
# (final or partial) first, then statuses that carry no trustworthy numbers.
_STATUS_TIER = {COMPLETED: 0, RUNNING: 0, FAILED: 2, UNREADABLE: 3, NO_METRICS: 4}
_OTHER_STATUS_TIER = 1  # a status this module does not know, written by a newer run.py

_STATUS_WIDTH = 60  # error messages beyond this are cut in the aligned table, not the CSV


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
    final_top1: float | None = None
    epochs_completed: int | None = None
    epochs_planned: int | None = None
    wall_seconds: float | None = None
    images_per_sec: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # SETTING_KEYS, resolved

    @property
    def status_text(self) -> str:
        """The status column: the status, and for failed/unreadable jobs the reason."""
        if self.error and self.status in (FAILED, UNREADABLE):
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


# ----------------------------------------------------------------------------- reading


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


def _override_values(overrides: Iterable[str]) -> dict[str, Any]:
    """key -> value of `key=value`, `+key=value` and `++key=value` overrides.

    They stand in for config values whose interpolation cannot be resolved here.
    """
    values: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.lstrip("+")
        if not sep or not key or key.startswith("~"):
            continue
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            values[key] = raw
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


def _read_job(root: Path, job_dir: Path) -> JobRow:
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
    if row.status == FAILED:
        row.error = _error_line(metrics.get("error"))
    row.params = _as_int(metrics.get("params_trainable"))
    row.macs = _as_int(metrics.get("macs"))
    row.best_top1 = _as_float(metrics.get("best_eval_acc_top1"))
    row.final_top1 = _as_float(metrics.get("final_eval_acc_top1"))
    row.epochs_completed = _as_int(metrics.get("epochs_completed"))
    row.epochs_planned = _as_int(metrics.get("epochs_planned")) or row.epochs_planned
    row.wall_seconds = _as_float(metrics.get("wall_seconds"))
    row.images_per_sec = _as_float(metrics.get("train_images_per_sec"))
    return row


def _scan(root: Path) -> tuple[list[Path], list[Path]]:
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
    jobs, _ = _scan(root)
    return sort_rows(_read_job(root, job_dir) for job_dir in jobs)


# ----------------------------------------------------------------------------- analysis


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, value) points no cheaper-or-equal point matches or beats, cheapest first.

    With cost = MACs and value = accuracy, these are the best accuracy available at a
    compute budget: each point is strictly more accurate than every point costing no more.
    """
    front: list[tuple[float, float]] = []
    for cost, value in sorted(points, key=lambda p: (p[0], -p[1])):
        # sorted by cost, best value first at equal cost: later points only need to beat
        # the last point kept
        if not front or value > front[-1][1]:
            front.append((cost, value))
    return front


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


# ----------------------------------------------------------------------------- tables

CSV_COLUMNS = (
    "job",
    "overrides",
    "status",
    "scale",
    "lr",
    "optimizer",
    "params",
    "macs_m",
    "best_top1_pct",
    "final_top1_pct",
    "epochs_completed",
    "epochs_planned",
    "wall_s",
    "img_per_s",
)

# (header, right-aligned); cells come from _table_cells in this order
TABLE_COLUMNS = (
    ("job", False),
    ("overrides", False),
    ("status", False),
    ("scale", True),
    ("lr", True),
    ("optimizer", False),
    ("params", True),
    ("MACs (M)", True),
    ("best top-1 (%)", True),
    ("final top-1 (%)", True),
    ("epochs", True),
    ("wall time (s)", True),
    ("img/s", True),
)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else fraction * 100


def _csv_record(row: JobRow) -> dict[str, Any]:
    """The CSV row: plain numbers (percent, millions of MACs), empty where unknown."""
    return {
        "job": row.job,
        "overrides": ",".join(row.overrides),
        "status": row.status_text,
        "scale": row.scale,
        "lr": row.lr,
        "optimizer": row.optimizer,
        "params": row.params,
        "macs_m": _round(None if row.macs is None else row.macs / 1e6, 3),
        "best_top1_pct": _round(_percent(row.best_top1), 3),
        "final_top1_pct": _round(_percent(row.final_top1), 3),
        "epochs_completed": row.epochs_completed,
        "epochs_planned": row.epochs_planned,
        "wall_s": _round(row.wall_seconds, 1),
        "img_per_s": _round(row.images_per_sec, 1),
    }


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table_cells(row: JobRow) -> list[str]:
    """The aligned table's cells for one row, in TABLE_COLUMNS order."""
    status = row.status_text
    if len(status) > _STATUS_WIDTH:
        status = status[: _STATUS_WIDTH - 1] + "…"
    if row.epochs_completed is None and row.epochs_planned is None:
        epochs = "-"
    else:
        counts = (row.epochs_completed, row.epochs_planned)
        epochs = "/".join("?" if n is None else str(n) for n in counts)
    return [
        row.job,
        ",".join(row.overrides) or "-",
        status,
        _fmt(row.scale, "g"),
        _fmt(row.lr, "g"),
        row.optimizer or "-",
        _fmt(row.params, ","),
        _fmt(None if row.macs is None else row.macs / 1e6, ".2f"),
        _fmt(_percent(row.best_top1), ".2f"),
        _fmt(_percent(row.final_top1), ".2f"),
        epochs,
        _fmt(row.wall_seconds, ".0f"),
        _fmt(row.images_per_sec, ".1f"),
    ]


def format_table(rows: Sequence[JobRow]) -> str:
    """A Markdown table padded so it also reads aligned as plain text on a terminal."""
    header = [title for title, _ in TABLE_COLUMNS]
    body = [[cell.replace("|", "\\|") for cell in _table_cells(row)] for row in rows]
    widths = [max(3, len(title), *(len(r[i]) for r in body)) for i, title in enumerate(header)]
    right = [align for _, align in TABLE_COLUMNS]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
        return "| " + " | ".join(padded) + " |"

    dashes = ("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right))
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


# ----------------------------------------------------------------------------- plot


def _lr_label(lr: float | None) -> str:
    return "lr=?" if lr is None else f"lr={lr:g}"


def plot_summary(rows: Sequence[JobRow], path: Path, title: str) -> bool:
    """Draw best top-1 against MACs for completed jobs into path; False if none has both.

    One series per LR when the jobs used several (a width sweep per LR reads as a curve),
    each point labelled with its width, and the Pareto front over all jobs as a step line.
    """
    done = [
        r for r in rows if r.status == COMPLETED and r.best_top1 is not None and (r.macs or 0) > 0
    ]
    if not done:
        return False
    # Imported here: matplotlib costs more than the rest of the module to import, and
    # --no-plot or collect() never needs it. Figure without pyplot leaves no global state.
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(8, 5.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    lrs = sorted({r.lr for r in done}, key=lambda lr: (lr is None, lr or 0.0))
    several = len(lrs) > 1
    for lr in lrs:
        group = sorted((r for r in done if r.lr == lr), key=lambda r: (r.macs, r.best_top1))
        xs = [r.macs / 1e6 for r in group]
        ys = [r.best_top1 * 100 for r in group]
        label = _lr_label(lr) if several else f"completed jobs ({_lr_label(lr)})"
        ax.plot(xs, ys, marker="o", linestyle="-" if several else "none", alpha=0.85, label=label)
        for r, x, y in zip(group, xs, ys):
            if r.scale is not None:
                ax.annotate(
                    f"x{r.scale:g}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8
                )
    front = pareto_front((r.macs / 1e6, r.best_top1 * 100) for r in done)
    all_x = [r.macs / 1e6 for r in done]
    fx, fy = [p[0] for p in front], [p[1] for p in front]
    if max(all_x) > fx[-1]:  # the best accuracy stays the front up to the largest budget
        fx.append(max(all_x))
        fy.append(fy[-1])
    ax.step(fx, fy, where="post", color="k", linestyle="--", linewidth=1.2, label="Pareto front")
    if max(all_x) > 10 * min(all_x):
        ax.set_xscale("log")
        # plain numbers (6, 20, 80) instead of 6x10^0; minor ticks labelled when few
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("best top-1 accuracy (%)")
    ax.set_title(f"{title}: best top-1 vs MACs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.savefig(path)
    return True


# ----------------------------------------------------------------------------- output


def write_summary(root: Path, plot: bool = True, sort: str = "best") -> dict[str, Any]:
    """Write summary.csv, summary.md and (if plot and a job completed) summary.png into root.

    Returns {"csv": Path, "md": Path, "png": Path | None, "rows": [JobRow], "notes": [str]}.
    Raises FileNotFoundError when root is not a directory, NoJobsError (a subclass) when
    no job dir is at or below it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    job_dirs, optuna_files = _scan(root)
    if not job_dirs:
        raise NoJobsError(f"no job directories (containing {CONFIG_FILE.as_posix()}) in {root}")
    rows = sort_rows((_read_job(root, d) for d in job_dirs), sort)
    title = root.resolve().name or str(root.resolve())

    png = root / PNG_NAME if plot and plot_summary(rows, root / PNG_NAME, title) else None
    notes = [_counts(rows), *_optuna_lines(root, optuna_files)]
    if plot and png is None:
        notes.append("No completed job reports both MACs and accuracy yet: no plot written.")
    shared = _shared_settings(rows)

    csv_path = root / CSV_NAME
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(_csv_record(row) for row in rows)

    md = [f"# Summary of {title}", "", *(f"{note}  " for note in notes), ""]
    if shared:
        md += ["Shared settings:", "", *(f"- `{item}`" for item in shared), ""]
    md += [format_table(rows), ""]
    if png is not None:
        md += [f"![best top-1 vs MACs]({PNG_NAME})", ""]
    md_path = root / MD_NAME
    md_path.write_text("\n".join(md), encoding="utf-8")
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


if __name__ == "__main__":
    sys.exit(main())
