"""Sweeps as a user launches them: real Hydra multirun subprocesses on tiny data, the
summary over them, and the runs as a real VisualDL server shows them."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, TINY, run_cli, visualdl_server

pytestmark = pytest.mark.slow
ONE_EPOCH = [*TINY, "trainer.epochs=1"]
# for studies that search the width themselves: a width fixed on the command line wins
ONE_EPOCH_ANY_WIDTH = [a for a in ONE_EPOCH if not a.startswith("model.scale=")]


def _single_sweep_dir(cwd: Path) -> Path:
    (day,) = (cwd / "outputs" / "sweeps").iterdir()
    (sweep,) = day.iterdir()
    return sweep


def _jobs(sweep: Path) -> dict[str, Path]:
    return {p.name: p for p in sweep.iterdir() if (p / ".hydra").is_dir()}


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> Path:
    """A 2 widths x 2 LRs grid, launched from a directory outside the project."""
    cwd = tmp_path_factory.mktemp("grid")
    run_cli(["-m", *ONE_EPOCH, "model.scale=0.25,0.35", "optim.lr=0.1,0.01"], cwd=cwd)
    return _single_sweep_dir(cwd)


def test_grid_makes_four_jobs_named_by_overrides(grid_sweep):
    jobs = _jobs(grid_sweep)
    assert set(jobs) == {
        f"model.scale={s},optim.lr={lr}" for s in ("0.25", "0.35") for lr in ("0.1", "0.01")}
    for name, job in jobs.items():
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed", name
        # the name VisualDL shows: the sweep's date/time, then what varies
        assert metrics["run_name"] == "/".join([*grid_sweep.parts[-2:], name])
        assert len(list(job.glob("vdlrecords.*"))) == 1
        # reproducible: the composed config and the command that reruns the job
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert set(name.split(",")) <= set(overrides)
        command = (job / "command.sh").read_text()
        assert "python -m mbv2.run" in command and name.split(",")[0] in command


def test_summary_over_the_sweep(grid_sweep):
    proc = run_cli([str(grid_sweep)], cwd=ROOT, module="mbv2.summary")
    rows = list(csv.DictReader((grid_sweep / "summary.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    best = [float(r["best_top1_pct"]) for r in rows]
    assert best == sorted(best, reverse=True)
    by_scale = {r["scale"]: int(r["params"]) for r in rows}
    assert by_scale["0.25"] < by_scale["0.35"]
    assert "model.scale=0.35" in proc.stdout  # the table is printed too
    assert (grid_sweep / "summary.md").read_text().count("model.scale=") >= 4
    with Image.open(grid_sweep / "summary.png") as img:
        assert img.size[0] > 300 and img.size[1] > 200


def test_rerun_command_reproduces_a_job(grid_sweep, tmp_path):
    job = _jobs(grid_sweep)["model.scale=0.25,optim.lr=0.1"]
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    run_cli([*overrides, f"hydra.run.dir={tmp_path / 'rerun'}"], cwd=ROOT)
    a = json.loads((job / "metrics.json").read_text())
    b = json.loads((tmp_path / "rerun" / "metrics.json").read_text())
    assert a["final_eval_acc_top1"] == pytest.approx(b["final_eval_acc_top1"], abs=1e-6)
    assert a["final_eval_loss"] == pytest.approx(b["final_eval_loss"], rel=1e-5)


def test_failed_jobs_do_not_stop_the_sweep(tmp_path):
    # -1 is rejected before training; 1e8 diverges to a NaN loss mid-epoch
    proc = run_cli(["-m", *ONE_EPOCH, "sched.warmup_epochs=0", "optim.lr=0.05,-1,100000000.0"],
                   cwd=tmp_path, check=False)
    sweep = _single_sweep_dir(tmp_path)
    jobs = _jobs(sweep)
    status = {n: json.loads((j / "metrics.json").read_text()) for n, j in jobs.items()}
    assert status["optim.lr=0.05"]["status"] == "completed"
    assert status["optim.lr=-1"]["status"] == "failed"
    assert "optim.lr" in status["optim.lr=-1"]["error"]
    assert status["optim.lr=100000000.0"]["status"] == "failed"
    assert "loss is nan" in status["optim.lr=100000000.0"]["error"]
    # every job ran; the sweep's exit status and closing line say which failed
    assert proc.returncode == 1
    closing = [x for x in proc.stdout.splitlines() if x.startswith("sweep ")][-1]
    assert "3 jobs" in closing and "1 completed" in closing and "2 failed" in closing
    assert "optim.lr=-1" in closing and "optim.lr=100000000.0" in closing
    run_cli([str(sweep)], cwd=ROOT, module="mbv2.summary")
    rows = {r["job"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows["optim.lr=0.05"]["status"] == "completed"
    assert rows["optim.lr=-1"]["status"].startswith("failed")
    assert rows["optim.lr=100000000.0"]["status"].startswith("failed")


def test_experiment_from_another_directory(tmp_path):
    # the preset lives in <project>/experiments; the sweep is launched from tmp_path
    run_cli(["experiment=lr_sweep", *ONE_EPOCH, 'hydra.sweeper.params={optim.lr:"0.1,0.02"}'],
            cwd=tmp_path)
    jobs = _jobs(_single_sweep_dir(tmp_path))
    assert len(jobs) == 2 and any("optim.lr=0.02" in n for n in jobs)


def test_submitit_local_launcher(tmp_path):
    run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
             *ONE_EPOCH, "model.scale=0.25,0.35"], cwd=tmp_path)
    jobs = _jobs(_single_sweep_dir(tmp_path))
    assert len(jobs) == 2
    for job in jobs.values():
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    run_cli(["-m", "hydra/launcher=local_parallel", *ONE_EPOCH, "optim.lr=0.1,0.01"], cwd=tmp_path)
    jobs = _jobs(_single_sweep_dir(tmp_path))
    assert len(jobs) == 2
    assert all(json.loads((j / "metrics.json").read_text())["status"] == "completed"
               for j in jobs.values())
    # two jobs at once share the cores: each gets cores // 2 math threads, logged
    cores = len(os.sched_getaffinity(0))
    for job in jobs.values():
        assert yaml.safe_load((job / "config_resolved.yaml").read_text())["trainer"]["cpu_threads"] == max(1, cores // 2)
        assert "2 jobs at once" in (job / "run.log").read_text()


def test_two_sweeps_in_the_same_second_do_not_clobber(tmp_path):
    args = [sys.executable, "-m", "mbv2.run", "-m", *ONE_EPOCH, "optim.lr=0.1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    sweeps = [s for day in (tmp_path / "outputs" / "sweeps").iterdir() for s in day.iterdir()]
    assert len(sweeps) == 2
    for sweep in sweeps:
        (job,) = _jobs(sweep).values()  # nothing varies: named by all its overrides
        assert "optim.lr=0.1" in job.name and (job / "metrics.json").is_file()


# -- VisualDL server -------------------------------------------------------------------

def _get(base: str, path: str, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    return body.get("data", body) if isinstance(body, dict) else body


@pytest.fixture
def vdl_server(grid_sweep):
    with visualdl_server(grid_sweep, grid_sweep) as base:
        yield base


def test_visualdl_server_shows_every_job(vdl_server, grid_sweep):
    base = vdl_server
    runs = _get(base, "/app/api/runs")
    expected = {"/".join([*grid_sweep.parts[-2:], name]): name for name in _jobs(grid_sweep)}
    assert set(expected) <= set(runs), runs  # each job is a run, under its readable name
    scalar = _get(base, "/app/api/scalar/tags")
    tags_by_run = dict(zip(scalar["runs"], scalar["tags"]))
    some_run = sorted(expected)[0]
    for run in expected:
        assert {"train/loss", "train/lr", "eval/acc_top1", "eval/loss",
                "eval/best", "eval/last"} <= set(tags_by_run[run])
    points = _get(base, "/app/api/scalar/list", run=some_run, tag="eval/acc_top1")
    assert len(points) == 1  # one epoch -> one evaluation
    metrics = json.loads((grid_sweep / expected[some_run] / "metrics.json").read_text())
    assert points[0][2] == pytest.approx(metrics["final_eval_acc_top1"], abs=1e-6)
    indicators = _get(base, "/app/api/hparams/indicators")
    names = {i["name"] for i in indicators["hparams"]}
    assert {"scale", "lr", "optim", "data", "epochs"} <= names and len(names) <= 16
    assert all(len(n) <= 9 for n in names)  # longer axis names freeze parallel coordinates
    assert {"eval/best", "eval/last", "eval/loss"} == {m["name"] for m in indicators["metrics"]}
    listed = _get(base, "/app/api/hparams/list")
    assert {Path(r["name"]).name for r in listed} == set(expected.values())  # every job
    assert {r["hparams"]["scale"] for r in listed} == {0.25, 0.35}
    assert {r["hparams"]["lr"] for r in listed} == {0.1, 0.01}
    for r in listed:
        best = json.loads((grid_sweep / Path(r["name"]).name / "metrics.json").read_text())
        assert r["metrics"]["eval/best"] == pytest.approx(best["best_eval_acc_top1"], abs=1e-6)
        assert r["metrics"]["eval/last"] == pytest.approx(best["final_eval_acc_top1"], abs=1e-6)
