"""What a trained run hands on: the contract between training, eval, export and predict.

* the class names (`class_names.txt`, line i = class id i) in the run dir and beside an
  exported model;
* the eval transform as data (`preprocess.json`, from `mbv2.data.transforms.eval_spec`):
  predict rebuilds the transform from it (`eval_transform`), other runtimes can follow it;
* the softmax head an exported model adds, so its outputs are class probabilities;
* `restore_run`: the trained network of a run dir or checkpoint, with its config and
  class names, for eval, export and dygraph predict.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import paddle
from omegaconf import DictConfig, OmegaConf

from mbv2.data.transforms import eval_spec, eval_transform
from mbv2.files import write_text_atomic
from mbv2.model import MobileNetV2, build_model
from mbv2.train.checkpoint import (CHECKPOINT_DIR, CheckpointError, load_checkpoint,
                                   resolve_checkpoint, run_dir_of)

__all__ = ["CLASS_NAMES_FILE", "DEPLOY_CONFIG_FILE", "LABEL_MAP_FILE", "MODEL_PREFIX",
           "PREPROCESS_FILE", "WithSoftmax", "eval_transform", "exported_model_files",
           "write_deploy_config", "write_label_map",
           "load_run_config", "preprocess_spec", "read_class_names", "read_preprocess",
           "restore_network", "restore_run", "write_class_names", "write_preprocess"]

log = logging.getLogger(__name__)

CLASS_NAMES_FILE = "class_names.txt"
PREPROCESS_FILE = "preprocess.json"
# PaddleClas's deploy predictor opens Config(<dir>/inference.json|.pdmodel,
# <dir>/inference.pdiparams); exports before this name used model.*
MODEL_PREFIX = "inference"
LEGACY_MODEL_PREFIXES = ("model",)
LABEL_MAP_FILE = "class_id_map.txt"
DEPLOY_CONFIG_FILE = "inference_cls.yaml"
RUN_CONFIG_FILES = ("config_resolved.yaml", ".hydra/config.yaml")


def write_class_names(names: Sequence[str], directory: str | Path) -> Path:
    """One name per line, line i = class id i (the order predictions are reported in)."""
    path = Path(directory) / CLASS_NAMES_FILE
    write_text_atomic(path, "".join(f"{n}\n" for n in names))
    return path


def read_class_names(directory: str | Path, num_classes: int) -> list[str]:
    """The names written by `write_class_names`; class ids when absent or of another count."""
    path = Path(directory) / CLASS_NAMES_FILE
    if path.is_file():
        names = path.read_text(encoding="utf-8").splitlines()
        if len(names) == num_classes:
            return names
        log.warning("%s lists %d names for %d classes; using class ids", path, len(names), num_classes)
    return [str(i) for i in range(num_classes)]


def write_label_map(names: Sequence[str], directory: Path) -> Path:
    """PaddleClas's class_id_map_file: `id name` lines (its Topk splits at the first space)."""
    path = Path(directory) / LABEL_MAP_FILE
    write_text_atomic(path, "".join(f"{i} {n}\n" for i, n in enumerate(names)))
    return path


def write_deploy_config(directory: Path, spec: dict[str, Any], topk: int) -> Path:
    """`inference_cls.yaml` in PaddleClas's deploy format: its predictor
    (`deploy/python/predict_cls.py -c <dir>/inference_cls.yaml`) preprocesses as mbv2
    evaluates (PIL backend, rounded resize, floor crop) and maps ids to names."""
    import yaml

    doc = {
        "Global": {"infer_imgs": "./images", "inference_model_dir": ".", "batch_size": 1,
                   "use_gpu": False, "enable_mkldnn": True, "cpu_num_threads": 2,
                   "enable_benchmark": False, "use_fp16": False, "ir_optim": True,
                   "use_tensorrt": False, "gpu_mem": 8000, "enable_profile": False},
        "PreProcess": {"transform_ops": [
            {"ResizeImage": {"resize_short": spec["resize_short"], "backend": "pil",
                             "interpolation": spec["interpolation"]}},
            {"CropImage": {"size": spec["center_crop"]}},
            {"NormalizeImage": {"scale": 1.0 / 255.0, "mean": spec["mean"], "std": spec["std"],
                                "order": "", "channel_num": 3}},
            {"ToCHWImage": None}]},
        "PostProcess": {"main_indicator": "Topk",
                        "Topk": {"topk": int(topk), "class_id_map_file": LABEL_MAP_FILE},
                        "SavePreLabel": {"save_dir": "./pre_label/"}},
    }
    path = Path(directory) / DEPLOY_CONFIG_FILE
    write_text_atomic(path, yaml.safe_dump(doc, sort_keys=False))
    return path


def exported_model_files(directory: Path) -> tuple[Path, Path] | None:
    """(program, parameters) of an exported model dir, this name or an earlier export's."""
    for prefix in (MODEL_PREFIX, *LEGACY_MODEL_PREFIXES):
        params = Path(directory) / f"{prefix}.pdiparams"
        for suffix in (".json", ".pdmodel"):
            program = Path(directory) / f"{prefix}{suffix}"
            if program.is_file() and params.is_file():
                return program, params
    return None


def preprocess_spec(data_cfg: DictConfig) -> dict[str, Any]:
    """The eval transform mbv2.eval applies, plus what a runtime needs around it."""
    return {**eval_spec(data_cfg), "channel_order": "RGB", "layout": "NCHW", "scale": 1 / 255,
            "input_name": "image", "output": "softmax probabilities [batch, classes]"}


def write_preprocess(directory: Path, spec: dict[str, Any], **facts: Any) -> Path:
    path = directory / PREPROCESS_FILE
    write_text_atomic(path, json.dumps({**spec, **facts}, indent=2) + "\n")
    return path


def read_preprocess(directory: Path) -> dict[str, Any]:
    path = directory / PREPROCESS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; re-export the model with mbv2.export")
    return json.loads(path.read_text(encoding="utf-8"))


class WithSoftmax(paddle.nn.Layer):
    """`net` followed by softmax: what an exported model computes."""

    def __init__(self, net: MobileNetV2):
        super().__init__()
        self.inner = net

    def forward(self, image):
        return paddle.nn.functional.softmax(self.inner(image), axis=-1)


def load_run_config(run_dir: Path) -> DictConfig:
    """The resolved config a run saved (`config_resolved.yaml`, else `.hydra/config.yaml`)."""
    for name in RUN_CONFIG_FILES:
        if (run_dir / name).is_file():
            return OmegaConf.load(run_dir / name)
    raise CheckpointError(f"{run_dir}: no config_resolved.yaml or .hydra/config.yaml; the "
                          f"checkpoint must sit in the run dir mbv2.run wrote "
                          f"(<run dir>/{CHECKPOINT_DIR}/)")


def restore_network(ckpt_path: Path, model_cfg: DictConfig, ema: bool = False, device: str = "cpu"):
    """The trained network of `ckpt_path` (built from the run's `model` config), in eval
    mode, and the checkpoint's meta. `ema=True` takes the EMA weights."""
    ckpt = load_checkpoint(ckpt_path)
    weights = ckpt["model"]
    if ema:
        if not ckpt.get("ema"):
            raise CheckpointError(f"{ckpt_path}: has no EMA weights (the run had "
                                  f"trainer.ema_decay=null); drop ema=true")
        weights = ckpt["ema"]
    head = weights.get("out.weight")
    num_classes = int(head.shape[1]) if head is not None else 1000
    net = build_model(model_cfg, num_classes=num_classes, device=device, weights_follow=True)
    missing, _ = net.set_state_dict(weights)
    if missing:
        raise CheckpointError(f"{ckpt_path}: weights do not fit the run's model config "
                              f"(missing {list(missing)[:5]}...); was config_resolved.yaml edited?")
    net.eval()
    return net, ckpt["meta"]


def restore_run(path: str | Path, ema: bool = False, device: str = "cpu"):
    """(network, run config, class names, checkpoint file, meta) of a run dir or
    checkpoint; the network in eval mode."""
    ckpt = resolve_checkpoint(path)
    run_dir = run_dir_of(ckpt)
    cfg = load_run_config(run_dir)
    net, meta = restore_network(ckpt, cfg.model, ema=ema, device=device)
    return net, cfg, read_class_names(run_dir, net.class_num), ckpt, meta
