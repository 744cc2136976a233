"""`curves.png` in every run dir: loss, top-1 and LR per epoch, redrawn after each epoch, so
the run dir alone shows how training went (VisualDL shows the same per step).

A redraw costs ~70 ms (matplotlib's Agg, no pyplot, no tight_layout): `CurvesPlotter`
redraws after an epoch when `min_interval` seconds have passed since the last one (every
epoch of a real run; a few times in a run of sub-second epochs) and always at the end."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from mbv2.files import replace_atomic

log = logging.getLogger(__name__)


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(h["epoch"], h[key]) for h in history
              if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
    return [e for e, _ in points], [v for _, v in points]


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Train/eval loss, train/eval (and EMA) top-1 and the LR against the epoch; False
    (and a log line) when it cannot be drawn - a plot never stops a run."""
    if not history:
        return False
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        log.info("curves.png skipped: %s", e)
        return False
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    panels = ((axes[0], "loss", ("train_loss", "eval_loss", "eval_ema_loss")),
              (axes[1], "top-1", ("train_acc_top1", "eval_acc_top1", "eval_ema_acc_top1")),
              (axes[2], "learning rate", ("lr",)))
    for ax, name, keys in panels:
        for key in keys:
            epochs, values = _series(history, key)
            if values:
                ax.plot(epochs, values, marker="o", markersize=3, label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if name != "learning rate":
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.84, wspace=0.22)
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    return True


class CurvesPlotter:
    """Redraws `curves.png` from a run's history, at most every `min_interval` seconds
    unless asked for the final picture."""

    def __init__(self, path: Path, title: str, min_interval: float = 5.0):
        self.path, self.title, self.min_interval = path, title, min_interval
        self._drawn_at: float | None = None
        self._drawn_epochs = -1

    def update(self, history: Sequence[dict[str, Any]], final: bool = False) -> None:
        now = time.monotonic()
        due = self._drawn_at is None or now - self._drawn_at >= self.min_interval
        if len(history) == self._drawn_epochs or not (due or final):
            return
        try:
            plot_curves(history, self.path, self.title)
        except Exception as e:  # a plot must never stop a run
            log.warning("curves.png not drawn: %s: %s", type(e).__name__, e)
        self._drawn_at, self._drawn_epochs = time.monotonic(), len(history)
