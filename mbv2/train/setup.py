"""Everything a run sets up around the recipe, each from the `trainer` config's keys:
the device and threads, the seeds, the `paddle.Model` (inputs, loss, metrics, AMP), the
train loader, the facts metrics.json records, and resuming from a checkpoint."""
from __future__ import annotations

import contextlib
import logging
import os
import random
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
from mbv2.train.checkpoint import Checkpointer, load_checkpoint, resolve_checkpoint, restore_rng
from mbv2.train.ema import ModelEma
from mbv2.train.optim import BatchPlan
from mbv2.train.tracking import RunTracker

log = logging.getLogger(__name__)


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


def prepare_model(net: paddle.nn.Layer, optimizer, trainer: DictConfig, image_size: int,
                  device: str) -> paddle.Model:
    """`paddle.Model` with its inputs, the loss (`trainer.label_smoothing`), top-1/top-5
    and mixed precision on GPU (`trainer.amp`)."""
    inputs = paddle.static.InputSpec([None, 3, image_size, image_size], "float32", "image")
    labels = paddle.static.InputSpec([None, 1], "int64", "label")
    model = paddle.Model(net, inputs, labels)
    loss = paddle.nn.CrossEntropyLoss(label_smoothing=float(trainer.label_smoothing))
    amp_configs = None
    if trainer.amp:
        if device.startswith("gpu"):
            amp_configs = {"level": str(trainer.amp)}
        else:
            log.warning("trainer.amp=%s is ignored on %s: Paddle's AMP needs a GPU", trainer.amp, device)
    model.prepare(optimizer, loss, paddle.metric.Accuracy(topk=(1, 5)), amp_configs=amp_configs)
    return model


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
        checkpointer.reconcile(self.path, epoch)
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
    """metrics.json ends as completed or failed (with the error), with the bad-image
    counts, whatever happens inside the block; a failure is re-raised."""
    try:
        yield
    except BaseException as e:
        _record_bad_images(tracker, data)
        tracker.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    _record_bad_images(tracker, data)
    tracker.finish("completed")


def _record_bad_images(tracker: RunTracker, data) -> None:
    """Images skipped at the start-up scan or replaced during training: metrics.json + log."""
    tracker.metrics.update(data.bad_image_counts())
    summary = data.bad_image_summary()
    if summary:
        log.warning(summary)
