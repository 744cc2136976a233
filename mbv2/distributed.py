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

from mbv2.files import write_text_atomic

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
        write_text_atomic(path, value)
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


def paddle_env_from_slurm(env: dict[str, str], hostnames: list[str]) -> dict[str, str]:
    """The variables paddle.distributed.launch would set, derived from a SLURM task's
    environment: one process per task, `tasks_per_node` tasks (= GPUs) per node.

    Used when a sweep job runs on SLURM with several tasks (Hydra's submitit launcher with
    `tasks_per_node` > 1): every task runs the job, and Paddle's collective engine finds
    its peers through these variables."""
    ntasks = int(env["SLURM_NTASKS"])
    procid = int(env["SLURM_PROCID"])
    local = int(env.get("SLURM_LOCALID", "0"))
    per_node = ntasks // max(1, len(hostnames))
    # a port range that differs between jobs sharing a node
    base = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    endpoints = [f"{host}:{base + i}" for host in hostnames for i in range(per_node)]
    return {
        "PADDLE_TRAINER_ID": str(procid),
        "PADDLE_TRAINERS_NUM": str(ntasks),
        "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
        "PADDLE_CURRENT_ENDPOINT": endpoints[procid],
        "PADDLE_MASTER": endpoints[0],
        "PADDLE_RANK_IN_NODE": str(local),
        "PADDLE_LOCAL_RANK": str(local),
        "FLAGS_selected_gpus": str(local),
    }


def adopt_slurm_tasks() -> bool:
    """Inside a multi-task SLURM job that no Paddle launcher started, set Paddle's
    variables from SLURM's (see paddle_env_from_slurm). Returns whether it did."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "PADDLE_TRAINERS_NUM" in os.environ:
        return False
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout
        hostnames = out.split()
    except (OSError, subprocess.CalledProcessError):
        hostnames = [nodelist]  # a single node name needs no expansion
    os.environ.update(paddle_env_from_slurm(dict(os.environ), hostnames))
    return True
