"""`python -m mbv2.run [overrides]`: compose the config, build, `paddle.Model.fit`.

Returns the best eval/acc_top1, the value Hydra sweepers optimise. Inside a sweep a
failing job is recorded as failed (metrics.json, log) and the sweep moves on; a single
run re-raises so the shell sees the failure.
"""
from __future__ import annotations

import logging
import random
import shlex
import sys
import time
import traceback
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import mbv2  # noqa: F401  (sets the MKL code path before paddle loads)
from mbv2.config import check_config, flat_hparams, register_configs

log = logging.getLogger("mbv2.run")


def select_device(requested: str) -> str:
    import paddle

    if requested == "auto":
        has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
        return "gpu" if has_gpu else "cpu"
    return requested


def seed_everything(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def write_rerun_command(run_dir: Path) -> None:
    """The command line that reproduces this job, beside its resolved config."""
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    cmd = ["python", "-m", "mbv2.run", *overrides]
    text = (f"#!/bin/sh\n# reruns this job into a new run dir; started as: "
            f"{shlex.join(sys.argv)}\ncd {shlex.quote(hc.runtime.cwd)} && {shlex.join(cmd)}\n")
    (run_dir / "command.sh").write_text(text)


def train(cfg: DictConfig, run_dir: Path, run_name: str) -> float:
    """Build data, model, optimizer and schedule from `cfg`; fit; return best top-1."""
    import paddle

    from mbv2.checkpoint import Checkpointer
    from mbv2.data import build_data, write_class_names
    from mbv2.model import build_model, count_macs, count_parameters
    from mbv2.optim import build_optimizer, build_schedule
    from mbv2.tracking import RunTracker

    check_config(cfg)
    device = paddle.set_device(select_device(str(cfg.trainer.device)))
    seed_everything(int(cfg.trainer.seed))
    OmegaConf.save(cfg, run_dir / "config_resolved.yaml", resolve=True)

    data = build_data(cfg.data)
    write_class_names(data.class_names, run_dir / "class_names.txt")
    net = build_model(cfg.model, num_classes=data.num_classes, device=str(device))

    t = cfg.trainer
    steps_per_epoch = max(1, -(-len(data.train) // int(t.batch_size)))
    schedule = build_schedule(cfg.sched, float(cfg.optim.lr), int(t.epochs), steps_per_epoch)
    optimizer = build_optimizer(cfg.optim, net.parameters(), schedule)

    size = int(cfg.data.image_size)
    inputs = paddle.static.InputSpec([None, 3, size, size], "float32", "image")
    labels = paddle.static.InputSpec([None, 1], "int64", "label")
    model = paddle.Model(net, inputs, labels)
    loss = paddle.nn.CrossEntropyLoss(label_smoothing=float(t.label_smoothing))
    model.prepare(optimizer, loss, paddle.metric.Accuracy(topk=(1, 5)))

    static = {"params_trainable": count_parameters(net), "macs": count_macs(net, size),
              "image_size": size, "device": select_device(str(cfg.trainer.device)), "num_classes": data.num_classes,
              "train_images": len(data.train), "val_images": len(data.val)}
    tracker = RunTracker(run_dir, run_name, flat_hparams(cfg), static,
                         log_freq=int(t.log_freq), epochs=int(t.epochs))
    log.info("run %s: MobileNetV2 x%s, %d params, %.1f M MACs at %d px, %s, dir %s",
             run_name, cfg.model.scale, static["params_trainable"], static["macs"] / 1e6,
             size, device, run_dir)
    try:
        model.fit(data.train, data.val, batch_size=int(t.batch_size), epochs=int(t.epochs),
                  eval_freq=int(t.eval_freq), log_freq=int(t.log_freq), save_dir=None,
                  verbose=int(t.verbose), shuffle=True, num_workers=int(t.num_workers),
                  callbacks=[tracker, Checkpointer(run_dir)])
        if tracker.metrics.get("last_eval_epoch") != int(t.epochs):
            # fit evaluates when epoch % eval_freq == 0; the final weights always get one
            model.evaluate(data.val, batch_size=int(t.batch_size), verbose=0,
                           num_workers=int(t.num_workers), callbacks=[tracker, Checkpointer(run_dir)])
    except BaseException as e:
        tracker.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    metrics = tracker.finish("completed")
    return float(metrics["best_eval_acc_top1"])


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    run_name = run_dir.name if hc.mode != RunMode.MULTIRUN else (hc.sweep.subdir or run_dir.name)
    write_rerun_command(run_dir)
    started = time.time()
    try:
        return train(cfg, run_dir, run_name)
    except Exception as e:
        if hc.mode != RunMode.MULTIRUN:
            raise
        # one bad job must not end the sweep: record it, report NaN to the sweeper
        log.error("job %s failed after %.0f s: %s\n%s", run_name, time.time() - started, e,
                  traceback.format_exc())
        _mark_failed(run_dir, e)
        return float("nan")


def _mark_failed(run_dir: Path, error: BaseException) -> None:
    """A job that failed before its tracker existed (bad config value) still says so."""
    from mbv2.tracking import METRICS_FILE, write_json_atomic

    path = run_dir / METRICS_FILE
    if not path.exists():
        write_json_atomic(path, {"status": "failed", "error": f"{type(error).__name__}: {error}"})


register_configs()

if __name__ == "__main__":
    main()
