"""Data sources and transforms, built from the `data` config by `build_data`.

Every source yields (CHW float32 image, int64 label) pairs and reports its class names.
Train transform: RandomResizedCrop (+ horizontal flip) + normalize; eval: resize the short
side to image_size / 0.875, center crop, normalize - deterministic, as PaddleClas evaluates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import DictConfig
from paddle.io import Dataset
from paddle.vision import transforms as T
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EVAL_CROP_RATIO = 0.875  # resize to 256 for a 224 crop


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or config key."""


class ToNormalizedArray:
    """PIL image -> CHW float32 array, (x/255 - mean) / std. Plain numpy: cheaper per
    sample than building paddle tensors inside the data loader."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3) * 255.0
        self.scale = 1.0 / (np.asarray(std, dtype=np.float32).reshape(1, 1, 3) * 255.0)

    def __call__(self, img: Image.Image) -> np.ndarray:
        arr = np.asarray(img, dtype=np.float32)
        return np.ascontiguousarray(((arr - self.mean) * self.scale).transpose(2, 0, 1))


def build_transforms(cfg: DictConfig, train: bool) -> Callable[[Image.Image], np.ndarray]:
    size = int(cfg.image_size)
    finish = ToNormalizedArray(cfg.mean, cfg.std)
    if train:
        steps = [T.RandomResizedCrop(size, scale=tuple(cfg.crop_scale))]
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize(int(round(size / EVAL_CROP_RATIO))), T.CenterCrop(size)]
    return T.Compose(steps + [finish])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Palette and gray images with transparency go through RGBA
    so the transparent colour is not misread."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" or "A" in img.mode or "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e}); "
                        f"replace or remove the file") from e


class ImageFileDataset(Dataset):
    """(path, label) pairs read from disk on demand."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        super().__init__()
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int):
        path, label = self.samples[idx]
        return self.transform(load_image(path)), np.int64(label)


class InMemoryDataset(Dataset):
    """uint8 HWC RGB images held in memory (small data sets)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        super().__init__()
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        return self.transform(Image.fromarray(self.images[idx])), self.labels[idx]


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _digits(cfg: DictConfig) -> DataBundle:
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
    return DataBundle(
        InMemoryDataset(rgb[idx_train], digits.target[idx_train], build_transforms(cfg, True)),
        InMemoryDataset(rgb[idx_val], digits.target[idx_val], build_transforms(cfg, False)),
        names)


def _fake_split(n: int, num_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(12345).integers(0, 256, size=(num_classes, 3))
    labels = np.arange(n) % num_classes
    noise = rng.integers(0, 256, size=(n, size, size, 3))
    images = (0.5 * noise + 0.5 * palette[labels][:, None, None, :]).astype(np.uint8)
    return images, labels


def _fake(cfg: DictConfig) -> DataBundle:
    size, k = int(cfg.image_size), int(cfg.num_classes)
    train = _fake_split(int(cfg.num_samples), k, size, int(cfg.split_seed))
    val = _fake_split(int(cfg.num_val_samples), k, size, int(cfg.split_seed) + 1)
    return DataBundle(InMemoryDataset(*train, build_transforms(cfg, True)),
                      InMemoryDataset(*val, build_transforms(cfg, False)),
                      [f"class_{i}" for i in range(k)])


def scan_class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """class name -> sorted image files of `split_dir/<class>/`."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such directory; data=folder expects "
                        f"data.root/train/<class>/* and data.root/val/<class>/*")
    classes = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        classes[class_dir.name] = files
    if not classes:
        raise DataError(f"{split_dir}: no class folders; put images in {split_dir}/<class>/")
    return classes


def _folder(cfg: DictConfig) -> DataBundle:
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root!r}: no such directory")
    train_classes = scan_class_folders(root / "train")
    val_classes = scan_class_folders(root / "val")
    if set(train_classes) != set(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"{root}: train and val class folders differ "
                        f"(only in train: {only_train}, only in val: {only_val})")
    names = sorted(train_classes)
    splits = []
    for split, classes in (("train", train_classes), ("val", val_classes)):
        empty = [c for c in names if not classes[c]]
        if empty:
            raise DataError(f"{root / split}: class folders without images: {empty} "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        splits.append([(str(p), i) for i, c in enumerate(names) for p in classes[c]])
    return DataBundle(ImageFileDataset(splits[0], build_transforms(cfg, True)),
                      ImageFileDataset(splits[1], build_transforms(cfg, False)), names)


_SOURCES: dict[str, Callable[[DictConfig], DataBundle]] = {
    "digits": _digits,
    "fake": _fake,
    "folder": _folder,
}


def build_data(cfg: DictConfig) -> DataBundle:
    """The train and val data sets named by `data.name`."""
    bundle = _SOURCES[cfg.name](cfg)
    log.info("data %s: %d train / %d val images, %d classes, %d px",
             cfg.name, len(bundle.train), len(bundle.val), bundle.num_classes, cfg.image_size)
    return bundle


def write_class_names(names: Sequence[str], path: str | Path) -> None:
    """One name per line, line i = class id i (the order predictions are reported in)."""
    Path(path).write_text("".join(f"{n}\n" for n in names))
