"""One table and one plot for a sweep: `python -m mbv2.summary <dir> [--sort KEY] [--no-plot]`.

A width x LR sweep leaves one Hydra job directory per run; opening metrics.json files one
at a time shows neither which width/LR wins, nor which jobs failed, nor the trade-off of
accuracy against compute. This package reads every job directory below a sweep or outputs
dir (finished, running, failed or never started) and writes into that dir:

- summary.csv: one row per job, every setting and result, plain numbers, for pandas;
- summary.md: a heading naming the dir, the data and what varies; the settings all jobs
  share, once; an aligned table (also printed) with a column only for the settings that
  vary; job counts; a warning when the jobs trained on different data (also on stderr);
- summary.png: best top-1 against MACs per completed job, with its Pareto front, ties
  spread apart, one marker shape per data group when the data differ.

It runs while a sweep is still training, so it tolerates half-written metrics.json files,
configs with interpolations it cannot resolve (Hydra's or mbv2's own resolvers), and jobs
that never wrote anything. It imports no paddle, and matplotlib only when it plots, so it
answers in well under a second.

Modules: jobs (reading job dirs into JobRows, sorting them), study (what the jobs share,
what varies, whether their data differ; the headline), table (summary.csv and the aligned
table), plot (summary.png, the Pareto front, ties), report (summary.md, write_summary,
the command line), grid (a study's rows x cols table over seeds, e.g. width x LR, and its
plot: `python -m mbv2.summary grid <sweep dir> --rows model.scale --cols optim.lr --out
PREFIX`, and the StudyReport Hydra callback that writes it when a study's multirun ends).
"""
from mbv2.summary.jobs import (
    COMPLETED,
    CONFIG_FILE,
    FAILED,
    METRICS_FILE,
    NO_METRICS,
    OPTUNA_FILE,
    OVERRIDES_FILE,
    RUNNING,
    SETTING_KEYS,
    SORT_CHOICES,
    SORT_KEYS,
    UNREADABLE,
    JobRow,
    NoJobsError,
    collect,
    sort_rows,
)
from mbv2.summary.grid import (
    SEED_KEY,
    StudyGrid,
    StudyReport,
    build_grid,
    format_grid_table,
    plot_grid,
    write_study_report,
)
from mbv2.summary.plot import (
    TIE_STEP,
    marker_positions,
    pareto_front,
    plot_summary,
    tie_offsets,
)
from mbv2.summary.report import CSV_NAME, MD_NAME, PNG_NAME, grid_main, main, write_summary
from mbv2.summary.study import DATA_KEYS, SETTING_LABELS, Study, describe, where_name
from mbv2.summary.table import CSV_COLUMNS, TABLE_COLUMNS, format_table

__all__ = [
    "COMPLETED",
    "CONFIG_FILE",
    "CSV_COLUMNS",
    "CSV_NAME",
    "DATA_KEYS",
    "FAILED",
    "MD_NAME",
    "METRICS_FILE",
    "NO_METRICS",
    "OPTUNA_FILE",
    "OVERRIDES_FILE",
    "PNG_NAME",
    "RUNNING",
    "SEED_KEY",
    "SETTING_KEYS",
    "SETTING_LABELS",
    "SORT_CHOICES",
    "SORT_KEYS",
    "TABLE_COLUMNS",
    "TIE_STEP",
    "UNREADABLE",
    "JobRow",
    "NoJobsError",
    "Study",
    "StudyGrid",
    "StudyReport",
    "build_grid",
    "collect",
    "describe",
    "format_grid_table",
    "format_table",
    "grid_main",
    "main",
    "marker_positions",
    "pareto_front",
    "plot_grid",
    "plot_summary",
    "sort_rows",
    "tie_offsets",
    "where_name",
    "write_study_report",
    "write_summary",
]
