"""Data-parallel runs under `python -m paddle.distributed.launch`: who this process is, and
the one run dir all ranks share.

Paddle's launcher sets PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM in every process; the
collective engine itself (init, gradient all-reduce, sharded sampling) is paddle.Model's.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

_STARTED = time.time()

def rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def world_size() -> int:
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def is_primary() -> bool:
    """Rank 0 writes the run's files (VisualDL, checkpoints, metrics.json); others train."""
    return rank() == 0


def _rendezvous_file() -> Path:
    # PADDLE_MASTER (host:port) is picked anew by every launch and is the same in all of
    # its processes, so it names this launch; the cwd keeps unrelated launches apart.
    launch = f"{os.environ.get('PADDLE_MASTER', '')}|{os.getcwd()}"
    key = hashlib.sha1(launch.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mbv2-run-dir-{key}"


def shared_choice(choose: Callable[[], str], timeout: float = 120.0) -> str:
    """`choose()` on rank 0, the same answer on every other rank of this launch.

    The run dir is named after the start time, which can differ by a second between
    processes; rank 0 picks it and the others read its pick from a file in the temp dir.
    Ranks on other nodes do not share that temp dir: give them `hydra.run.dir=...`."""
    if world_size() == 1:
        return choose()
    path = _rendezvous_file()
    if is_primary():
        value = choose()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(value)
        os.replace(tmp, path)
        return value
    deadline = time.monotonic() + timeout
    # a file left by an earlier launch that happened to get the same master port is stale
    while not (path.exists() and path.stat().st_mtime > _STARTED - 30):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {rank()} waited {timeout:.0f} s for rank 0 to choose the run dir "
                f"({path}); on several nodes set hydra.run.dir=<a shared path> explicitly")
        time.sleep(0.05)
    return path.read_text()
