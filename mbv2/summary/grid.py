"""A study's grid, e.g. width x LR over seeds: one Markdown table and one plot.

A cell (row value x col value) holds the mean ± sample std (n shown) of its seeds' best
eval top-1; a row its model's params and MACs and its runs' mean train img/s and wall
seconds (per col value where the col changes the MACs, as a stem stride does). Runs that
did not finish, and planned runs with no job dir, are counted and listed, never averaged
in. The plot: cell means against MACs, error bars the std, a line per col value, the
Pareto front of the means. Written by the `StudyReport` Hydra callback when a multirun ends
(experiments/study_*.yaml), and by `python -m mbv2.summary grid <sweep dir> --rows KEY
--cols KEY --out PREFIX`; a rebuild keeps the report's hand-written notes section.
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import shlex
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import Container, OmegaConf

from mbv2.summary.jobs import (CONFIG_FILE, FINISHED, METRICS_FILE, JobRow, NoJobsError,
                               _override_values, collect, sort_rows)
from mbv2.summary.plot import TIE_STEP, pareto_front
from mbv2.summary.study import (SETTING_LABELS, _value_order, describe, format_setting,
                                known_values, where_name)

log = logging.getLogger(__name__)

SEED_KEY = "trainer.seed"
NOTES_HEADING = "## What this does and does not show"
TODO_LINE = "**TODO (engineer): fill this in from the measured numbers, then delete this line.**"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
Key = tuple[str, str]  # (row value, col value), formatted as format_setting writes them


def label(key: str) -> str:
    """A config key as a header says it: `scale`, `lr`, `stem stride`."""
    return SETTING_LABELS.get(key, key.rpartition(".")[2].replace("_", " "))


def job_value(row: JobRow, key: str) -> str | None:
    """A job's value of any config key, formatted: its setting as collect read it, else its
    override (how a sweep sets trainer.seed), else its saved config; None when unknown."""
    value = row.settings.get(key)
    if value is None:
        value = _override_values(row.overrides).get(key)
    if value is None:
        try:
            cfg = OmegaConf.load(row.path / CONFIG_FILE)
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable config says nothing, as in jobs.py
            pass
    return None if value is None or isinstance(value, Container) else format_setting(value)


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


@dataclass
class StudyGrid:
    """The study's jobs placed in their cells; see build_grid."""

    rows_key: str
    cols_key: str
    seed_key: str
    jobs: list[JobRow]
    row_values: list[str]
    col_values: list[str]
    seeds: list[str]
    cells: dict[Key, list[JobRow]]  # the finished runs with a best top-1, only
    left_out: list[tuple[str, str]]  # (run, why): not averaged in, or never started
    planned: int

    @property
    def completed(self) -> int:
        return sum(len(runs) for runs in self.cells.values())

    def runs(self, r: str, c: str | None = None) -> list[JobRow]:
        """The finished runs of row r (of its cell in col c)."""
        cols = self.col_values if c is None else [c]
        return [job for col in cols for job in self.cells.get((r, col), [])]

    def stats(self, r: str, c: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std, n) of the cell's best top-1 in %; std None below 2 runs."""
        top1 = [job.best_top1 * 100 for job in self.runs(r, c)]
        std = statistics.stdev(top1) if len(top1) > 1 else None
        return _mean(top1), std, len(top1)

    def macs_m(self, r: str, c: str | None = None) -> float | None:
        return _mean(None if j.macs is None else j.macs / 1e6 for j in self.runs(r, c))

    def best(self, r: str | None = None) -> set[Key]:
        """The best cells of row r (of the grid): the highest mean as shown, ties included."""
        rows = self.row_values if r is None else [r]
        means = {(a, c): self.stats(a, c)[0] for a in rows for c in self.col_values}
        shown = {key: round(m, 2) for key, m in means.items() if m is not None}
        top = max(shown.values(), default=None)
        return {key for key, m in shown.items() if m == top}


def build_grid(jobs: Sequence[JobRow], rows_key: str, cols_key: str, seed_key: str = SEED_KEY,
               planned: int | None = None) -> StudyGrid:
    """Each job in its (row, col) cell; the jobs that did not finish and the row x col x seed
    runs no job dir holds listed. planned: the sweep's runs (None: the grid's)."""
    placed = [(job, job_value(job, rows_key), job_value(job, cols_key), job_value(job, seed_key))
              for job in sort_rows(jobs, "job")]
    rows, cols, seeds = (sorted({p[i] for p in placed} - {None}, key=_value_order)
                         for i in (1, 2, 3))
    cells: dict[Key, list[JobRow]] = {}
    left_out = []
    for job, r, c, _ in placed:
        if job.status in FINISHED and job.best_top1 is not None and None not in (r, c):
            cells.setdefault((r, c), []).append(job)
        else:
            why = "finished without a best top-1" if job.status in FINISHED else job.status_text
            unknown = [key for key, v in ((rows_key, r), (cols_key, c)) if v is None]
            left_out.append((job.job, why + "".join(f"; no {key}" for key in unknown)))
    seen = {p[1:] for p in placed}
    for r, c, s in itertools.product(rows, cols, seeds or [None]):
        if (r, c, s) not in seen:
            name = f"{rows_key}={r},{cols_key}={c}" + (f",{seed_key}={s}" if s else "")
            left_out.append((name, "no job dir: never started"))
    found = len(placed) + sum(why.startswith("no job dir") for _, why in left_out)
    if planned is not None and planned > found:
        left_out.append((f"{planned - found} more planned runs", "no job dir: never started"))
    return StudyGrid(rows_key, cols_key, seed_key, list(jobs), rows, cols, seeds, cells,
                     left_out, max(planned or 0, found))


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell_text(grid: StudyGrid, r: str, c: str, best_row: set[Key], best: set[Key]) -> str:
    mean, std, n = grid.stats(r, c)
    if mean is None:
        return "-"
    text = f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
    text = f"**{text}**" if (r, c) in best_row else text
    return f"{text} (n={n})" + (" ★" if (r, c) in best else "")


def _row_costs(grid: StudyGrid, r: str, split: bool) -> list[str]:
    """params; MACs, img/s and wall s per run: of the row, or per col value when split."""
    parts: list[str | None] = list(grid.col_values) if split else [None]
    params = sorted({j.params for j in grid.runs(r) if j.params is not None})

    def each(value_of: Any, spec: str) -> str:
        return " / ".join(_num(value_of(c), spec) for c in parts)

    return [" / ".join(f"{p:,}" for p in params) or "-",
            each(lambda c: grid.macs_m(r, c), ".2f"),
            each(lambda c: _mean(j.images_per_sec for j in grid.runs(r, c)), ".1f"),
            each(lambda c: _mean(j.wall_seconds for j in grid.runs(r, c)), ".0f")]


def format_grid_table(grid: StudyGrid) -> str:
    """The Markdown table: a row per row value, a column per col value, costs around them."""
    # the col changes the network (a stem stride), not only its training: costs per col
    split = any(len({j.macs for j in grid.runs(r) if j.macs}) > 1 for r in grid.row_values)
    per = f" ({label(grid.cols_key)} {' / '.join(grid.col_values)})" if split else ""
    head = [label(grid.rows_key), "params", f"MACs (M){per}",
            *(f"{label(grid.cols_key)}={c}" for c in grid.col_values),
            f"train img/s{per}", f"wall s/run{per}"]
    best = grid.best()
    body = []
    for r in grid.row_values:
        params, macs, speed, wall = _row_costs(grid, r, split)
        cells = [_cell_text(grid, r, c, grid.best(r), best) for c in grid.col_values]
        body.append([r, params, macs, *cells, speed, wall])
    widths = [max(map(len, column)) for column in zip(head, *body)]
    lines = [[t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(cells, widths))]
             for cells in (head, *body)]
    rule = ["-" * widths[0], *("-" * (w - 1) + ":" for w in widths[1:])]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in (lines[0], rule, *lines[1:]))


def _duration(seconds: float) -> str:
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200
            else f"{seconds / 3600:.1f} h")


def _notes(md_path: Path, grid: StudyGrid) -> list[str]:
    """The "what this shows" section of an existing report (hand-written), else a template."""
    if md_path.is_file():
        old = md_path.read_text(encoding="utf-8").split("\n")
        if NOTES_HEADING in old:
            start = old.index(NOTES_HEADING)
            ends = (i for i in range(start + 1, len(old)) if old[i].startswith("## "))
            end = next(ends, len(old))
            return [*old[start:end]] if old[end - 1:end] == [""] else [*old[start:end], ""]
    rows, cols = label(grid.rows_key), label(grid.cols_key)
    return [NOTES_HEADING, "", TODO_LINE, "", f"*Shows:* which {cols} is best at each {rows} on "
            f"this data and epoch budget, whether it moves with the {rows}, and what each {rows} "
            "costs (params, MACs, img/s on this machine). _Fill in: the best cell, the trend._", "",
            "*Does not show:* other data (ImageNet), other schedules or recipes; a difference "
            f"where means lie within about one std ({len(grid.seeds) or '?'} seeds); a held-out "
            "score: best top-1 is the best epoch on the validation split. _Fill in: next steps._",
            ""]


def _header(grid: StudyGrid, title: str, command: str, rebuild: str) -> list[str]:
    study = describe(grid.jobs)
    epochs = "/".join(known_values(grid.jobs, "trainer.epochs")) or "?"
    size = "/".join(known_values(grid.jobs, "data.image_size")) or "?"
    own = {grid.rows_key, grid.cols_key, grid.seed_key, "trainer.epochs", "data.name",
           "data.image_size", "data.num_classes"}
    recipe = [s for s in study.shared_lines()
              if s.partition("=")[0] not in own and not s.startswith("experiment=")]
    others = [label(k) for k in study.varying if k not in own]
    wall = sum(j.wall_seconds or 0.0 for j in grid.jobs)
    ends = [p.stat().st_mtime for p in (j.path / METRICS_FILE for j in grid.jobs) if p.is_file()]
    md = [f"# {title}", ""]
    for warning in [study.warning()] + [f"warning: these runs also differ in {', '.join(others)}"
                                        if others else None]:
        md += [f"> **{warning}**", ""] if warning else []
    not_in = grid.planned - grid.completed
    md += [f"- **Data:** {study.data_text().removeprefix('data=')}",
           f"- **Epochs:** {epochs}; **image size:** {size} px; **seeds** (`{grid.seed_key}`): "
           f"{', '.join(grid.seeds) or '?'}",
           f"- **Runs:** {grid.completed} completed of {grid.planned} planned"
           + (f" ({not_in} not in the table, listed below)" if not_in else ""),
           f"- **Total wall time:** {_duration(wall)} (the sum of every run's wall seconds)",
           f"- **Date:** {dt.date.today()} (last run finished "
           f"{dt.date.fromtimestamp(max(ends)) if ends else '?'})",
           f"- **Recipe shared by all runs:** {', '.join(f'`{s}`' for s in recipe) or '-'}",
           f"- **Reproduce:** `{command}` (a rerun continues it; finished runs are skipped)",
           f"- **Rebuild this report:** `{rebuild}`", ""]
    return md


def _left_out_lines(grid: StudyGrid) -> list[str]:
    lines = [f"- `{run}`: {why}" for run, why in grid.left_out]
    head = (f"{grid.planned - grid.completed} of {grid.planned} planned runs are not averaged in:"
            if lines else f"None: all {grid.planned} planned runs completed.")
    return ["## Runs not in the table", "", head, "", *lines, *([""] if lines else [])]


def study_markdown(grid: StudyGrid, title: str, command: str, rebuild: str,
                   png_name: str | None, notes: list[str]) -> str:
    """The whole report: header, table, legend, plot, notes, the runs left out."""
    cols, rows = label(grid.cols_key), label(grid.rows_key)
    legend = (f"Cells: best eval top-1 (%), mean ± sample std over the {grid.seed_key} values "
              f"(n = finished runs). **Bold**: the best {cols} of its {rows}; ★: the best "
              "overall. params and MACs per model; img/s (training) and wall seconds: means "
              "over the finished runs.")
    plot = [f"![best top-1 vs MACs]({png_name})", ""] if png_name else []
    md = [*_header(grid, title, command, rebuild), format_grid_table(grid), "", legend, "",
          *plot, *notes, *_left_out_lines(grid)]
    return "\n".join(md)


def _draw_cells(ax: Any, grid: StudyGrid) -> list[tuple[float, float, float, float, str, str]]:
    """One errorbar line per col value, side by side where they share MACs; returns each
    drawn cell's (MACs, x drawn at, mean, top of its error bar, row value, col value)."""
    drawn, k = [], len(grid.col_values)
    for i, c in enumerate(grid.col_values):
        shift = 10 ** ((i - (k - 1) / 2) * TIE_STEP)
        cells = [(grid.macs_m(r, c), *grid.stats(r, c)[:2], r) for r in grid.row_values]
        cells = sorted((x, x * shift, m, s or 0.0, r) for x, m, s, r in cells
                       if x and m is not None)
        if not cells:
            continue
        ax.errorbar([p[1] for p in cells], [p[2] for p in cells], yerr=[p[3] for p in cells],
                    marker=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}", capsize=3,
                    markersize=5, alpha=0.85, label=f"{label(grid.cols_key)}={c}", zorder=2)
        drawn += [(x, at, m, m + s, r, c) for x, at, m, s, r in cells]
    return drawn


def plot_grid(grid: StudyGrid, path: Path, title: str) -> bool:
    """Write the plot to path; False (nothing written) when no cell has MACs and a mean."""
    if not any(grid.macs_m(r) for r in grid.row_values):  # a finished run with MACs
        return False
    from matplotlib.figure import Figure  # only when plotting: costs more than all the rest
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(9.5, 5.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    drawn = _draw_cells(ax, grid)
    front = pareto_front((x, m) for x, _, m, *_ in drawn)  # on the true MACs
    front.append((max(p[0] for p in drawn), front[-1][1]))  # the best holds to the largest
    ax.step(*zip(*front), where="post", color="0.3", linestyle="--", linewidth=1.5, zorder=1,
            label="Pareto front of the cell means")
    best = [p for p in drawn if (p[4], p[5]) in grid.best()]  # none: the best has no MACs
    if best:
        ax.plot([p[1] for p in best], [p[2] for p in best], marker="*", markersize=14, zorder=3,
                color="gold", markeredgecolor="k", linestyle="none",
                label=f"best: {best[0][2]:.2f} %" + (f" ({len(best)} tied)" * (len(best) > 1)))
    tops: dict[tuple[str, float], float] = {}
    for x, _, _, top, r, _ in drawn:  # one label per row value and MACs, above its highest bar
        tops[(r, x)] = max(tops.get((r, x), top), top)
    prefix = "x" if grid.rows_key == "model.scale" else f"{label(grid.rows_key)}="
    for (r, x), top in tops.items():
        ax.annotate(f"{prefix}{r}", (x, top), xytext=(0, 6), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 20, not 2x10^1
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("MACs per image (millions, log scale)")
    ax.set_ylabel("best eval top-1 (%), mean ± std over seeds")
    ax.set_title(f"{title}\n{grid.completed} of {grid.planned} planned runs", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(y=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside, hiding none
    fig.savefig(path)
    return True


def reproduce_command(jobs: Sequence[JobRow]) -> str:
    """The mbv2.run command the jobs came from: the overrides they all share when one is
    an `experiment=` preset (it brings the sweep), else those and each other one swept."""
    common = [o for o in jobs[0].overrides if all(o in job.overrides for job in jobs[1:])]
    swept: dict[str, set[str]] = {}
    if not any(o.startswith("experiment=") for o in common):
        for o in (o for job in jobs for o in job.overrides if o not in common):
            swept.setdefault(o.partition("=")[0], set()).add(o.partition("=")[2])
    sweeps = [f"{key}={','.join(sorted(v, key=_value_order))}" for key, v in swept.items()]
    return shlex.join(["python", "-m", "mbv2.run", *(["-m"] if swept else []), *common, *sweeps])


def planned_runs(params: Any, task: Sequence[str]) -> int | None:
    """The jobs a basic sweep of these sweeper params and command-line overrides launches
    (a key swept on the command line replaces its param); None where it cannot say."""
    counts: dict[str, int] = {}
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(task)
    try:
        for o in OverridesParser.create().parse_overrides(lines):
            swept = o.is_sweep_override()
            counts[o.key_or_group] = len(list(o.sweep_string_iterator())) if swept else 1
    except Exception:  # noqa: BLE001 - an interval (Optuna) or a syntax it cannot count
        return None
    return math.prod(counts.values())


def write_study_report(sweep_dir: Path, out: Path, rows: str = "model.scale",
                       cols: str = "optim.lr", seed_key: str = SEED_KEY, planned: int | None = None,
                       command: str | None = None, title: str | None = None,
                       plot: bool = True) -> dict[str, Any]:
    """<out>.md and (when plot, and a cell has MACs) <out>.png from the jobs below
    sweep_dir; {"md": Path, "png": Path | None, "grid": StudyGrid}. Raises
    FileNotFoundError (NoJobsError when sweep_dir holds no job dir)."""
    from mbv2.config import PROJECT_ROOT

    jobs = collect(Path(sweep_dir))
    if not jobs:
        raise NoJobsError(f"no job dirs (containing {CONFIG_FILE.as_posix()}) in {sweep_dir}")
    grid = build_grid(jobs, rows, cols, seed_key, planned)
    out = Path(out).with_suffix("") if Path(out).suffix in (".md", ".png") else Path(out)
    md, png = out.with_name(out.name + ".md"), out.with_name(out.name + ".png")
    md.parent.mkdir(parents=True, exist_ok=True)
    given_title = title
    title = title or f"{label(rows)} x {label(cols)} over seeds: {where_name(Path(sweep_dir))}"
    drawn = plot and plot_grid(grid, png, title)
    shown = out.relative_to(PROJECT_ROOT) if out.is_relative_to(PROJECT_ROOT) else out
    rebuild = ["python", "-m", "mbv2.summary", "grid", str(sweep_dir), "--rows", rows,
               "--cols", cols, "--out", str(shown)]
    rebuild += (["--seed-key", seed_key] if seed_key != SEED_KEY else []) + \
        (["--planned", str(planned)] if planned else []) + (["--title", given_title] if given_title else [])
    text = study_markdown(grid, title, command or reproduce_command(jobs), shlex.join(rebuild),
                          png.name if drawn else None, _notes(md, grid))
    md.write_text(text, encoding="utf-8")
    return {"md": md, "png": png if drawn else None, "grid": grid}


class StudyReport(Callback):
    """Hydra callback (hydra.callbacks in experiments/study_*.yaml): at the multirun's end,
    the report as `out`.md/.png (relative to the project root). Hydra calls it before
    SweepEnd (on_multirun_end goes in reverse), so a sweep with failed jobs gets one too."""

    def __init__(self, out: str, rows: str = "model.scale", cols: str = "optim.lr",
                 seed_key: str = SEED_KEY, title: str | None = None) -> None:
        self.out, self.rows, self.cols, self.seed_key, self.title = out, rows, cols, seed_key, title

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from mbv2.config import PROJECT_ROOT

        task = list(config.hydra.overrides.task)  # the command line: its hydra.* ones apart
        given = [*task, *(config.hydra.overrides.get("hydra") or [])]
        try:
            result = write_study_report(
                Path(str(config.hydra.sweep.dir)), PROJECT_ROOT / self.out, self.rows, self.cols,
                self.seed_key, planned_runs(config.hydra.sweeper.get("params"), task),
                shlex.join(["python", "-m", "mbv2.run", *given]), self.title)
        except Exception as exc:  # noqa: BLE001 - a report must not hide the sweep's outcome
            log.error("study report not written: %s: %s", type(exc).__name__, exc)
            return
        line = "study report: " + ", ".join(str(p) for p in (result["md"], result["png"]) if p)
        log.info(line)
        print(line, flush=True)
