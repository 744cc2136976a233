"""Weights from a `.pdparams` file (PaddleClas or mbv2) into a network, by key."""
from __future__ import annotations

import logging
import os
import warnings

import paddle
import paddle.nn as nn

log = logging.getLogger(__name__)

SUFFIX = ".pdparams"


def resolve_pretrained(path: str) -> str:
    """The file `model.pretrained` names: the path itself, or `<path>.pdparams` for a
    prefix as PaddleClas users have them (`paddle.Model.save` and PaddleClas's own
    checkpoints are named `output/.../57` with the suffix left off)."""
    if os.path.isfile(path):
        return path
    if not path.endswith(SUFFIX) and os.path.isfile(path + SUFFIX):
        return path + SUFFIX
    tried = "" if path.endswith(SUFFIX) else f" (nor {path + SUFFIX!r})"
    raise FileNotFoundError(
        f"model.pretrained={path!r}: no such file{tried}; give the path of a .pdparams "
        f"file or its prefix")


def load_pretrained(net: nn.Layer, path: str, strict: bool = True) -> dict[str, list[str]]:
    """Load a `.pdparams` file (PaddleClas or mbv2; `path` may leave off the suffix) by
    key; keys whose shape differs (a 1000-class head into a 10-class model) or that the
    model lacks are skipped and reported, never an error.

    A file that fits less than MIN_BACKBONE_SHARE of the backbone is another width or
    network: `strict` refuses it (ValueError naming the width it holds); not `strict`
    loads what fits with one WARNING, and the rest of the network keeps its fresh init."""
    path = resolve_pretrained(path)
    try:
        state = paddle.load(path)
    except Exception as e:  # paddle raises several types for a damaged file
        raise ValueError(f"model.pretrained={path!r}: cannot read weights ({e})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = net.state_dict()
    loaded, skipped = [], []
    usable = {}
    for key, value in state.items():
        if key not in own:
            skipped.append(f"{key} (not in model)")
        elif list(value.shape) != list(own[key].shape):
            skipped.append(f"{key} (shape {list(value.shape)} != model {list(own[key].shape)})")
        else:
            usable[key] = value
            loaded.append(key)
    _check_backbone(path, own, usable, state, strict)
    missing = [k for k in own if k not in usable]
    with warnings.catch_warnings():  # paddle warns per absent key; the log below says it once
        warnings.simplefilter("ignore")
        net.set_state_dict(usable)
    log.info("pretrained %s: loaded %d of %d model tensors%s", path, len(loaded), len(own),
             f"; skipped {', '.join(skipped[:3])}{f' and {len(skipped) - 3} more' if len(skipped) > 3 else ''}"
             if skipped else "")
    return {"loaded": loaded, "skipped": skipped, "missing": missing}


HEAD_PREFIX = "out."
STEM_KEY = "conv1._conv.weight"
# below this share of the backbone's tensors the file is another network, not a warm start
MIN_BACKBONE_SHARE = 0.9


def _check_backbone(path: str, own: dict, usable: dict, state: dict, strict: bool) -> None:
    """Loading only a few tensors (another width, another network) would train from
    scratch under a pretrained label: stop (strict) or warn once, naming what the file
    looks like."""
    backbone = [k for k in own if not k.startswith(HEAD_PREFIX)]
    fitted = [k for k in backbone if k in usable]
    if not backbone or len(fitted) >= MIN_BACKBONE_SHARE * len(backbone):
        return
    held = _held_width(state.get(STEM_KEY), own.get(STEM_KEY))
    short = (f"model.pretrained={path!r}: only {len(fitted)} of {len(backbone)} backbone "
             f"tensors fit this model")
    if not strict:
        log.warning("%s (the file holds %s); loaded those, the rest trains from scratch "
                    "(model.pretrained_strict=false)", short, held)
        return
    hint = ""
    stem, mine = state.get(STEM_KEY), own.get(STEM_KEY)
    if stem is not None and mine is not None and list(stem.shape) != list(mine.shape):
        hint = (f" Its conv1 has {stem.shape[0]} output channels, this model's "
                f"{mine.shape[0]} (int(32 x model.scale)): set model.scale to the file's width "
                f"(e.g. {stem.shape[0] / 32:g}).")
    raise ValueError(
        f"{short}, so it would train from scratch.{hint} Or give a file of this "
        f"network (PaddleClas MobileNetV2 or an mbv2 run of the same model.scale and "
        f"model.bottleneck), or set model.pretrained_strict=false to load what fits")


def _held_width(stem, mine) -> str:
    """The width a file holds, read off its conv1 output channels (int(32 x scale))."""
    if stem is None or len(stem.shape) != 4:
        return f"no {STEM_KEY}, so not a MobileNetV2 of this layout"
    channels = int(stem.shape[0])
    width = f"{round(channels / 32, 3):.3f}".rstrip("0")
    width += "0" if width.endswith(".") else ""
    this = f", this model's {int(mine.shape[0])}" if mine is not None else ""
    return (f"MobileNetV2 x{width}: its {STEM_KEY} has {channels} output channels, "
            f"int(32 x scale){this}")
