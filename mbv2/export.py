"""`python -m mbv2.export ckpt=<run dir or checkpoint> [format=paddle|onnx] [out=<dir>]`

A Paddle inference model of a checkpoint for `mbv2.predict`, Paddle Inference and
PaddleClas's deploy tools: `inference.json` + `inference.pdiparams` (`paddle.jit.save`,
PIR), batch and image size free, softmax included, so outputs are class probabilities.
Beside it: `class_names.txt` (line i = class i), `class_id_map.txt` (PaddleClas's `id name`
label map), `preprocess.json` (the eval transform: resize, center crop, mean/std) and
`inference_cls.yaml` (the same in PaddleClas's deploy format), so predict and PaddleClas's
predictor reproduce what eval saw. The depthwise convs are Paddle's own op: an exported model needs
no mbv2 custom op. `format=onnx` writes `model.onnx` through paddle2onnx (an extra).
Default out: `<run dir>/export`. The files are written beside `out` first and the model is
run back through Paddle Inference before any file of `out` is replaced, so an export that
fails (a full disk truncates the parameters without an error from Paddle) leaves the one
already there as it was.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
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
    # Everything is written into a staging dir beside `out` and checked before any file
    # of `out` is replaced: Paddle's parameter writer does not report a failed write (a
    # full disk, a file-size limit leave a truncated .pdiparams and exit 0), and a failed
    # re-export must not break the export already there.
    stage = out.parent / f".{out.name}.{os.getpid()}.export"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        # any batch and any image size: a model trained at 32 px runs on PaddleClas's 224 crops
        inputs = [paddle.static.InputSpec([None, 3, None, None], "float32", spec["input_name"])]
        prefix = str(stage / artifacts.MODEL_PREFIX)
        with net.reference_ops():  # the exported program must not need mbv2's custom ops
            model = artifacts.WithSoftmax(net)
            if args.format == "paddle":
                paddle.jit.save(model, prefix, input_spec=inputs)
                _check_export(stage, model, int(spec["center_crop"]), out)
            else:
                paddle.onnx.export(model, prefix, input_spec=inputs, opset_version=args.opset)
        written = [p.name for p in sorted(stage.glob(f"{artifacts.MODEL_PREFIX}.*"))]
        artifacts.write_class_names(class_names, stage)
        artifacts.write_label_map(class_names, stage)
        artifacts.write_deploy_config(stage, spec, topk=min(5, len(class_names)))
        artifacts.write_preprocess(stage, spec, num_classes=len(class_names), checkpoint=str(ckpt),
                                   epoch=meta.get("epoch"), ema=args.ema,
                                   model_scale=float(net.scale), format=args.format)
        for f in sorted(stage.iterdir()):  # renames into out: no space needed
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"exported {ckpt} (epoch {meta.get('epoch')}) -> {out}: "
          f"{', '.join(written + [artifacts.CLASS_NAMES_FILE, artifacts.LABEL_MAP_FILE, artifacts.PREPROCESS_FILE, artifacts.DEPLOY_CONFIG_FILE])}")
    return out


def _check_export(stage: Path, model, size: int, out: Path) -> None:
    """The staged model, opened in Paddle Inference (oneDNN) as `mbv2.predict engine=paddle`
    and PaddleClas's deploy tools open one,
    gives the network's probabilities on a random batch, or the export stops with a
    sentence and `out` untouched."""
    import numpy as np
    import paddle

    from mbv2.predict import ExportedPredictor

    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype("float32")
    with paddle.no_grad():
        want = model(paddle.to_tensor(x)).numpy()
    why = None
    try:
        got = ExportedPredictor(stage, threads=1, engine="paddle")(x)
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-4):
            why = (f"its outputs differ from the checkpoint's (max difference "
                   f"{float(np.abs(got - want).max()) if got.shape == want.shape else got.shape})")
    except Exception as e:  # a truncated or unreadable file: Paddle raises many kinds
        why = f"it cannot be run back ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if why:
        sizes = ", ".join(f"{p.name} {p.stat().st_size} bytes" for p in sorted(stage.iterdir()))
        raise SystemExit(f"mbv2.export: the model it wrote ({sizes}) is not whole: {why}. The "
                         f"disk may be full or a file-size limit reached; {out} was left as it "
                         f"was. Free space and export again")


main = entry_point(ExportArgs, run_export, "mbv2.export",
                   "ckpt=<run dir or checkpoint> [format=paddle|onnx] [out=<dir>]")


if __name__ == "__main__":
    main()
