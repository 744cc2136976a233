"""One image file -> upright RGB PIL image, and the log of files that could not be used.

Every decoder failure becomes a DataError naming the file. The decompression-bomb guard is
the decoder's own (`data.max_image_pixels`): the pixel count is read from the header and
checked before anything is decoded, so Pillow's process-wide check is switched off while
the decoder opens a file and no DecompressionBombWarning or Error comes from Pillow.

A file that fails to decode during training is replaced by the next sample and recorded
in the run dir's bad-image log (BadImageLog), never ending the run."""
from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from mbv2.data.errors import PILLOW_MAX_IMAGE_PIXELS, DataError


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


def _not_a_file(path: str | Path, error: OSError) -> str:
    """Why `path` is not an image file: missing (Windows `\\` separators?) or a directory."""
    if isinstance(error, IsADirectoryError):
        return f"{path}: is a directory, not an image file"
    hint = "; write paths with '/', not '\\'" if "\\" in str(path) else ""
    return f"{path}: no such file{hint}"


class ImageDecoder:
    """path -> RGB PIL image, upright (EXIF orientation applied). Every failure becomes a
    DataError naming the file. Picklable, so DataLoader workers get their own copy.

    `max_pixels` (data.max_image_pixels) replaces Pillow's decompression-bomb limit: the
    pixel count is read from the header and checked before anything is decoded."""

    def __init__(self, max_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS):
        self.max_pixels = max_pixels

    def _open(self, path: str | Path) -> Image.Image:
        # Pillow's check stands aside: the limit is applied right below, with a message that
        # names the key to raise. Set per call, because spawned workers do not inherit the
        # parent's module state; always the same value, so threads decoding at once agree
        # (a save-and-restore, like warnings.catch_warnings, would race between them).
        Image.MAX_IMAGE_PIXELS = None
        img = Image.open(path)  # reads the header only
        w, h = img.size
        if self.max_pixels is not None and w * h > self.max_pixels:
            img.close()
            raise DataError(f"{path}: {w}x{h} = {w * h} pixels is over data.max_image_pixels="
                            f"{self.max_pixels} (a decompression bomb guard); {self._raise_hint()}")
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
        except (FileNotFoundError, IsADirectoryError) as e:
            raise DataError(_not_a_file(path, e)) from e
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
        except (FileNotFoundError, IsADirectoryError) as e:
            return _not_a_file(path, e)
        except Exception as e:
            return f"{path}: not a readable image ({type(e).__name__}: {e})"


def load_image(path: str | Path, max_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS) -> Image.Image:
    """One image file as upright RGB; DataError naming the file when it cannot be used."""
    return ImageDecoder(max_pixels)(path)


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


def temporary_bad_image_log() -> BadImageLog:
    """A log in a temporary file, for data built outside a run dir; removed at exit."""
    fd, name = tempfile.mkstemp(prefix="mbv2_bad_images_", suffix=".tsv")
    os.close(fd)
    os.unlink(name)  # recreated on the first record; nothing left behind if none
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    return BadImageLog(name)
