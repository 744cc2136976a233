"""`python -m mbv2.predict model=<exported dir or checkpoint> inputs=<image, dir or glob> [topk=5] [out=<dir>] [config=<PaddleClas deploy config>]`

Class names and scores (softmax probabilities) per image, as a table on stdout and
`<out>/predictions.csv` (default: the current directory). A file that cannot be decoded is
listed with its error and the others still run. An exported dir (mbv2.export) runs, with
`engine=auto` (the default), through mbv2's one-op CPU predictor where it can (the
kernels' library built with Paddle's MKL, a MobileNetV2 program: mbv2/ops/infer_net.cc,
1.1-1.7x Paddle Inference here; `precision=bf16` on CPUs with AVX512-BF16: its 1x1 convs
in bfloat16), else through Paddle Inference with oneDNN (`engine=paddle`; with
`precision=bf16`, CPUs with AVX512-BF16 or AMX, oneDNN's bfloat16 kernels); a run dir or checkpoint runs the dygraph network. Both apply the eval transform of the
run's data config. A model PaddleClas exported (no mbv2 record beside it) follows the
PaddleClas deploy config given as `config=` (or a training config's Infer section):
`artifacts.read_deploy_config`.
"""
from __future__ import annotations

import csv
import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from mbv2.cli import entry_point

PREDICTIONS_FILE = "predictions.csv"
log = logging.getLogger("mbv2.predict")


@dataclass
class PredictArgs:
    model: str = "???"
    inputs: str = "???"
    topk: int = 5
    out: str = "."
    batch_size: int = 16
    # CPU math threads of the Paddle Inference predictor
    threads: int = 2
    # checkpoints only: predict with the EMA weights
    ema: bool = False
    # exported models: fp32, or bf16 (bfloat16 products: mbv2's predictor on CPUs with
    # AVX512-BF16, oneDNN's bfloat16 kernels in Paddle Inference on those and AMX CPUs)
    precision: str = "fp32"
    # exported models: auto (mbv2's CPU predictor where it can run the model, else Paddle
    # Inference), kernels (mbv2's, or an error saying why not), paddle (Paddle Inference)
    engine: str = "auto"
    # a PaddleClas deploy config (deploy/configs/inference_cls.yaml) for a model PaddleClas
    # exported (inference.pdmodel/.json + .pdiparams, no preprocess.json): its PreProcess
    # and class_id_map_file are followed
    config: Optional[str] = None


def collect_inputs(spec: str) -> list[Path]:
    """A file, a directory (its image files, recursively) or a glob pattern."""
    from mbv2.data import IMAGE_EXTENSIONS

    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


PRECISIONS = ("fp32", "bf16")
ENGINES = ("auto", "kernels", "paddle")


def check_precision(precision: str, key: str = "precision") -> str:
    """`precision` if this machine can run it, else a DeviceError naming `key`."""
    from mbv2.runtime import BF16_FLAGS, DeviceError, has_bf16

    if precision not in PRECISIONS:
        raise DeviceError(f"{key}={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not has_bf16():
        raise DeviceError(f"{key}=bf16: this CPU reports none of {', '.join(BF16_FLAGS)}, "
                         f"which oneDNN's bf16 kernels need; use {key}=fp32")
    return precision


def inference_config(model: Path, params: Path, threads: int, precision: str = "fp32"):
    """The Paddle Inference config mbv2 runs an exported model with: CPU, oneDNN (the
    measured 6x over dygraph at 224 px comes from here), IR optimisation, `threads` math
    threads; `precision="bf16"` runs oneDNN's bfloat16 kernels (FP32 weights, the convs and
    matmuls in bf16: measured here 1.5-1.8x the FP32 predictor, top-1 on the digits
    unchanged; see the README)."""
    from paddle import inference

    config = inference.Config(str(model), str(params))
    config.disable_gpu()
    (config.enable_onednn if hasattr(config, "enable_onednn") else config.enable_mkldnn)()
    if check_precision(precision) == "bf16":
        (config.enable_onednn_bfloat16 if hasattr(config, "enable_onednn_bfloat16")
         else config.enable_mkldnn_bfloat16)()
    config.set_cpu_math_library_num_threads(int(threads))
    config.switch_ir_optim(True)
    config.disable_glog_info()
    return config


class ExportedPredictor:
    """An exported dir's model: Paddle Inference (oneDNN on CPU, `threads` math threads,
    FP32 or, with `precision="bf16"` on CPUs with AVX512-BF16 or AMX, bfloat16 kernels) or
    mbv2's one-op CPU predictor (`engine`: see `PredictArgs.engine`; bf16 on CPUs with
    AVX512-BF16). `self.engine` says
    which runs it, `self.why` why not the other where auto chose."""

    def __init__(self, model_dir: Path, threads: int, precision: str = "fp32",
                 engine: str = "auto"):
        from mbv2.artifacts import MODEL_PREFIX, exported_model_files

        if engine not in ENGINES:
            raise SystemExit(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
        files = exported_model_files(model_dir)
        if files is None:
            raise FileNotFoundError(f"{model_dir}: no {MODEL_PREFIX}.json + {MODEL_PREFIX}.pdiparams; "
                                    f"export the model with `python -m mbv2.export ckpt=<run dir> "
                                    f"out={model_dir}`")
        model, params = files
        self.why = ""
        self.kernels = None
        if engine != "paddle":
            self.why = self._kernels_why(model, params, threads, precision)
            if self.why and engine == "kernels":
                raise SystemExit(f"engine=kernels cannot run {model_dir}: {self.why}; use "
                                 f"engine=paddle (Paddle Inference)")
        self.engine = "kernels" if self.kernels is not None else "paddle"
        if self.engine == "paddle":
            from paddle import inference

            config = inference_config(model, params, threads, precision)
            self.predictor = inference.create_predictor(config)
            self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
            self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def _kernels_why(self, model: Path, params: Path, threads: int, precision: str) -> str:
        """"" with self.kernels set, or why mbv2's predictor cannot run this model here."""
        from mbv2.ops import inference
        from mbv2.runtime import set_cpu_threads

        why = inference.bf16_why_not() if precision == "bf16" else None
        if why:
            return why
        try:
            layers = inference.layers_of_program(model, params)
        except inference.NotMobileNetV2 as e:
            return f"it does not read {model.name} as a MobileNetV2 ({e})"
        if not inference.available():
            return "the kernels' library is unavailable here (no compiler, or no MKL in Paddle)"
        set_cpu_threads(threads)
        self.kernels = inference.NetworkInference(layers, precision)
        return ""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.kernels is not None:
            return self.kernels(batch).numpy()
        self.input.reshape(list(batch.shape))
        self.input.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        self.predictor.run()
        return self.output.copy_to_cpu()


class DygraphPredictor:
    """The checkpoint's network in dygraph, softmax applied like the exported model."""

    def __init__(self, net):
        self.net = net

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import paddle

        with paddle.no_grad():
            logits = self.net(paddle.to_tensor(batch, dtype="float32"))
            return paddle.nn.functional.softmax(logits, axis=-1).numpy()


def load_predictor(spec: str, threads: int, ema: bool, precision: str = "fp32",
                   config: str | None = None,
                   engine: str = "auto") -> tuple[Callable, Callable, list[str] | None]:
    """(predict(batch) -> probabilities, transform(PIL image) -> CHW array, class names or
    None for class ids). Both kinds of model apply the eval transform as `mbv2.artifacts`
    records it; an exported dir without mbv2's record (a PaddleClas export) follows a
    PaddleClas deploy config: `config`, or the dir's own inference_cls.yaml."""
    from mbv2 import artifacts

    check_precision(precision)
    path = Path(spec).expanduser()
    if path.is_dir() and artifacts.exported_model_files(path) is not None:
        deploy = Path(config).expanduser() if config else path / artifacts.DEPLOY_CONFIG_FILE
        if config or not (path / artifacts.PREPROCESS_FILE).is_file():
            if not deploy.is_file():
                raise SystemExit(
                    f"error: {path} has no {artifacts.PREPROCESS_FILE} (what mbv2.export writes) "
                    f"and no {artifacts.DEPLOY_CONFIG_FILE}"
                    + (f"; config={config} is not a file" if config else "")
                    + ". For a model PaddleClas exported, give its deploy config: "
                      "config=<PaddleClas>/deploy/configs/inference_cls.yaml")
            try:
                pre, names = artifacts.read_deploy_config(deploy)
            except artifacts.DeployConfigError as e:
                raise SystemExit(f"error: config: {e}") from None
            log.info("preprocessing as %s says: short side %d, crop %d; %s", deploy,
                     pre["resize_short"], pre["center_crop"],
                     f"{len(names)} class names" if names else "class ids (no class_id_map_file)")
            return (_exported(path, threads, precision, engine), artifacts.eval_transform(pre),
                    names)
        pre = artifacts.read_preprocess(path)
        names = artifacts.read_class_names(path, int(pre["num_classes"]))
        return (_exported(path, threads, precision, engine), artifacts.eval_transform(pre),
                names)
    if config:
        raise SystemExit(f"error: config={config} is for an exported model dir; {spec} is a "
                         f"run dir or checkpoint, which carries its own preprocessing")
    if engine != "auto":
        raise SystemExit(f"error: engine={engine} is for an exported model dir; {spec} is a "
                         f"run dir or checkpoint (export it: python -m mbv2.export ckpt={spec})")
    if precision != "fp32":
        raise SystemExit(f"error: precision={precision} runs an exported model; export this one "
                         f"first (python -m mbv2.export ckpt={spec} out=<dir>) and predict "
                         f"with model=<dir>")
    import paddle

    paddle.set_device("cpu")
    net, cfg, names, ckpt, meta = artifacts.restore_run(spec, ema=ema)
    log.info("dygraph predictions from %s (epoch %s); an exported model is faster "
             "(python -m mbv2.export ckpt=%s)", ckpt, meta.get("epoch"), spec)
    transform = artifacts.eval_transform(artifacts.preprocess_spec(cfg.data))
    return DygraphPredictor(net), transform, names


def _exported(path: Path, threads: int, precision: str, engine: str) -> ExportedPredictor:
    predictor = ExportedPredictor(path, threads, precision, engine)
    if predictor.engine == "kernels":
        from mbv2.ops import inference

        products = ""
        if precision == "bf16":
            products = (", 1x1 products on AMX tiles" if inference.amx()
                        else ", 1x1 products in AVX512-BF16 dot products")
        log.info("predicting with mbv2's CPU predictor (engine=kernels, %s%s, %d threads)",
                 precision, products, threads)
    else:
        log.info("predicting with Paddle Inference (oneDNN, %s, %d threads)%s", precision, threads,
                 f"; mbv2's CPU predictor not used: {predictor.why}" if predictor.why else "")
    return predictor


def predict_files(files: Sequence[Path], predict: Callable, transform: Callable,
                  names: Sequence[str] | None, topk: int, batch_size: int) -> list[dict]:
    """One row per file: its top-k (class, score), or the error that kept it out."""
    from mbv2.data import DataError, load_image

    k = max(1, min(int(topk), len(names))) if names is not None else max(1, int(topk))
    rows: list[dict] = []
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        probs = predict(np.stack([a for _, a in pending]))
        for (f, _), p in zip(pending, probs):
            if names is not None and len(p) != len(names):
                raise SystemExit(f"error: the model gives {len(p)} scores an image but its "
                                 f"class names list {len(names)}; give the class map of this "
                                 f"model")
            order = np.argsort(-p)[:k]
            rows.append({"file": str(f), "top": [(int(i), names[i] if names is not None else str(i),
                                                  float(p[i])) for i in order], "error": None})
        pending.clear()

    for f in files:
        try:
            pending.append((f, transform(load_image(f))))
        except (DataError, OSError) as e:
            rows.append({"file": str(f), "top": [], "error": str(e)})
        if len(pending) >= batch_size:
            flush()
    flush()
    order = {str(f): i for i, f in enumerate(files)}
    return sorted(rows, key=lambda r: order[r["file"]])


def write_predictions(rows: Sequence[dict], path: Path) -> None:
    """CSV, one line per (file, rank); an unreadable file gets one line with its error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "rank", "class_id", "class_name", "score", "error"])
        for r in rows:
            if r["error"]:
                w.writerow([r["file"], "", "", "", "", r["error"]])
            for rank, (cid, name, score) in enumerate(r["top"], start=1):
                w.writerow([r["file"], rank, cid, name, f"{score:.6f}", ""])


def print_table(rows: Sequence[dict]) -> None:
    width = max([len(r["file"]) for r in rows] + [4])
    print(f"{'file':<{width}}  top predictions (class score)")
    for r in rows:
        text = f"ERROR {r['error']}" if r["error"] else \
            "  ".join(f"{name} {score:.4f}" for _, name, score in r["top"])
        print(f"{r['file']:<{width}}  {text}")


def run_predict(args: PredictArgs) -> list[dict]:
    files = collect_inputs(args.inputs)
    if not files:
        raise SystemExit(f"inputs={args.inputs!r}: no image files there (a file, a directory "
                         f"or a glob such as 'photos/*.jpg')")
    predict, transform, names = load_predictor(args.model, args.threads, args.ema,
                                               args.precision, args.config, args.engine)
    rows = predict_files(files, predict, transform, names, args.topk, args.batch_size)
    out = Path(args.out) / PREDICTIONS_FILE
    write_predictions(rows, out)
    print_table(rows)
    errors = sum(1 for r in rows if r["error"])
    print(f"{len(rows) - errors} images predicted, {errors} unreadable -> {out}")
    return rows


main = entry_point(PredictArgs, run_predict, "mbv2.predict",
                   "model=<exported dir or checkpoint> inputs=<image, dir or glob> [topk=5] [out=<dir>] "
                   "[precision=fp32|bf16] [engine=auto|kernels|paddle] "
                   "[config=<PaddleClas inference_cls.yaml>]")


if __name__ == "__main__":
    main()
