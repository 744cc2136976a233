"""A run dir across processes, as a user meets it: an interrupted sweep rerun into its dir
continues (finished jobs are not trained again, the interrupted one resumes), a path key
swept keeps every job, one process per run dir, SIGTERM and early stopping end a run with
the status that says so. Real `python -m mbv2.run` subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from visualdl import LogReader

from tests.conftest import ROOT, TINY, run_cli
from tests.image_files import write_jpeg

pytestmark = pytest.mark.slow
# enough steps per epoch (600 images / 16) that a poll can catch a job between epochs
SLOW = [*TINY, "data.num_samples=600", "trainer.epochs=3", "trainer.log_freq=5"]
GRID = ["model.scale=0.25,0.35", "optim.lr=0.05,0.02,0.01"]  # 6 jobs; job 3: 0.25 x 0.01
JOB3 = "model.scale=0.25,optim.lr=0.01"


def _metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mbv2.run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended first:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _epochs_done(job: Path) -> int:
    try:
        m = _metrics(job)
    except (OSError, ValueError):
        return 0
    return int(m.get("epochs_completed") or 0) if m.get("status") == "running" else 0


def _eval_epochs(job: Path) -> list[int]:
    reader = LogReader(file_path=str(job / "vdlrecords.mbv2.log"))
    return [r.id for r in reader.get_data("scalar", "eval/acc_top1")]


def test_killed_sweep_rerun_into_its_dir_continues(tmp_path):
    reference = tmp_path / "uninterrupted"
    run_cli(["-m", *SLOW, *GRID, f"hydra.sweep.dir={reference}"], cwd=tmp_path)
    sweep = tmp_path / "sweep"
    args = ["-m", *SLOW, *GRID, f"hydra.sweep.dir={sweep}"]
    proc = _start(args, tmp_path)
    # mid job 3, once its first epoch's checkpoint is there (metrics.json counts the epoch
    # a moment before the checkpoint is written)
    _wait_for(lambda: _epochs_done(sweep / JOB3) >= 1
              and (sweep / JOB3 / "checkpoints" / "last.pdckpt").is_file(), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group
    proc.wait(timeout=30)
    first = {n: (sweep / n / "metrics.json").stat().st_mtime
             for n in ("model.scale=0.25,optim.lr=0.05", "model.scale=0.25,optim.lr=0.02")}
    assert _metrics(sweep / JOB3)["status"] == "running"

    again = run_cli(args, cwd=tmp_path)  # the same command, the same sweep dir
    jobs = sorted(p.parent.name for p in sweep.glob("*/.hydra"))
    assert len(jobs) == 6
    for name in jobs:
        m = _metrics(sweep / name)
        assert m["status"] == "completed", name
        assert _eval_epochs(sweep / name) == [1, 2, 3], name  # each epoch once
        assert m["final_eval_acc_top1"] == pytest.approx(
            _metrics(reference / name)["final_eval_acc_top1"], abs=1e-6), name
    for name, mtime in first.items():  # finished before the kill: not trained again
        assert (sweep / name / "metrics.json").stat().st_mtime == mtime
        assert f"{sweep.name}/{name}: already completed" in again.stdout + again.stderr
    resumed = _metrics(sweep / JOB3)["resumed"]
    assert len(resumed) == 1 and resumed[0]["from_checkpoint"].endswith("last.pdckpt")
    assert resumed[0]["epoch"] >= 1
    assert not list(sweep.glob("multirun.*.yaml"))  # the same launch: its record stays one file


def test_sweep_over_a_path_key_keeps_every_job(tmp_path):
    roots = []
    for parent in ("a", "b"):  # both end in /images: named by last component + hash
        root = tmp_path / parent / "images"
        for c in range(2):
            for i in range(4):
                write_jpeg(root / f"c{c}" / f"{i}.jpg", size=(36, 36), color=(60 + 120 * c, 40, 90))
        roots.append(root)
    run_cli(["-m", *TINY, "trainer.epochs=1", "data=folder", "data.image_size=32",
             f"data.root={roots[0]},{roots[1]}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
            cwd=tmp_path)
    jobs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/.hydra"))
    assert len(jobs) == 2 and len({j.name for j in jobs}) == 2
    assert all(j.name.startswith("data.root=images-") for j in jobs)
    used = set()
    for job in jobs:
        assert _metrics(job)["status"] == "completed"
        used.add(json.loads(json.dumps(_config(job)))["data"]["root"])
    assert used == {str(r) for r in roots}


def _config(job: Path) -> dict:
    import yaml

    return yaml.safe_load((job / "config_resolved.yaml").read_text())


def test_second_process_on_a_run_dir_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    first = _start([*SLOW, "data.num_samples=3000", "trainer.epochs=20", f"hydra.run.dir={run_dir}"],
                   tmp_path)
    try:
        _wait_for(lambda: (run_dir / "metrics.json").is_file(), first)
        started = time.monotonic()
        second = run_cli([*SLOW, "data.num_samples=3000", "trainer.epochs=20",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=False)
        assert second.returncode != 0 and time.monotonic() - started < 60
        assert f"is in use: process {first.pid} is training there" in second.stderr
        assert first.poll() is None  # the first one trains on undisturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)


SKIP = ("run.log", ".mbv2.lock")  # the log and the lock holder's PID change; nothing else may


def test_a_finished_run_dir_is_never_trained_over(tmp_path):
    run_dir = tmp_path / "run"
    run_cli([*TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in SKIP}
    other = run_cli([*TINY, "trainer.epochs=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=False)
    assert other.returncode != 0
    assert "holds another run" in other.stderr and "trainer.epochs: 1 -> 2" in other.stderr
    assert f"trainer.resume={run_dir}" in other.stderr
    after = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in SKIP}
    assert after == before  # nothing there changed, .hydra/ included


def _job_files(sweep: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sweep)): p.read_bytes() for p in sweep.glob("*/**/*")
            if p.is_file() and p.name not in SKIP}


def test_sweep_rerun_after_a_conf_edit_leaves_its_jobs_as_they_were(tmp_path):
    """The same sweep command after a config file changed (here an experiment file found
    through hydra.searchpath): every job's dir holds a run of the old config, so each job
    refuses it - .hydra/ included, which the sweep summary reads - and the sweep says so
    with exit status 1 instead of reporting the old runs as this launch's results."""
    study = tmp_path / "mine" / "experiment" / "study.yaml"
    study.parent.mkdir(parents=True)
    study.write_text("# @package _global_\ntrainer:\n  epochs: 1\n")
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "experiment=study", f"hydra.searchpath=[file://{tmp_path / 'mine'}]",
            "optim.lr=0.1,0.01", f"hydra.sweep.dir={sweep}"]
    run_cli(args, cwd=tmp_path)
    before = _job_files(sweep)
    assert sum(name.endswith(".hydra/config.yaml") for name in before) == 2
    study.write_text("# @package _global_\ntrainer:\n  epochs: 2\n")
    rerun = run_cli(args, cwd=tmp_path, check=False)
    assert rerun.returncode == 1, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "2 jobs: 2 refused" in rerun.stdout
    assert "refused optim.lr=0.1: " in rerun.stdout and "trainer.epochs: 1 -> 2" in rerun.stdout
    assert _job_files(sweep) == before
    assert not (sweep / ".mbv2_refused").exists()
    # Hydra rewrote multirun.yaml for the new launch; the one that made the jobs is kept
    kept = list(sweep.glob("multirun.*.yaml"))
    assert len(kept) == 1 and "epochs: 1" in kept[0].read_text()
    assert "epochs: 2" in (sweep / "multirun.yaml").read_text()
    # the edit undone, the same command finds both jobs finished and trains nothing
    study.write_text("# @package _global_\ntrainer:\n  epochs: 1\n")
    again = run_cli(args, cwd=tmp_path)
    assert "2 jobs: 2 completed" in again.stdout and _job_files(sweep) == before
    assert len(list(sweep.glob("multirun.*.yaml"))) == 2  # the epochs-2 launch's record too


def test_sigterm_marks_terminated_and_a_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SLOW, "data.num_samples=1500", f"hydra.run.dir={run_dir}"]
    proc = _start(args, tmp_path)
    _wait_for(lambda: _epochs_done(run_dir) >= 1, proc)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    m = _metrics(run_dir)
    assert m["status"] == "terminated" and "signal 15" in m["error"]
    assert (run_dir / "checkpoints" / "last.pdckpt").is_file()
    run_cli(args, cwd=tmp_path)  # the same command: continues from the last checkpoint
    m = _metrics(run_dir)
    assert m["status"] == "completed" and m["epochs_completed"] == 3
    assert m["resumed"][0]["epoch"] >= 1
    assert _eval_epochs(run_dir) == [1, 2, 3]


def test_early_stopping_ends_the_run_and_says_when(tmp_path):
    run_dir = tmp_path / "run"
    # an LR this small cannot improve top-1 after the first epoch: patience 2 ends it at 3
    run_cli([*TINY, "trainer.epochs=6", "optim.lr=1e-9", "sched.warmup_epochs=0",
             "trainer.early_stop_patience=2", f"hydra.run.dir={run_dir}"], cwd=ROOT)
    m = _metrics(run_dir)
    assert m["status"] == "stopped_early" and m["stopped_early_epoch"] == 3
    assert m["epochs_completed"] == 3 and m["best_epoch"] == 1
