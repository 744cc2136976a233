"""`python -m mbv2.run [overrides]`: compose the config, build, `paddle.Model.fit`.

Returns the best eval/acc_top1, the value Hydra sweepers optimise. Inside a sweep a
failing job is recorded as failed (metrics.json, log), returns None and the sweep moves
on; a single run re-raises so the shell sees the failure.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shlex
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    # run as a file (`python -m paddle.distributed.launch mbv2/run.py`): import mbv2 as a
    # package, not this file's folder as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import mbv2  # noqa: F401  (sets the MKL code path before paddle loads)
from mbv2 import distributed
from mbv2.config import CONF_DIR, LAUNCH_ARGS_ENV, check_config, flat_hparams, register_configs
from mbv2.runtime import default_cpu_threads, describe_malloc, select_device, set_cpu_threads

log = logging.getLogger("mbv2.run")


def seed_everything(seed: int) -> None:
    """Paddle's generator (weight init) gets the same seed on every rank; the Python and
    NumPy generators that drive augmentation get one per rank, so data-parallel ranks do
    not crop their shards identically."""
    import paddle

    random.seed(seed + distributed.rank())
    np.random.seed(seed + distributed.rank())
    paddle.seed(seed)


def write_rerun_command(run_dir: Path) -> None:
    """The command line that reproduces this job, beside its resolved config."""
    hc = HydraConfig.get()
    # a resumed run's command line carries trainer.resume; the rerun is a fresh run
    overrides = [o for o in hc.overrides.task if not o.startswith("trainer.resume=")]
    cmd = ["python", "-m", "mbv2.run", *overrides]
    text = (f"#!/bin/sh\n# reruns this job into a new run dir; started as: "
            f"{shlex.join(sys.argv)}\ncd {shlex.quote(hc.runtime.cwd)} && {shlex.join(cmd)}\n")
    (run_dir / "command.sh").write_text(text)


def build_train_loader(dataset, batch_size: int, num_workers: int, place, start_epoch: int):
    """The loader `paddle.Model.fit` builds from a Dataset, with the sampler's epoch set:
    it shuffles with RandomState(epoch), so a resumed run sees the order the uninterrupted
    run would have seen (fit's own loader would restart at epoch 0's order)."""
    from paddle.io import DataLoader, DistributedBatchSampler

    sampler = DistributedBatchSampler(dataset, batch_size=batch_size, shuffle=True)
    sampler.set_epoch(start_epoch)
    return DataLoader(dataset, batch_sampler=sampler, places=place, num_workers=num_workers,
                      return_list=True)


def train(cfg: DictConfig, run_dir: Path, run_name: str) -> float:
    """Build data, model, optimizer and schedule from `cfg`; fit; return best top-1."""
    import paddle

    from mbv2.checkpoint import (Checkpointer, EpochEnd, ModelEma, load_checkpoint,
                                 resolve_checkpoint, restore_rng)
    from mbv2.data import BAD_IMAGES_FILE, build_data, write_class_names
    from mbv2.model import build_model, count_macs, count_parameters
    from mbv2.optim import build_optimizer, build_schedule, effective_lr
    from mbv2.tracking import RunTracker

    check_config(cfg)
    t = cfg.trainer
    resumed = None
    if t.resume:  # read first: a damaged checkpoint should fail before anything is built
        ckpt_path = resolve_checkpoint(str(t.resume))
        resumed = load_checkpoint(ckpt_path)
    device_name = select_device(str(t.device))
    device = paddle.set_device(device_name)
    if device_name == "cpu":
        local_procs = int(os.environ.get("PADDLE_LOCAL_SIZE", distributed.world_size()))
        set_cpu_threads(t.cpu_threads or default_cpu_threads(local_procs))
        log.info("CPU allocator: %s; MKL code path: MKL_DEBUG_CPU_TYPE=%s", describe_malloc(),
                 os.environ.get("MKL_DEBUG_CPU_TYPE", "unset"))
    seed_everything(int(t.seed))
    primary, ranks = distributed.is_primary(), distributed.world_size()
    if primary:
        OmegaConf.save(cfg, run_dir / "config_resolved.yaml", resolve=True)

    data = build_data(cfg.data, bad_image_log=run_dir / BAD_IMAGES_FILE)
    if primary:
        write_class_names(data.class_names, run_dir / "class_names.txt")
    net = build_model(cfg.model, num_classes=data.num_classes, device=device_name)

    # each rank trains on its 1/ranks shard (DistributedBatchSampler), batch_size per device
    shard = -(-len(data.train) // ranks)
    steps_per_epoch = max(1, -(-shard // int(t.batch_size)))
    global_batch = int(t.batch_size) * ranks
    lr = effective_lr(cfg.optim, global_batch)
    if ranks > 1 or cfg.optim.lr_reference_batch:
        rule = (f"scaled linearly from optim.lr={cfg.optim.lr} per batch of "
                f"{cfg.optim.lr_reference_batch}" if cfg.optim.lr_reference_batch
                else "optim.lr as given (set optim.lr_reference_batch to scale it)")
        log.info("data parallel over %d process(es): global batch %d = %d per device x %d; "
                 "LR %.4g, %s", ranks, global_batch, int(t.batch_size), ranks, lr, rule)
    schedule = build_schedule(cfg.sched, lr, int(t.epochs), steps_per_epoch)
    optimizer = build_optimizer(cfg.optim, net.parameters(), schedule)

    size = int(cfg.data.image_size)
    inputs = paddle.static.InputSpec([None, 3, size, size], "float32", "image")
    labels = paddle.static.InputSpec([None, 1], "int64", "label")
    model = paddle.Model(net, inputs, labels)
    loss = paddle.nn.CrossEntropyLoss(label_smoothing=float(t.label_smoothing))
    amp_configs = None
    if t.amp:
        if device_name.startswith("gpu"):
            amp_configs = {"level": str(t.amp)}
        else:
            log.warning("trainer.amp=%s is ignored on %s: Paddle's AMP needs a GPU", t.amp, device_name)
    model.prepare(optimizer, loss, paddle.metric.Accuracy(topk=(1, 5)), amp_configs=amp_configs)

    static = {"params_trainable": count_parameters(net), "macs": count_macs(net, size),
              "image_size": size, "device": device_name, "num_classes": data.num_classes,
              "train_images": len(data.train), "val_images": len(data.val),
              "world_size": ranks, "global_batch_size": global_batch, "lr_effective": lr,
              **data.bad_image_counts()}
    tracker = RunTracker(run_dir, run_name, flat_hparams(cfg), static,
                         log_freq=int(t.log_freq), epochs=int(t.epochs), write=primary)
    checkpointer = Checkpointer(run_dir, keep_top_k=int(t.keep_top_k), write=primary)
    ema = ModelEma(net, float(t.ema_decay)) if t.ema_decay else None
    start_epoch = 0
    if resumed is not None:
        net.set_state_dict(resumed["model"])
        optimizer.set_state_dict(resumed["optimizer"])  # includes the LR schedule's step
        meta = resumed["meta"]
        start_epoch = int(meta["epoch"])
        checkpointer.load_state_dict(meta["checkpointer"])
        checkpointer.reconcile(ckpt_path, start_epoch)
        tracker.resume(resumed["tracker"], str(ckpt_path))
        if ema is not None:
            if resumed.get("ema"):
                ema.load_state_dict(resumed["ema"])
            else:
                log.warning("resume: %s has no EMA weights; the EMA starts from the current "
                            "weights", ckpt_path)
        log.info("resume: %s, epoch %d of %d done, global step %d", ckpt_path, start_epoch,
                 int(t.epochs), tracker.global_step)
    log.info("run %s: MobileNetV2 x%s, %d params, %.1f M MACs at %d px, %s, dir %s",
             run_name, cfg.model.scale, static["params_trainable"], static["macs"] / 1e6,
             size, device, run_dir)
    try:
        if start_epoch < int(t.epochs):
            train_loader = build_train_loader(data.train, int(t.batch_size), int(t.num_workers),
                                              device, start_epoch)
            if resumed is not None:  # last: building the model and data drew from the RNGs
                restore_rng(resumed["rng"])
            model.fit(train_loader, None, epochs=int(t.epochs) - start_epoch,
                      log_freq=int(t.log_freq), save_dir=None, verbose=int(t.verbose),
                      callbacks=[tracker, EpochEnd(tracker, checkpointer, data.val, ema, t)])
        else:
            log.info("resume: all %d epochs were already done; nothing to train", int(t.epochs))
    except BaseException as e:
        _record_bad_images(tracker, data)
        tracker.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    _record_bad_images(tracker, data)
    metrics = tracker.finish("completed")
    return float(metrics["best_eval_acc_top1"])


def _record_bad_images(tracker, data) -> None:
    """Images skipped at the start-up scan or replaced during training: metrics.json + log."""
    tracker.metrics.update(data.bad_image_counts())
    summary = data.bad_image_summary()
    if summary:
        log.warning(summary)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    # a multi-GPU sweep job on SLURM: each task becomes one data-parallel rank
    distributed.adopt_slurm_tasks()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    run_name = run_dir.name if hc.mode != RunMode.MULTIRUN else (hc.sweep.subdir or run_dir.name)
    if distributed.is_primary():
        write_rerun_command(run_dir)
    started = time.time()
    try:
        return train(cfg, run_dir, run_name)
    except Exception as e:
        if hc.mode != RunMode.MULTIRUN:
            raise
        # One bad job must not end the sweep: record it and return no value. The Optuna
        # sweeper tells a non-number to the study as a failed trial and carries on; a NaN
        # would make it raise.
        log.error("job %s failed after %.0f s: %s\n%s", run_name, time.time() - started, e,
                  traceback.format_exc())
        _mark_failed(run_dir, e)
        return None


def _mark_failed(run_dir: Path, error: BaseException) -> None:
    """A job that failed before its tracker existed (bad config value) still says so."""
    from mbv2.tracking import METRICS_FILE, write_json_atomic

    path = run_dir / METRICS_FILE
    if not path.exists():
        write_json_atomic(path, {"status": "failed", "error": f"{type(error).__name__}: {error}"})


def _quote(value: str) -> str:
    """A Hydra override value that may hold `,` `=` or spaces (default run dir names do)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_argv(argv: list[str]) -> list[str]:
    """`trainer.resume=<run dir or checkpoint>` alone recreates the run: Hydra composes
    from conf/ and the command line, so the run's own overrides (.hydra/overrides.yaml)
    go first, then any given now, and hydra.run.dir points back at the run dir."""
    given = [a for a in argv[1:] if a.startswith("trainer.resume=")]
    if not given or given[-1] == "trainer.resume=null":
        return argv
    from mbv2.checkpoint import CheckpointError, resolve_checkpoint, run_dir_of

    try:
        ckpt = resolve_checkpoint(given[-1].split("=", 1)[1].strip("'\""))
    except CheckpointError as e:
        raise SystemExit(f"trainer.resume: {e}") from None
    run_dir = run_dir_of(ckpt)
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        raise SystemExit(f"trainer.resume: {recorded} is missing, so the run's settings are "
                         f"unknown; resume a run dir written by mbv2.run")
    skip = ("trainer.resume=", "hydra.run.dir=")
    original = [str(o) for o in OmegaConf.load(recorded) if not str(o).startswith(skip)]
    now = [a for a in argv[1:] if not a.startswith(skip)]
    if any(a in ("-m", "--multirun") for a in now):
        raise SystemExit("trainer.resume continues one run; it cannot be part of a sweep (-m)")
    return [argv[0], *original, *now, f"trainer.resume={_quote(str(ckpt))}",
            f"hydra.run.dir={_quote(str(run_dir))}"]


def cli() -> None:
    """Entry point (`python -m mbv2.run`, `mbv2-run`): remembers the command line so sweep
    jobs can be named by what varies between them (see config.job_dir_name). A resume
    replays the run's own overrides first (`resume_argv`)."""
    sys.argv = resume_argv(sys.argv)
    os.environ[LAUNCH_ARGS_ENV] = json.dumps(sys.argv[1:])
    if not distributed.is_primary():
        # ranks > 0 share rank 0's run dir (see distributed.shared_choice) but leave its
        # files alone: no second .hydra/ copy, their log goes to the launcher's workerlog
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    main()


register_configs()

if __name__ == "__main__":
    cli()
