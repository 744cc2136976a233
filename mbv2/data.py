"""Data sources and transforms, built from the `data` config by `build_data`.

Every source yields (CHW float32 image, int64 label) pairs and reports its class names.
Train transform: RandomResizedCrop (+ horizontal flip) + normalize; eval: resize the short
side to image_size / 0.875, center crop, normalize - deterministic, as PaddleClas evaluates.

Sources (`data.name`): digits and fake (in memory, no files), folder (class folders),
list (PaddleClas label lists), seed_list (classification-pp `cls_train.txt` annotations),
cifar10 (a local `cifar-10-python.tar.gz`). File sources are checked before training:
list-file syntax, empty splits and class sets fail at once with file and line; a start-up
scan (`data.scan`) finds unreadable images and either lists them all in one error or drops
them (`data.on_bad_image`). A file that still fails to decode during training is replaced
by the next sample and recorded in the run dir's bad-image log, never ending the run.

`python -m mbv2.data lists <root> <out_dir>` writes PaddleClas lists from a folder tree.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf
from paddle.io import Dataset
from paddle.vision import transforms as T
from PIL import ExifTags, Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EVAL_CROP_RATIO = 0.875  # resize to 256 for a 224 crop
PILLOW_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default decompression-bomb limit
BAD_IMAGES_FILE = "bad_images.tsv"
# a run of this many undecodable samples in a row means the data set, not one file, is bad
MAX_CONSECUTIVE_BAD = 20
# how many problems one error message lists before "... and N more"
MAX_LISTED = 20
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

# ImageDecoder checks the pixel count itself and raises at the configured limit, naming the
# file and the key to raise; Pillow's warning between 1x and 2x its limit would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or config key."""


def _listed(problems: Sequence[str]) -> str:
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


# -- transforms ----------------------------------------------------------------------
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


# -- decoding one file -------------------------------------------------------------------
def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit gray -> 'L' by scaling the value range. Pillow's own convert()
    clips at 255, which turns almost every 16-bit pixel white."""
    arr = np.asarray(img)
    if img.mode == "F":
        scaled = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
    elif img.mode.startswith("I;16") or np.max(arr, initial=0) > 255:
        scaled = arr / 257.0  # 65535 -> 255
    else:  # 'I' holding 8-bit values
        scaled = arr
    return Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. 16-bit gray is scaled, CMYK converted; palette and gray
    images with transparency are composited over white, so whatever colour happens to
    sit under a transparent pixel (often black) is not what the model sees."""
    if img.mode == "RGB":
        return img
    if img.mode in ("F", "I") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_8bit(img)
    if img.mode == "P" or "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(white, rgba)
        return rgba.convert("RGB")
    return img.convert("RGB")


class ImageDecoder:
    """path -> RGB PIL image, upright (EXIF orientation applied). Every failure becomes a
    DataError naming the file. Picklable, so DataLoader workers get their own copy.

    `max_pixels` (data.max_image_pixels) replaces Pillow's decompression-bomb limit: the
    pixel count is read from the header and checked before anything is decoded."""

    def __init__(self, max_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS):
        self.max_pixels = max_pixels

    def _open(self, path: str | Path) -> Image.Image:
        # set per call: spawned workers do not inherit the parent's module state
        Image.MAX_IMAGE_PIXELS = self.max_pixels
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:  # over 2x the limit: Pillow refuses first
            raise DataError(f"{path}: {e}; {self._raise_hint()}") from e
        w, h = img.size
        if self.max_pixels is not None and w * h > self.max_pixels:
            img.close()
            raise DataError(f"{path}: {w}x{h} = {w * h} pixels is over data.max_image_pixels="
                            f"{self.max_pixels} (a decompression-bomb guard); {self._raise_hint()}")
        return img

    def _raise_hint(self) -> str:
        return ("if the file is trusted, raise the limit (e.g. data.max_image_pixels="
                f"{4 * (self.max_pixels or PILLOW_MAX_IMAGE_PIXELS)}, or null for none), "
                "or downscale the image")

    def __call__(self, path: str | Path) -> Image.Image:
        try:
            with self._open(path) as img:
                img.load()
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
                if orientation != 1:
                    img = ImageOps.exif_transpose(img)
                return to_rgb(img)
        except DataError:
            raise
        except FileNotFoundError as e:
            raise DataError(f"{path}: no such file") from e
        except Exception as e:  # any decoder failure means this file is unusable
            raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e}); "
                            f"replace or remove the file") from e

    def check(self, path: str | Path, full: bool) -> str | None:
        """None if the file is usable, else the reason. `full` decodes the pixels (finds
        truncated JPEGs); otherwise only the header is read and PNG chunk CRCs verified."""
        try:
            if full:
                self(path)
            else:
                with self._open(path) as img:
                    img.verify()
            return None
        except DataError as e:
            return str(e)
        except FileNotFoundError:
            return f"{path}: no such file"
        except Exception as e:
            return f"{path}: not a readable image ({type(e).__name__}: {e})"


def load_image(path: str | Path, max_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS) -> Image.Image:
    """One image file as upright RGB; DataError naming the file when it cannot be used."""
    return ImageDecoder(max_pixels)(path)


# -- bad-image bookkeeping ---------------------------------------------------------------
class BadImageLog:
    """Bad files found by the start-up scan or while training: one `phase<TAB>path<TAB>
    reason` line each. A file rather than a counter in memory because DataLoader workers
    are separate processes; each record is one short append, which the kernel keeps whole,
    so workers need no lock and the main process reads the counts at any time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def record(self, phase: str, path: str, reason: str) -> None:
        clean = " ".join(reason.split())  # no tabs or newlines inside a field
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{phase}\t{path}\t{clean}\n")

    def entries(self) -> list[tuple[str, str, str]]:
        if not self.path.exists():
            return []
        rows = (line.split("\t", 2) for line in self.path.read_text(encoding="utf-8").splitlines())
        return [(r[0], r[1], r[2]) for r in rows if len(r) == 3]


def _temporary_bad_image_log() -> BadImageLog:
    fd, name = tempfile.mkstemp(prefix="mbv2_bad_images_", suffix=".tsv")
    os.close(fd)
    os.unlink(name)  # recreated on the first record; nothing left behind if none
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    return BadImageLog(name)


# -- data sets ---------------------------------------------------------------------------
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
    return DataBundle(
        InMemoryDataset(rgb[idx_train], digits.target[idx_train], build_transforms(cfg, True)),
        InMemoryDataset(rgb[idx_val], digits.target[idx_val], build_transforms(cfg, False)),
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
    return DataBundle(InMemoryDataset(*train, build_transforms(cfg, True)),
                      InMemoryDataset(*val, build_transforms(cfg, False)),
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


# -- file sources: scanning and splitting ---------------------------------------------
def _image_files(class_dir: Path) -> list[Path]:
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
    at least one left for training) to val; the same seed gives the same split."""
    rng = np.random.default_rng(seed)
    train, val = {}, {}
    too_few = [f"{c} ({len(f)})" for c, f in classes.items() if len(f) < 2]
    if too_few:
        raise DataError(f"{where}: classes with fewer than 2 images cannot be split into "
                        f"train and val: {too_few}")
    for name, files in classes.items():
        order = rng.permutation(len(files))
        n_val = min(len(files) - 1, max(1, int(round(len(files) * val_fraction))))
        val[name] = sorted(files[i] for i in order[:n_val])
        train[name] = sorted(files[i] for i in order[n_val:])
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
    else:
        every = scan_class_folders(root, classes)
        _require_images(root, every)
        train, val = stratified_split(every, val_fraction, seed, root)
    names = list(classes) if classes is not None else sorted(train)
    return names, train, val


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


def _file_dataset(cfg: DictConfig, bad_log: BadImageLog, class_names: list[str],
                  splits: dict[str, tuple[list[tuple[str, int]], list[str] | None]]) -> DataBundle:
    """The start-up scan over both splits, then the two ImageFileDatasets."""
    decoder = ImageDecoder(None if cfg.max_image_pixels is None else int(cfg.max_image_pixels))
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
                        f"{_listed(problems)}\nFix or remove them, or set data.on_bad_image=skip "
                        f"to train without them")
    if problems:
        log.warning("skipping %d unusable image file(s) (data.on_bad_image=skip):%s",
                    len(problems), _listed(problems))
    for split, samples in kept.items():
        if not samples:
            raise DataError(f"the {split} split has no usable images left "
                            f"({len(splits[split][0])} listed, all bad)")
    train_labels, val_labels = ({lab for _, lab in kept[s]} for s in ("train", "val"))
    val_only = sorted(val_labels - train_labels)
    if val_only:
        raise DataError(f"classes {[class_names[i] for i in val_only]} (ids {val_only}) have val "
                        f"images but no train images; the model could never predict them")
    if train_labels - val_labels:
        log.warning("classes without val images: %s",
                    [class_names[i] for i in sorted(train_labels - val_labels)])
    return DataBundle(
        ImageFileDataset(kept["train"], build_transforms(cfg, True), decoder, bad_log, "train"),
        ImageFileDataset(kept["val"], build_transforms(cfg, False), decoder, bad_log, "val"),
        class_names, bad_log)


def _folder(cfg: DictConfig, bad_log: BadImageLog) -> DataBundle:
    root = Path(str(cfg.root)).expanduser()
    classes = list(cfg.classes) if cfg.classes is not None else None
    names, train, val = folder_splits(root, classes, float(cfg.val_fraction), int(cfg.split_seed))
    splits = {split: ([(str(p), i) for i, c in enumerate(names) for p in per_class[c]], None)
              for split, per_class in (("train", train), ("val", val))}
    return _file_dataset(cfg, bad_log, names, splits)


# -- list sources ----------------------------------------------------------------------
def resolve_delimiter(delimiter: str) -> str:
    """`\\t` and `tab` mean a tab: a shell or Hydra override cannot easily pass one."""
    return "\t" if delimiter in ("\\t", "tab") else delimiter


def _meaningful_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of a list file; blank lines at the end are ignored
    (editors add them), blank lines in between are kept so they can be reported."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return list(enumerate(lines, start=1))


def _find_list_file(key: str, value: str, root: Path | None) -> Path:
    """A list file's path: absolute, or under data.root, or relative to the working dir."""
    path = Path(value).expanduser()
    tried = [path] if path.is_absolute() or root is None else [root / path, path]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise DataError(f"data.{key}={value!r}: no such file (looked at "
                    f"{', '.join(str(p) for p in tried)})")


def read_label_list(path: Path, image_root: Path, line_format: Literal["paddleclas", "seed"],
                    delimiter: str = " ", num_classes: int | None = None
                    ) -> tuple[list[tuple[str, int]], list[str]]:
    """Samples and their origins (`file:line`) of a label list.

    paddleclas: `relative/path<delimiter>label`, split at the last delimiter, so paths
    may contain the delimiter. seed (classification-pp): `<class_id>;<path>`. Relative
    image paths are taken from `image_root`. Every bad line is collected, then one error
    names them all."""
    samples, origins, problems = [], [], []
    for lineno, line in _meaningful_lines(path):
        where = f"{path}:{lineno}"
        text = line.strip()
        if not text:
            problems.append(f"{where}: empty line; remove it")
            continue
        if line_format == "seed":
            parts, want = text.split(";", 1), "'<class_id>;<path>'"
            label_text, file_text = parts if len(parts) == 2 else ("", "")
        else:
            parts, want = text.rsplit(delimiter, 1), f"'relative/path{delimiter!r}label'"
            file_text, label_text = (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else ("", "")
        if len(parts) != 2 or not file_text or not label_text:
            problems.append(f"{where}: expected {want}, got {line!r}")
            continue
        try:
            label = int(label_text.strip())
        except ValueError:
            problems.append(f"{where}: label {label_text.strip()!r} is not an integer")
            continue
        if label < 0 or (num_classes is not None and label >= num_classes):
            limit = f"below the number of classes ({num_classes})" if num_classes else ">= 0"
            problems.append(f"{where}: label {label} is out of range; labels must be {limit}")
            continue
        image = Path(file_text.strip()).expanduser()
        samples.append((str(image if image.is_absolute() else image_root / image), label))
        origins.append(where)
    if problems:
        raise DataError(f"{len(problems)} bad line(s) in the label list {path}:{_listed(problems)}")
    if not samples:
        raise DataError(f"{path}: the label list has no samples")
    return samples, origins


def read_class_names(path: Path, line_format: Literal["id_name", "names"]) -> list[str]:
    """id_name (PaddleClas class_id_map_file): `id name` lines, ids 0..K-1 in any order,
    names may contain spaces. names (classification-pp cls_classes.txt): one per line."""
    lines = _meaningful_lines(path)
    if line_format == "names":
        return [line.strip() for _, line in lines]
    names: dict[int, str] = {}
    problems = []
    for lineno, line in lines:
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not parts[0].lstrip("-").isdigit():
            problems.append(f"{path}:{lineno}: expected 'class_id name', got {line!r}")
        elif int(parts[0]) in names:
            problems.append(f"{path}:{lineno}: class id {parts[0]} appears twice")
        else:
            names[int(parts[0])] = parts[1]
    if not problems and sorted(names) != list(range(len(names))):
        problems.append(f"{path}: class ids must be 0..{len(names) - 1} without gaps, got "
                        f"{sorted(names)[:10]}...")
    if problems:
        raise DataError(f"bad class names file (data.class_names):{_listed(problems)}")
    return [names[i] for i in range(len(names))]


def _label_lists(cfg: DictConfig, bad_log: BadImageLog,
                 line_format: Literal["paddleclas", "seed"]) -> DataBundle:
    root = Path(str(cfg.root)).expanduser() if cfg.root else None
    if root is not None and not root.is_dir():
        raise DataError(f"data.root={cfg.root!r}: no such directory")
    names = None
    if cfg.class_names:
        names_file = _find_list_file("class_names", str(cfg.class_names), root)
        names = read_class_names(names_file, "id_name" if line_format == "paddleclas" else "names")
    num_classes = cfg.num_classes if cfg.num_classes is not None else (len(names) if names else None)
    if names is not None and len(names) != num_classes:
        raise DataError(f"data.class_names has {len(names)} names but data.num_classes={num_classes}")
    splits = {}
    for split, key in (("train", "train_list"), ("val", "val_list")):
        list_file = _find_list_file(key, str(cfg[key]), root)
        splits[split] = read_label_list(list_file, root or list_file.parent, line_format,
                                        resolve_delimiter(str(cfg.delimiter)), num_classes)
    if names is None:
        top = max(label for samples, _ in splits.values() for _, label in samples)
        names = [str(i) for i in range(num_classes if num_classes is not None else top + 1)]
    return _file_dataset(cfg, bad_log, names, splits)


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
    from mbv2.config import DataConfig

    # a config saved by an older mbv2 (eval of an old run) lacks newer keys: their defaults
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
    bad_log = BadImageLog(bad_image_log) if bad_image_log else _temporary_bad_image_log()
    bundle = _SOURCES[cfg.name](cfg, bad_log)
    bundle.bad_images = bad_log
    log.info("data %s: %d train / %d val images, %d classes, %d px",
             cfg.name, len(bundle.train), len(bundle.val), bundle.num_classes, cfg.image_size)
    return bundle


def write_class_names(names: Sequence[str], path: str | Path) -> None:
    """One name per line, line i = class id i (the order predictions are reported in)."""
    Path(path).write_text("".join(f"{n}\n" for n in names))


# -- tools -----------------------------------------------------------------------------
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


def measure_loader(data: DataBundle | DictConfig, batch_size: int = 64, num_workers: int = 0,
                   batches: int = 20, split: Literal["train", "val"] = "train") -> float:
    """Images per second a paddle DataLoader delivers (decode + transform + collate), the
    number to set beside training img/s: when it is lower, training waits for data.
    Worker start-up and the first batch are left out of the timing."""
    from paddle.io import DataLoader, Subset

    if isinstance(data, DictConfig):  # the `data` config, or a whole run config
        bundle = build_data(data.data if "data" in data else data)
    else:
        bundle = data
    dataset = bundle.train if split == "train" else bundle.val
    # One whole pass over a subset of the right size: a loader abandoned mid-epoch leaves
    # its workers prefetching files the caller may already be deleting.
    wanted = (batches + 1) * batch_size
    if len(dataset) < 2 * batch_size:
        raise DataError(f"measure_loader: {len(dataset)} images do not fill two batches of {batch_size}")
    indices = np.random.default_rng(0).permutation(len(dataset))[:wanted].tolist()
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        drop_last=True, num_workers=num_workers, return_list=True)
    images, started = 0, None
    for x, _ in loader:
        if started is None:  # worker start-up and the first batch are not timed
            started = time.perf_counter()
            continue
        images += int(x.shape[0])
    return images / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mbv2.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lists = sub.add_parser("lists", help="write PaddleClas train/val/label lists from a folder tree")
    lists.add_argument("root", help="root/train/<class>/* + root/val/<class>/*, or root/<class>/*")
    lists.add_argument("out_dir", help="where train_list.txt, val_list.txt, label_list.txt go")
    lists.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of each class for val when root has no train/ + val/")
    lists.add_argument("--seed", type=int, default=0, help="split seed (data.split_seed)")
    lists.add_argument("--classes", nargs="+", help="class folders to use, in id order")
    lists.add_argument("--delimiter", default=" ", help="between path and label; \\t or tab for a tab")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = write_label_lists(args.root, args.out_dir, args.val_fraction, args.seed,
                                    args.classes, args.delimiter)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    for split, path in written.items():
        lines = path.read_text(encoding="utf-8").count("\n")
        print(f"{path}: {lines} {'classes' if split == 'labels' else 'images'}")


if __name__ == "__main__":
    main()
