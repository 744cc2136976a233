"""The data sources, built from the `data` config by `build_data`.

Every source yields (CHW float32 image, int64 label) pairs and reports its class names.
Sources (`data.name`): digits and fake (in memory, no files), folder (class folders),
list (PaddleClas label lists), seed_list (classification-pp `cls_train.txt` annotations),
cifar10 (a local `cifar-10-python.tar.gz`). File sources are checked before training:
list-file syntax, empty splits and class sets fail at once with file and line, then the
start-up scan of mbv2.data.datasets looks at every image."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from mbv2.config import DataConfig
from mbv2.data.checks import (inferred_class_count, warn_label_gaps, warn_repeated_names,
                              warn_single_class)
from mbv2.data.datasets import DataBundle, InMemoryDataset, file_datasets
from mbv2.data.decode import BadImageLog, temporary_bad_image_log
from mbv2.data.errors import DataError, require_directory
from mbv2.data.folders import folder_splits
from mbv2.data.lists import find_list_file, read_class_names, read_label_list, resolve_delimiter
from mbv2.data.transforms import build_transforms

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _transforms(cfg: DictConfig) -> tuple[Callable, Callable]:
    """(train, val) transforms of the `data` config."""
    return build_transforms(cfg, True), build_transforms(cfg, False)


# -- in-memory sources -----------------------------------------------------------------
def _digits(cfg: DictConfig, bad_log: BadImageLog) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 ink levels -> 0..255, upsampled once here rather than in every epoch
    small = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    size = int(cfg.image_size)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                    for im in small])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    idx_train, idx_val = train_test_split(
        np.arange(len(rgb)), test_size=float(cfg.val_fraction),
        random_state=int(cfg.split_seed), stratify=digits.target)
    names = [str(int(n)) for n in digits.target_names]
    train_transform, val_transform = _transforms(cfg)
    return DataBundle(InMemoryDataset(rgb[idx_train], digits.target[idx_train], train_transform),
                      InMemoryDataset(rgb[idx_val], digits.target[idx_val], val_transform),
                      names)


def _fake_split(n: int, num_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class colour + smooth noise. The noise is drawn on a coarse 8x8 grid and upsampled:
    pixel-level noise would turn into blobs under random-resized crops, and a network
    trained on blobs sees different images at eval time (no crop) than it learned on."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(12345).integers(0, 256, size=(num_classes, 3))
    labels = np.arange(n) % num_classes
    coarse = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.uint8)
    noise = np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR))
                      for c in coarse]).astype(np.float32)
    images = (0.5 * noise + 0.5 * palette[labels][:, None, None, :]).astype(np.uint8)
    return images, labels


def _fake(cfg: DictConfig, bad_log: BadImageLog) -> DataBundle:
    size, k = int(cfg.image_size), int(cfg.num_classes)
    train = _fake_split(int(cfg.num_samples), k, size, int(cfg.split_seed))
    val = _fake_split(int(cfg.num_val_samples), k, size, int(cfg.split_seed) + 1)
    train_transform, val_transform = _transforms(cfg)
    return DataBundle(InMemoryDataset(*train, train_transform), InMemoryDataset(*val, val_transform),
                      [f"class_{i}" for i in range(k)])


def _cifar10(cfg: DictConfig, bad_log: BadImageLog) -> DataBundle:
    """paddle's Cifar10 reader on a local archive; it never downloads here."""
    from paddle.vision.datasets import Cifar10

    archive = Path(str(cfg.archive)).expanduser()
    if not archive.is_file():
        raise DataError(f"data.archive={str(cfg.archive)!r}: no such file. Download "
                        f"cifar-10-python.tar.gz ({CIFAR10_URL}) on a machine with internet, "
                        f"put it at {archive} or point data.archive=<path> at it; "
                        f"mbv2 does not download data")
    splits = []
    for mode in ("train", "test"):
        try:
            ds = Cifar10(data_file=str(archive), mode=mode, download=False,
                         transform=build_transforms(cfg, mode == "train"), backend="pil")
        except Exception as e:  # tarfile/gzip/pickle errors: the archive is damaged
            raise DataError(f"data.archive={archive}: cannot read it as cifar-10-python.tar.gz "
                            f"({type(e).__name__}: {' '.join(str(e).split())}); download it again") from e
        if len(ds) == 0:
            member = "data_batch_*" if mode == "train" else "test_batch"
            raise DataError(f"data.archive={archive}: no {member} inside; expected the "
                            f"cifar-10-batches-py/ layout of cifar-10-python.tar.gz")
        splits.append(ds)
    return DataBundle(splits[0], splits[1], list(CIFAR10_CLASSES))


# -- file sources ----------------------------------------------------------------------
def _folder(cfg: DictConfig, bad_log: BadImageLog) -> DataBundle:
    root = Path(str(cfg.root)).expanduser()
    classes = list(cfg.classes) if cfg.classes is not None else None
    names, train, val = folder_splits(root, classes, float(cfg.val_fraction), int(cfg.split_seed))
    splits = {split: ([(str(p), i) for i, c in enumerate(names) for p in per_class[c]], None)
              for split, per_class in (("train", train), ("val", val))}
    return file_datasets(cfg, bad_log, names, splits, _transforms(cfg))


def _seed_class_tree(value: str, root: Path | None) -> tuple[Path, list[str]] | None:
    """classification-pp numbers classes in the order `os.listdir` lists its
    `datasets/train/<class>` folders and writes no names file: data.class_names may name
    that folder, and the names come back in the same order (on the same file system)."""
    path = Path(value).expanduser()
    for candidate in ([path] if path.is_absolute() or root is None else [root / path, path]):
        if candidate.is_dir():
            names = [n for n in os.listdir(candidate) if (candidate / n).is_dir()
                     and not n.startswith(".")]
            if not names:
                raise DataError(f"data.class_names={value!r}: {candidate} holds no class folders; "
                                f"give the seed's datasets/train folder or a cls_classes.txt")
            log.info("class names from the folders of %s, in os.listdir order (as "
                     "classification-pp's txt_annotation.py numbers them): %s", candidate, names[:10])
            return candidate, names
    return None


def _class_names_file(cfg: DictConfig, root: Path | None,
                      line_format: Literal["paddleclas", "seed"]) -> tuple[list[str], str] | None:
    """The names of data.class_names and the end of an out-of-range message; None if unset."""
    if not cfg.class_names:
        return None
    tree = _seed_class_tree(str(cfg.class_names), root) if line_format == "seed" else None
    if tree is not None:
        names_file, names = tree
    else:
        names_file = find_list_file("class_names", str(cfg.class_names), root)
        names = read_class_names(names_file, "id_name" if line_format == "paddleclas" else "names")
    warn_repeated_names(names, f"data.class_names {names_file}")
    if cfg.num_classes is not None and len(names) != cfg.num_classes:
        raise DataError(f"data.class_names has {len(names)} names but data.num_classes="
                        f"{cfg.num_classes}; make them agree, or leave data.num_classes unset")
    return names, (f" that data.class_names={str(cfg.class_names)!r} names; add the missing "
                   f"names to {names_file} or fix the label")


def _label_lists(cfg: DictConfig, bad_log: BadImageLog,
                 line_format: Literal["paddleclas", "seed"]) -> DataBundle:
    root = None
    if cfg.root:
        root = require_directory("data.root", cfg.root, "the directory the image paths in "
                                 "data.train_list and data.val_list start from")
    named = _class_names_file(cfg, root, line_format)
    by_key = f" set by data.num_classes={cfg.num_classes}; raise it or fix the label"
    names, classes_from = named if named else (None, by_key)
    num_classes = len(names) if names is not None else cfg.num_classes
    splits = {}
    for split, key in (("train", "train_list"), ("val", "val_list")):
        list_file = find_list_file(key, str(cfg[key]), root)
        splits[split] = read_label_list(list_file, root or list_file.parent, line_format,
                                        resolve_delimiter(str(cfg.delimiter)), num_classes,
                                        key, classes_from)
    if names is None:
        count = num_classes if num_classes is not None else inferred_class_count(splits)
        names = [str(i) for i in range(count)]
    warn_label_gaps(splits, names, inferred=named is None and cfg.num_classes is None)
    return file_datasets(cfg, bad_log, names, splits, _transforms(cfg))


def _list(cfg: DictConfig, bad_log: BadImageLog) -> DataBundle:
    return _label_lists(cfg, bad_log, "paddleclas")


def _seed_list(cfg: DictConfig, bad_log: BadImageLog) -> DataBundle:
    return _label_lists(cfg, bad_log, "seed")


_SOURCES: dict[str, Callable[[DictConfig, BadImageLog], DataBundle]] = {
    "digits": _digits,
    "fake": _fake,
    "folder": _folder,
    "list": _list,
    "seed_list": _seed_list,
    "cifar10": _cifar10,
}


def build_data(cfg: DictConfig, bad_image_log: str | Path | None = None) -> DataBundle:
    """The train and val data sets named by `data.name`. Bad images are recorded in
    `bad_image_log` (the run dir's bad_images.tsv), or in a temporary file when None."""
    # a config saved by an older mbv2 (eval of an old run) lacks newer keys: their defaults
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
    bad_log = BadImageLog(bad_image_log) if bad_image_log else temporary_bad_image_log()
    bundle = _SOURCES[cfg.name](cfg, bad_log)
    bundle.bad_images = bad_log
    warn_single_class(bundle.class_names, cfg.name)
    log.info("data %s: %d train / %d val images, %d classes, %d px",
             cfg.name, len(bundle.train), len(bundle.val), bundle.num_classes, cfg.image_size)
    return bundle
