"""`python -m mbv2.export ckpt=<run dir or checkpoint> [format=paddle|onnx] [out=<dir>]`

A Paddle inference model of a checkpoint for `mbv2.predict`, Paddle Inference and
PaddleClas's deploy tools: `inference.json` + `inference.pdiparams` (`paddle.jit.save`,
PIR), batch and image size free, softmax included, so outputs are class probabilities.
Beside it: `class_names.txt` (line i = class i), `class_id_map.txt` (PaddleClas's `id name`
label map), `preprocess.json` (the eval transform: resize, center crop, mean/std) and
`inference_cls.yaml` (the same in PaddleClas's deploy format), so predict and PaddleClas's
predictor reproduce what eval saw. The depthwise convs are Paddle's own op: an exported model needs
no mbv2 custom op. `format=onnx` writes `model.onnx` through paddle2onnx (an extra).
Default out: `<run dir>/export`.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mbv2.cli import default_output_dir, entry_point

log = logging.getLogger("mbv2.export")


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


def run_export(args: ExportArgs) -> Path:
    import paddle

    from mbv2 import artifacts
    from mbv2.train.checkpoint import run_dir_of

    if args.format not in ("paddle", "onnx"):
        raise SystemExit(f"format={args.format!r}: use paddle or onnx")
    if args.format == "onnx" and importlib.util.find_spec("paddle2onnx") is None:
        raise SystemExit("format=onnx needs the paddle2onnx package, which is not installed: "
                         "pip install paddle2onnx, then rerun (format=paddle needs nothing)")
    paddle.set_device("cpu")
    net, cfg, class_names, ckpt, meta = artifacts.restore_run(args.ckpt, ema=args.ema, device="cpu")
    out = Path(args.out) if args.out else default_output_dir(run_dir_of(ckpt) / "export", "mbv2.export")
    out.mkdir(parents=True, exist_ok=True)
    spec = artifacts.preprocess_spec(cfg.data)
    # any batch and any image size: a model trained at 32 px runs on PaddleClas's 224 crops
    inputs = [paddle.static.InputSpec([None, 3, None, None], "float32", spec["input_name"])]
    prefix = str(out / artifacts.MODEL_PREFIX)
    with net.reference_ops():  # the exported program must not need mbv2's custom ops
        model = artifacts.WithSoftmax(net)
        if args.format == "paddle":
            paddle.jit.save(model, prefix, input_spec=inputs)
        else:
            paddle.onnx.export(model, prefix, input_spec=inputs, opset_version=args.opset)
    written = [p.name for p in sorted(out.glob(f"{artifacts.MODEL_PREFIX}.*"))]
    artifacts.write_class_names(class_names, out)
    artifacts.write_label_map(class_names, out)
    artifacts.write_deploy_config(out, spec, topk=min(5, len(class_names)))
    artifacts.write_preprocess(out, spec, num_classes=len(class_names), checkpoint=str(ckpt),
                               epoch=meta.get("epoch"), ema=args.ema,
                               model_scale=float(net.scale), format=args.format)
    print(f"exported {ckpt} (epoch {meta.get('epoch')}) -> {out}: "
          f"{', '.join(written + [artifacts.CLASS_NAMES_FILE, artifacts.LABEL_MAP_FILE, artifacts.PREPROCESS_FILE, artifacts.DEPLOY_CONFIG_FILE])}")
    return out


main = entry_point(ExportArgs, run_export, "mbv2.export",
                   "ckpt=<run dir or checkpoint> [format=paddle|onnx] [out=<dir>]")


if __name__ == "__main__":
    main()
