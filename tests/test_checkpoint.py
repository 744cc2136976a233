"""Checkpoints and resume: a run killed with SIGKILL mid-epoch and resumed ends where an
uninterrupted run ends (metrics and VisualDL steps); top-k pruning; damaged files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paddle
import pytest
from visualdl import LogReader, LogWriter

from mbv2.train.checkpoint import (CKPT_SUFFIX, SUFFIXES, Checkpointer, CheckpointError,
                                   CheckpointSaveError, load_checkpoint)
from mbv2.train.tracking import RECORDS_FILE, truncate_records
from tests.conftest import ROOT, TINY, run_cli

# 160 images / batch 16 = 10 steps an epoch (~1 s here): room to kill inside epoch 3
RESUME_RUN = [*TINY, "data.num_samples=160", "trainer.epochs=4", "optim.lr=0.05"]
STEPS_PER_EPOCH = 10


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _scalars(run_dir: Path, tag: str) -> list:
    return LogReader(file_path=str(run_dir / RECORDS_FILE)).get_data("scalar", tag)


def _kill_inside_epoch_3(run_dir: Path) -> None:
    """Start the run, SIGKILL it once epoch 2's checkpoint is written and epoch 3 trains."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mbv2.run", *RESUME_RUN, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            try:
                m = _metrics(run_dir)
            except (FileNotFoundError, json.JSONDecodeError):
                m = {}
            if (m.get("last_checkpoint") or {}).get("epoch") == 2:
                # a third of an epoch into epoch 3: the checkpoint is followed by a few
                # milliseconds of bookkeeping, then training batches
                time.sleep(m["history"][-1]["train_seconds"] / 3)
                break
            assert proc.poll() is None, f"run ended early: {proc.stderr.read().decode()[-3000:]}"
            time.sleep(0.01)
        else:
            pytest.fail("epoch 2's checkpoint never appeared")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli([*RESUME_RUN, f"hydra.run.dir={straight}"], cwd=ROOT)

    _kill_inside_epoch_3(killed)
    at_kill = _metrics(killed)
    assert at_kill["status"] == "running" and at_kill["last_checkpoint"]["epoch"] == 2
    assert at_kill["epochs_completed"] in (2, 3), "killed inside epoch 3 (or its eval)"

    run_cli([f"trainer.resume={killed}"], cwd=tmp_path)  # the run dir alone is enough

    a, b = _metrics(straight), _metrics(killed)
    assert b["status"] == "completed" and b["epochs_completed"] == 4
    assert b["resumed"] == [{"epoch": 2, "global_step": 2 * STEPS_PER_EPOCH,
                             "from_checkpoint": str(killed / "checkpoints" / f"last{CKPT_SUFFIX}")}]
    for key in ("best_eval_acc_top1", "best_epoch", "final_eval_acc_top1", "final_eval_loss",
                "final_train_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3, 4]
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["eval_loss"] == pytest.approx(ha["eval_loss"], rel=1e-5)

    # one record file, every step exactly once, same values as the uninterrupted run
    assert sorted(p.name for p in killed.glob("vdlrecords.*")) == [RECORDS_FILE]
    steps = list(range(1, 4 * STEPS_PER_EPOCH + 1))
    for tag in ("train/loss", "train/lr"):
        assert [r.id for r in _scalars(killed, tag)] == steps, tag
        assert [r.value for r in _scalars(killed, tag)] == pytest.approx(
            [r.value for r in _scalars(straight, tag)], rel=1e-5, abs=1e-7), tag
    assert [r.id for r in _scalars(killed, "eval/acc_top1")] == [1, 2, 3, 4]

    # same checkpoints as the uninterrupted run: last, best, the top 3 epochs
    names = lambda d: sorted(p.name for p in (d / "checkpoints").glob(f"*{CKPT_SUFFIX}"))
    assert names(killed) == names(straight)
    assert len([n for n in names(killed) if n.startswith("epoch_")]) == 3
    assert load_checkpoint(killed / "checkpoints" / f"last{CKPT_SUFFIX}")["meta"]["epoch"] == 4
    # and it reruns as a fresh run, without the resume
    rerun = (killed / "command.sh").read_text().splitlines()[-1]
    assert "python -m mbv2.run" in rerun and "trainer.resume" not in rerun


def _tiny_model() -> paddle.Model:
    net = paddle.nn.Linear(4, 2)
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.Momentum(learning_rate=0.1, parameters=net.parameters()))
    return model


def test_top_k_keeps_exactly_k_and_best(tmp_path):
    saver, model = Checkpointer(tmp_path, keep_top_k=3), _tiny_model()
    metrics = [0.1, 0.5, None, 0.3, 0.7, 0.2, 0.6]  # None: an epoch without eval
    for epoch, metric in enumerate(metrics, start=1):
        saver.save(model, epoch, epoch * 10, metric, extra={})
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob(f"epoch_*{CKPT_SUFFIX}"))
    assert files == ["epoch_0002.pdckpt", "epoch_0005.pdckpt", "epoch_0007.pdckpt"]
    for prefix in ("epoch_0002", "best", "last"):  # each as a full set, Model.load-able
        for suffix in (".pdparams", ".pdopt"):
            assert (tmp_path / "checkpoints" / f"{prefix}{suffix}").is_file()
    best = load_checkpoint(tmp_path / "checkpoints" / f"best{CKPT_SUFFIX}")["meta"]
    assert best["epoch"] == 5 and best["eval/acc_top1"] == pytest.approx(0.7)
    assert load_checkpoint(tmp_path / "checkpoints" / f"last{CKPT_SUFFIX}")["meta"]["epoch"] == 7
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def _snapshot(ckdir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(ckdir.iterdir())}


@pytest.mark.parametrize("failing", SUFFIXES)
def test_a_save_that_cannot_write_changes_nothing_and_says_what_to_do(tmp_path, monkeypatch, failing):
    """Disk full while `last` is written (any of its three files): the run dir keeps the
    previous epoch's files untouched (same inodes, same bytes, no temporaries), best and
    top-k bookkeeping are as before, the error names the file and the way on, and the
    next save that can write works as if the failed one never happened."""
    import errno

    from mbv2.train import checkpoint as ck

    saver, model = Checkpointer(tmp_path, keep_top_k=2), _tiny_model()
    saver.save(model, 1, 10, 0.2, extra={})
    saver.save(model, 2, 20, 0.4, extra={})
    ckdir = tmp_path / "checkpoints"
    before, bookkeeping = _snapshot(ckdir), saver.state_dict()

    real_paddle_save, real_ckpt_save = ck.paddle.save, ck.ckptfile.save_checkpoint

    def full(path) -> None:
        with open(path, "wb") as f:  # a partial file first, as a real full disk leaves
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def paddle_save(obj, path, *a, **k):  # path: last's temporary name, ".last.pdopt.<pid>.tmp"
        return full(path) if f"last{failing}." in str(path) else real_paddle_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.paddle, "save", paddle_save)
    monkeypatch.setattr(ck.ckptfile, "save_checkpoint",
                        lambda obj, path: full(path) if failing == CKPT_SUFFIX else real_ckpt_save(obj, path))
    with pytest.raises(CheckpointSaveError) as e:
        saver.save(model, 3, 30, 0.9, extra={})  # would be the new best and in the top 2
    msg = str(e.value)
    assert str(ckdir / f"last{failing}") in msg and "No space left on device" in msg
    assert "as they were before epoch 3" in msg and f"trainer.resume={tmp_path}" in msg
    assert _snapshot(ckdir) == before
    assert saver.state_dict() == bookkeeping

    monkeypatch.undo()
    saver.save(model, 3, 30, 0.9, extra={})
    assert load_checkpoint(ckdir / f"best{CKPT_SUFFIX}")["meta"]["epoch"] == 3
    assert sorted(p.name for p in ckdir.glob(f"epoch_*{CKPT_SUFFIX}")) == [
        "epoch_0002.pdckpt", "epoch_0003.pdckpt"]
    assert not [p for p in ckdir.iterdir() if p.name.endswith(".tmp")]


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    Checkpointer(tmp_path, keep_top_k=1).save(_tiny_model(), 1, 10, 0.5, extra={})
    last = tmp_path / "checkpoints" / f"last{CKPT_SUFFIX}"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(last)
    assert str(last) in str(e.value) and "truncated" in str(e.value)
    assert "best.pdckpt" in str(e.value)  # what to use instead


@pytest.mark.slow
def test_resume_from_truncated_checkpoint_fails_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    run_cli([*TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}"], cwd=ROOT)
    last = run_dir / "checkpoints" / f"last{CKPT_SUFFIX}"
    last.write_bytes(last.read_bytes()[:1000])
    proc = run_cli([f"trainer.resume={run_dir}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert str(last) in proc.stderr and "truncated" in proc.stderr


def test_truncate_records_drops_steps_after_the_checkpoint(tmp_path):
    with LogWriter(logdir=str(tmp_path), file_name=RECORDS_FILE) as w:
        for step in range(1, 11):
            w.add_scalar("train/loss", float(step), step)
        for epoch in (1, 2, 3):
            w.add_scalar("eval/acc_top1", 0.1 * epoch, epoch)
            w.add_scalar("eval_ema/acc_top1", 0.1 * epoch, epoch)
    path = tmp_path / RECORDS_FILE
    with open(path, "ab") as f:  # a record the killed process only half wrote
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00partial")
    assert truncate_records(path, max_step=6, max_epoch=2) == 4 + 1 + 1 + 1
    reader = LogReader(file_path=str(path))
    assert [r.id for r in reader.get_data("scalar", "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [r.id for r in reader.get_data("scalar", "eval/acc_top1")] == [1, 2]
    assert [r.id for r in reader.get_data("scalar", "eval_ema/acc_top1")] == [1, 2]
