"""What the benchmark times and how its numbers are tabled: cases, results, backends.

Each case is one network size on one input size; each Result one backend in one mode
(train or infer) on one case. The table has one row per case and mode, a column per
backend, the fastest PyTorch backend ("best_torch"), the ratios of the Paddle backends to
PyTorch eager and to that best, and every backend's achieved GFLOP/s and fraction of this
CPU's FP32 peak (mbv2.bench.peak).
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mbv2.bench.peak import achieved_gflops

# Backends, each timed in a process of its own. "torch" is PyTorch as installed (glibc's
# default allocator); "torch_kept_heap" is PyTorch given the allocator setting every mbv2
# process runs with (mbv2.runtime.configure_malloc: the kept heap, with its huge pages from
# configure_hugepages), for a like-for-like ratio.
# The speed-minded variants, all with the kept heap: "torch_channels_last" (model and input
# in torch.channels_last), "torch_compile" (that + torch.compile, default mode) and
# "torch_bf16" (channels_last + bfloat16 autocast; n/a without avx512_bf16/amx_bf16).
# "paddle_predictor_kernels": the same exported model run by mbv2's one-op CPU predictor
# (`python -m mbv2.predict engine=kernels`, FP32; mbv2/ops/infer_net.cc);
# "paddle_predictor_kernels_bf16" the same with `precision=bf16` (its 1x1 convs in bfloat16;
# n/a without avx512_bf16).
# "paddle_predictor_bf16": the exported predictor with oneDNN's bfloat16 kernels
# (`python -m mbv2.predict precision=bf16 engine=paddle`; n/a without avx512_bf16/amx_bf16).
# "paddle_kernel_bf16": training on the kernels with mixed precision (`trainer.amp=O1` on
# CPU: the larger 1x1 convs multiply in bfloat16), beside PyTorch's bf16 autocast.
PADDLE_BACKENDS = ("paddle_native", "paddle_kernel", "paddle_kernel_bf16", "paddle_predictor",
                   "paddle_predictor_kernels", "paddle_predictor_kernels_bf16",
                   "paddle_predictor_bf16")
# inference only
PREDICTORS = ("paddle_predictor", "paddle_predictor_kernels", "paddle_predictor_kernels_bf16",
              "paddle_predictor_bf16")
TRAIN_ONLY = ("paddle_kernel_bf16",)
# n/a without bf16 instructions
BF16_BACKENDS = ("torch_bf16", "paddle_kernel_bf16", "paddle_predictor_kernels_bf16",
                 "paddle_predictor_bf16")
EAGER_TORCH = ("torch", "torch_kept_heap")
TORCH_BACKENDS = EAGER_TORCH + ("torch_channels_last", "torch_compile", "torch_bf16")
TORCH_VARIANTS = {"torch": "eager", "torch_kept_heap": "eager",
                  "torch_channels_last": "channels_last", "torch_compile": "compile",
                  "torch_bf16": "bf16"}
NA_PREFIX = "n/a"  # a Result whose error starts so was not run (not possible here)


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
    # 32 px: 24 timed steps, 12 a round. With 4 a round, one process of the kernels that
    # ran in the host's slow spell (35 against 45 ms a step at x0.5) moved the cell by a
    # quarter (rounds of 2,677 and 3,882 img/s); the steps there take ~40-70 ms (Paddle's
    # own ops ~2.4 s at x1.0: ~1.5 minutes of this run's ~15).
    return [Case(s, 32, 128, 10, 3, 24) for s in scales] + \
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


def best_torch(row: dict[str, Any]) -> tuple[str | None, float | None]:
    """(backend, img/s) of the fastest PyTorch backend in a table row; (None, None) if none."""
    timed = [(row[b], b) for b in TORCH_BACKENDS if isinstance(row.get(b), (int, float))]
    if not timed:
        return None, None
    v, b = max(timed)
    return b, v


def _ratios(row: dict[str, Any]) -> None:
    for ref in EAGER_TORCH:
        t = row.get(ref)
        for b in PADDLE_BACKENDS:
            if t and row.get(b):
                row[f"{b}_vs_{ref}"] = round(row[b] / t, 2)
    row["best_torch_backend"], row["best_torch"] = best_torch(row)
    for b in ("paddle_kernel", "paddle_kernel_bf16") + PREDICTORS:
        if row["best_torch"] and row.get(b):
            row[f"{b}_vs_best_torch"] = round(row[b] / row["best_torch"], 2)


def _flops(row: dict[str, Any], macs: int | None, peak_gflop_s: float | None) -> None:
    row["macs_per_image"] = macs
    row["gflop_s"], row["peak_fraction"] = {}, {}
    for b in PADDLE_BACKENDS + TORCH_BACKENDS + ("best_torch",):
        if macs and isinstance(row.get(b), (int, float)):
            g = achieved_gflops(macs, row[b])
            row["gflop_s"][b] = round(g, 2)
            if peak_gflop_s:
                row["peak_fraction"][b] = round(g / peak_gflop_s, 4)


def table(results: list[Result], macs: dict[tuple, int] | None = None,
          peak_gflop_s: float | None = None,
          unavailable: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per case and mode: img/s per backend, the ratios, GFLOP/s. `macs`: forward
    MACs per image by (scale, image_size, class_num); `unavailable`: backend -> why it has
    no column (every row), besides results that were n/a."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r.case.scale, r.case.image_size, r.case.batch, r.mode)
        row = rows.setdefault(key, {"scale": r.case.scale, "image_size": r.case.image_size,
                                    "batch": r.case.batch, "mode": r.mode,
                                    "unavailable": dict(unavailable or {}),
                                    "_macs": (macs or {}).get(
                                        (r.case.scale, r.case.image_size, r.case.class_num))})
        row[r.backend] = round(r.img_s, 2) if r.img_s else None
        if r.error and r.error.startswith(NA_PREFIX):
            row["unavailable"][r.backend] = r.error
    for row in rows.values():
        _ratios(row)
        _flops(row, row.pop("_macs"), peak_gflop_s)
    return list(rows.values())


def _cell(row: dict[str, Any], key: str, w: int, p: int = 1) -> str:
    v = row.get(key)
    if isinstance(v, (int, float)):
        return f"{v:{w}.{p}f}"
    why = row.get("unavailable", {}).get(key.rstrip("%"), "")
    mark = "no torch" if "not installed" in why else "n/a" if why else "-"
    return f"{mark:>{w}s}"


# (header, row key, width, decimals) of the img/s table and of the GFLOP/s table
_SPEED_COLS = (("native", "paddle_native", 8, 1), ("kernel", "paddle_kernel", 8, 1),
               ("kern16", "paddle_kernel_bf16", 8, 1), ("predict", "paddle_predictor", 8, 1),
               ("pred_k", "paddle_predictor_kernels", 8, 1),
               ("pk16", "paddle_predictor_kernels_bf16", 8, 1),
               ("pred16", "paddle_predictor_bf16", 8, 1),
               ("torch", "torch", 8, 1),
               ("torch*", "torch_kept_heap", 8, 1), ("t_cl", "torch_channels_last", 8, 1),
               ("t_comp", "torch_compile", 8, 1), ("t_bf16", "torch_bf16", 8, 1),
               ("best_t", "best_torch", 8, 1), ("|", None, 1, 0),
               ("kern/t", "paddle_kernel_vs_torch", 6, 2),
               ("kern/t*", "paddle_kernel_vs_torch_kept_heap", 7, 2),
               ("pred/t", "paddle_predictor_vs_torch", 6, 2),
               ("kern/best", "paddle_kernel_vs_best_torch", 9, 2),
               ("k16/best", "paddle_kernel_bf16_vs_best_torch", 8, 2),
               ("pred/best", "paddle_predictor_vs_best_torch", 9, 2),
               ("pk/best", "paddle_predictor_kernels_vs_best_torch", 8, 2),
               ("pk16/best", "paddle_predictor_kernels_bf16_vs_best_torch", 9, 2),
               ("p16/best", "paddle_predictor_bf16_vs_best_torch", 8, 2))


def _lines(rows: list[dict[str, Any]], cols: tuple, pick: Callable) -> list[str]:
    head = f"{'model':6s} {'px':>4s} {'batch':>5s} {'mode':5s} | " + " ".join(
        f"{h:>{w}s}" for h, _, w, _ in cols)
    out = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join("|" if k is None else _cell(pick(r, k), k, w, p) for _, k, w, p in cols)
        out.append(f"x{r['scale']:<5} {r['image_size']:4d} {r['batch']:5d} {r['mode']:5s} | "
                   + cells)
    return out


def _gflops_view(row: dict[str, Any], key: str) -> dict[str, Any]:
    g, f = row.get("gflop_s", {}).get(key), row.get("peak_fraction", {}).get(key)
    return {key: g, f"{key}%": None if f is None else 100 * f,
            "unavailable": row.get("unavailable", {})}


def format_table(rows: list[dict[str, Any]], threads: int,
                 peak: dict[str, Any] | None = None) -> str:
    lines = [f"MobileNetV2 img/s, {threads} threads (median of timed steps; higher is better)",
             "native/kernel: dygraph on Paddle's ops / mbv2's CPU kernels; kern16: the kernels "
             "with trainer.amp=O1 (bfloat16 1x1 products, training); predict/pred16: the "
             "exported model in Paddle Inference (oneDNN), FP32 / bfloat16 kernels; pred_k/pk16: "
             "the exported model in mbv2's one-op CPU predictor (engine=kernels), FP32 / "
             "bfloat16 1x1 products"]
    lines += _lines(rows, _SPEED_COLS, lambda r, k: r)
    best = sorted({r["best_torch_backend"] for r in rows if r.get("best_torch_backend")})
    lines += ["torch: PyTorch as installed (glibc's default allocator); torch*: PyTorch with "
              "the kept heap (and its huge pages) every mbv2 process uses (MBV2_MALLOC, "
              "MBV2_HUGEPAGES); t_cl/t_comp/t_bf16: kept "
              "heap + channels_last, + torch.compile, + bf16 autocast; best_t: the fastest "
              f"PyTorch column ({', '.join(best) or 'none'})"]
    notes = sorted({f"{b}: {why}" for r in rows for b, why in r.get("unavailable", {}).items()
                    if b != "torch" and "not installed" not in why})
    if any("not installed" in w for r in rows for w in r.get("unavailable", {}).values()):
        notes.insert(0, "no torch: torch not installed")
    lines += notes
    speeds = _SPEED_COLS[:[k for _, k, _, _ in _SPEED_COLS].index(None)]  # before the "|"
    gcols = tuple((h, k, w, 1) for h, k, w, _ in speeds)
    lines += ["", "achieved GFLOP/s (2 x forward MACs/image x img/s)"]
    lines += _lines(rows, gcols, lambda r, k: _gflops_view(r, k))
    lines += ["", "% of this CPU's FP32 peak"]
    pct = tuple((h, f"{k}%", w, 2) for h, k, w, _ in gcols)
    lines += _lines(rows, pct, lambda r, k: _gflops_view(r, k[:-1]))
    if peak:
        lines.append(f"FP32 peak: {peak['formula']}; assumption: {peak['assumption']}")
    return "\n".join(lines)
