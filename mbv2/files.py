"""Writing a file so that a reader (or a crash) never sees half of it.

Every file mbv2 replaces in place - metrics.json, checkpoints, VisualDL records cut back on
resume, exported metadata - goes through `replace_atomic`: written to a temporary name in
the same directory, optionally fsynced, then renamed over the target in one `os.replace`.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """A hidden sibling of `path`, private to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_atomic(path: str | Path, write: Callable[[Path], None], fsync: bool = False) -> None:
    """`write(tmp)` fills a temporary file next to `path`, which then replaces `path`.
    `fsync`: the bytes are on disk before the rename publishes them (checkpoints)."""
    replace_together({Path(path): write}, fsync)


def replace_together(writes: dict[Path, Callable[[Path], None]], fsync: bool = False) -> None:
    """Several files replaced all or none: each `write(tmp)` fills a temporary file next to
    its path, and only when every one is written are they renamed into place, in the
    dict's order (the renames need no space). A write that fails (disk full, quota) leaves
    every target as it was; its OSError names the file meant (pickle's name none)."""
    staged = {Path(path): temporary_name(Path(path)) for path in writes}
    try:
        for path, write in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                write(staged[path])
                if fsync:
                    with open(staged[path], "rb") as f:
                        os.fsync(f.fileno())
            except OSError as e:
                e.filename = e.filename or str(path)
                raise
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def unwritable_reason(directory: Path | None) -> str | None:
    """Why a file cannot be created in `directory` (a read-only mount, no permission), or
    None when it can (or `directory` is None). An unnamed temporary file is tried, so
    nothing appears there; the kernel's answer, not the permission bits (root passes those)."""
    import tempfile

    if directory is None:
        return None
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as e:
        return e.strerror or str(e)


def write_text_atomic(path: str | Path, text: str) -> None:
    replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    replace_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
