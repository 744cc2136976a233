"""Checks over the labelled samples of a file source, made before anything is built.

A class count inferred from one typo'd label (`img.png 99999999`: 100,000,000 classes)
stops with the file and line of that label. Data that is legal but most likely a mistake
is one WARNING line each, naming files, lines and counts: an image listed twice in a split,
the same image in train and val, label ids no image uses, a single class, a class name
given twice. Paths are compared as written (normalized), without touching the disk."""
from __future__ import annotations

import logging
import os
from collections import defaultdict

from mbv2.data.errors import MAX_EXAMPLES, MAX_INFERRED_CLASSES, DataError, examples

log = logging.getLogger(__name__)

# split name -> (samples, their origins `file:line` or None)
Splits = dict[str, tuple[list[tuple[str, int]], list[str] | None]]


def _file_of(origins: list[str] | None) -> str:
    """The list file a split was read from, or '' for a folder tree."""
    return f" {origins[0].rsplit(':', 1)[0]}" if origins else ""


def _ids(ids: list[int]) -> str:
    return f"{ids[:10]}{'...' if len(ids) > 10 else ''}"


def inferred_class_count(splits: Splits) -> int:
    """The class count when neither data.num_classes nor data.class_names is given: the
    largest label + 1, unless that makes far more classes than distinct labels are used
    (more than max(2 x distinct, distinct + 100), or over MAX_INFERRED_CLASSES): then the
    label is most likely a typo, and nothing is built."""
    top, where = -1, ""
    used: set[int] = set()
    for samples, origins in splits.values():
        for i, (path, label) in enumerate(samples):
            used.add(label)
            if label > top:
                top, where = label, origins[i] if origins else path
    count, distinct = top + 1, len(used)
    if count > MAX_INFERRED_CLASSES or count > max(2 * distinct, distinct + 100):
        raise DataError(f"{where}: label {top} would make {count} classes (with neither "
                        f"data.num_classes nor data.class_names set, the class count is the "
                        f"largest label + 1) but the lists use only {distinct} distinct "
                        f"label(s); if {top} is a typo fix that line, else set "
                        f"data.num_classes=<K> or data.class_names=<file naming every class>")
    return count


def warn_duplicates(splits: Splits) -> None:
    """One warning per split that lists an image more than once."""
    for split, (samples, origins) in splits.items():
        seen: dict[str, list[int]] = defaultdict(list)
        for i, (path, _) in enumerate(samples):
            seen[os.path.normpath(path)].append(i)
        repeated = [idx for idx in seen.values() if len(idx) > 1]
        if not repeated:
            continue
        relabelled = sum(len({samples[i][1] for i in idx}) > 1 for idx in repeated)
        shown = []
        for idx in repeated[:MAX_EXAMPLES]:
            lines = ", ".join(origins[i].rsplit(":", 1)[1] for i in idx[:5]) if origins else ""
            labels = sorted({samples[i][1] for i in idx})
            shown.append(f"{samples[idx[0]][0]}{f' on lines {lines}' if lines else ''}"
                         f"{f' (labels {labels})' if len(labels) > 1 else ''}")
        conflict = f", {relabelled} of them with different labels" if relabelled else ""
        log.warning("%s list%s: %d image(s) listed more than once%s; every copy is one more "
                    "sample an epoch: %s", split, _file_of(origins), len(repeated), conflict,
                    examples(shown, len(repeated)))


def warn_train_val_overlap(splits: Splits) -> None:
    """One warning when val holds images that train holds too."""
    (train, train_origins), (val, val_origins) = splits["train"], splits["val"]
    in_train = {os.path.normpath(path) for path, _ in train}
    both = sorted({os.path.normpath(path) for path, _ in val} & in_train)
    if both:
        log.warning("%d image(s) are in both train%s and val%s, so val accuracy is partly "
                    "measured on training images; remove them from one split: %s",
                    len(both), _file_of(train_origins), _file_of(val_origins), examples(both))


def warn_label_gaps(splits: Splits, class_names: list[str], inferred: bool) -> None:
    """One warning when some class ids have no image in train or val."""
    used = {label for samples, _ in splits.values() for _, label in samples}
    missing = [i for i in range(len(class_names)) if i not in used]
    if not missing:
        return
    if inferred:
        hint = (" (labels look 1-based; class ids start at 0)" if missing == [0] else
                "; renumber the labels 0..K-1 without gaps, or name every class with "
                "data.class_names")
        log.warning("label ids %s are used by no image: the class count %d is the largest "
                    "label + 1, so %d of the head's outputs are never trained%s",
                    _ids(missing), len(class_names), len(missing), hint)
    else:
        log.warning("classes %s (ids %s) have no images in train or val; their outputs are "
                    "never trained", examples([repr(class_names[i]) for i in missing]), _ids(missing))


def warn_repeated_names(class_names: list[str], where: str) -> None:
    """One warning when two class ids share a name: predictions could not tell them apart."""
    ids: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(class_names):
        ids[name].append(i)
    repeated = [f"{name!r} (ids {', '.join(map(str, i))})" for name, i in ids.items() if len(i) > 1]
    if repeated:
        log.warning("%s: %d class name(s) given to more than one id, so predictions cannot "
                    "tell those classes apart: %s", where, len(repeated), examples(repeated))


def warn_single_class(class_names: list[str], source: str) -> None:
    if len(class_names) == 1:
        log.warning("data %s has a single class (%r): top-1 accuracy is trivially 1.0 and "
                    "there is nothing to learn; a classifier needs at least 2 classes",
                    source, class_names[0])
