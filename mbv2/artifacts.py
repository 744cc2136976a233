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

__all__ = ["CLASS_NAMES_FILE", "DEPLOY_CONFIG_FILE", "DeployConfigError", "LABEL_MAP_FILE", "MODEL_PREFIX",
           "PREPROCESS_FILE", "WithSoftmax", "eval_transform", "exported_model_files",
           "write_deploy_config", "write_label_map",
           "load_run_config", "preprocess_spec", "read_class_names", "read_deploy_config",
           "read_preprocess",
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


class DeployConfigError(ValueError):
    """A PaddleClas deploy config mbv2.predict cannot follow; the message names the file,
    the key and what would work."""


def _number(value: Any, path: Path, key: str) -> float:
    """A YAML number, or PaddleClas's string form of one ("1.0/255.0")."""
    try:
        if isinstance(value, str) and "/" in value:
            a, b = value.split("/", 1)
            return float(a) / float(b)
        return float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise DeployConfigError(f"{path}: {key}={value!r} is not a number") from None


def read_deploy_config(path: str | Path) -> tuple[dict[str, Any], list[str] | None]:
    """The eval transform (`preprocess_spec`'s keys) and the class names (None: no map) a
    PaddleClas deploy config describes, the file its `deploy/python/predict_cls.py -c`
    reads (`deploy/configs/inference_cls.yaml`; mbv2.export writes one too), or a training
    config's Infer section (`ppcls/configs/...`): DecodeImage(to_rgb), ResizeImage
    (resize_short), CropImage(size), NormalizeImage(scale, mean, std) and ToCHWImage, and
    the Topk class_id_map_file (`id name` lines; a relative path is taken from the
    config's dir, then from the current one)."""
    import yaml

    path = Path(path).expanduser()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DeployConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise DeployConfigError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    doc = doc if isinstance(doc, dict) else {}
    # the deploy config's PreProcess, or a training config's Infer section (ppcls/configs)
    infer = doc.get("Infer") if isinstance(doc.get("Infer"), dict) else {}
    ops, where = (doc.get("PreProcess") or {}).get("transform_ops"), "PreProcess.transform_ops"
    if ops is None and infer:
        ops, where = infer.get("transforms"), "Infer.transforms"
    if not isinstance(ops, list):
        raise DeployConfigError(f"{path}: no PreProcess.transform_ops (nor Infer.transforms) "
                                f"list; give PaddleClas's deploy config "
                                f"(deploy/configs/inference_cls.yaml) or the model's training config")
    spec: dict[str, Any] = {"interpolation": "bilinear", "channel_order": "RGB",
                            "layout": "NCHW", "input_name": "image"}
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or len(op) != 1:
            raise DeployConfigError(f"{path}: {where}[{i}] is not one op")
        (name, args), = op.items()
        _follow_op(spec, name, args or {}, path, f"{where}[{i}].{name}")
    missing = [k for k in ("resize_short", "center_crop", "mean") if k not in spec]
    if missing:
        raise DeployConfigError(f"{path}: {where} has no {', '.join(missing)} (from {_DEPLOY_OPS})")
    spec["image_size"] = spec["center_crop"]
    post = (doc.get("PostProcess") or {}).get("Topk") or infer.get("PostProcess") or {}
    names = None
    if isinstance(post, dict) and post.get("class_id_map_file"):
        names = _read_label_map(path, str(post["class_id_map_file"]))
    return spec, names


_DEPLOY_OPS = "DecodeImage(to_rgb), ResizeImage(resize_short), CropImage, NormalizeImage, ToCHWImage"


def _follow_op(spec: dict[str, Any], name: str, args: dict[str, Any], path: Path, key: str) -> None:
    """One PaddleClas preprocessing op into `spec`, or a DeployConfigError naming `key`."""
    if name == "DecodeImage":  # mbv2 decodes every file to RGB, HWC
        if not args.get("to_rgb", True) or args.get("channel_first", False):
            raise DeployConfigError(f"{path}: {key} decodes to BGR or CHW; mbv2.predict "
                                    f"feeds RGB images (to_rgb: True, channel_first: False)")
    elif name == "ResizeImage":
        if "resize_short" not in args:
            raise DeployConfigError(f"{path}: {key} resizes to a fixed size={args.get('size')}; "
                                    f"mbv2.predict follows resize_short (the short side) only")
        spec["resize_short"] = int(_number(args["resize_short"], path, f"{key}.resize_short"))
        if args.get("interpolation") in ("bilinear", "nearest", "bicubic"):
            spec["interpolation"] = args["interpolation"]
        if args.get("backend", "cv2") != "pil":
            log.warning("%s: %s resizes with OpenCV (PaddleClas's default backend); mbv2 "
                        "resizes with Pillow, so scores can differ slightly from "
                        "predict_cls.py's", path, key)
    elif name == "CropImage":
        spec["center_crop"] = int(_number(args.get("size"), path, f"{key}.size"))
    elif name == "NormalizeImage":
        scale = _number(args.get("scale", 1 / 255), path, f"{key}.scale")
        if str(args.get("order", "")).lower() not in ("", "hwc"):
            raise DeployConfigError(f"{path}: {key}.order={args.get('order')!r}: mbv2.predict "
                                    f"normalises HWC images ('' or 'hwc')")
        unit = 255.0 * scale  # (x * scale - mean) / std as (x / 255 - mean') / std'
        spec["mean"] = [_number(v, path, f"{key}.mean") / unit for v in args.get("mean", [0, 0, 0])]
        spec["std"] = [_number(v, path, f"{key}.std") / unit for v in args.get("std", [1, 1, 1])]
    elif name != "ToCHWImage":
        raise DeployConfigError(f"{path}: {key} is not an op mbv2.predict applies ({_DEPLOY_OPS})")


def _read_label_map(config: Path, name: str) -> list[str]:
    """PaddleClas's class_id_map_file as a name list (the data package's parser)."""
    from mbv2.data import DataError
    from mbv2.data.errors import listed
    from mbv2.data.lists import meaningful_lines, parse_id_names

    key = "PostProcess.Topk.class_id_map_file"
    candidates = [Path(name).expanduser()] if Path(name).is_absolute() else [config.parent / name, Path(name)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DeployConfigError(f"{config}: {key}={name} is not there (looked in "
                                f"{', '.join(str(c) for c in candidates)}); fix the path or "
                                f"remove the key to print class ids")
    try:
        names, problems = parse_id_names(found, meaningful_lines(found, "class_names"))
    except DataError as e:  # unreadable or not text
        problems = [str(e)]
    if problems or not names:
        raise DeployConfigError(f"{config}: bad {key}:{listed(problems or [f'{found} names no class'])}")
    return names


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
