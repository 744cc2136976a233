"""Class-folder trees: `root/train/<class>/*` + `root/val/<class>/*`, or `root/<class>/*`
split per class by a seeded, stratified split. Folder names are the class names (sorted,
or in `data.classes` order); empty, missing or mismatched class folders fail at once.
Names starting with '.' (.ipynb_checkpoints, macOS's ._photo.jpg) and tool folders
(__pycache__, __MACOSX) are neither classes nor images: skipped, in one INFO line."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mbv2.data.errors import IMAGE_EXTENSIONS, SYSTEM_DIRS, DataError, examples, require_directory

log = logging.getLogger(__name__)


def _hidden(entry: Path) -> bool:
    """Hidden (.ipynb_checkpoints, macOS's ._photo.jpg) or put there by a tool (__MACOSX)."""
    return entry.name.startswith(".") or entry.name in SYSTEM_DIRS


def _broken(entry: Path) -> bool:
    """A symbolic link to nothing, or a loop of links."""
    return entry.is_symlink() and not entry.exists()


def _visible(directory: Path, keep: Callable[[Path], bool], skipped: list[Path]) -> list[Path]:
    """The entries of `directory` that `keep` takes, sorted; hidden ones and broken links
    are added to `skipped` (the link test only for entries `keep` refused: it costs two
    more system calls a file)."""
    kept = []
    for entry in sorted(directory.iterdir()):
        if _hidden(entry):
            skipped.append(entry)
        elif keep(entry):
            kept.append(entry)
        elif _broken(entry):
            skipped.append(entry)
    return kept


def _is_image(entry: Path) -> bool:
    return entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file()


def _image_files(class_dir: Path, skipped: list[Path]) -> list[Path]:
    """The image files directly in `class_dir`, by extension (any case), sorted."""
    return _visible(class_dir, _is_image, skipped)


def _log_skipped(root: Path, skipped: list[Path]) -> None:
    """One INFO line for the hidden entries skipped, one WARNING line for broken links."""
    def named(paths: list[Path]) -> str:
        return examples([p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
                         for p in paths])
    hidden = [p for p in skipped if _hidden(p)]
    broken = [p for p in skipped if not _hidden(p)]
    if hidden:
        log.info("%s: skipped %d hidden or system entr%s (names starting with '.', or %s): %s",
                 root, len(hidden), "y" if len(hidden) == 1 else "ies", ", ".join(SYSTEM_DIRS[:2]),
                 named(hidden))
    if broken:
        log.warning("%s: skipped %d broken symbolic link(s) (missing target or a loop): %s",
                    root, len(broken), named(broken))


def scan_class_folders(split_dir: Path, classes: Sequence[str] | None = None,
                       skipped: list[Path] | None = None) -> dict[str, list[Path]]:
    """class name -> sorted image files of `split_dir/<class>/`; only `classes` when given.
    Hidden and system folders and files are skipped: added to `skipped`, or logged when
    it is None."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such directory; data=folder expects "
                        f"data.root/train/<class>/* and data.root/val/<class>/*, "
                        f"or data.root/<class>/* split by data.val_fraction")
    hidden: list[Path] = [] if skipped is None else skipped
    if classes is not None:
        missing = [c for c in classes if not (split_dir / c).is_dir()]
        if missing:
            raise DataError(f"{split_dir}: no folder for data.classes {missing}")
        found = {c: _image_files(split_dir / c, hidden) for c in classes}
    else:
        found = {d.name: _image_files(d, hidden) for d in _visible(split_dir, Path.is_dir, hidden)}
    if not found:
        here = [p.name for p in hidden if p.parent == split_dir]
        also = f" (only hidden ones or broken links: {examples(here)})" if here else ""
        raise DataError(f"{split_dir}: no class folders{also}; put images in {split_dir}/<class>/")
    if skipped is None:
        _log_skipped(split_dir, hidden)
    return found


def _require_images(where: Path, classes: dict[str, list[Path]]) -> None:
    empty = [c for c, files in classes.items() if not files]
    if empty:
        others = sorted(p.name + "/" * p.is_dir() for c in empty for p in (where / c).iterdir()
                        if not _hidden(p))
        found = f"; found only {examples(others)}" if others else ""
        raise DataError(f"{where}: class folders without images: {empty} "
                        f"(looked for {', '.join(IMAGE_EXTENSIONS)}{found}); add images or "
                        f"leave them out with data.classes=[...]")


def stratified_split(classes: dict[str, list[Path]], val_fraction: float, seed: int,
                     where: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per class, a seeded shuffle and round(n * val_fraction) files (at least one, and
    at least one left for training) to val; the same seed gives the same split.

    Not scikit-learn's `train_test_split(stratify=...)`: that one rounds the val share
    over the whole set and can leave a small class no val file, and its draws differ from
    these, so `mbv2.eval` of a run trained before would rebuild another val split - one
    holding that run's training images."""
    too_few = [f"{c} ({len(f)})" for c, f in classes.items() if len(f) < 2]
    if too_few:
        raise DataError(f"{where}: classes with fewer than 2 images cannot be split into "
                        f"train and val: {too_few}")
    rng = np.random.default_rng(seed)
    train, val = {}, {}
    for name, files in classes.items():
        order = rng.permutation(len(files))
        n_val = min(len(files) - 1, max(1, int(round(len(files) * val_fraction))))
        val[name] = sorted(files[i] for i in order[:n_val])
        train[name] = sorted(files[i] for i in order[n_val:])
    return train, val


def _paired_splits(root: Path, classes: Sequence[str] | None, skipped: list[Path]
                   ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """root/train + root/val, with the same class folders, none empty."""
    train = scan_class_folders(root / "train", classes, skipped)
    val = scan_class_folders(root / "val", classes, skipped)
    if set(train) != set(val):
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        raise DataError(f"{root}: train and val class folders differ "
                        f"(only in train: {only_train}, only in val: {only_val}); "
                        f"add the missing folders or pick classes with data.classes=[...]")
    _require_images(root / "train", train)
    _require_images(root / "val", val)
    return train, val


def folder_splits(root: Path, classes: Sequence[str] | None, val_fraction: float,
                  seed: int) -> tuple[list[str], dict[str, list[Path]], dict[str, list[Path]]]:
    """Class names and per-class train/val files of a folder tree: root/train + root/val
    when both exist, else root/<class>/* split by val_fraction."""
    root = require_directory("data.root", root, "the directory holding train/ and val/, or "
                             "one folder per class")
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        present, absent = ("train", "val") if has_train else ("val", "train")
        raise DataError(f"{root}: has {present}/ but no {absent}/; add {root / absent}/<class>/ "
                        f"or move the class folders up to {root}/<class>/ to split by "
                        f"data.val_fraction")
    skipped: list[Path] = []
    if has_train:
        train, val = _paired_splits(root, classes, skipped)
    else:
        every = scan_class_folders(root, classes, skipped)
        _require_images(root, every)
        train, val = stratified_split(every, val_fraction, seed, root)
    _log_skipped(root, skipped)
    names = list(classes) if classes is not None else sorted(train)
    return names, train, val
