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
    missing = [k for k in own if k not in usable]
    with warnings.catch_warnings():  # paddle warns per absent key; the log below says it once
        warnings.simplefilter("ignore")
        net.set_state_dict(usable)
    log.info("pretrained %s: loaded %d of %d model tensors", path, len(loaded), len(own))
    for s in skipped:
        log.info("pretrained: skipped %s", s)
    for k in missing:
        if k not in {s.split(" ")[0] for s in skipped}:
            log.info("pretrained: %s not in file, left as initialised", k)
    return {"loaded": loaded, "skipped": skipped, "missing": missing}
