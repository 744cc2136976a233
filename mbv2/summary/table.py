"""The summary's two tables: summary.csv (plain numbers) and the aligned Markdown table.

The CSV is for pandas or a spreadsheet: every setting and result of every job, percent
and millions of MACs as numbers, empty cells where a job does not say. The Markdown table
is for reading: a column for each setting that varies between the jobs (the shared ones
are listed once above it, see mbv2.summary.study), the job's dir name without the shared
overrides, and the results. It is padded so the same text reads aligned on a terminal;
long error messages and values are cut there, never in the CSV.
"""
from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mbv2.summary.jobs import JobRow
from mbv2.summary.study import SETTING_LABELS, Study, describe, format_setting

_STATUS_WIDTH = 60  # error messages beyond this are cut in the aligned table, not the CSV
_SETTING_WIDTH = 40  # likewise a long setting (a bottleneck list) in its column

# CSV columns after the original ones: the other settings, by the config key they hold
_CSV_SETTINGS = (
    ("weight_decay", "optim.weight_decay"),
    ("schedule", "sched.name"),
    ("batch_size", "trainer.batch_size"),
    ("bottleneck", "model.bottleneck"),
    ("data_name", "data.name"),
    ("image_size", "data.image_size"),
    ("num_classes", "data.num_classes"),
)

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
    "best_epoch",
    *(name for name, _ in _CSV_SETTINGS),
)

def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else fraction * 100


def _csv_setting(value: Any) -> Any:
    """Numbers and strings as they are; a list or mapping as compact JSON."""
    return format_setting(value) if isinstance(value, (list, dict)) else value


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
        "best_epoch": row.best_epoch,
        **{name: _csv_setting(row.settings.get(key)) for name, key in _CSV_SETTINGS},
    }


def write_csv(rows: Iterable[JobRow], path: Path) -> None:
    """summary.csv: a header of CSV_COLUMNS, then one record per row."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(_csv_record(row) for row in rows)



def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _epochs(row: JobRow) -> str:
    if row.epochs_completed is None and row.epochs_planned is None:
        return "-"
    counts = (row.epochs_completed, row.epochs_planned)
    return "/".join("?" if n is None else str(n) for n in counts)


Cell = Callable[[JobRow], str]

# The result columns every table has, after job, status and the varying settings:
# (header, right-aligned, cell)
_RESULT_COLUMNS: tuple[tuple[str, bool, Cell], ...] = (
    ("params", True, lambda r: _fmt(r.params, ",")),
    ("MACs (M)", True, lambda r: _fmt(None if r.macs is None else r.macs / 1e6, ".2f")),
    ("best top-1 (%)", True, lambda r: _fmt(_percent(r.best_top1), ".2f")),
    ("final top-1 (%)", True, lambda r: _fmt(_percent(r.final_top1), ".2f")),
    ("best epoch", True, lambda r: _fmt(r.best_epoch, "d")),
    ("epochs", True, _epochs),
    ("wall time (s)", True, lambda r: _fmt(r.wall_seconds, ".0f")),
    ("img/s", True, lambda r: _fmt(r.images_per_sec, ".1f")),
)
# (header, right-aligned) of the columns every aligned table has, in order; a column per
# varying setting (and one for overrides not shown otherwise) comes after status
TABLE_COLUMNS = (("job", False), ("status", False), *((h, r) for h, r, _ in _RESULT_COLUMNS))


def _setting_column(study: Study, key: str) -> tuple[str, bool, Cell]:
    """A varying setting's column: right-aligned when every value is a number."""
    values = [row.settings.get(key) for row in study.rows]
    numeric = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                  for v in values)

    def cell(row: JobRow) -> str:
        value = row.settings.get(key)
        return "-" if value is None else _cut(format_setting(value), _SETTING_WIDTH)

    return SETTING_LABELS.get(key, key), numeric, cell


def _columns(study: Study) -> list[tuple[str, bool, Cell]]:
    """job, [overrides], status, the varying settings, then the results."""
    columns: list[tuple[str, bool, Cell]] = [("job", False, study.name)]
    if any(study.overrides_cell(row) for row in study.rows):
        columns.append(("overrides", False, lambda r: study.overrides_cell(r) or "-"))
    columns.append(("status", False, lambda r: _cut(r.status_text, _STATUS_WIDTH)))
    columns += [_setting_column(study, key) for key in study.columns]
    return columns + list(_RESULT_COLUMNS)


def format_table(rows: Sequence[JobRow], study: Study | None = None) -> str:
    """A Markdown table padded so it also reads aligned as plain text on a terminal.

    Settings all rows share get no column (list study.shared_lines() above the table).
    """
    columns = _columns(study or describe(rows))
    header = [title for title, _, _ in columns]
    body = [[cell(row).replace("|", "\\|") for _, _, cell in columns] for row in rows]
    widths = [max(3, len(title), *(len(r[i]) for r in body)) for i, title in enumerate(header)]
    right = [align for _, align, _ in columns]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
        return "| " + " | ".join(padded) + " |"

    dashes = ("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right))
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])
