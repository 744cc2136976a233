"""The `.pdckpt` file: arrays and JSON, so reading one runs no code.

A checkpoint is one uncompressed `.npz` zip (numpy's format, read with
`allow_pickle=False`): every tensor of the model, optimizer and EMA state as an array under
its path (`model/conv1._conv.weight`, `optimizer/<accumulator>`, `ema/...`), and one
`__json__` entry holding everything else as JSON - epoch, step, metrics, the tracker's
history, the optimizer's LR-schedule state, and the RNG states as numbers (Python's and
NumPy's Mersenne Twister, Paddle's generator state as its integer tuple). A crafted run dir
can therefore not run code when mbv2 resumes, evaluates, exports or predicts from it.

Checkpoints written by mbv2 before this format are pickles (`paddle.save`): they are read
only when the environment says so (`MBV2_TRUST_PICKLE=1`), since unpickling a file runs
whatever it contains.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import paddle

FORMAT_VERSION = 2
JSON_KEY = "__json__"
TRUST_PICKLE_ENV = "MBV2_TRUST_PICKLE"
ARRAY_SECTIONS = ("model", "optimizer", "ema")


def _to_array(value: Any) -> np.ndarray | None:
    if isinstance(value, paddle.Tensor):
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    return None


def _flatten(section: str, tree: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Arrays of `tree` (nested dicts allowed) into `arrays` under `section/key/...`; what
    is left (plain values) is returned as a JSON-able tree."""
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{section}/{key}"
        array = _to_array(value)
        if array is not None:
            arrays[path] = array
        elif isinstance(value, dict):
            rest[key] = {"__tree__": _flatten(path, value, arrays)}
        else:
            rest[key] = value
    return rest


def _unflatten(section: str, rest: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    prefix = f"{section}/"
    for path, array in arrays.items():
        if path.startswith(prefix) and "/" not in path[len(prefix):]:
            tree[path[len(prefix):]] = paddle.to_tensor(array)
    for key, value in rest.items():
        if isinstance(value, dict) and "__tree__" in value:
            tree[key] = _unflatten(f"{section}/{key}", value["__tree__"], arrays)
        else:
            tree[key] = value
    return tree


def capture_rng() -> dict[str, Any]:
    """Every RNG the training loop draws from (augmentation uses Python's `random`), as
    numbers: JSON and one array, never pickles."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": {"name": name, "keys": np.asarray(keys), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "paddle": [list(s.__getstate__()) for s in paddle.get_rng_state()]}


def restore_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    cls = type(paddle.get_rng_state()[0])
    generators = []
    for numbers in state["paddle"]:
        generator = cls.__new__(cls)
        generator.__setstate__(tuple(numbers))
        generators.append(generator)
    paddle.set_rng_state(generators)


def save_checkpoint(ckpt: dict[str, Any], tmp: Path) -> None:
    """`ckpt` (model/optimizer/ema state dicts, rng, meta, tracker, ...) into `tmp`."""
    arrays: dict[str, np.ndarray] = {}
    doc: dict[str, Any] = {"format": FORMAT_VERSION}
    for key, value in ckpt.items():
        if key in ARRAY_SECTIONS and isinstance(value, dict):
            doc[key] = {"__tree__": _flatten(key, value, arrays)}
        elif key == "rng":
            rng = dict(value)
            arrays["rng/numpy_keys"] = np.asarray(rng["numpy"].pop("keys"))
            doc[key] = rng
        elif key != "format":
            doc[key] = value
    arrays[JSON_KEY] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # a pickle's protocol opcode; a zip starts with PK


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The dict `save_checkpoint` wrote (tensors as paddle tensors); raises ValueError for
    a file that is not one, PermissionError for a pickle not trusted by the environment."""
    path = Path(path)
    if is_pickle(path):
        if os.environ.get(TRUST_PICKLE_ENV) != "1":
            raise PermissionError(
                f"{path} is a checkpoint in mbv2's earlier pickle format: reading it would run "
                f"any code it holds. If you trust it, set {TRUST_PICKLE_ENV}=1 for this command "
                f"(the run's next checkpoint is written in the safe format)")
        return paddle.load(str(path))
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if JSON_KEY not in arrays:
        raise ValueError("no metadata entry")
    doc = json.loads(bytes(arrays.pop(JSON_KEY)).decode())
    ckpt: dict[str, Any] = {}
    for key, value in doc.items():
        if key in ARRAY_SECTIONS and isinstance(value, dict) and "__tree__" in value:
            ckpt[key] = _unflatten(key, value["__tree__"], arrays)
        else:
            ckpt[key] = value
    if "rng" in ckpt and "rng/numpy_keys" in arrays:
        ckpt["rng"]["numpy"]["keys"] = arrays["rng/numpy_keys"]
    return ckpt
