"""Optimizer and LR schedule from the `optim` and `sched` configs.

Schedules are expressed in epochs in the config and stepped every iteration, so the LR
curve does not depend on the batch size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import paddle
from omegaconf import DictConfig
from paddle.optimizer import lr as lr_sched

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """How one epoch is cut: each of `ranks` processes trains on its 1/ranks shard
    (DistributedBatchSampler), `batch_size` images per device and step."""

    train_images: int
    batch_size: int
    ranks: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.ranks

    @property
    def steps_per_epoch(self) -> int:
        shard = -(-self.train_images // self.ranks)
        return max(1, -(-shard // self.batch_size))


def build_optimization(optim: DictConfig, sched: DictConfig, parameters, epochs: int,
                       plan: BatchPlan) -> tuple[paddle.optimizer.Optimizer, float]:
    """The optimizer with its per-step LR schedule, and the base LR it uses."""
    lr = effective_lr(optim, plan.global_batch)
    if plan.ranks > 1 or optim.lr_reference_batch:
        rule = (f"scaled linearly from optim.lr={optim.lr} per batch of "
                f"{optim.lr_reference_batch}" if optim.lr_reference_batch
                else "optim.lr as given (set optim.lr_reference_batch to scale it)")
        log.info("data parallel over %d process(es): global batch %d = %d per device x %d; "
                 "LR %.4g, %s", plan.ranks, plan.global_batch, plan.batch_size, plan.ranks, lr, rule)
    schedule = build_schedule(sched, lr, epochs, plan.steps_per_epoch)
    return build_optimizer(optim, parameters, schedule), lr


def build_schedule(sched: DictConfig, base_lr: float, epochs: int, steps_per_epoch: int):
    """An LRScheduler stepped once per training iteration."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(float(sched.warmup_epochs) * steps_per_epoch)))
    decay_steps = total - warmup
    if sched.name == "cosine":
        inner = lr_sched.CosineAnnealingDecay(base_lr, T_max=decay_steps, eta_min=float(sched.eta_min))
    elif sched.name == "piecewise":
        # milestones are absolute epochs; the warm-up shifts the inner scheduler's clock
        bounds = [m * steps_per_epoch - warmup for m in sched.milestones if m * steps_per_epoch > warmup]
        values = [base_lr * float(sched.gamma) ** i for i in range(len(bounds) + 1)]
        inner = lr_sched.PiecewiseDecay(bounds, values) if bounds else base_lr
    elif sched.name == "exponential":
        inner = lr_sched.ExponentialDecay(base_lr, gamma=float(sched.gamma) ** (1.0 / steps_per_epoch))
    else:  # constant
        inner = lr_sched.LambdaDecay(base_lr, lambda step: 1.0)
    if warmup > 0:
        return lr_sched.LinearWarmup(inner, warmup_steps=warmup,
                                     start_lr=float(sched.warmup_start_lr), end_lr=base_lr)
    if isinstance(inner, float):
        return lr_sched.LambdaDecay(base_lr, lambda step: 1.0)
    return inner


def effective_lr(optim: DictConfig, global_batch: int) -> float:
    """optim.lr, scaled linearly to the global batch when optim.lr_reference_batch is set."""
    lr = float(optim.lr)
    if optim.lr_reference_batch:
        lr *= global_batch / float(optim.lr_reference_batch)
    return lr


def build_optimizer(optim: DictConfig, parameters, schedule) -> paddle.optimizer.Optimizer:
    wd = float(optim.weight_decay)
    l2 = paddle.regularizer.L2Decay(wd) if wd > 0 else None
    clip = paddle.nn.ClipGradByGlobalNorm(float(optim.grad_clip)) if optim.grad_clip else None
    common = dict(learning_rate=schedule, parameters=parameters, grad_clip=clip)
    name = optim.name
    if name in ("momentum", "sgd"):
        momentum = float(optim.momentum) if name == "momentum" else 0.0
        return paddle.optimizer.Momentum(momentum=momentum, use_nesterov=bool(optim.nesterov),
                                         weight_decay=l2, **common)
    if name == "adam":
        return paddle.optimizer.Adam(beta1=optim.beta1, beta2=optim.beta2, epsilon=optim.epsilon,
                                     weight_decay=l2, **common)
    if name == "adamw":
        return paddle.optimizer.AdamW(beta1=optim.beta1, beta2=optim.beta2, epsilon=optim.epsilon,
                                      weight_decay=wd, **common)
    if name == "rmsprop":
        return paddle.optimizer.RMSProp(rho=optim.rho, momentum=optim.momentum,
                                        epsilon=optim.epsilon, weight_decay=l2, **common)
    raise ValueError(f"optim.name={name!r} is not supported")

