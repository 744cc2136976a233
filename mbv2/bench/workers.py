"""Timing in fresh processes: one backend on one case per worker process, and the two
end-to-end numbers of the full run (`make run`'s experiment, the JPEG data loader).

Separate processes keep the backends from disturbing each other: measured here, building
the oneDNN predictor in the same process slowed the kernel's training steps from ~90 to
~125 ms, and torch's GNU OpenMP threads next to Paddle's Intel OpenMP pool made torch 8x
slower at 2 threads.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mbv2.bench.cases import PADDLE_BACKENDS, PREDICTORS, TORCH_BACKENDS, TORCH_VARIANTS, Case
from mbv2.bench.paddle_side import paddle_fns, predictor_fn
from mbv2.bench.torch_side import COMPILE_WARMUP, torch_fns

# What the OpenMP and MKL runtimes read once, when Paddle or torch loads them.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    return {var: str(threads) for var in THREAD_VARS}


def _step_fns(backend: str, case: Case, threads: int,
              workdir: Path) -> dict[str, Callable[[], Any]]:
    """{'train': step, 'infer': step} of one backend (the predictor: inference only)."""
    if backend in PADDLE_BACKENDS:
        import paddle

        paddle.set_device("cpu")
    if backend in ("paddle_native", "paddle_kernel"):
        train, infer = paddle_fns(case, backend == "paddle_kernel")
        return {"train": train, "infer": infer}
    if backend == "paddle_kernel_bf16":
        return {"train": paddle_fns(case, True, bf16=True)[0]}
    if backend in PREDICTORS:
        precision = "bf16" if backend.endswith("_bf16") else "fp32"
        engine = "kernels" if "_kernels" in backend else "paddle"
        return {"infer": predictor_fn(case, threads, workdir, precision, engine)}
    if backend in TORCH_BACKENDS:
        train, infer = torch_fns(case, threads, TORCH_VARIANTS[backend])
        return {"train": train, "infer": infer}
    if backend == SGEMM:
        return {"infer": sgemm_fn()}
    raise ValueError(f"unknown backend {backend!r}")


# Not a backend: one FP32 matrix product of SGEMM_SIZE^3 through Paddle (MKL), the rate
# of which bounds this CPU's FP32 peak from below (mbv2.bench.peak.cpu_peak).
SGEMM = "sgemm"
SGEMM_SIZE = 2048


def sgemm_fn() -> Callable[[], Any]:
    import paddle

    paddle.seed(0)
    a = paddle.randn([SGEMM_SIZE, SGEMM_SIZE], dtype="float32")
    b = paddle.randn([SGEMM_SIZE, SGEMM_SIZE], dtype="float32")
    return lambda: float(paddle.matmul(a, b)[0, 0])


def measured_sgemm_gflops(threads: int) -> float | None:
    """GFLOP/s of the fastest of 5 SGEMM_SIZE^3 products on `threads` threads, in a process
    of its own set up like the backends' (None if it failed)."""
    case = Case(scale=1.0, image_size=0, batch=1, class_num=0, warmup=2, reps=3)
    try:
        times = in_subprocess(SGEMM, case, threads)["infer"]
    except Exception:  # the peak then rests on the clock alone
        return None
    return 2 * SGEMM_SIZE ** 3 / min(times) / 1e9


def time_steps(fn: Callable[[], Any], warmup: int, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def backend_worker(backend: str, case: Case, threads: int) -> dict[str, list[float]]:
    """Time one backend on one case in this process: {'train': [s...], 'infer': [s...]}.
    Each mode runs `case.warmup` untimed steps first (the heap and caches fill), then its
    timed steps back to back (torch_compile: at least COMPILE_WARMUP untimed steps, which
    compile). The process is set up (mbv2.runtime.configure_process) by its caller,
    before paddle or torch loads."""
    warmup = max(case.warmup, COMPILE_WARMUP) if backend == "torch_compile" else case.warmup
    with tempfile.TemporaryDirectory(prefix="mbv2_bench_") as tmp:
        fns = _step_fns(backend, case, threads, Path(tmp))
        return {mode: time_steps(fn, warmup, case.reps if mode == "train" else 2 * case.reps)
                for mode, fn in fns.items()}


def in_subprocess(backend: str, case: Case, threads: int) -> dict[str, list[float]]:
    """`backend_worker` in a fresh interpreter (`python -m mbv2.bench --worker`): see the
    module's docstring for why."""
    import subprocess

    env = dict(os.environ, **thread_env(threads))
    env.pop("MBV2_MALLOC", None)
    if backend == "torch":  # PyTorch as a user runs it: glibc's default allocator
        env["MBV2_MALLOC"] = "system"
    proc = subprocess.run(
        [sys.executable, "-m", "mbv2.bench", "--threads", str(threads),
         "--worker", backend, json.dumps(asdict(case))],
        capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{backend} worker exited {proc.returncode}: {tail[0][-400:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------- end to end and data

def default_run(workdir: Path) -> dict[str, Any]:
    """`make run`'s experiment (python -m mbv2.run with its defaults), timed from the
    shell's point of view: interpreter start, data, build, training, evaluation."""
    import subprocess

    run_dir = workdir / "default_run"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mbv2.run", "trainer.verbose=0",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": proc.stderr[-800:]}
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "best_eval_acc_top1": m["best_eval_acc_top1"],
            "final_eval_acc_top1": m["final_eval_acc_top1"],
            "train_images_per_sec": round(m["train_images_per_sec"], 1),
            "epochs": m["epochs_completed"]}


def loader_speed(workdir: Path, image_size: int = 32, workers: tuple[int, ...] = (0, 2)) -> dict[str, Any]:
    """Data-loader img/s decoding JPEG files from disk (the digits written as 32 px
    JPEGs in class folders), to hold against training img/s at the same size."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image
    from sklearn.datasets import load_digits

    from mbv2.config import DataConfig
    from mbv2.data import measure_loader

    root = workdir / "digits_jpeg"
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if i % 5 == 0 else "train"
        d = root / split / str(label)
        d.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((image_size, image_size))
        big.convert("RGB").save(d / f"{i}.jpg", quality=90)
    cfg = OmegaConf.structured(DataConfig(name="folder", root=str(root), image_size=image_size,
                                          hflip=False))
    return {f"workers_{w}": round(measure_loader(cfg, batch_size=64, num_workers=w, batches=20), 1)
            for w in workers}
