"""summary.png: best top-1 against MACs per completed job, with its Pareto front.

Jobs that land on the same point (the same width, so the same MACs, and the same top-1)
would hide each other: tie_offsets spreads them side by side in log-MACs and one label
says how many are there. The Pareto front is computed and drawn on the true values.
Jobs trained on different data (mbv2.summary.study) get one marker shape and one front
per data group. The title names the dir, the data, what varies and the number of runs.

matplotlib is imported only when a plot is drawn (see plot_summary).
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mbv2.summary.jobs import FINISHED, JobRow, sort_rows
from mbv2.summary.study import Study, describe

TIE_STEP = 0.02  # decades of MACs between neighbouring tied markers (about 5 %)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per data group
_FRONT_STYLES = ("--", ":", "-.")
_TITLE_WIDTH = 80  # characters per title line


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


def _tie_key(x: float, y: float) -> tuple[float, float]:
    """Points with one key coincide on the plot: x within ~2 %, y within 0.1."""
    return round(math.log10(x), 2), round(y, 1)


def tie_offsets(points: Sequence[tuple[float, float]], step: float = TIE_STEP) -> list[float]:
    """Offsets in log10(x) that set coinciding (x, y) points (x > 0) side by side.

    n points that coincide get offsets step apart, centred on 0 (the true x); a point that
    coincides with none gets 0.0. The result depends only on the points and their order.
    """
    members: dict[tuple[float, float], list[int]] = {}
    for i, (x, y) in enumerate(points):
        members.setdefault(_tie_key(x, y), []).append(i)
    offsets = [0.0] * len(points)
    for indices in members.values():
        for rank, i in enumerate(indices):
            offsets[i] = (rank - (len(indices) - 1) / 2) * step
    return offsets


def _true(row: JobRow) -> tuple[float, float]:
    """(MACs in millions, best top-1 in %) as the job reported them."""
    return row.macs / 1e6, row.best_top1 * 100


def _plotted(rows: Iterable[JobRow]) -> list[JobRow]:
    """Completed jobs with MACs and accuracy, cheapest first, then by accuracy and LR."""
    done = [
        r for r in rows if r.status in FINISHED and r.best_top1 is not None and (r.macs or 0) > 0
    ]
    return sorted(sort_rows(done, "job"), key=lambda r: (*_true(r), r.lr is None, r.lr or 0.0))


def marker_positions(rows: Iterable[JobRow]) -> dict[str, tuple[float, float]]:
    """job -> (MACs in millions, top-1 in %) where its marker is drawn: the true values,
    with x moved by tie_offsets where markers would coincide. Completed jobs only."""
    done = _plotted(rows)
    offsets = tie_offsets([_true(r) for r in done])
    return {r.job: (_true(r)[0] * 10**o, _true(r)[1]) for r, o in zip(done, offsets)}


def _lr_label(lr: float | None) -> str:
    return "lr=?" if lr is None else f"lr={lr:g}"


def _by_group(done: Sequence[JobRow], study: Study) -> dict[str, list[JobRow]]:
    """Data group label ('' when all jobs share their data) -> its jobs, in order."""
    groups: dict[str, list[JobRow]] = {}
    for row in done:
        groups.setdefault(study.group(row), []).append(row)
    return groups


def _draw_points(ax: Any, done: Sequence[JobRow], study: Study) -> None:
    """One series per LR (a colour; a line when there are several) and data group (a
    marker shape), at marker_positions."""
    positions = marker_positions(done)
    lrs = sorted({r.lr for r in done}, key=lambda lr: (lr is None, lr or 0.0))
    several = len(lrs) > 1
    for g, (group, members) in enumerate(_by_group(done, study).items()):
        for i, lr in enumerate(lrs):
            series = [r for r in members if r.lr == lr]
            if not series:
                continue
            label = _lr_label(lr) if several else f"completed jobs ({_lr_label(lr)})"
            ax.plot(
                [positions[r.job][0] for r in series],
                [positions[r.job][1] for r in series],
                marker=_MARKERS[g % len(_MARKERS)],
                color=f"C{i % 10}",
                linestyle="-" if several else "none",
                markeredgecolor="white",
                alpha=0.85,
                label=f"{label}, {group}" if group else label,
            )


def _draw_labels(ax: Any, done: Sequence[JobRow]) -> None:
    """Each point's width (x0.5); one label per tie, above its true place, with the count."""
    ties: dict[tuple[float, float], list[JobRow]] = {}
    for row in done:
        ties.setdefault(_tie_key(*_true(row)), []).append(row)
    positions = marker_positions(done)
    for members in ties.values():
        scales = sorted({r.scale for r in members if r.scale is not None})
        text = "/".join(f"x{s:g}" for s in scales)
        if len(members) == 1:
            if text:
                where = positions[members[0].job]
                ax.annotate(text, where, xytext=(4, 4), textcoords="offset points", fontsize=8)
            continue
        text = f"{text} ({len(members)} tied)".strip()
        ax.annotate(
            text, _true(members[0]), xytext=(0, 7), textcoords="offset points",
            fontsize=8, ha="center", va="bottom",
        )


def _draw_fronts(ax: Any, done: Sequence[JobRow], study: Study) -> None:
    """The Pareto front of each data group, on the true values, as a step line."""
    for g, (group, members) in enumerate(_by_group(done, study).items()):
        front = pareto_front(_true(r) for r in members)
        fx, fy = [p[0] for p in front], [p[1] for p in front]
        largest = max(_true(r)[0] for r in members)
        if largest > fx[-1]:  # the best accuracy stays the front up to the largest budget
            fx.append(largest)
            fy.append(fy[-1])
        ax.step(
            fx, fy, where="post", color="k", linewidth=1.2,
            linestyle=_FRONT_STYLES[g % len(_FRONT_STYLES)],
            label=f"Pareto front ({group})" if group else "Pareto front",
        )


def _style_axes(ax: Any, done: Sequence[JobRow], study: Study) -> None:
    from matplotlib.ticker import LogFormatter

    all_x = [_true(r)[0] for r in done]
    lo, hi = min(all_x), max(all_x)
    if hi < 2 * lo:  # at least a factor 3 in view, so tie offsets read as small
        centre = math.sqrt(lo * hi)
        ax.set_xlim(centre / 1.75, centre * 1.75)
    if hi > 10 * lo:
        ax.set_xscale("log")
        # plain numbers (6, 20, 80) instead of 6x10^0; minor ticks labelled when few
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("best top-1 accuracy (%)")
    counted = f"best top-1 vs MACs: {len(done)} completed of {len(study.rows)} runs plotted"
    ax.set_title(textwrap.fill(study.headline(), _TITLE_WIDTH) + "\n" + counted, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(y=0.1)  # room for the labels above the highest points
    entries = len(ax.get_legend_handles_labels()[1])
    ax.legend(loc="best", fontsize=8, ncols=2 if entries > 8 else 1)


def plot_summary(rows: Sequence[JobRow], path: Path, study: Study | None = None) -> bool:
    """Draw best top-1 against MACs for completed jobs into path; False if none has both.

    One series per LR when the jobs used several (a width sweep per LR reads as a curve),
    each point labelled with its width, and the Pareto front over all jobs as a step line
    (one per data group when the jobs trained on different data).
    """
    done = _plotted(rows)
    if not done:
        return False
    study = study or describe(rows)
    # Imported here: matplotlib costs more than the rest of the module to import, and
    # --no-plot or collect() never needs it. Figure without pyplot leaves no global state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    _draw_points(ax, done, study)
    _draw_labels(ax, done)
    _draw_fronts(ax, done, study)
    _style_axes(ax, done, study)
    fig.savefig(path)
    return True
