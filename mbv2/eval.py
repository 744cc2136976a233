"""`python -m mbv2.eval ckpt=<run dir or checkpoint> [split=val|train] [data.key=value ...]`

Top-1/top-5 and mean loss of a checkpoint on one split, per-class accuracy and a confusion
matrix. The run's saved config gives the model and data; `data.*` arguments replace its
data settings (another root, image size, ...). Written to `<run dir>/eval/` (or `out=`):
`eval.json` + `confusion_matrix.png` for split=val, `eval_train.json` +
`confusion_matrix_train.png` for split=train. In VisualDL the matrix appears as an image
of the run itself (`eval/confusion_matrix`, appended to the run's own records), beside the
eval/* scalars training logged: no second run, no second name for one metric.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from mbv2.cli import default_output_dir, entry_point

log = logging.getLogger("mbv2.eval")

EVAL_DIR = "eval"


@dataclass
class EvalArgs:
    ckpt: str = "???"
    split: str = "val"
    # evaluate the EMA weights (runs with trainer.ema_decay) instead of the model's
    ema: bool = False
    batch_size: int = 64
    # auto: the GPU when Paddle has one, else the CPU
    device: str = "auto"
    # default: <run dir>/eval
    out: Optional[str] = None
    # replaces keys of the run's data config, e.g. data.root=/other/data
    data: Dict[str, Any] = field(default_factory=dict)


def evaluate_logits(net, dataset, batch_size: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) of `net` over `dataset`, in order (`paddle.Model.predict`)."""
    import paddle

    spec = paddle.static.InputSpec([None, 3, image_size, image_size], "float32", "image")
    model = paddle.Model(net, inputs=[spec])
    model.prepare()
    (logits,) = model.predict(dataset, batch_size=batch_size, stack_outputs=True, verbose=0)
    if hasattr(dataset, "targets"):  # mbv2's datasets know their labels without decoding
        labels = dataset.targets()
    else:  # e.g. paddle's Cifar10: its samples hold the label
        labels = np.concatenate([np.asarray(dataset[i][1]).reshape(-1) for i in range(len(dataset))])
    return logits, np.asarray(labels, dtype=np.int64)


def classification_report(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-k (k = min(5, classes)), mean cross-entropy, per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted), by scikit-learn's metrics."""
    from scipy.special import softmax
    from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, top_k_accuracy_score

    n, c = logits.shape
    classes = np.arange(c)
    k = min(5, c)
    predicted = logits.argmax(axis=1)
    confusion = confusion_matrix(labels, predicted, labels=classes)
    per_class = []
    for i, name in enumerate(class_names):
        total, correct = int(confusion[i].sum()), int(confusion[i, i])
        per_class.append({"class": name, "images": total, "correct": correct,
                          "acc": correct / total if total else None})
    top_k = top_k_accuracy_score(labels, logits, k=k, labels=classes) if c > 2 else \
        float(accuracy_score(labels, predicted) if k == 1 else 1.0)
    return {"num_images": int(n), "num_classes": int(c),
            "acc_top1": float(accuracy_score(labels, predicted)),
            "acc_top5": float(top_k), "top5_k": k,
            "loss": float(log_loss(labels, softmax(logits.astype(np.float64), axis=1), labels=classes)),
            "per_class": per_class, "confusion_matrix": confusion.tolist()}


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> np.ndarray:
    """The matrix as a PNG at `path`; returns the image (HWC uint8) for VisualDL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    c = len(class_names)
    side = min(12.0, 3.0 + 0.35 * c)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if c <= 40:  # beyond that the labels overlap into a black bar
        ax.set_xticks(range(c), labels=class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(c), labels=class_names, fontsize=8)
    if c <= 20:
        threshold = confusion.max() / 2 if confusion.size else 0
        for (i, j), v in np.ndenumerate(confusion):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _check_same_classes(data_names: list[str], run_names: list[str], ckpt: Path) -> None:
    """The data's class ids must mean what they meant in training: the same names in the
    same order (class_names.txt of the run), not only the same count."""
    from mbv2.data import DataError

    if data_names == run_names:
        return
    ids_only = run_names == [str(i) for i in range(len(run_names))]  # no names were recorded
    if len(data_names) == len(run_names) and ids_only:
        return
    if len(data_names) != len(run_names):
        raise DataError(f"the data has {len(data_names)} classes, the checkpoint {ckpt} "
                        f"{len(run_names)}; give data.* of the same classes")
    if sorted(data_names) == sorted(run_names):
        raise DataError(f"the data's classes are the run's in another order ({data_names[:5]} "
                        f"vs the run's {run_names[:5]} ...): class ids would be mixed up. Give "
                        f"data.classes in the run's order (its class_names.txt)")
    only_data = sorted(set(data_names) - set(run_names))[:5]
    raise DataError(f"the data's classes {only_data} ... are not the classes {ckpt} was trained "
                    f"on ({run_names[:5]} ...); evaluate on data of the run's classes")


def _eval_data(args: EvalArgs, cfg, class_names: Sequence[str], ckpt: Path):
    """The split to evaluate: the run's data config with `data.*` arguments over it."""
    from omegaconf import OmegaConf

    from mbv2.data import build_data, build_transforms

    data_cfg = cfg.data
    OmegaConf.set_struct(data_cfg, True)  # a misspelt data.* key fails, naming it
    try:
        data_cfg = OmegaConf.merge(data_cfg, args.data)
    except Exception as e:
        raise SystemExit(f"data override: {str(e).splitlines()[0]}") from None
    data = build_data(data_cfg)
    _check_same_classes(list(data.class_names), list(class_names), ckpt)
    dataset = data.val if args.split == "val" else data.train
    if args.split == "train":
        # the train split with eval transforms: augmentation would make the numbers noise
        dataset.transform = build_transforms(data_cfg, train=False)
    return dataset, data_cfg


def _record(run_dir: Path, tag: str, epoch: int, image: np.ndarray) -> str | None:
    """The confusion matrix as an image of the run itself in VisualDL: appended to the
    run's own records (same file, same run name), so eval adds neither a second run nor a
    second name for a metric the run already logs (eval/*). Skipped, with the reason
    returned, while the run is still training (its writer owns the file)."""
    import json

    from visualdl import LogWriter

    from mbv2.train.tracking import METRICS_FILE, RECORDS_FILE

    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        metrics = {}
    if metrics.get("status") == "running":
        return f"{run_dir} is still training; its VisualDL records were left alone"
    records = run_dir / RECORDS_FILE
    if not os.access(run_dir, os.W_OK) or (records.exists() and not os.access(records, os.W_OK)):
        return (f"{run_dir / RECORDS_FILE} cannot be written (read-only); "
                f"the confusion matrix is in the PNG only")
    name = metrics.get("run_name") or run_dir.name
    with LogWriter(logdir=str(run_dir), file_name=RECORDS_FILE, display_name=name) as writer:
        writer.add_image(tag, image, step=epoch)
    return None


def run_eval(args: EvalArgs) -> dict[str, Any]:
    import paddle
    from omegaconf import OmegaConf

    from mbv2.artifacts import restore_run
    from mbv2.runtime import select_device
    from mbv2.train.checkpoint import run_dir_of

    if args.split not in ("val", "train"):
        raise SystemExit(f"split={args.split!r}: use val or train")
    device = select_device(args.device, key="device")
    paddle.set_device(device)
    net, cfg, class_names, ckpt, meta = restore_run(args.ckpt, ema=args.ema, device=device)
    dataset, data_cfg = _eval_data(args, cfg, class_names, ckpt)
    if not args.out:  # before the work: a read-only run dir says so now, not after it
        default_output_dir(run_dir_of(ckpt) / EVAL_DIR, "mbv2.eval")
    logits, labels = evaluate_logits(net, dataset, args.batch_size, int(data_cfg.image_size))
    report = classification_report(logits, labels, class_names)
    result = {"checkpoint": str(ckpt), "epoch": int(meta.get("epoch") or 0), "split": args.split,
              "ema": args.ema, "data": OmegaConf.to_container(data_cfg, resolve=True),
              "class_names": list(class_names), **report}
    _write_outputs(args, run_dir_of(ckpt), result)
    return result


def _write_outputs(args: EvalArgs, run_dir: Path, result: dict[str, Any]) -> None:
    """eval[_train].json, the confusion matrix PNG and a VisualDL record, then one line."""
    from mbv2.files import write_json_atomic

    out = Path(args.out) if args.out else run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.split == "val" else f"_{args.split}"
    epoch, weights = result["epoch"], "EMA weights" if args.ema else "weights"
    title = f"{run_dir.name}: {args.split}, epoch {epoch} {weights}, top-1 {result['acc_top1']:.4f}"
    png = out / f"confusion_matrix{suffix}.png"
    image = plot_confusion(np.asarray(result["confusion_matrix"]), result["class_names"], title, png)
    write_json_atomic(out / f"eval{suffix}.json", result)
    tag = f"eval/confusion_matrix{suffix}{'_ema' if args.ema else ''}{'_other_data' if args.data else ''}"
    skipped = _record(run_dir, tag, epoch, image)
    if skipped:
        log.warning(skipped)
    print(f"{result['checkpoint']} (epoch {epoch}, {weights}) on {args.split}: "
          f"{result['num_images']} images, top-1 {result['acc_top1']:.4f}, "
          f"top-{result['top5_k']} {result['acc_top5']:.4f}, loss {result['loss']:.4f}\n"
          f"-> {out / f'eval{suffix}.json'}, {png}")


main = entry_point(EvalArgs, run_eval, "mbv2.eval",
                   "ckpt=<run dir or checkpoint> [split=val|train] [data.key=value ...]")


if __name__ == "__main__":
    main()
