"""Data sources and transforms, built from the `data` config by `build_data`.

A package, one job a module. Imports go one way, from the bottom up:

    errors                       DataError, limits, file names (no paddle, numpy, Pillow)
    decode, transforms,          one image file -> RGB image; image -> normalized array;
    lists, folders, checks       label-list / class-name files; class-folder trees;
                                 typo'd class counts, duplicates, train/val overlap, gaps
    folder_lists, datasets       folder tree -> label lists; data sets and start-up scan
    sources, throughput          `build_data` and its sources; `measure_loader`
    __main__                     `python -m mbv2.data lists <root> <out_dir>`

The names below are re-exported lazily (PEP 562): `from mbv2.data import DataError` loads
only mbv2.data.errors, and paddle is imported by the first name that needs it.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "errors": ("BAD_IMAGES_FILE", "IMAGE_EXTENSIONS", "MAX_CONSECUTIVE_BAD", "MAX_LISTED",
               "PILLOW_MAX_IMAGE_PIXELS", "DataError"),
    "decode": ("BadImageLog", "ImageDecoder", "load_image", "to_rgb"),
    "transforms": ("EVAL_CROP_RATIO", "ToNormalizedArray", "build_transforms", "eval_spec",
                   "eval_transform"),
    "lists": ("read_class_names", "read_label_list", "resolve_delimiter"),
    "folders": ("folder_splits", "scan_class_folders", "stratified_split"),
    "folder_lists": ("write_label_lists",),
    "datasets": ("DataBundle", "ImageFileDataset", "InMemoryDataset", "scan_images"),
    "sources": ("CIFAR10_CLASSES", "CIFAR10_URL", "build_data"),
    "throughput": ("measure_loader",),
    "__main__": ("main",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found once; later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
