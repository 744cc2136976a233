"""Class-folder trees: `root/train/<class>/*` + `root/val/<class>/*`, or `root/<class>/*`
split per class by a seeded, stratified split. Folder names are the class names (sorted,
or in `data.classes` order); empty, missing or mismatched class folders fail at once."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mbv2.data.errors import IMAGE_EXTENSIONS, DataError


def _image_files(class_dir: Path) -> list[Path]:
    """The image files directly in `class_dir`, by extension (any case), sorted."""
    return sorted(p for p in class_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_class_folders(split_dir: Path, classes: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """class name -> sorted image files of `split_dir/<class>/`; only `classes` when given."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such directory; data=folder expects "
                        f"data.root/train/<class>/* and data.root/val/<class>/*, "
                        f"or data.root/<class>/* split by data.val_fraction")
    if classes is not None:
        missing = [c for c in classes if not (split_dir / c).is_dir()]
        if missing:
            raise DataError(f"{split_dir}: no folder for data.classes {missing}")
        return {c: _image_files(split_dir / c) for c in classes}
    found = {d.name: _image_files(d) for d in sorted(p for p in split_dir.iterdir() if p.is_dir())}
    if not found:
        raise DataError(f"{split_dir}: no class folders; put images in {split_dir}/<class>/")
    return found


def _require_images(where: Path, classes: dict[str, list[Path]]) -> None:
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise DataError(f"{where}: class folders without images: {empty} "
                        f"(looked for {', '.join(IMAGE_EXTENSIONS)}); add images or "
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


def _paired_splits(root: Path, classes: Sequence[str] | None
                   ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """root/train + root/val, with the same class folders, none empty."""
    train = scan_class_folders(root / "train", classes)
    val = scan_class_folders(root / "val", classes)
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
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r}: no such directory")
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        present, absent = ("train", "val") if has_train else ("val", "train")
        raise DataError(f"{root}: has {present}/ but no {absent}/; add {root / absent}/<class>/ "
                        f"or move the class folders up to {root}/<class>/ to split by "
                        f"data.val_fraction")
    if has_train:
        train, val = _paired_splits(root, classes)
    else:
        every = scan_class_folders(root, classes)
        _require_images(root, every)
        train, val = stratified_split(every, val_fraction, seed, root)
    names = list(classes) if classes is not None else sorted(train)
    return names, train, val
