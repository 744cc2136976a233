"""Training throughput on one GPU: mbv2's MobileNetV2 through `paddle.Model.fit` (FP32 and
`trainer.amp=O1`, the model mbv2.run prepares), and the same network in PyTorch (FP32,
channels_last, AMP float16 with a GradScaler, AMP bfloat16, torch.compile + AMP float16).

    python -m mbv2.bench.gpu [--scale 1.0] [--image-size 224] [--batches 32 256]
                             [--steps 40] [--out gpu.json] [--device gpu] [--skip-compile]

Each side runs where its framework can reach a GPU and says why not otherwise (Paddle
without CUDA, PyTorch without a GPU), so one prepared script serves a machine that has
either. Images/s = batch x timed steps / their wall time, after warm-up steps (cuDNN's
algorithm search, allocator growth, compilation). Paddle's figure is `Model.fit`'s own
loop - a DataLoader over images held in memory, the loss and top-1/top-5 each step - as a
user's run gets it; PyTorch's is the bench's step (forward, cross-entropy, backward, SGD
momentum) on one batch already on the GPU, so the PyTorch figure is the higher bound.
`--device cpu` runs both sides on the CPU (the tests do, at tiny sizes).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

from mbv2.bench.cases import Case

TORCH_VARIANTS = ("fp32", "fp32_channels_last", "amp_fp16", "amp_bf16", "compile_amp_fp16")
PADDLE_LEVELS = (None, "O1")


def _rate(stamps: list[float], batch: int, warmup: int) -> float:
    """Images/s over the steps after the first `warmup` ones (stamps: each step's end)."""
    timed = stamps[warmup:]
    if len(timed) < 2:
        raise ValueError("too few steps to time: raise --steps")
    return batch * (len(timed) - 1) / (timed[-1] - timed[0])


def paddle_side(case: Case, device: str, workers: int) -> dict[str, Any]:
    """img/s of Model.fit, FP32 and O1, or {"skipped": why}."""
    try:
        import paddle
    except Exception as exc:  # broken installs raise more than ImportError
        return {"skipped": f"paddle not importable: {exc}"}
    if device == "gpu" and not (paddle.is_compiled_with_cuda()
                                and paddle.device.cuda.device_count() > 0):
        why = "sees no GPU" if paddle.is_compiled_with_cuda() else "is built without CUDA"
        return {"skipped": f"paddle {paddle.__version__} {why}"}
    out: dict[str, Any] = {"version": paddle.__version__}
    for level in PADDLE_LEVELS:
        out["fp32" if level is None else f"amp_{level}"] = round(
            _paddle_fit(case, device, workers, level), 1)
    return out


def _paddle_fit(case: Case, device: str, workers: int, level: str | None) -> float:
    import numpy as np
    import paddle
    from omegaconf import OmegaConf

    from mbv2.model import MobileNetV2
    from mbv2.ops import select_ops
    from mbv2.train.setup import prepare_model

    paddle.set_device(device)
    paddle.seed(0)
    net = MobileNetV2(class_num=case.class_num, scale=case.scale)
    net.use_ops(select_ops("auto", device))
    opt = paddle.optimizer.Momentum(learning_rate=0.01, momentum=0.9, parameters=net.parameters())
    model = prepare_model(net, opt, paddle.nn.CrossEntropyLoss(), OmegaConf.create({"amp": level}),
                          case.image_size, device)
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((case.batch, 3, case.image_size, case.image_size)).astype("float32")
    labels = rng.integers(0, case.class_num, (case.batch, 1)).astype("int64")

    class Held(paddle.io.Dataset):
        def __len__(self):
            return case.batch * (case.warmup + case.reps)

        def __getitem__(self, i):
            return pool[i % case.batch], labels[i % case.batch]

    class Stamps(paddle.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.stamps: list[float] = []

        def on_train_batch_end(self, step, logs=None):
            self.stamps.append(time.perf_counter())

    stamps = Stamps()
    model.fit(Held(), batch_size=case.batch, epochs=1, shuffle=False, drop_last=True,
              num_workers=workers, verbose=0, callbacks=[stamps])
    return _rate(stamps.stamps, case.batch, case.warmup)


def torch_side(case: Case, device: str, variants: tuple[str, ...]) -> dict[str, Any]:
    """img/s of each PyTorch variant, or {"skipped": why}."""
    try:
        import torch
    except Exception as exc:
        return {"skipped": f"torch not importable: {exc}"}
    if device == "gpu" and not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} sees no GPU"}
    out: dict[str, Any] = {"version": torch.__version__}
    for variant in variants:
        try:
            out[variant] = round(_torch_steps(case, device, variant), 1)
        except Exception as exc:  # one variant failing (compile) leaves the others
            out[variant] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return out


def _torch_steps(case: Case, device: str, variant: str) -> float:
    import contextlib

    import torch

    from mbv2.bench.torch_side import torch_model

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    torch.manual_seed(0)
    model = torch_model(case.class_num, case.scale).to(dev)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, device=dev)
    y = torch.randint(0, case.class_num, (case.batch,), device=dev)
    if variant != "fp32":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if variant.startswith("compile") else model
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float16
    amp = "amp" in variant
    scaler = torch.amp.GradScaler(dev.type, enabled=amp and dtype == torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    stamps = []
    for _ in range(case.warmup + case.reps):
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(dev.type, dtype=dtype) if amp else contextlib.nullcontext()
        with ctx:
            loss = torch.nn.functional.cross_entropy(run(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss.item()  # waits for the step, as Model.fit's per-step loss does
        stamps.append(time.perf_counter())
    return _rate(stamps, case.batch, case.warmup)


def machine(device: str) -> dict[str, Any]:
    """What ran it: the GPU's name and memory, driver and library versions where visible."""
    import shutil
    import subprocess

    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    if device == "gpu" and shutil.which("nvidia-smi"):
        res = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["gpu"] = res.stdout.strip() or res.stderr.strip()
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m mbv2.bench.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per figure")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    ap.add_argument("--workers", type=int, default=4, help="Model.fit's DataLoader processes")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--skip-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    variants = tuple(v for v in TORCH_VARIANTS if not (args.skip_compile and v.startswith("compile")))
    report: dict[str, Any] = {"machine": machine(args.device), "rows": []}
    for batch in args.batches:
        case = Case(args.scale, args.image_size, batch, args.classes, args.warmup, args.steps)
        row = {"scale": args.scale, "image_size": args.image_size, "batch": batch,
               "paddle_fit": paddle_side(case, args.device, args.workers),
               "torch": torch_side(case, args.device, variants)}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
