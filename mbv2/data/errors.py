"""The bottom layer of mbv2.data: the error type, the limits and the file names every other
module of the package shares. Imports nothing from mbv2 and neither paddle, numpy nor
Pillow, so `mbv2.data.DataError` and the constants cost nothing to import."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PILLOW_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default decompression-bomb limit
BAD_IMAGES_FILE = "bad_images.tsv"
# a run of this many undecodable samples in a row means the data set, not one file, is bad
MAX_CONSECUTIVE_BAD = 20
# how many problems one error message lists before "... and N more"
MAX_LISTED = 20
# how many examples one warning line names
MAX_EXAMPLES = 3
# with neither data.num_classes nor data.class_names, the class count is the largest label
# + 1; above this (or far above the distinct labels seen) that label is taken for a typo
MAX_INFERRED_CLASSES = 100_000
# folders that tools, not people, put into a data tree; never taken as classes (nor is any
# name starting with '.': .ipynb_checkpoints, .thumbs, macOS's ._photo.jpg)
SYSTEM_DIRS = ("__pycache__", "__MACOSX", "@eaDir", "lost+found", "$RECYCLE.BIN",
               "System Volume Information")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or config key."""


def listed(problems: Sequence[str]) -> str:
    """The first MAX_LISTED problems, one an indented line, for the end of an error message."""
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


def examples(items: Sequence[str], total: int | None = None) -> str:
    """The first MAX_EXAMPLES items on one line, with "..." when there are more."""
    more = ", ..." if (total if total is not None else len(items)) > MAX_EXAMPLES else ""
    return ", ".join(items[:MAX_EXAMPLES]) + more


def require_directory(key: str, value: str | Path, need: str) -> Path:
    """`value` (config key `key`) as an existing directory; `need` says what it must hold."""
    path = Path(str(value)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        archive = path.name.lower().endswith((".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z"))
        hint = "unpack it and point it at the unpacked folder" if archive else f"point it at {need}"
        raise DataError(f"{key}={str(value)!r} is a file, not a directory; {hint}")
    raise DataError(f"{key}={str(value)!r}: no such directory; point it at {need}")
