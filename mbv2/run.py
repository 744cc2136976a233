"""`python -m mbv2.run [overrides]`: compose the config, build, `paddle.Model.fit`.

Returns the best eval/acc_top1, the value Hydra sweepers optimise. Inside a sweep a
failing job is recorded as failed (metrics.json, log), returns None and the sweep moves
on; a single run re-raises so the shell sees the failure.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    # run as a file (`python -m paddle.distributed.launch mbv2/run.py`): import mbv2 as a
    # package, not this file's folder as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mbv2 import distributed, lifecycle, rundirs, runtime
from mbv2.config import CONF_DIR, check_config, register_configs, run_hparams

log = logging.getLogger("mbv2.run")


def train(cfg: DictConfig, run_dir: Path, run_name: str, varying: Sequence[str] = ()) -> float:
    """The recipe: data, model, optimizer and schedule from `cfg`; fit; best top-1.
    `varying`: the config keys shown in VisualDL beside the core set (what the sweep varies)."""
    # paddle loads here, after cli() configured the process
    from mbv2.data import BAD_IMAGES_FILE, build_data
    from mbv2.model import build_model
    from mbv2.train import callbacks as cb
    from mbv2.train import setup
    from mbv2.train.checkpoint import Checkpointer
    from mbv2.train.ema import ModelEma
    from mbv2.train.losses import build_loss
    from mbv2.train.optim import BatchPlan, build_optimization
    from mbv2.train.tracking import RunTracker

    check_config(cfg)
    t, size, primary = cfg.trainer, int(cfg.data.image_size), distributed.is_primary()
    resumed = setup.Resumed.load(t.resume)  # a damaged checkpoint fails before anything is built
    device = setup.prepare_process(t)
    data = build_data(cfg.data, bad_image_log=run_dir / BAD_IMAGES_FILE)
    net = build_model(cfg.model, num_classes=data.num_classes, device=device)
    if resumed:
        resumed.check_fits(net, str(t.resume))
    plan = BatchPlan(len(data.train), int(t.batch_size), distributed.world_size())
    optimizer, lr = build_optimization(cfg.optim, cfg.sched, net.parameters(), int(t.epochs), plan)
    model = setup.prepare_model(net, optimizer, build_loss(cfg.loss), t, size, device)
    if primary:
        setup.record_run(cfg, run_dir, data.class_names, resumed, net)
    facts = setup.run_facts(net, data, size, device, plan, lr)
    tracker = RunTracker(run_dir, run_name, run_hparams(cfg, varying), facts, log_freq=int(t.log_freq),
                         epochs=int(t.epochs), write=primary)
    checkpointer = Checkpointer(run_dir, keep_top_k=int(t.keep_top_k), write=primary)
    ema = ModelEma(net, float(t.ema_decay)) if t.ema_decay else None
    start_epoch = resumed.restore(net, optimizer, checkpointer, tracker, ema) if resumed else 0
    log.info("run %s: MobileNetV2 x%s, %d params, %.1f M MACs at %d px, %s (%s), dir %s",
             run_name, net.scale, facts["params_trainable"], facts["macs"] / 1e6, size, device,
             net.ops.name, run_dir)
    callbacks = cb.run_callbacks(t, tracker, checkpointer, data.val, ema)
    with setup.recorded_outcome(tracker, data):
        setup.fit(model, data.train, t, start_epoch, callbacks, resumed)
    return float(tracker.metrics["best_eval_acc_top1"])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    # a multi-GPU sweep job on SLURM: each task becomes one data-parallel rank
    distributed.adopt_slurm_tasks()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    run_name = rundirs.run_name(run_dir, (hc.sweep.subdir or run_dir.name) if sweep else None)
    started = time.time()
    try:
        with lifecycle.RunDirLock(run_dir) if distributed.is_primary() else nullcontext():
            return _run_job(cfg, hc, run_dir, run_name, sweep)
    except Exception as e:
        if not sweep:
            raise
        # One bad job must not end the sweep: record it and return no value. The Optuna
        # sweeper tells a non-number to the study as a failed trial and carries on; a NaN
        # would make it raise.
        if isinstance(e, lifecycle.RunDirError):  # nothing was written there: no traceback
            log.error("job %s refused its dir: %s", run_name, e)
            lifecycle.note_refused(run_dir, str(e))
            return None
        log.error("job %s failed after %.0f s: %s\n%s", run_name, time.time() - started, e,
                  traceback.format_exc())
        _mark_failed(run_dir, e)
        return None


def _run_job(cfg: DictConfig, hc, run_dir: Path, run_name: str, sweep: bool) -> float:
    """Train in `run_dir`, or continue or skip the run it already holds (lifecycle.plan_job)."""
    if not cfg.trainer.resume:
        plan = lifecycle.plan_job(run_dir, cfg)
        if plan.reason:
            log.info("job %s: %s", run_name, plan.reason)
        if plan.action == "done":
            return float(plan.best)
        if plan.action == "resume":
            cfg.trainer.resume = str(run_dir)
        elif lifecycle.holds_run(run_dir) and distributed.is_primary():
            lifecycle.set_aside_attempt(run_dir)
    jobs = lifecycle.parallel_jobs(hc) if sweep else 1
    if cfg.trainer.cpu_threads is None and jobs > 1:  # k jobs at once share the cores
        cfg.trainer.cpu_threads = runtime.default_cpu_threads(jobs)
        log.info("job %s: %d jobs at once: %d CPU threads each", run_name, jobs, cfg.trainer.cpu_threads)
    if distributed.is_primary() and not cfg.trainer.resume:
        rundirs.write_rerun_command(run_dir)
    from mbv2.train.setup import fresh_parameter_names

    with fresh_parameter_names():
        return train(cfg, run_dir, run_name, rundirs.varying_keys(hc.overrides.task, sweep))


def _mark_failed(run_dir: Path, error: BaseException) -> None:
    """A job that failed before its tracker existed (bad config value) still says so."""
    from mbv2.files import write_json_atomic
    from mbv2.train.tracking import METRICS_FILE

    path = run_dir / METRICS_FILE
    if not path.exists():
        write_json_atomic(path, {"status": "failed", "error": f"{type(error).__name__}: {error}"})


def cli() -> None:
    """Entry point (`python -m mbv2.run`, `mbv2-run`): sets the process up before paddle
    loads, remembers the command line so sweep jobs can be named by what varies between
    them (rundirs.job_dir_name), and replays a resumed run's own overrides first
    (rundirs.resume_argv)."""
    runtime.configure_process()
    rundirs.check_explicit_dirs(sys.argv)
    sys.argv = rundirs.resume_argv(sys.argv)
    rundirs.check_explicit_dirs(sys.argv)  # the resumed run's own dir, now named
    os.environ[rundirs.LAUNCH_ARGS_ENV] = json.dumps(sys.argv[1:])
    if not distributed.is_primary():
        # ranks > 0 share rank 0's run dir (see distributed.shared_choice) but leave its
        # files alone: no second .hydra/ copy, their log goes to the launcher's workerlog
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    try:
        main()
    except lifecycle.Terminated as e:  # recorded as terminated; rerun the command to resume
        print(f"mbv2.run: {e}; the run is marked terminated and resumes from its last "
              f"checkpoint when the same command runs again", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None


register_configs()
rundirs.register_resolvers()

if __name__ == "__main__":
    cli()
