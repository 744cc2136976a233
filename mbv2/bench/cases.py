"""What the benchmark times and how its numbers are tabled: cases, results, backends.

Each case is one network size on one input size; each Result one backend in one mode
(train or infer) on one case. The table has one row per case and mode, a column per
backend, and the ratios of each Paddle backend to each PyTorch one.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

# Backends, each timed in a process of its own. "torch" is PyTorch as installed (glibc's
# default allocator); "torch_kept_heap" is PyTorch given the allocator setting every mbv2
# process runs with (mbv2.runtime.configure_malloc), for a like-for-like ratio.
PADDLE_BACKENDS = ("paddle_native", "paddle_kernel", "paddle_predictor")
TORCH_BACKENDS = ("torch", "torch_kept_heap")


@dataclass(frozen=True)
class Case:
    scale: float
    image_size: int
    batch: int
    class_num: int
    warmup: int
    reps: int  # timed training steps; inference uses 2x (it is cheaper)


def default_cases(quick: bool, scales: list[float]) -> list[Case]:
    if quick:  # smoke: every code path once or twice, ~1 minute
        return [Case(s, 32, 32, 10, 1, 2) for s in scales] + \
               [Case(s, 224, 4, 1000, 1, 2) for s in scales]
    # 224 px x1.0 native training is ~3 s a step here: few reps keep the run < 10 min.
    # 5 warm-up steps there: the heap keeps growing (page faults) for the first few.
    return [Case(s, 32, 128, 10, 3, 8) for s in scales] + \
           [Case(s, 224, 32, 1000, 5, 5) for s in scales]


@dataclass
class Result:
    case: Case
    mode: str  # train | infer
    backend: str  # paddle_native | paddle_kernel | paddle_predictor | torch
    seconds: list[float] = field(default_factory=list)
    load_before: float = 0.0
    load_after: float = 0.0
    error: str | None = None
    round_img_s: list[float] = field(default_factory=list)  # median of each round

    @property
    def img_s(self) -> float | None:
        return self.case.batch / statistics.median(self.seconds) if self.seconds else None


def table(results: list[Result]) -> list[dict[str, Any]]:
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r.case.scale, r.case.image_size, r.case.batch, r.mode)
        row = rows.setdefault(key, {"scale": r.case.scale, "image_size": r.case.image_size,
                                    "batch": r.case.batch, "mode": r.mode})
        row[r.backend] = round(r.img_s, 2) if r.img_s else None
    for row in rows.values():
        for ref in TORCH_BACKENDS:
            t = row.get(ref)
            for b in PADDLE_BACKENDS:
                if t and row.get(b):
                    row[f"{b}_vs_{ref}"] = round(row[b] / t, 2)
    return list(rows.values())


def format_table(rows: list[dict[str, Any]], threads: int) -> str:
    head = (f"{'model':6s} {'px':>4s} {'batch':>5s} {'mode':5s} | {'native':>8s} {'kernel':>8s} "
            f"{'predict':>8s} {'torch':>8s} {'torch*':>8s} | {'kern/t':>6s} {'kern/t*':>7s} "
            f"{'pred/t':>6s}")
    lines = [f"MobileNetV2 img/s, {threads} threads (median of timed steps; higher is better)",
             head, "-" * len(head)]

    def f(v: Any, w: int, p: int = 1) -> str:
        return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"

    for r in rows:
        lines.append(f"x{r['scale']:<5} {r['image_size']:4d} {r['batch']:5d} {r['mode']:5s} | "
                     f"{f(r.get('paddle_native'), 8)} {f(r.get('paddle_kernel'), 8)} "
                     f"{f(r.get('paddle_predictor'), 8)} {f(r.get('torch'), 8)} "
                     f"{f(r.get('torch_kept_heap'), 8)} | "
                     f"{f(r.get('paddle_kernel_vs_torch'), 6, 2)} "
                     f"{f(r.get('paddle_kernel_vs_torch_kept_heap'), 7, 2)} "
                     f"{f(r.get('paddle_predictor_vs_torch'), 6, 2)}")
    lines.append("torch: PyTorch as installed (glibc's default allocator); torch*: PyTorch with "
                 "the kept heap every mbv2 process uses (MBV2_MALLOC)")
    return "\n".join(lines)
