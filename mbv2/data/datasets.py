"""Paddle data sets (files on disk, or arrays in memory), the bundle a source returns, and
the start-up scan that checks file sources before training.

The scan (`data.scan`) finds unreadable images and either lists them all in one error or
drops them (`data.on_bad_image`); splits left empty and classes with val but no train
images fail at once. A file that still fails to decode during training is replaced by the
next sample and recorded in the bad-image log, never ending the run."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from omegaconf import DictConfig
from paddle.io import Dataset
from PIL import Image

from mbv2.data.checks import Splits, warn_duplicates, warn_train_val_overlap
from mbv2.data.decode import BadImageLog, ImageDecoder
from mbv2.data.errors import MAX_CONSECUTIVE_BAD, DataError, examples, listed

log = logging.getLogger(__name__)


class ImageFileDataset(Dataset):
    """(path, label) pairs read from disk on demand. A file that fails to decode is
    recorded in `bad_log` and replaced by the next sample, so one file that went bad after
    the start-up scan costs one sample, not the run."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable,
                 decoder: ImageDecoder | None = None, bad_log: BadImageLog | None = None,
                 split: str = "train"):
        super().__init__()
        self.samples, self.transform = samples, transform
        self.decoder = decoder or ImageDecoder()
        self.bad_log, self.split = bad_log, split

    def __len__(self) -> int:
        return len(self.samples)

    def targets(self) -> np.ndarray:
        """Every sample's label, in order, without decoding an image."""
        return np.asarray([label for _, label in self.samples], dtype=np.int64)

    def __getitem__(self, idx: int):
        if self.bad_log is None:  # no log to count in: a bad file is an error
            path, label = self.samples[idx]
            return self.transform(self.decoder(path)), np.int64(label)
        for offset in range(min(MAX_CONSECUTIVE_BAD, len(self.samples))):
            path, label = self.samples[(idx + offset) % len(self.samples)]
            try:
                img = self.decoder(path)
            except DataError as e:
                self.bad_log.record(self.split, path, str(e))
                log.warning("skipped %s: %s", path, e)
                continue
            return self.transform(img), np.int64(label)
        raise DataError(f"{MAX_CONSECUTIVE_BAD} images in a row from {self.samples[idx][0]} on "
                        f"failed to decode; the data set looks broken (see {self.bad_log.path})")


class InMemoryDataset(Dataset):
    """uint8 HWC RGB images held in memory (small data sets)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        super().__init__()
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def targets(self) -> np.ndarray:
        return self.labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        return self.transform(Image.fromarray(self.images[idx])), self.labels[idx]


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    class_names: list[str]
    bad_images: BadImageLog | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def bad_image_counts(self) -> dict[str, int]:
        """For metrics.json: files dropped by the start-up scan, and distinct files that
        failed to decode later and were replaced by another sample."""
        entries = self.bad_images.entries() if self.bad_images else []
        return {"bad_images_skipped_at_scan": len({p for ph, p, _ in entries if ph == "scan"}),
                "bad_images_replaced": len({p for ph, p, _ in entries if ph != "scan"})}

    def bad_image_summary(self) -> str | None:
        """One log line when any image was skipped, else None."""
        counts = self.bad_image_counts()
        if not any(counts.values()):
            return None
        return (f"bad images: {counts['bad_images_skipped_at_scan']} skipped at the start-up scan, "
                f"{counts['bad_images_replaced']} replaced during training; files and reasons in "
                f"{self.bad_images.path}")


def scan_images(samples: Sequence[tuple[str, int]], decoder: ImageDecoder, full: bool,
                origins: Sequence[str] | None = None, threads: int | None = None) -> list[tuple[int, str]]:
    """(index, reason) of every unusable file. Threads, because the work is file reads
    and Pillow's C decoders, which release the GIL."""
    threads = threads or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(lambda s: decoder.check(s[0], full), samples))
    bad = [(i, r) for i, r in enumerate(reasons) if r is not None]
    if origins is not None:
        bad = [(i, f"{r} [{origins[i]}]") for i, r in bad]
    return bad


def _scan_splits(cfg: DictConfig, bad_log: BadImageLog, decoder: ImageDecoder,
                 splits: Splits) -> dict[str, list[tuple[str, int]]]:
    """The samples of each split that pass the start-up scan, by the data.on_bad_image policy."""
    kept: dict[str, list[tuple[str, int]]] = {}
    problems: list[str] = []
    started = time.perf_counter()
    for split, (samples, origins) in splits.items():
        bad = [] if cfg.scan == "off" else scan_images(samples, decoder, cfg.scan == "full", origins)
        problems += [f"{split}: {reason}" for _, reason in bad]
        drop = {i for i, _ in bad}
        if cfg.on_bad_image == "skip":
            for i, reason in bad:
                bad_log.record("scan", samples[i][0], reason)
        kept[split] = [s for i, s in enumerate(samples) if i not in drop]
    if cfg.scan != "off":
        log.info("start-up scan (%s) of %d images: %.1f s, %d bad", cfg.scan,
                 sum(len(s) for s, _ in splits.values()), time.perf_counter() - started, len(problems))
    if problems and cfg.on_bad_image == "error":
        raise DataError(f"{len(problems)} unusable image file(s) found before training:"
                        f"{listed(problems)}\nFix or remove them, or set data.on_bad_image=skip "
                        f"to train without them")
    if problems:
        log.warning("skipping %d unusable image file(s) (data.on_bad_image=skip):%s",
                    len(problems), listed(problems))
    return kept


def _check_kept(kept: dict[str, list[tuple[str, int]]], splits: Splits, class_names: list[str]) -> None:
    """Every split still has images, and every class with val images has train images."""
    for split, samples in kept.items():
        if not samples:
            raise DataError(f"the {split} split has no usable images left "
                            f"({len(splits[split][0])} listed, all bad)")
    train_labels, val_labels = ({lab for _, lab in kept[s]} for s in ("train", "val"))
    val_only = sorted(val_labels - train_labels)
    if val_only:
        samples, origins = splits["val"]
        first = {lab: origins[i] for i, (_, lab) in reversed(list(enumerate(samples)))} if origins else {}
        where = f" (first at {examples([first[i] for i in val_only])})" if first else ""
        raise DataError(f"classes {[class_names[i] for i in val_only]} (ids {val_only}) have val "
                        f"images but no train images{where}; the model could never predict "
                        f"them: fix those labels or add train images of those classes")
    if train_labels - val_labels:
        log.warning("classes without val images: %s",
                    [class_names[i] for i in sorted(train_labels - val_labels)])


def file_datasets(cfg: DictConfig, bad_log: BadImageLog, class_names: list[str], splits: Splits,
                  transforms: tuple[Callable, Callable]) -> DataBundle:
    """The start-up scan over both splits, then the two ImageFileDatasets, with the
    (train, val) transforms. Duplicates and train/val overlap are warned about first."""
    warn_duplicates(splits)
    warn_train_val_overlap(splits)
    decoder = ImageDecoder(None if cfg.max_image_pixels is None else int(cfg.max_image_pixels))
    kept = _scan_splits(cfg, bad_log, decoder, splits)
    _check_kept(kept, splits, class_names)
    train_transform, val_transform = transforms
    return DataBundle(
        ImageFileDataset(kept["train"], train_transform, decoder, bad_log, "train"),
        ImageFileDataset(kept["val"], val_transform, decoder, bad_log, "val"),
        class_names, bad_log)
