"""Data-parallel training through Paddle's own launcher: real `paddle.distributed.launch`
processes on this CPU (gloo), against a single-process run of the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mbv2.train.optim import effective_lr
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

# colour-coded fake classes: learnable in a few epochs, so accuracies can be compared
DP_ARGS = ["model.scale=0.25", "data=fake", "data.num_samples=256", "data.num_val_samples=64",
           "data.num_classes=4", "optim=adam", "optim.lr=0.005", "trainer.epochs=16",
           "trainer.log_freq=1", "trainer.verbose=0"]


def _only_run_dir(cwd: Path) -> Path:
    (day,) = (cwd / "outputs" / "runs").iterdir()
    runs = list(day.iterdir())
    assert len(runs) == 1, f"all ranks must share one run dir, found {runs}"
    return runs[0]


@pytest.fixture(scope="module")
def dp_and_single(tmp_path_factory):
    dp_cwd = tmp_path_factory.mktemp("dp")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
         "--log_dir", str(dp_cwd / "log"), str(ROOT / "mbv2" / "run.py"),
         *DP_ARGS, "trainer.batch_size=16"],
        cwd=dp_cwd, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted((dp_cwd / "log").glob("workerlog.*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-5000:]
    single_cwd = tmp_path_factory.mktemp("single")
    run_cli([*DP_ARGS, "trainer.batch_size=32"], cwd=single_cwd)
    return _only_run_dir(dp_cwd), _only_run_dir(single_cwd), logs


def test_two_processes_share_one_run_dir_and_rank0_writes(dp_and_single):
    dp_dir, _, logs = dp_and_single
    assert len(list(dp_dir.glob("vdlrecords.*"))) == 1
    assert (dp_dir / "checkpoints" / "last.pdckpt").is_file()
    m = json.loads((dp_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and m["world_size"] == 2
    assert m["global_batch_size"] == 32 and m["lr_effective"] == pytest.approx(0.005)
    assert "global batch 32 = 16 per device x 2" in logs  # the rule is logged
    assert (dp_dir / ".hydra" / "config.yaml").is_file()


def test_data_parallel_matches_single_process(dp_and_single):
    dp_dir, single_dir, _ = dp_and_single
    dp = json.loads((dp_dir / "metrics.json").read_text())
    single = json.loads((single_dir / "metrics.json").read_text())
    # same global batch and steps; batch-norm statistics are per device (batch 16 each), so
    # not bit-equal: measured, the two-process run reaches 0.78 best top-1 on these 64
    # validation images, and the single process 0.72-0.98 across seeds 42 and 0-3 and
    # kernel versions (the rounding alone moves one seed by 0.1-0.2: seed 42 0.81 with one
    # batch norm summation order, 0.72 with the next; means 0.89 with both). Both must
    # learn (chance is 0.25) and stay close.
    assert single["best_eval_acc_top1"] >= 0.6 and dp["best_eval_acc_top1"] >= 0.6
    assert abs(dp["best_eval_acc_top1"] - single["best_eval_acc_top1"]) <= 0.25
    assert dp["final_train_loss"] == pytest.approx(single["final_train_loss"], abs=0.5)
    assert [h["epoch"] for h in dp["history"]] == list(range(1, 17))
    # each rank saw half the data per epoch: 256 / 2 / 16 = 8 steps, as the single run's 256 / 32
    assert dp["train_images"] == single["train_images"] == 256


def test_lr_rule(cfg_factory):
    cfg = cfg_factory(["optim.lr=0.1"])
    assert effective_lr(cfg.optim, global_batch=512) == pytest.approx(0.1)  # as given
    cfg = cfg_factory(["optim.lr=0.1", "optim.lr_reference_batch=256"])
    assert effective_lr(cfg.optim, global_batch=512) == pytest.approx(0.2)
    assert effective_lr(cfg.optim, global_batch=64) == pytest.approx(0.025)


def test_slurm_tasks_become_paddle_ranks():
    from mbv2.distributed import paddle_env_from_slurm

    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242"}
    out = paddle_env_from_slurm(env, ["gpu01", "gpu02"])
    assert out["PADDLE_TRAINER_ID"] == "5" and out["PADDLE_TRAINERS_NUM"] == "8"
    endpoints = out["PADDLE_TRAINER_ENDPOINTS"].split(",")
    assert len(endpoints) == 8 and endpoints[0] == "gpu01:24242" and endpoints[4] == "gpu02:24242"
    assert out["PADDLE_CURRENT_ENDPOINT"] == "gpu02:24243"  # task 5 = node 2, local task 1
    assert out["FLAGS_selected_gpus"] == "1" and out["PADDLE_MASTER"] == "gpu01:24242"
