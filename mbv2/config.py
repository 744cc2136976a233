"""The typed schema every YAML file in conf/ and experiments/ is checked against.

Hydra merges the YAML groups into these dataclasses, so a wrong type or an unknown key
(`model.scale=abc`, `optim.lrr=0.1`) fails at composition with the key named. Value
ranges that a type cannot express (`optim.lr=-1`) are checked by `check_config`, which
every entry point calls before it builds anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"


@dataclass
class ModelConfig:
    name: str = "mobilenet_v2"
    scale: float = 1.0
    # rows of [t, c, n, s]; None means the PaddleClas table in mbv2/model.py
    bottleneck: Optional[List[List[int]]] = None
    # None: the number of classes the data source reports
    class_num: Optional[int] = None
    pretrained: Optional[str] = None
    # auto: the C++ depthwise kernel on CPU, Paddle's own op on GPU
    fast_depthwise: str = "auto"


@dataclass
class DataConfig:
    name: str = "digits"
    image_size: int = 32
    # folder: root/train/<class>/*, root/val/<class>/*
    root: Optional[str] = None
    # digits: share of the data held out for validation (stratified, split_seed)
    val_fraction: float = 0.2
    split_seed: int = 0
    # fake: random images whose colour depends on the class, so a model can learn them
    num_samples: int = 256
    num_val_samples: int = 64
    num_classes: int = 10
    # train augmentation: RandomResizedCrop area range, horizontal flip
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class OptimConfig:
    name: str = "momentum"
    lr: float = 0.1
    weight_decay: float = 4e-5
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    rho: float = 0.95
    # clip the global gradient norm to this value; None: no clipping
    grad_clip: Optional[float] = None


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    # cosine: the LR it anneals to
    eta_min: float = 0.0
    # piecewise: epochs at which the LR is multiplied by gamma
    milestones: List[int] = field(default_factory=lambda: [30, 60, 90])
    # piecewise: factor per milestone; exponential: factor per epoch
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64
    num_workers: int = 0
    eval_freq: int = 1
    log_freq: int = 10
    seed: int = 42
    device: str = "auto"
    label_smoothing: float = 0.0
    # paddle.Model's progress output: 0 silent, 1 progress bar, 2 a line per log_freq steps
    verbose: int = 2


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigValueError(ValueError):
    """A config value of the right type but outside what the code accepts."""


_CHOICES = {
    "model.name": ("mobilenet_v2",),
    "model.fast_depthwise": ("auto", "on", "off"),
    "data.name": ("digits", "folder", "fake"),
    "optim.name": ("momentum", "sgd", "adam", "adamw", "rmsprop"),
    "sched.name": ("cosine", "piecewise", "exponential", "constant"),
    "trainer.verbose": (0, 1, 2),
}

# key -> (test, what a valid value is)
_RANGES = {
    "model.scale": (lambda v: v > 0, "> 0"),
    "data.image_size": (lambda v: v >= 8, ">= 8 pixels"),
    "data.val_fraction": (lambda v: 0 < v < 1, "between 0 and 1"),
    "data.num_samples": (lambda v: v >= 1, ">= 1"),
    "data.num_val_samples": (lambda v: v >= 1, ">= 1"),
    "data.num_classes": (lambda v: v >= 1, ">= 1"),
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.grad_clip": (lambda v: v is None or v > 0, "> 0 or null"),
    "sched.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "sched.warmup_start_lr": (lambda v: v >= 0, ">= 0"),
    "sched.gamma": (lambda v: v > 0, "> 0"),
    "trainer.epochs": (lambda v: v >= 1, ">= 1"),
    "trainer.batch_size": (lambda v: v >= 1, ">= 1"),
    "trainer.num_workers": (lambda v: v >= 0, ">= 0"),
    "trainer.eval_freq": (lambda v: v >= 1, ">= 1"),
    "trainer.log_freq": (lambda v: v >= 1, ">= 1"),
    "trainer.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def check_config(cfg: DictConfig) -> None:
    """Reject values a type cannot rule out, naming the key and what to give instead."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigValueError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
    for key, (ok, want) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigValueError(f"{key}={value!r} is invalid: it must be {want}")
    crop = list(cfg.data.crop_scale)
    if len(crop) != 2 or not 0 < crop[0] <= crop[1] <= 1:
        raise ConfigValueError(f"data.crop_scale={crop} must be [min, max] with 0 < min <= max <= 1")
    for key in ("data.mean", "data.std"):
        if len(OmegaConf.select(cfg, key)) != 3:
            raise ConfigValueError(f"{key} must hold 3 values, one per RGB channel")
    if min(cfg.data.std) <= 0:
        raise ConfigValueError(f"data.std={list(cfg.data.std)} must be > 0")
    if cfg.data.name == "folder" and not cfg.data.root:
        raise ConfigValueError("data=folder needs data.root=<dir holding train/ and val/>")
    device = str(cfg.trainer.device)
    if device not in ("auto", "cpu") and not device.startswith("gpu"):
        raise ConfigValueError(f"trainer.device={device!r}: use auto, cpu, gpu or gpu:N")


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's hyper-parameters as `section.key -> int|float|str`, the value types
    VisualDL's HParams panel accepts (bools become strings, lists their text)."""
    out: dict[str, Any] = {}
    plain = OmegaConf.to_container(cfg, resolve=True)
    for section in ("model", "data", "optim", "sched", "trainer"):
        for key, value in (plain.get(section) or {}).items():
            if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
                value = str(value)
            out[f"{section}.{key}"] = value
    return out


_UNIQUE_DIRS: dict[str, str] = {}


def unique_dir(base: str, suffix: str = "") -> str:
    """`base` + `_suffix`, made unique on disk by creating it (an exclusive mkdir), so
    two runs or sweeps started in the same second never share a directory. Cached per
    process because Hydra resolves the output dir more than once."""
    name = f"{base}_{suffix}" if suffix else base
    if name in _UNIQUE_DIRS:
        return _UNIQUE_DIRS[name]
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    candidate, i = name, 1
    while True:
        try:
            os.mkdir(candidate)
            break
        except FileExistsError:
            i += 1
            candidate = f"{name}-{i}"
    _UNIQUE_DIRS[name] = candidate
    return candidate


def register_configs() -> None:
    """Schema and experiment presets into Hydra's ConfigStore; idempotent."""
    if not OmegaConf.has_resolver("mbv2_unique_dir"):
        OmegaConf.register_new_resolver("mbv2_unique_dir", unique_dir, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    # experiments/ sits at the project root, outside conf/; registering its files here
    # makes `experiment=<name>` work from any working directory.
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="experiment", name=path.stem, node=node, package="_global_",
                 provider=f"mbv2 experiments ({EXPERIMENTS_DIR})")
