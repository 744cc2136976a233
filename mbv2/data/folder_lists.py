"""Folder tree -> PaddleClas label lists (`python -m mbv2.data lists <root> <out_dir>`):
the split of data=folder written out in the format data=list reads back."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from mbv2.data.folders import folder_splits
from mbv2.data.lists import resolve_delimiter

log = logging.getLogger(__name__)


def write_label_lists(root: str | Path, out_dir: str | Path, val_fraction: float = 0.2,
                      seed: int = 0, classes: Sequence[str] | None = None,
                      delimiter: str = " ") -> dict[str, Path]:
    """PaddleClas lists for a folder tree: train_list.txt and val_list.txt (`path label`,
    paths relative to `root`) and label_list.txt (`id name`, PaddleClas's
    class_id_map_file). Uses root/train + root/val when present, else the same seeded,
    stratified split as data=folder with this val_fraction and seed (data.split_seed)."""
    root, out_dir = Path(root).expanduser(), Path(out_dir).expanduser()
    delimiter = resolve_delimiter(delimiter)
    names, train, val = folder_splits(root, classes, val_fraction, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, per_class in (("train", train), ("val", val)):
        rows = [(p.relative_to(root).as_posix(), i) for i, c in enumerate(names) for p in per_class[c]]
        if delimiter == " " and any(" " in p for p, _ in rows):
            log.warning("some paths contain spaces; PaddleClas splits them wrongly with a space "
                        "delimiter: use delimiter='\\t' (and data.delimiter='\\t')")
        written[split] = out_dir / f"{split}_list.txt"
        written[split].write_text("".join(f"{p}{delimiter}{i}\n" for p, i in rows), encoding="utf-8")
    written["labels"] = out_dir / "label_list.txt"
    written["labels"].write_text("".join(f"{i} {n}\n" for i, n in enumerate(names)), encoding="utf-8")
    return written
