"""The typed schema every YAML file in conf/ and experiments/ is checked against, and
the one place every default lives.

Hydra merges the YAML groups into these dataclasses, so a wrong type or an unknown key
(`model.scale=abc`, `optim.lrr=0.1`) fails at composition with the key named. The
defaults below are the default run's; a group's YAML file (conf/data/folder.yaml, ...)
sets only what that option changes. Value ranges that a type cannot express
(`optim.lr=-1`) are checked by `check_config`, which every entry point calls before it
builds anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mbv2.data.errors import PILLOW_MAX_IMAGE_PIXELS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"
# absolute, so the config is found however mbv2.run starts: `python -m`, a file path given
# to paddle.distributed.launch, or the installed `mbv2-run` script
CONF_DIR = PROJECT_ROOT / "conf"


@dataclass
class ModelConfig:
    # MobileNetV2 as PaddleClas 2.3 builds it; PaddleClas *_pretrained.pdparams load into it
    name: str = "mobilenet_v2"
    # width multiplier: channels of every row are int(c * scale); conv9 is 1280 wide,
    # int(1280 * scale) when scale > 1. PaddleClas's ImageNet model is 1.0
    scale: float = 0.5
    # rows of [t expansion, c channels, n units, s stride of the first unit];
    # None: PaddleClas's table (mbv2.model.PADDLECLAS_BOTTLENECK)
    bottleneck: Optional[List[List[int]]] = None
    # conv1's stride: 2 (PaddleClas), or 1 for small images (4x the MACs, same weights)
    stem_stride: int = 2
    # None: the number of classes the data source reports
    class_num: Optional[int] = None
    # a .pdparams file (PaddleClas or mbv2), or its prefix (`model_data/57`, as
    # paddle.Model.save names them); a head of another class count is skipped and logged
    pretrained: Optional[str] = None
    # true: a file that fits less than 90 % of the backbone (another width or network) is an
    # error naming the width it holds; false: load what fits, warn, train the rest from scratch
    pretrained_strict: bool = True
    # mbv2's CPU kernels (depthwise conv, fused batch norm + ReLU6, small-map 1x1 convs):
    # auto: on CPU, Paddle's own ops on GPU; on; off (Paddle's ops everywhere)
    cpu_kernels: str = "auto"


@dataclass
class DataConfig:
    # digits, fake, folder, list, seed_list, cifar10; each one's keys are documented in
    # conf/data/<name>.yaml
    name: str = "digits"
    image_size: int = 32
    # folder: root/train/<class>/* + root/val/<class>/*, or root/<class>/* (split by
    # val_fraction); list/seed_list: the directory relative image paths start from
    root: Optional[str] = None
    # digits, folder without train/ + val/: share of each class held out for validation
    # (stratified, seeded by split_seed)
    val_fraction: float = 0.2
    split_seed: int = 0
    # folder: class folder names to use, in class-id order; None: every folder, sorted
    classes: Optional[List[str]] = None
    # list/seed_list: label list files (absolute, under root, or relative to the cwd)
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    # list: between path and label (PaddleClas `delimiter`); "\t" or "tab" for a tab
    delimiter: str = " "
    # list: PaddleClas class_id_map_file (`id name` lines); seed_list: one name per line
    class_names: Optional[str] = None
    # cifar10: a local cifar-10-python.tar.gz (never downloaded)
    archive: Optional[str] = None
    # fake: classes to generate; list/seed_list: labels must be below it
    # (None: the class_names file's length, else the largest label + 1)
    num_classes: Optional[int] = None
    # fake: random images whose colour depends on the class, so a model can learn them
    num_samples: int = 256
    num_val_samples: int = 64
    # image files: the start-up scan (header: open + verify, full: decode every pixel,
    # off) and what it does with unusable files (error: list them all and stop, skip:
    # train without them). During training a file that fails is always replaced + counted.
    scan: str = "header"
    on_bad_image: str = "error"
    # decompression-bomb guard (Pillow's default); raise it, or None, for trusted huge images
    max_image_pixels: Optional[int] = PILLOW_MAX_IMAGE_PIXELS
    # train augmentation: RandomResizedCrop area range, horizontal flip
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class OptimConfig:
    name: str = "momentum"
    lr: float = 0.03
    weight_decay: float = 4e-5
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    rho: float = 0.95
    # clip the global gradient norm to this value; None: no clipping
    grad_clip: Optional[float] = None
    # None: optim.lr is used as given, whatever the number of devices. A batch size (e.g.
    # 256): optim.lr is the LR for that global batch and is scaled linearly to the run's
    # global batch (trainer.batch_size x devices), as in Goyal et al. 2017.
    lr_reference_batch: Optional[int] = None


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
class LossConfig:
    # cross_entropy or poly1 (CE + epsilon * (1 - p_t), Leng et al. 2022)
    name: str = "cross_entropy"
    # share of the target spread over all classes (both losses)
    label_smoothing: float = 0.0
    # poly1: the weight of the (1 - p_t) term
    epsilon: float = 1.0


@dataclass
class TrainerConfig:
    epochs: int = 15
    # per device; the global batch is batch_size x devices
    batch_size: int = 64
    # DataLoader worker processes; 0 decodes in the training process
    num_workers: int = 0
    # evaluate every eval_freq epochs (and always after the last)
    eval_freq: int = 1
    # train/* scalars every log_freq steps
    log_freq: int = 10
    seed: int = 42
    # auto: GPU when Paddle is built with CUDA and sees one, else CPU; or cpu, gpu, gpu:N
    device: str = "auto"
    # CPU math threads of this process; None: the cores it may use, shared evenly with
    # the other processes of a data-parallel launch on the node
    cpu_threads: Optional[int] = None
    # paddle.Model's progress output: 0 silent, 1 progress bar, 2 a line per log_freq steps
    verbose: int = 2
    # a run dir or checkpoint to continue from (into the same run dir); None: a new run
    resume: Optional[str] = None
    # epoch checkpoints kept besides last and best: the k highest eval/acc_top1
    keep_top_k: int = 3
    # decay of an exponential moving average of the weights (e.g. 0.999); None: off
    ema_decay: Optional[float] = None
    # mixed precision, O1 or O2; None: off. GPU: Paddle's AMP. CPU: the kernels' larger 1x1
    # convs multiply in bfloat16 (CPUs with AVX512-BF16 or AMX; else a warning, FP32)
    amp: Optional[str] = None
    # end the run after this many evaluated epochs without a better eval/acc_top1 (status
    # stopped_early, the epoch in metrics.json); None: train every epoch
    early_stop_patience: Optional[int] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigValueError(ValueError):
    """A config value of the right type but outside what the code accepts."""


_CHOICES = {
    "model.name": ("mobilenet_v2",),
    "model.cpu_kernels": ("auto", "on", "off"),
    "model.stem_stride": (1, 2),
    "data.name": ("digits", "folder", "fake", "list", "seed_list", "cifar10"),
    "data.scan": ("header", "full", "off"),
    "data.on_bad_image": ("error", "skip"),
    "optim.name": ("momentum", "sgd", "adam", "adamw", "rmsprop"),
    "sched.name": ("cosine", "piecewise", "exponential", "constant"),
    "loss.name": ("cross_entropy", "poly1"),
    "trainer.verbose": (0, 1, 2),
    "trainer.amp": (None, "O1", "O2"),
}

# key -> (test, what a valid value is)
_RANGES = {
    # upper bounds: past them a run dies in a MemoryError that names nothing
    "model.scale": (lambda v: 0 < v <= 8, "> 0 and <= 8 (x8 is already ~210 M parameters)"),
    "data.image_size": (lambda v: 8 <= v <= 2048, "between 8 and 2048 pixels"),
    "data.val_fraction": (lambda v: 0 < v < 1, "between 0 and 1"),
    "data.num_samples": (lambda v: v >= 1, ">= 1"),
    "data.num_val_samples": (lambda v: v >= 1, ">= 1"),
    "data.num_classes": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "data.max_image_pixels": (lambda v: v is None or v >= 1, ">= 1 or null (no limit)"),
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.grad_clip": (lambda v: v is None or v > 0, "> 0 or null"),
    "optim.lr_reference_batch": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "sched.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "sched.warmup_start_lr": (lambda v: v >= 0, ">= 0"),
    "sched.gamma": (lambda v: v > 0, "> 0"),
    "trainer.epochs": (lambda v: v >= 1, ">= 1"),
    "trainer.batch_size": (lambda v: 1 <= v <= 65536, "between 1 and 65536"),
    "trainer.num_workers": (lambda v: v >= 0, ">= 0"),
    "trainer.eval_freq": (lambda v: v >= 1, ">= 1"),
    "trainer.log_freq": (lambda v: v >= 1, ">= 1"),
    "trainer.cpu_threads": (lambda v: v is None or v >= 1, ">= 1 or null (all cores)"),
    "loss.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "trainer.keep_top_k": (lambda v: v >= 0, ">= 0"),
    "trainer.ema_decay": (lambda v: v is None or 0 < v < 1, "in (0, 1) or null"),
    "trainer.early_stop_patience": (lambda v: v is None or v >= 1, ">= 1 or null"),
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
    _check_data_sources(cfg.data)
    _warn_suspicious(cfg)
    device = str(cfg.trainer.device)
    if device not in ("auto", "cpu") and not device.startswith("gpu"):
        raise ConfigValueError(f"trainer.device={device!r}: use auto, cpu, gpu or gpu:N")


def _warn_suspicious(cfg: DictConfig) -> None:
    """Legal settings that rarely mean what they say: a warning naming the key."""
    import logging

    log = logging.getLogger("mbv2.config")
    epochs, warmup = int(cfg.trainer.epochs), float(cfg.sched.warmup_epochs)
    if warmup >= epochs:
        log.warning("sched.warmup_epochs=%s is not shorter than trainer.epochs=%d: the LR "
                    "only warms up and never reaches its schedule", warmup, epochs)


def _check_data_sources(data: DictConfig) -> None:
    """Keys one data source needs; their files are checked when the data is built."""
    if data.name == "folder" and not data.root:
        raise ConfigValueError("data=folder needs data.root=<dir holding train/ and val/, "
                               "or one folder per class>")
    if data.name == "fake" and data.num_classes is None:
        raise ConfigValueError("data=fake needs data.num_classes=<number of classes>")
    if data.name in ("list", "seed_list"):
        for key in ("train_list", "val_list"):
            if not data[key]:
                raise ConfigValueError(f"data={data.name} needs data.{key}=<label list file>")
    if data.name == "list" and not data.delimiter:
        raise ConfigValueError("data.delimiter is empty; use ' ' (PaddleClas default) or '\\t'")
    if data.name == "cifar10" and not data.archive:
        raise ConfigValueError("data=cifar10 needs data.archive=<path of cifar-10-python.tar.gz>")
    if data.classes is not None:
        classes = list(data.classes)
        if not classes or len(set(classes)) != len(classes):
            raise ConfigValueError(f"data.classes={classes} must be distinct folder names "
                                   f"(or null for every folder)")


# The names of the hyper-parameters every run shows in VisualDL's HParams views, in
# column order. Short and undotted, both for a reason measured in a real browser: a dotted
# name (`model.scale`) is read there as a nested path and its cells stay empty; and an axis
# name wider than its column (columns are >= 60 px) sends the parallel-coordinates view
# into an endless shortening loop that freezes the tab, so every name stays <= 9 characters.
CORE_HPARAMS = {
    "scale": "model.scale", "lr": "optim.lr", "optim": "optim.name", "sched": "sched.name",
    "batch": "trainer.batch_size", "epochs": "trainer.epochs", "img_size": "data.image_size",
    "data": "data.name", "wd": "optim.weight_decay", "loss": "loss.name", "smoothing": "loss.label_smoothing",
    "ema": "trainer.ema_decay",
}
MAX_HPARAM_NAME = 9
# short names for keys a sweep may vary; others use their last part, cut to 9 characters
_SHORT_NAMES = {
    "warmup_epochs": "warmup", "warmup_start_lr": "warmup_lr", "num_classes": "classes",
    "num_samples": "samples", "num_val_samples": "val_n", "val_fraction": "val_frac",
    "crop_scale": "crop", "grad_clip": "clip", "lr_reference_batch": "lr_batch",
    "milestones": "miles", "bottleneck": "table", "keep_top_k": "top_k",
    "early_stop_patience": "patience", "cpu_kernels": "kernels", "split_seed": "split",
    "max_image_pixels": "max_px", "stem_stride": "stem", "on_bad_image": "bad_img", "num_workers": "workers",
}
# VisualDL's parallel-coordinates view pins the tab at 100 % CPU with ~20 hyper-parameters
MAX_HPARAMS = 16


def hparam_name(key: str, taken: Sequence[str] = ()) -> str:
    """The HParams name of a config key: its core name, else a short form of its last part
    (at most MAX_HPARAM_NAME characters), made unique against `taken`."""
    core = {v: k for k, v in CORE_HPARAMS.items()}
    if key in core:
        return core[key]
    last = key.rsplit(".", 1)[-1]
    name = _SHORT_NAMES.get(last, last)[:MAX_HPARAM_NAME]
    i = 2
    while name in taken:
        name = f"{name[:MAX_HPARAM_NAME - 1]}{i}"
        i += 1
    return name


def run_hparams(cfg: DictConfig, varying: Sequence[str] = ()) -> dict[str, Any]:
    """The hyper-parameters a run shows in VisualDL: the core set, then the config keys that
    vary in the sweep, at most MAX_HPARAMS, as int|float|str (bools and lists become text;
    null values are left out, so the cell stays empty instead of reading "null"). The full
    config stays in the run dir."""
    keys = list(CORE_HPARAMS.values())
    keys += [k for k in varying if k not in keys and OmegaConf.select(cfg, k, default=_ABSENT)
             is not _ABSENT]
    out: dict[str, Any] = {}
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if len(out) == MAX_HPARAMS:
            break
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = str(OmegaConf.to_container(value, resolve=True))
        elif isinstance(value, bool):
            value = str(value).lower()
        out[hparam_name(key, list(out))] = value
    return out


_ABSENT = object()


def register_configs() -> None:
    """Schema and experiment presets into Hydra's ConfigStore; idempotent."""
    from mbv2.sweeper import register_sweeper

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    register_sweeper(cs)  # hydra/sweeper=mbv2_optuna
    # experiments/ sits at the project root, outside conf/; registering its files here
    # makes `experiment=<name>` work from any working directory.
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="experiment", name=path.stem, node=node, package="_global_",
                 provider=f"mbv2 experiments ({EXPERIMENTS_DIR})")
