"""PIL image -> normalized CHW float32 array, for training and for evaluation.

Train transform: RandomResizedCrop (+ horizontal flip) + normalize; eval: resize the short
side to image_size / 0.875, center crop, normalize - deterministic, as PaddleClas evaluates.
The eval transform is also data (`eval_spec`): an exported model writes that dict next to
itself and predict rebuilds the very same transform from it with `eval_transform`."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig
from paddle.vision import transforms as T
from PIL import Image

EVAL_CROP_RATIO = 0.875  # resize to 256 for a 224 crop


class ToNormalizedArray:
    """PIL image -> CHW float32 array, (x/255 - mean) / std. Plain numpy: cheaper per
    sample than building paddle tensors inside the data loader."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3) * 255.0
        self.scale = 1.0 / (np.asarray(std, dtype=np.float32).reshape(1, 1, 3) * 255.0)

    def __call__(self, img: Image.Image) -> np.ndarray:
        arr = np.asarray(img, dtype=np.float32)
        return np.ascontiguousarray(((arr - self.mean) * self.scale).transpose(2, 0, 1))


def eval_spec(cfg: DictConfig) -> dict[str, Any]:
    """The eval transform of the `data` config (image_size, mean, std) as plain data."""
    size = int(cfg.image_size)
    return {"image_size": size, "resize_short": int(round(size / EVAL_CROP_RATIO)),
            "center_crop": size, "interpolation": "bilinear",
            "mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std]}


class ResizeShort:
    """The short side to `size`, the long side scaled alike; both rounded, as PaddleClas's
    `ResizeImage(resize_short=...)` does (paddle.vision's Resize truncates the long side:
    on a 403x300 image the inputs then differ by up to 0.58 and so do the scores)."""

    def __init__(self, size: int, interpolation: str = "bilinear"):
        self.size = int(size)
        self.resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                         "bicubic": Image.BICUBIC}[interpolation]

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = self.size / min(w, h)
        return img.resize((int(round(w * scale)), int(round(h * scale))), self.resample)


class CenterCrop:
    """The centre `size` x `size`, its corner at floor((side - size) / 2) as PaddleClas's
    `CropImage` places it (paddle.vision's CenterCrop rounds: one pixel off on odd margins)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w < self.size or h < self.size:
            raise ValueError(f"image {w}x{h} is smaller than the {self.size} px crop")
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


def eval_transform(spec: Mapping[str, Any]) -> Callable[[Image.Image], np.ndarray]:
    """Resize the short side, center crop, normalize: the transform an `eval_spec` describes,
    step for step as PaddleClas's deploy preprocessing (ResizeImage, CropImage,
    NormalizeImage, ToCHWImage) computes it with its PIL backend."""
    return T.Compose([ResizeShort(int(spec["resize_short"]), spec.get("interpolation", "bilinear")),
                      CenterCrop(int(spec["center_crop"])),
                      ToNormalizedArray(spec["mean"], spec["std"])])


def build_transforms(cfg: DictConfig, train: bool) -> Callable[[Image.Image], np.ndarray]:
    """The train (random crop, flip) or eval (`eval_spec`) transform of the `data` config."""
    if not train:
        return eval_transform(eval_spec(cfg))
    steps = [T.RandomResizedCrop(int(cfg.image_size), scale=tuple(cfg.crop_scale))]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [ToNormalizedArray(cfg.mean, cfg.std)])
