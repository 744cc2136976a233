"""The bottom layer of mbv2.data: the error type, the limits and the file names every other
module of the package shares. Imports nothing from mbv2 and neither paddle, numpy nor
Pillow, so `mbv2.data.DataError` and the constants cost nothing to import."""
from __future__ import annotations

from typing import Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PILLOW_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default decompression-bomb limit
BAD_IMAGES_FILE = "bad_images.tsv"
# a run of this many undecodable samples in a row means the data set, not one file, is bad
MAX_CONSECUTIVE_BAD = 20
# how many problems one error message lists before "... and N more"
MAX_LISTED = 20


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or config key."""


def listed(problems: Sequence[str]) -> str:
    """The first MAX_LISTED problems, one an indented line, for the end of an error message."""
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"\n  {shown}{more}"
