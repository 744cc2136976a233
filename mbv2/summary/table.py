"""The summary's two tables: summary.csv (plain numbers) and the aligned Markdown table.

The CSV is for pandas or a spreadsheet: percent and millions of MACs as numbers, empty
cells where a job does not say. The Markdown table is padded so the same text reads
aligned on a terminal; long error messages are cut there, never in the CSV.
"""
from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mbv2.summary.jobs import JobRow

_STATUS_WIDTH = 60  # error messages beyond this are cut in the aligned table, not the CSV

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


def write_csv(rows: Iterable[JobRow], path: Path) -> None:
    """summary.csv: a header of CSV_COLUMNS, then one record per row."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(_csv_record(row) for row in rows)


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
