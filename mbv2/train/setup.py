"""Everything a run sets up around the recipe, each from the `trainer` config's keys:
the device and threads, the seeds, the `paddle.Model` (inputs, loss, metrics, AMP), the
train loader, the facts metrics.json records, and resuming from a checkpoint."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from omegaconf import DictConfig

from mbv2 import distributed
from mbv2.model import count_macs, count_parameters
from mbv2.runtime import default_cpu_threads, describe_process, select_device, set_cpu_threads
from mbv2.lifecycle import Terminated
from mbv2.train.checkpoint import (Checkpointer, CheckpointError, load_checkpoint,
                                   resolve_checkpoint, restore_rng)
from mbv2.train.ema import ModelEma
from mbv2.train.optim import BatchPlan
from mbv2.train.pruning import TrialPruned
from mbv2.train.tracking import METRICS_FILE, RECORDS_FILE, RunTracker

log = logging.getLogger(__name__)


def fresh_parameter_names():
    """Parameter (and optimizer state) names counted from 0 for this run, whatever ran
    before it in the process. The optimizer's state is keyed by these names: without this,
    job 3 of a sweep names its parameters after jobs 1 and 2, and its checkpoint would not
    load into a rerun that skips them."""
    return paddle.utils.unique_name.guard()


def prepare_process(trainer: DictConfig) -> str:
    """Device (`trainer.device`), CPU threads (`trainer.cpu_threads`), seeds
    (`trainer.seed`); returns the device name."""
    device = select_device(str(trainer.device))
    paddle.set_device(device)
    if device == "cpu":
        local_procs = int(os.environ.get("PADDLE_LOCAL_SIZE", distributed.world_size()))
        set_cpu_threads(trainer.cpu_threads or default_cpu_threads(local_procs))
        log.info(describe_process())
    seed_everything(int(trainer.seed))
    return device


def seed_everything(seed: int) -> None:
    """Paddle's generator (weight init) gets the same seed on every rank; the Python and
    NumPy generators that drive augmentation get one per rank, so data-parallel ranks do
    not crop their shards identically."""
    random.seed(seed + distributed.rank())
    np.random.seed(seed + distributed.rank())
    paddle.seed(seed)


def prepare_model(net: paddle.nn.Layer, optimizer, loss: paddle.nn.Layer, trainer: DictConfig,
                  image_size: int, device: str) -> paddle.Model:
    """`paddle.Model` with its inputs, the loss, top-1/top-5 and mixed precision
    (`trainer.amp`): Paddle's AMP on GPU; on CPU the kernels' bfloat16 1x1 products."""
    inputs = paddle.static.InputSpec([None, 3, image_size, image_size], "float32", "image")
    labels = paddle.static.InputSpec([None, 1], "int64", "label")
    model = paddle.Model(net, inputs, labels)
    amp_configs = None
    if trainer.amp:
        if device.startswith("gpu"):
            amp_configs = {"level": str(trainer.amp)}
        else:
            cpu_mixed_precision(net, str(trainer.amp))
    model.prepare(optimizer, loss, paddle.metric.Accuracy(topk=(1, 5)), amp_configs=amp_configs)
    return model


def cpu_mixed_precision(net, level: str) -> None:
    """trainer.amp on CPU: the 1x1 convs' products in bfloat16 (float32 weights, batch
    norm, accumulation and everything else) where the CPU and the kernels allow it."""
    from mbv2.ops import mixed_precision

    ops, why_not = mixed_precision(net.ops)
    if why_not:
        log.warning("trainer.amp=%s is ignored on this CPU: %s", level, why_not)
        return
    net.use_ops(ops)
    log.info("trainer.amp=%s on CPU: 1x1 convs multiply bfloat16 copies of their operands "
             "(float32 master weights and accumulation)", level)


def record_run(cfg: DictConfig, run_dir: Path, class_names, resumed: Resumed | None, net) -> None:
    """The run's resolved config, class names and layer-by-layer model summary beside it,
    once everything it needs was built (a resume that cannot go on leaves the dir as it
    was), and its `.hydra/` record (overrides.yaml: what a resume replays; config.yaml:
    what the sweep summary reads), which Hydra does not write into a dir that already held
    a run (rundirs.record_subdir): a resume, or a job that starts over there, is recorded
    here once it is sure to train."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mbv2.artifacts import write_class_names
    from mbv2.files import write_text_atomic
    from mbv2.model.summary import layer_summary, write_summary_csv

    write_text_atomic(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_class_names(class_names, run_dir)
    write_summary_csv(layer_summary(net, int(cfg.data.image_size)), run_dir / "model_summary.csv")
    kept = [o for o in HydraConfig.get().overrides.task
            if not o.startswith(("trainer.resume=", "hydra."))]
    write_text_atomic(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(kept))
    write_text_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))


def run_facts(net, data, image_size: int, device: str, plan: BatchPlan, lr: float) -> dict[str, Any]:
    """What metrics.json records about the run besides its results."""
    return {"params_trainable": count_parameters(net), "macs": count_macs(net, image_size),
            "image_size": image_size, "device": device, "num_classes": data.num_classes,
            "train_images": len(data.train), "val_images": len(data.val),
            "world_size": plan.ranks, "global_batch_size": plan.global_batch, "lr_effective": lr,
            **data.bad_image_counts()}


def train_loader(dataset, trainer: DictConfig, start_epoch: int):
    """The loader `paddle.Model.fit` builds from a Dataset, with the sampler's epoch set:
    it shuffles with RandomState(epoch), so a resumed run sees the order the uninterrupted
    run would have seen (fit's own loader would restart at epoch 0's order)."""
    from paddle.io import DataLoader, DistributedBatchSampler

    sampler = DistributedBatchSampler(dataset, batch_size=int(trainer.batch_size), shuffle=True)
    sampler.set_epoch(start_epoch)
    # places: None is the device paddle.set_device chose
    return DataLoader(dataset, batch_sampler=sampler, num_workers=int(trainer.num_workers),
                      return_list=True)


def fit(model: paddle.Model, dataset, trainer: DictConfig, start_epoch: int, callbacks: list,
        resumed: Resumed | None) -> None:
    """The epochs left (`trainer.epochs` minus those a resumed run already did)."""
    epochs = int(trainer.epochs)
    if start_epoch >= epochs:
        log.info("resume: all %d epochs were already done; nothing to train", epochs)
        return
    loader = train_loader(dataset, trainer, start_epoch)
    if resumed is not None:  # last: building the model and data drew from the RNGs
        restore_rng(resumed.state["rng"])
    model.fit(loader, None, epochs=epochs - start_epoch, log_freq=int(trainer.log_freq),
              save_dir=None, verbose=int(trainer.verbose), callbacks=callbacks)


@dataclass
class Resumed:
    """A checkpoint to continue from (`trainer.resume`), read before anything is built so
    that a damaged file fails first."""

    path: Path
    state: dict[str, Any]

    def check_fits(self, net, resume: str) -> None:
        """Before anything is written: the checkpoint's weights must fit the network this
        config builds (a changed model.* would fail deep in Paddle without naming the key)."""
        own = net.state_dict()
        wrong = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in self.state["model"].items()
                 if k in own and list(v.shape) != list(own[k].shape)]
        missing = [k for k in own if k not in self.state["model"]]
        if wrong or missing:
            detail = "; ".join(wrong[:3]) or f"missing {missing[:3]}"
            raise CheckpointError(
                f"trainer.resume={resume}: {self.path} does not fit the model this config builds "
                f"({detail}): a model.* setting differs from the run's (see its "
                f"config_resolved.yaml). Resume without changing model.*; nothing was written")

    @classmethod
    def load(cls, resume: str | None) -> Resumed | None:
        if not resume:
            return None
        path = resolve_checkpoint(str(resume))
        return cls(path, load_checkpoint(path))

    def restore(self, net, optimizer, checkpointer: Checkpointer, tracker: RunTracker,
                ema: ModelEma | None) -> int:
        """Weights, optimizer (with the LR schedule's step), checkpoint bookkeeping, the
        tracker's record and the EMA, as they were; returns the epochs already done."""
        net.set_state_dict(self.state["model"])
        optimizer.set_state_dict(self.state["optimizer"])
        epoch = int(self.state["meta"]["epoch"])
        checkpointer.load_state_dict(self.state["meta"]["checkpointer"])
        aside = checkpointer.reconcile(self.path, epoch)
        if aside is not None:  # the later records and metrics are kept with the later weights
            for name in (RECORDS_FILE, METRICS_FILE):
                if (tracker.run_dir / name).is_file():
                    shutil.copy2(tracker.run_dir / name, aside / name.replace("vdlrecords.", "records."))
        planned = self.state["tracker"]["metrics"].get("epochs_planned")
        if planned is not None and int(planned) != tracker.epochs:
            log.warning("trainer.epochs is %d on resume, the run planned %d: the LR schedule is "
                        "laid out again over %d epochs, so the LR jumps at epoch %d",
                        tracker.epochs, int(planned), tracker.epochs, epoch + 1)
        tracker.resume(self.state["tracker"], str(self.path))
        if ema is not None and self.state.get("ema"):
            ema.load_state_dict(self.state["ema"])
        elif ema is not None:
            log.warning("resume: %s has no EMA weights; the EMA starts from the current "
                        "weights", self.path)
        log.info("resume: %s, epoch %d done, global step %d", self.path, epoch, tracker.global_step)
        return epoch


@contextlib.contextmanager
def recorded_outcome(tracker: RunTracker, data) -> Iterator[None]:
    """metrics.json ends with the run's true status and the bad-image counts, whatever
    happens inside the block: completed, stopped_early (trainer.early_stop_patience),
    pruned (an Optuna pruner; not an error), terminated (SIGTERM), interrupted (Ctrl-C) or
    failed (with the error). Everything but completed/stopped_early/pruned is re-raised."""
    try:
        yield
    except TrialPruned as e:
        _record_bad_images(tracker, data)
        tracker.finish("pruned", error=str(e))
        return
    except BaseException as e:
        status = {Terminated: "terminated", KeyboardInterrupt: "interrupted"}.get(type(e), "failed")
        _record_bad_images(tracker, data)
        try:
            tracker.finish(status, error=f"{type(e).__name__}: {e}")
        except OSError as write_error:  # the full disk that ended the run may refuse this too
            log.warning("run %s: could not record its %s status (%s); the error that ended "
                        "it follows", tracker.run_name, status, write_error)
        raise
    _record_bad_images(tracker, data)
    tracker.finish("stopped_early" if tracker.metrics.get("stopped_early_epoch") else "completed")


def _record_bad_images(tracker: RunTracker, data) -> None:
    """Images skipped at the start-up scan or replaced during training: metrics.json + log."""
    tracker.metrics.update(data.bad_image_counts())
    summary = data.bad_image_summary()
    if summary:
        log.warning(summary)
