"""`python -m mbv2.eval ckpt=<run dir or checkpoint> [split=val|train] [data.key=value ...]`

Top-1/top-5 and mean loss of a checkpoint on one split, per-class accuracy and a confusion
matrix. The run's saved config gives the model and data; `data.*` arguments replace its
data settings (another root, image size, ...). Written to `<run dir>/eval/` (or `out=`):
`eval.json` + `confusion_matrix.png` for split=val, `eval_train.json` +
`confusion_matrix_train.png` for split=train, and a VisualDL record of its own in that
folder (a second writer in the run dir would hide the training records).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

import mbv2  # noqa: F401  (sets the MKL code path before paddle loads)

log = logging.getLogger("mbv2.eval")

EVAL_DIR = "eval"
RECORDS_FILE = "vdlrecords.eval.log"


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


def evaluate_logits(net, dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) of `net` over `dataset`, in order."""
    import paddle

    loader = paddle.io.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                  return_list=True)
    logits, labels = [], []
    net.eval()
    with paddle.no_grad():
        for images, target in loader:
            logits.append(net(images).numpy())
            labels.append(np.asarray(target).reshape(-1))
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


def classification_report(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-k (k = min(5, classes)), mean cross-entropy, per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted)."""
    n, c = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    k = min(5, c)
    top_k = np.argsort(-logits, axis=1)[:, :k]
    predicted = top_k[:, 0]
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = []
    for i, name in enumerate(class_names):
        total, correct = int(confusion[i].sum()), int(confusion[i, i])
        per_class.append({"class": name, "images": total, "correct": correct,
                          "acc": correct / total if total else None})
    return {"num_images": int(n), "num_classes": int(c),
            "acc_top1": float((predicted == labels).mean()),
            "acc_top5": float((top_k == labels[:, None]).any(axis=1).mean()), "top5_k": k,
            "loss": float(-log_probs[np.arange(n), labels].mean()),
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


def run_eval(args: EvalArgs) -> dict[str, Any]:
    import paddle
    from omegaconf import OmegaConf

    from mbv2.checkpoint import restore_run, run_dir_of
    from mbv2.data import DataError, build_data, build_transforms
    from mbv2.tracking import write_json_atomic

    if args.split not in ("val", "train"):
        raise SystemExit(f"split={args.split!r}: use val or train")
    from mbv2.runtime import select_device

    device = select_device(args.device)
    paddle.set_device(device)
    net, cfg, class_names, ckpt, meta = restore_run(args.ckpt, ema=args.ema, device=device)
    data_cfg = cfg.data
    OmegaConf.set_struct(data_cfg, True)  # a misspelt data.* key fails, naming it
    try:
        data_cfg = OmegaConf.merge(data_cfg, args.data)
    except Exception as e:
        raise SystemExit(f"data override: {str(e).splitlines()[0]}") from None
    data = build_data(data_cfg)
    if data.num_classes != len(class_names):
        raise DataError(f"the data has {data.num_classes} classes, the checkpoint {ckpt} "
                        f"{len(class_names)}; give data.* of the same classes")
    dataset = data.val if args.split == "val" else data.train
    if args.split == "train":
        # the train split with eval transforms: augmentation would make the numbers noise
        dataset.transform = build_transforms(data_cfg, train=False)
    logits, labels = evaluate_logits(net, dataset, args.batch_size)
    report = classification_report(logits, labels, class_names)
    run_dir = run_dir_of(ckpt)
    out = Path(args.out) if args.out else run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.split == "val" else f"_{args.split}"
    epoch = int(meta.get("epoch") or 0)
    weights = "EMA weights" if args.ema else "weights"
    title = (f"{run_dir.name}: {args.split}, epoch {epoch} {weights}, "
             f"top-1 {report['acc_top1']:.4f}")
    png = out / f"confusion_matrix{suffix}.png"
    image = plot_confusion(np.asarray(report["confusion_matrix"]), class_names, title, png)
    result = {"checkpoint": str(ckpt), "epoch": epoch, "split": args.split, "ema": args.ema,
              "data": OmegaConf.to_container(data_cfg, resolve=True), "class_names": list(class_names),
              **report}
    write_json_atomic(out / f"eval{suffix}.json", result)

    from visualdl import LogWriter

    tag = f"{args.split}{'_ema' if args.ema else ''}"
    with LogWriter(logdir=str(out), file_name=RECORDS_FILE,
                   display_name=f"{run_dir.name}/{EVAL_DIR}") as writer:
        writer.add_image(f"confusion_matrix/{tag}", image, step=epoch)
        for key in ("acc_top1", "acc_top5", "loss"):
            writer.add_scalar(f"{tag}/{key}", report[key], step=epoch)
    print(f"{ckpt} (epoch {epoch}, {weights}) on {args.split}: {report['num_images']} images, "
          f"top-1 {report['acc_top1']:.4f}, top-{report['top5_k']} {report['acc_top5']:.4f}, "
          f"loss {report['loss']:.4f}\n-> {out / f'eval{suffix}.json'}, {png}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from mbv2.cli import run_entry

    run_entry(EvalArgs, run_eval, "mbv2.eval",
              "ckpt=<run dir or checkpoint> [split=val|train] [data.key=value ...]", argv)


if __name__ == "__main__":
    main()
