"""`python -m mbv2.export ckpt=<run dir or checkpoint> [format=paddle|onnx] [out=<dir>]`

A Paddle inference model of a checkpoint for `mbv2.predict` / Paddle Inference:
`model.json` + `model.pdiparams` (`paddle.jit.save`, PIR), batch dimension None, softmax
included, so outputs are class probabilities. Beside it: `class_names.txt` (line i = class
i) and `preprocess.json` (the eval transform: resize, center crop, mean/std), so predict
reproduces what eval saw. The depthwise convs are Paddle's own op: an exported model needs
no mbv2 custom op. `format=onnx` writes `model.onnx` through paddle2onnx (an extra).
Default out: `<run dir>/export`.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import mbv2  # noqa: F401  (sets the MKL code path before paddle loads)

log = logging.getLogger("mbv2.export")

MODEL_PREFIX = "model"
PREPROCESS_FILE = "preprocess.json"
CLASS_NAMES_FILE = "class_names.txt"


@dataclass
class ExportArgs:
    ckpt: str = "???"
    format: str = "paddle"
    # default: <run dir>/export
    out: Optional[str] = None
    # export the EMA weights (runs with trainer.ema_decay)
    ema: bool = False
    # format=onnx: the ONNX opset
    opset: int = 11


def preprocess_spec(data_cfg) -> dict[str, Any]:
    """The eval transform of mbv2.data.build_transforms, as data: predict rebuilds it from
    these keys, and other runtimes can follow them."""
    from mbv2.data import EVAL_CROP_RATIO

    size = int(data_cfg.image_size)
    return {"image_size": size, "resize_short": int(round(size / EVAL_CROP_RATIO)),
            "center_crop": size, "interpolation": "bilinear", "channel_order": "RGB",
            "layout": "NCHW", "scale": 1 / 255, "mean": [float(v) for v in data_cfg.mean],
            "std": [float(v) for v in data_cfg.std], "input_name": "image",
            "output": "softmax probabilities [batch, classes]"}


def inference_network(net):
    """`net` followed by softmax, with Paddle's own depthwise op."""
    import paddle

    net.set_fast_depthwise(None)  # the exported program must not need the custom op

    class WithSoftmax(paddle.nn.Layer):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            return paddle.nn.functional.softmax(self.inner(image), axis=-1)

    wrapped = WithSoftmax(net)
    wrapped.eval()
    return wrapped


def run_export(args: ExportArgs) -> Path:
    import paddle

    from mbv2.checkpoint import restore_run, run_dir_of

    if args.format not in ("paddle", "onnx"):
        raise SystemExit(f"format={args.format!r}: use paddle or onnx")
    if args.format == "onnx" and importlib.util.find_spec("paddle2onnx") is None:
        raise SystemExit("format=onnx needs the paddle2onnx package, which is not installed: "
                         "pip install paddle2onnx, then rerun (format=paddle needs nothing)")
    paddle.set_device("cpu")
    net, cfg, class_names, ckpt, meta = restore_run(args.ckpt, ema=args.ema, device="cpu")
    out = Path(args.out) if args.out else run_dir_of(ckpt) / "export"
    out.mkdir(parents=True, exist_ok=True)
    model = inference_network(net)
    size = int(cfg.data.image_size)
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", "image")]
    if args.format == "paddle":
        paddle.jit.save(model, str(out / MODEL_PREFIX), input_spec=spec)
        written = [p.name for p in sorted(out.glob(f"{MODEL_PREFIX}.*"))]
    else:
        paddle.onnx.export(model, str(out / MODEL_PREFIX), input_spec=spec, opset_version=args.opset)
        written = [f"{MODEL_PREFIX}.onnx"]
    (out / CLASS_NAMES_FILE).write_text("".join(f"{n}\n" for n in class_names))
    info = {**preprocess_spec(cfg.data), "num_classes": len(class_names),
            "checkpoint": str(ckpt), "epoch": meta.get("epoch"), "ema": args.ema,
            "model_scale": float(cfg.model.scale), "format": args.format}
    (out / PREPROCESS_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"exported {ckpt} (epoch {meta.get('epoch')}) -> {out}: "
          f"{', '.join(written + [CLASS_NAMES_FILE, PREPROCESS_FILE])}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from mbv2.cli import run_entry

    run_entry(ExportArgs, run_export, "mbv2.export",
              "ckpt=<run dir or checkpoint> [format=paddle|onnx] [out=<dir>]", argv)


if __name__ == "__main__":
    main()
