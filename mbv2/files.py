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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    replace_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
