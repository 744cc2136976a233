"""Weights from a `.pdparams` file (PaddleClas or mbv2) into a network, by key."""
from __future__ import annotations

import logging
import os
import warnings

import paddle
import paddle.nn as nn

log = logging.getLogger(__name__)


def load_pretrained(net: nn.Layer, path: str) -> dict[str, list[str]]:
    """Load a `.pdparams` file (PaddleClas or mbv2) by key; keys whose shape differs
    (a 1000-class head into a 10-class model) or that the model lacks are skipped and
    reported, never an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.pretrained={path!r}: no such file; give the path of a .pdparams file")
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
    _require_backbone(path, own, usable, state)
    missing = [k for k in own if k not in usable]
    with warnings.catch_warnings():  # paddle warns per absent key; the log below says it once
        warnings.simplefilter("ignore")
        net.set_state_dict(usable)
    log.info("pretrained %s: loaded %d of %d model tensors%s", path, len(loaded), len(own),
             f"; skipped {', '.join(skipped[:3])}{f' and {len(skipped) - 3} more' if len(skipped) > 3 else ''}"
             if skipped else "")
    return {"loaded": loaded, "skipped": skipped, "missing": missing}


HEAD_PREFIX = "out."
# below this share of the backbone's tensors the file is another network, not a warm start
MIN_BACKBONE_SHARE = 0.9


def _require_backbone(path: str, own: dict, usable: dict, state: dict) -> None:
    """Loading only a few tensors (another width, another network) would train from
    scratch under a pretrained label: stop, naming what the file looks like."""
    backbone = [k for k in own if not k.startswith(HEAD_PREFIX)]
    fitted = [k for k in backbone if k in usable]
    if not backbone or len(fitted) >= MIN_BACKBONE_SHARE * len(backbone):
        return
    hint = ""
    stem = state.get("conv1._conv.weight")
    mine = own.get("conv1._conv.weight")
    if stem is not None and mine is not None and list(stem.shape) != list(mine.shape):
        hint = (f" Its conv1 has {stem.shape[0]} output channels, this model's "
                f"{mine.shape[0]} (int(32 x model.scale)): set model.scale to the file's width "
                f"(e.g. {stem.shape[0] / 32:g}).")
    raise ValueError(
        f"model.pretrained={path!r}: only {len(fitted)} of {len(backbone)} backbone tensors "
        f"fit this model, so it would train from scratch.{hint} Or give a file of this "
        f"network (PaddleClas MobileNetV2 or an mbv2 run of the same model.scale and "
        f"model.bottleneck)")
