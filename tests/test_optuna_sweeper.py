"""mbv2's Optuna sweeper (hydra/sweeper=mbv2_optuna) as a user runs it: real
`python -m mbv2.run` studies on tiny data, their journal, results file and job dirs; a
failed trial, a rerun that continues the study, pruning from inside fit, and a study
killed mid-trial and rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY, run_cli

optuna = pytest.importorskip("optuna", minversion="4")

pytestmark = pytest.mark.slow
# the study searches the width itself: a width fixed on the command line would win
ANY_WIDTH = [a for a in TINY if not a.startswith("model.scale=")]
PRESET = ["experiment=optuna_lr_width", *ANY_WIDTH]
COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL)


def _study(sweep: Path, name: str = "optuna_lr_width"):
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(sweep / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def _results(sweep: Path) -> dict:
    return yaml.safe_load((sweep / "optimization_results.yaml").read_text())


def _job_metrics(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def test_sweeper_loads_without_optuna_and_names_the_extra(tmp_path):
    """mbv2.sweeper and the config registration import without optuna; choosing the
    sweeper then fails before any job with the install command."""
    code = ("import sys; sys.modules['optuna'] = sys.modules['hydra_plugins'] = None\n"
            "import mbv2.sweeper, mbv2.config; mbv2.config.register_configs()\n"
            "from mbv2.run import cli\n"
            f"sys.argv = ['mbv2.run', '-m', 'hydra/sweeper=mbv2_optuna', 'optim.lr=choice(0.1,0.2)',"
            f" 'hydra.sweep.dir={tmp_path / 's'}']\n"
            "cli()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "pip install -e .[sweep]" in proc.stderr + proc.stdout
    assert not list((tmp_path / "s").glob("*/metrics.json"))


def test_search_space_overrides_and_trial_identity():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mbv2.sweeper.space import format_float, parse_space
    from mbv2.sweeper.study import TrialSpec

    space, fixed = parse_space({"optim.lr": "tag(log, interval(0.001, 0.5))",
                                "model.scale": "choice(0.25, 1.0)",
                                "trainer.epochs": "range(2, 8, 2)"},
                               ["data=fake", "model.scale=0.5"])  # the command line fixes the width
    assert [p.name for p in space] == ["optim.lr", "trainer.epochs"]
    assert fixed == ["data=fake", "model.scale=0.5"]
    lr, epochs = (p.distribution for p in space)
    assert lr.log and (lr.low, lr.high) == (0.001, 0.5)
    assert (epochs.low, epochs.high, epochs.step) == (2, 6, 2)  # Hydra's range stops before 8
    assert space[0].override(0.0123456789) == "optim.lr=0.0123457"
    assert [format_float(x) for x in (3.0, 1e-05, 0.25)] == ["3.0", "1e-05", "0.25"]
    (width,), _ = parse_space({"model.scale": "choice(0.25, 1.0)"}, [])
    assert width.override(1.0) == "model.scale=1.0"  # a choice keeps its text
    spec = TrialSpec("/x/optuna.journal", "s", 7, "maximize", {"name": "median", "n_startup_trials": 1})
    (override,) = OverridesParser.create().parse_overrides([spec.env_override()])
    assert override.key_or_group == "hydra.job.env_set.MBV2_OPTUNA_TRIAL"
    assert TrialSpec.decode(override.value()) == spec


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """The preset study, 3 one-epoch trials, into a known sweep dir."""
    cwd = tmp_path_factory.mktemp("study")
    sweep = cwd / "sweep"
    run_cli([*PRESET, "trainer.epochs=1", "hydra.sweeper.n_trials=3",
             f"hydra.sweep.dir={sweep}"], cwd=cwd)
    return sweep


def test_study_reports_best_and_names_jobs_by_params(study_dir):
    jobs = _job_metrics(study_dir)
    assert len(jobs) == 3 and all(m["status"] == "completed" for m in jobs.values())
    for name in jobs:  # named by the params, no trial number: a retry finds its dir
        keys = [kv.split("=", 1)[0] for kv in name.split(",")]
        assert keys == ["model.scale", "optim.lr"], name
        lr = name.split("optim.lr=")[1]
        assert lr == "%.6g" % float(lr)
    results = _results(study_dir)
    assert results["best_value"] == max(m["best_eval_acc_top1"] for m in jobs.values())
    assert results["trials"]["complete"] == 3 and results["n_trials"] == 3
    best = results["best_params"]
    best_job = f"model.scale={best['model.scale']},optim.lr={'%.6g' % best['optim.lr']}"
    assert jobs[best_job]["best_eval_acc_top1"] == results["best_value"]
    study = _study(study_dir)
    assert [t.state for t in study.trials] == [COMPLETE] * 3
    assert {t.user_attrs["mbv2_job_dir"] for t in study.trials} == set(jobs)


def test_rerun_continues_the_journal(study_dir):
    """The same command, the same sweep dir, a larger n_trials: two more trials in the same
    study; the first three are neither rerun nor touched."""
    before = {p.parent.name: p.stat().st_mtime_ns for p in study_dir.glob("*/metrics.json")}
    run_cli([*PRESET, "trainer.epochs=1", "hydra.sweeper.n_trials=5",
             f"hydra.sweep.dir={study_dir}"], cwd=study_dir.parent)
    study = _study(study_dir)
    assert len(study.trials) == 5 and all(t.state == COMPLETE for t in study.trials)
    after = {p.parent.name: p.stat().st_mtime_ns for p in study_dir.glob("*/metrics.json")}
    assert len(after) == 5
    assert {k: after[k] for k in before} == before
    assert _results(study_dir)["trials"]["complete"] == 5


def test_failed_trial_does_not_stop_the_study(tmp_path):
    """A NaN-loss trial (huge LR, no warm-up) is failed in the study, the other trial still
    runs; both at once through the joblib launcher, each reporting to its own trial."""
    sweep = tmp_path / "sweep"
    run_cli(["-m", "hydra/sweeper=mbv2_optuna", "hydra/launcher=local_parallel",
                    "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=2",
                    "hydra.sweeper.pruner=median", "hydra.sweeper.pruner_settings.n_startup_trials=5",
                    *TINY, "trainer.epochs=2", "sched.warmup_epochs=0",
                    "optim.lr=choice(0.05,1000000.0)", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path, check=False)
    states = {t.params["optim.lr"]: t.state for t in _study(sweep, "mbv2").trials}
    assert states == {0.05: COMPLETE, 1000000.0: FAIL}
    results = _results(sweep)
    assert results["trials"]["failed"] == 1 and results["best_params"] == {"optim.lr": 0.05}
    assert _job_metrics(sweep)["optim.lr=1000000.0"]["status"] == "failed"
    # the jobs (loky worker processes) reported their epochs themselves
    entries = [json.loads(line) for line in (sweep / "optuna.journal").read_text().splitlines()]
    sweeper_worker = entries[0]["worker_id"]  # the entry creating the study
    reports = [e for e in entries if e["op_code"] == 7]  # SET_TRIAL_INTERMEDIATE_VALUE
    assert reports and all(e["worker_id"] != sweeper_worker for e in reports)


def test_pruner_stops_hopeless_trials(tmp_path):
    """Needs mbv2.run's wiring (pruning_callback in the fit callbacks, TrialPruned ->
    status pruned). Grid seed 1 runs LR 0.05 first; with no warm-up it is at 20-35 %
    top-1 on the digits after epoch 1 (measured), the two tiny LRs at chance (10 %), and
    a median pruner with one start-up trial stops them there. (At 16 px, x0.25, batch 64
    and a warm-up epoch every trial was still at chance after two epochs: whether the tiny
    LRs were pruned before the last one rode on the kernels' rounding.)"""
    sweep = tmp_path / "sweep"
    run_cli(["-m", "hydra/sweeper=mbv2_optuna", "hydra.sweeper.sampler=grid", "hydra.sweeper.seed=1",
             "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=median",
             "hydra.sweeper.pruner_settings.n_startup_trials=1",
             "hydra.sweeper.pruner_settings.n_warmup_steps=0", "data=digits", "data.image_size=32",
             "model.scale=0.5", "trainer.batch_size=32", "sched.warmup_epochs=0",
             "trainer.verbose=0", "trainer.epochs=3",
             "optim.lr=choice(0.05,0.00001,0.00002)", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    study = _study(sweep, "mbv2")
    pruned = [t for t in study.trials if t.state == PRUNED]
    assert pruned, [(t.params, t.state, t.intermediate_values) for t in study.trials]
    jobs = _job_metrics(sweep)
    for t in pruned:
        metrics = jobs[t.user_attrs["mbv2_job_dir"]]
        assert metrics["status"] == "pruned"
        assert metrics["epochs_completed"] < 3  # stopped before its last epoch
    assert _results(sweep)["trials"]["pruned"] == len(pruned)
    assert _results(sweep)["best_params"] == {"optim.lr": 0.05}


def _wait_for_second_trial(proc: subprocess.Popen, sweep: Path, timeout: float = 240) -> str:
    """The job dir of the second trial once it has trained an epoch (first one done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        jobs = _job_metrics_safe(sweep)
        done = [n for n, m in jobs.items() if m.get("status") == "completed"]
        running = [n for n, m in jobs.items()
                   if m.get("status") == "running" and m.get("epochs_completed", 0) >= 1]
        if len(done) == 1 and running:
            return running[0]
        time.sleep(0.02)
    raise AssertionError(f"the second trial never ran (exit {proc.poll()})")


def _job_metrics_safe(sweep: Path) -> dict[str, dict]:
    try:
        return _job_metrics(sweep)
    except (OSError, ValueError):  # a file being replaced
        return {}


def test_killed_study_reruns_the_killed_trial(tmp_path):
    """SIGKILL the whole study while its second trial trains; the same command again
    continues the journal: the killed trial is failed + marked interrupted, its params
    are retried (in the same job dir), and n_trials trials count in the end."""
    sweep = tmp_path / "sweep"
    args = [*PRESET, "trainer.epochs=4", "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=none",
            f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mbv2.run", *args], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed_job = _wait_for_second_trial(proc, sweep)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    first_job = next(n for n, m in _job_metrics(sweep).items() if m["status"] == "completed")
    first_mtime = (sweep / first_job / "metrics.json").stat().st_mtime_ns
    assert [t.state.name for t in _study(sweep).trials] == ["COMPLETE", "RUNNING"]

    run_cli(args, cwd=tmp_path)
    trials = _study(sweep).trials
    (killed,) = [t for t in trials if t.user_attrs.get("mbv2_interrupted")]
    (retry,) = [t for t in trials if t.user_attrs.get("mbv2_retry_of") == killed.number]
    assert killed.state == FAIL and killed.number == 1
    assert retry.state == COMPLETE and retry.params == killed.params
    assert retry.user_attrs["mbv2_job_dir"] == killed_job
    counted = [t for t in trials if not t.user_attrs.get("mbv2_interrupted")]
    assert len(counted) == 3 and all(t.state == COMPLETE for t in counted)
    assert (sweep / first_job / "metrics.json").stat().st_mtime_ns == first_mtime
    results = _results(sweep)
    assert results["trials"]["complete"] == 3 and results["trials"]["interrupted"] == 1
    assert _job_metrics(sweep)[killed_job]["status"] == "completed"
