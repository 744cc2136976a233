"""Real image and list files for the data tests, written with Pillow (no fixtures)."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 14),
                fmt: str | None = None, color: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        img = Image.new("RGB", size, (color, 100, 200)).convert("P", palette=Image.ADAPTIVE)
    else:
        img = Image.new(mode, size, color if mode in ("L", "I;16") else (color, 80, 160, 128)[:len(mode)])
    img.save(path, format=fmt)
    return path


def write_jpeg(path: Path, size: tuple[int, int] = (40, 30), color=(200, 30, 30)) -> Path:
    """A JPEG big enough that cutting it in half leaves a readable header but no pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 60, size=(size[1], size[0], 3))
    Image.fromarray((np.asarray(color) * 0.7 + noise).astype(np.uint8)).save(path, quality=95)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def class_tree(root: Path, classes: dict[str, int], size: tuple[int, int] = (24, 24)) -> Path:
    """root/<class>/<i>.jpg, `n` JPEGs per class, one colour per class."""
    for ci, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_jpeg(root / name / f"{i:03d}.jpg", size, color=(60 * ci % 256, 100, 40 * i % 256))
    return root


def cifar_archive(path: Path, per_batch: int = 4, test_size: int = 6) -> Path:
    """A tiny cifar-10-python.tar.gz in the real layout: cifar-10-batches-py/data_batch_1..5
    and test_batch, each a pickled dict with b'data' (uint8 [N, 3072], R plane then G then
    B, row-major 32x32) and b'labels' (list of int); batches.meta with the names."""
    def batch(n: int, offset: int) -> bytes:
        labels = [(offset + i) % 10 for i in range(n)]
        data = np.zeros((n, 3072), dtype=np.uint8)
        data[:, :1024] = 255  # every image pure red
        return pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data,
                             b"filenames": [b"f.png"] * n})

    members = {f"cifar-10-batches-py/data_batch_{k}": batch(per_batch, k) for k in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = batch(test_size, 0)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path
