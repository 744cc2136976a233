"""summary.png: best top-1 against MACs per completed job, with its Pareto front.

matplotlib is imported only when a plot is drawn (see plot_summary).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from mbv2.summary.jobs import COMPLETED, JobRow


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
