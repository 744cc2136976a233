"""The weights a run keeps: `last`, `best` and the top-k epochs, each enough to resume.

Layout of `<run dir>/checkpoints/`:

* `<name>.pdckpt` - the checkpoint: one file of arrays and JSON (`ckptfile`: reading it
  runs no code) holding model weights, optimizer and LR-schedule state, EMA weights,
  epoch, global step, metrics, RNG states and the tracker's history. Resume, eval, predict
  and export read this file. Being one file, it is replaced in one `os.replace`, so a crash
  mid-save leaves the previous `last` intact (timm's CheckpointSaver does the same with
  one `.pth.tar`). `last`'s three files are all written under temporary names before any
  is renamed into place, so a save that fails (disk full, quota, read-only) changes nothing
  and says so (CheckpointSaveError: the file, what is kept, how to continue).
* `<name>.pdparams` + `<name>.pdopt` - the same weights and optimizer state in the layout
  `paddle.Model.save` writes, for `paddle.Model.load` and `model.pretrained=`.

Names: `last` (every epoch), `best` (highest `eval/acc_top1`), `epoch_NNNN` (the
`trainer.keep_top_k` epochs with the highest `eval/acc_top1`). `best` and `epoch_NNNN` are
hard links to the files `last` had at that epoch, so they cost no disk space or time.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from mbv2.files import replace_atomic, replace_together
from mbv2.train import ckptfile

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CKPT_SUFFIX = ".pdckpt"
SUFFIXES = (CKPT_SUFFIX, ".pdparams", ".pdopt")
FORMAT_VERSION = ckptfile.FORMAT_VERSION
METRIC = "eval/acc_top1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the path."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint that could not be written (disk full, quota, read-only file system);
    the message names the file, what the run dir still holds and how to continue."""


# -- files ------------------------------------------------------------------------------
def _link_or_copy(src: Path, tmp: Path) -> None:
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this file system
        shutil.copy2(src, tmp)


def _publish(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src` (hard link; a copy where links are unsupported)."""
    replace_atomic(dst, lambda tmp: _link_or_copy(src, tmp))


def _remove(prefix: Path) -> None:
    for suffix in SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            Path(str(prefix) + suffix).unlink()


def _epoch_of(path: Path) -> int:
    return int(path.name[len("epoch_"):-len(CKPT_SUFFIX)])


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def resolve_checkpoint(path: str | Path, name: str = "last") -> Path:
    """The `.pdckpt` file meant by `path`: a run dir (its `checkpoints/<name>`), a
    checkpoints dir, a `.pdckpt` file, a prefix like `checkpoints/best`, or the
    `.pdparams`/`.pdopt` beside a `.pdckpt`."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        ckdir = p / CHECKPOINT_DIR if (p / CHECKPOINT_DIR).is_dir() else p
        candidate = ckdir / f"{name}{CKPT_SUFFIX}"
        if candidate.is_file():
            return candidate
        found = sorted(x.name for x in ckdir.glob(f"*{CKPT_SUFFIX}"))
        raise CheckpointError(
            f"{p}: no {candidate.relative_to(p) if ckdir != p else candidate.name} there "
            f"(checkpoints found: {found or 'none'}); give a run dir whose run saved at least "
            f"one epoch, or a .pdckpt file")
    if p.suffix == CKPT_SUFFIX and p.is_file():
        return p
    if p.suffix in (".pdparams", ".pdopt"):
        p = p.with_suffix("")
    if Path(str(p) + CKPT_SUFFIX).is_file():
        return Path(str(p) + CKPT_SUFFIX)
    raise CheckpointError(f"{path}: no such checkpoint; give a run dir, "
                          f"<run dir>/checkpoints/<last|best|epoch_NNNN>{CKPT_SUFFIX}")


def run_dir_of(ckpt: Path) -> Path:
    """The run dir a checkpoint file belongs to (`<run dir>/checkpoints/x.pdckpt`)."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else ckpt.parent


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a `.pdckpt`; a damaged or truncated file raises CheckpointError naming it."""
    path = Path(path)
    try:
        ckpt = ckptfile.read_checkpoint(path)
    except PermissionError as e:  # an earlier pickle checkpoint, not trusted
        raise CheckpointError(str(e)) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # numpy/zip/json raise many types for a damaged file
        others = sorted(x.name for x in path.parent.glob(f"*{CKPT_SUFFIX}") if x != path)
        raise CheckpointError(
            f"{path}: cannot read this checkpoint, it is damaged or truncated "
            f"({type(e).__name__}: {str(e)[:200]}). Use another checkpoint of the run "
            f"({', '.join(others) or 'none left'}) or retrain") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"{path}: not an mbv2 checkpoint (no model/meta entries); "
                              f"a plain .pdparams file loads with model.pretrained=")
    if ckpt.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer mbv2 (format {ckpt['format']}); "
                              f"update mbv2 to read it")
    return ckpt


# -- RNG --------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every RNG the training loop draws from, as numbers (see `ckptfile`)."""
    return ckptfile.capture_rng()


def restore_rng(state: dict[str, Any]) -> None:
    if isinstance(state.get("paddle"), str):  # an earlier, trusted pickle checkpoint
        random.setstate(_as_tuple(state["python"]))
        np.random.set_state(_as_tuple(state["numpy"]))
        paddle.set_rng_state(pickle.loads(bytes.fromhex(state["paddle"])))
        return
    ckptfile.restore_rng(state)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x


# -- the run's checkpoints ----------------------------------------------------------------
class Checkpointer:
    """Writes `last` every epoch, `best` and `epoch_NNNN` (top-k by eval/acc_top1)."""

    def __init__(self, run_dir: str | Path, keep_top_k: int = 3, write: bool = True):
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.write = write  # False on ranks > 0 of a data-parallel run: rank 0 saves
        self.keep_top_k = int(keep_top_k)
        self.top_k: list[tuple[float, int]] = []  # (metric, epoch), best first
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"top_k": [list(x) for x in self.top_k], "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "keep_top_k": self.keep_top_k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.top_k = [(float(m), int(e)) for m, e in state.get("top_k", [])]
        self.best_metric, self.best_epoch = state.get("best_metric"), state.get("best_epoch")
        if len(self.top_k) > self.keep_top_k:  # trainer.keep_top_k lowered on resume
            self.top_k = self.top_k[: self.keep_top_k]

    def save(self, model: paddle.Model, epoch: int, global_step: int, metric: float | None,
             extra: dict[str, Any]) -> Path:
        """Checkpoint the end of 1-based `epoch`; `metric` is its eval/acc_top1 or None
        when the epoch was not evaluated. `extra` (RNG, tracker, EMA) goes into the file."""
        before = (list(self.top_k), self.best_metric, self.best_epoch)
        is_best = metric is not None and (self.best_metric is None or metric > self.best_metric)
        if is_best:
            self.best_metric, self.best_epoch = float(metric), epoch
        dropped: list[int] = []
        if metric is not None and self.keep_top_k > 0:
            # better metric first; on a tie the earlier epoch stays (it got there first)
            ranked = sorted(self.top_k + [(float(metric), epoch)], key=lambda x: (-x[0], x[1]))
            dropped = [e for _, e in ranked[self.keep_top_k:]]
            self.top_k = ranked[: self.keep_top_k]
        last = self.dir / "last"
        if not self.write:
            return Path(str(last) + CKPT_SUFFIX)
        ckpt = {"format": FORMAT_VERSION, "model": model.network.state_dict(),
                "optimizer": model._optimizer.state_dict(),
                "meta": {"epoch": epoch, "global_step": global_step, METRIC: metric,
                         "checkpointer": self.state_dict()},
                **extra}
        try:
            self._write_last(ckpt, last)
        except OSError as e:  # nothing of this epoch was published: the bookkeeping goes back
            self.top_k, self.best_metric, self.best_epoch = before
            raise self._save_error(e, epoch, committed=False) from e
        try:
            if any(e == epoch for _, e in self.top_k):
                self._publish_all(last, self.dir / epoch_name(epoch))
            if is_best:
                self._publish_all(last, self.dir / "best")
                log.info("checkpoint: best %s %.4f at epoch %d -> %s", METRIC, metric, epoch,
                         self.dir / f"best{CKPT_SUFFIX}")
            for e in dropped:
                _remove(self.dir / epoch_name(e))
        except OSError as e:  # `last` is this epoch's; resume re-links best and the epoch file
            raise self._save_error(e, epoch, committed=True) from e
        return Path(str(last) + CKPT_SUFFIX)

    @staticmethod
    def _write_last(ckpt: dict[str, Any], last: Path) -> None:
        """`last`'s three files, all or none: each written (and fsynced) under a temporary
        name first, so a write that fails (disk full, quota) leaves the previous `last`
        whole, the three files of one epoch. Only then the renames, which need no space:
        the .pdparams/.pdopt copies, then the .pdckpt, the file resume reads, as the
        commit point (a kill between the renames leaves copies one epoch ahead of it,
        which the next save replaces)."""
        file = {suffix: Path(str(last) + suffix) for suffix in SUFFIXES}
        replace_together({file[".pdparams"]: lambda tmp: paddle.save(ckpt["model"], str(tmp)),
                          file[".pdopt"]: lambda tmp: paddle.save(ckpt["optimizer"], str(tmp)),
                          file[CKPT_SUFFIX]: lambda tmp: ckptfile.save_checkpoint(ckpt, tmp)},
                         fsync=True)

    def _save_error(self, e: OSError, epoch: int, committed: bool) -> CheckpointSaveError:
        path = e.filename or self.dir
        why = e.strerror or str(e)
        run_dir = self.dir.parent
        if committed:
            held = (f"last{CKPT_SUFFIX} holds epoch {epoch}, but its best/epoch_NNNN links "
                    f"were not all made (a resume makes them)")
        elif Path(str(self.dir / "last") + CKPT_SUFFIX).is_file():
            held = (f"the checkpoints there are as they were before epoch {epoch} "
                    f"(last{CKPT_SUFFIX} is the previous epoch's, whole)")
        else:
            return CheckpointSaveError(
                f"{path}: could not write the epoch {epoch} checkpoint: {why}; the run saved "
                f"no checkpoint, so there is nothing to resume. Free space on that file system "
                f"(or lift the quota / make it writable) and run the same command again")
        return CheckpointSaveError(
            f"{path}: could not write the epoch {epoch} checkpoint: {why}; {held}. Free space "
            f"on that file system (or lift the quota / make it writable) and continue with "
            f"`python -m mbv2.run trainer.resume={run_dir}`")

    def reconcile(self, resumed_from: Path, epoch: int) -> Path | None:
        """After resume: make the files agree with the bookkeeping of the checkpoint
        resumed from. Resumed from an earlier checkpoint than `last`, the later state
        (`last`, later epochs, a later `best`) is moved to `checkpoints/superseded-<time>/`,
        never deleted, and that dir is returned. Epoch files the top-k policy had dropped
        (a kill between saving and pruning) are removed, an epoch file the kill left
        unwritten is published, and `best` is re-pointed at its epoch."""
        if not self.write:
            return None
        from_last = Path(resumed_from).with_suffix("") == self.dir / "last"
        aside = None if from_last else self._set_aside_later(epoch)
        keep = {e for _, e in self.top_k}
        own = self.dir / epoch_name(epoch)
        if epoch in keep and not Path(str(own) + CKPT_SUFFIX).is_file() and from_last:
            self._publish_all(self.dir / "last", own)
        for f in self.dir.glob(f"epoch_*{CKPT_SUFFIX}"):
            if _epoch_of(f) not in keep:
                _remove(f.with_suffix(""))
        best = self.dir / epoch_name(self.best_epoch) if self.best_epoch else None
        if best is not None and Path(str(best) + CKPT_SUFFIX).is_file():
            self._publish_all(best, self.dir / "best")
        return aside

    def _set_aside_later(self, epoch: int) -> Path | None:
        """`last`, `best` and the epoch files after `epoch` into a superseded dir."""
        import time

        epochs = [f.with_suffix("") for f in self.dir.glob(f"epoch_*{CKPT_SUFFIX}") if _epoch_of(f) > epoch]
        later = epochs + [self.dir / n for n in ("last", "best")
                          if Path(str(self.dir / n) + CKPT_SUFFIX).is_file()]
        if not later:
            return None
        aside = self.dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True, exist_ok=True)
        for prefix in later:
            for suffix in SUFFIXES:
                src = Path(str(prefix) + suffix)
                if src.is_file():
                    _publish(src, aside / src.name)  # a hard link: the files stay where they are
        log.warning("resume from epoch %d: the run's later checkpoints (last, best, %d epoch "
                    "file(s)) are kept in %s; delete that dir when you no longer need them",
                    epoch, len(epochs), aside)
        return aside

    @staticmethod
    def _publish_all(src: Path, dst: Path) -> None:
        """`dst.*` as the same files as `src.*`. A process killed between writing `last`'s
        .pdckpt (what resume reads) and its .pdparams/.pdopt copies leaves those missing:
        they are skipped here and written again with the next epoch."""
        for suffix in SUFFIXES:
            source = Path(str(src) + suffix)
            if source.is_file() or suffix == CKPT_SUFFIX:
                _publish(source, Path(str(dst) + suffix))
            else:
                log.warning("checkpoint: %s is missing (a save was cut short); %s%s not written",
                            source, dst, suffix)
