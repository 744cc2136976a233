"""`python -m mbv2.bench`: the cases in turn, every backend in rounds of fresh worker
processes, then the table on stdout and the JSON report.

The machine may be shared: the 1-minute load average before and after each case goes into
the JSON so a noisy number can be recognised.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mbv2.bench.cases import (BF16_BACKENDS, NA_PREFIX, PADDLE_BACKENDS, PREDICTORS, TRAIN_ONLY,
                              TORCH_BACKENDS, Case, Result, default_cases, format_table, table)
from mbv2.bench.peak import cpu_peak
from mbv2.bench.torch_side import torch_available
from mbv2.bench.workers import (backend_worker, default_run, in_subprocess, loader_speed,
                                measured_sgemm_gflops, thread_env)
from mbv2.runtime import BF16_FLAGS, has_avx512_bf16, has_bf16


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


_NO_BF16 = f"{NA_PREFIX}: the CPU reports none of {', '.join(BF16_FLAGS)}"


def _not_here(backend: str) -> str | None:
    """Why a bf16 backend cannot run on this CPU (an n/a error), else None."""
    if backend not in BF16_BACKENDS:
        return None
    if not has_bf16():
        return _NO_BF16
    if backend == "paddle_predictor_kernels_bf16" and not has_avx512_bf16():
        return f"{NA_PREFIX}: mbv2's predictor runs bf16 on AVX512-BF16 only"
    return None


def run_case(case: Case, threads: int, with_torch: bool, log: Callable[[str], None],
             rounds: int = 2) -> list[Result]:
    """Time every backend on `case`, each in a fresh process (see `in_subprocess`), in
    `rounds` rounds that take turns (A B C .. A B C ..), each round half the timed steps.
    A slow spell of the shared machine then lands on several backends instead of one
    (single processes of PyTorch at 32 px ran at either ~800 or ~400 img/s here), and the
    per-round medians in the JSON (`round_img_s`) show when that happened. The bf16
    backends are not run (their error says n/a) where the CPU has no bfloat16 instructions."""
    backends = PADDLE_BACKENDS + (TORCH_BACKENDS if with_torch else ())
    results: dict[tuple[str, str], Result] = {}
    for backend in backends:
        modes = ("infer",) if backend in PREDICTORS else ("train",) if backend in TRAIN_ONLY \
            else ("train", "infer")
        for m in modes:
            results[(backend, m)] = Result(case, m, backend, load_before=_loadavg())
            results[(backend, m)].error = _not_here(backend)
    rounds = max(1, min(rounds, case.reps))
    for rnd in range(rounds):
        # this round's share of the timed steps (train: reps, infer: 2 x reps in all)
        share = replace(case, reps=case.reps // rounds + (1 if rnd < case.reps % rounds else 0))
        for backend in backends:
            rs = {m: r for (b, m), r in results.items() if b == backend and not r.error}
            if not rs:
                continue
            try:
                times = in_subprocess(backend, share, threads)
                for m, r in rs.items():
                    r.seconds += times[m]
                    r.round_img_s.append(round(case.batch / statistics.median(times[m]), 2))
            except Exception as e:  # one broken backend must not lose the others' numbers
                for r in rs.values():
                    r.error, r.seconds = f"{type(e).__name__}: {e}", []
    for r in results.values():
        r.load_after = _loadavg()
        shown = f"{r.img_s:8.1f} img/s" if r.img_s else f"failed ({r.error})"
        log(f"x{case.scale} {case.image_size}px b{case.batch} {r.mode:5s} {r.backend:29s} "
            f"{shown}" + (f"  (rounds: {r.round_img_s})" if len(r.round_img_s) > 1 else ""))
    return list(results.values())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mbv2 import bench

    ap = argparse.ArgumentParser(prog="python -m mbv2.bench",
                                 description=bench.__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run (small batches)")
    ap.add_argument("--out", default="outputs/bench.json", help="JSON results file")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for every framework (default: all CPUs)")
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="width multipliers (default 1.0 0.5; --quick: 1.0)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    ap.add_argument("--worker", nargs=2, metavar=("BACKEND", "CASE_JSON"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _configure(threads: int, paddle_threads: bool) -> None:
    """Set up this process before Paddle/torch load their OpenMP/MKL runtimes, which read
    these once: the thread variables, then mbv2.runtime.configure_process (MKL's code path,
    the allocator; Paddle's math threads, which stay at one otherwise, where Paddle
    computes - that imports paddle, which a torch worker must not)."""
    from mbv2.runtime import configure_process

    os.environ.update(thread_env(threads))
    configure_process(threads if paddle_threads else None)


def _run_worker(args: argparse.Namespace) -> dict[str, list[float]]:
    """Internal: one backend on one case, JSON timings on stdout."""
    backend, case_json = args.worker
    _configure(args.threads, paddle_threads=backend in PADDLE_BACKENDS)
    result = backend_worker(backend, Case(**json.loads(case_json)), args.threads)
    print(json.dumps(result), flush=True)
    return result


def _time_all(args: argparse.Namespace, scales: list[float],
              with_torch: bool) -> tuple[list[Result], dict[str, Any]]:
    """Every case on every backend; without --quick also the default experiment and the
    data loader (`extras` in the JSON)."""
    results: list[Result] = []
    extras: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mbv2_bench_") as tmp:
        for case in default_cases(args.quick, scales):
            results += run_case(case, args.threads, with_torch,
                                lambda s: print(s, file=sys.stderr, flush=True))
        if not args.quick:
            print("timing the default experiment (python -m mbv2.run) ...", file=sys.stderr)
            extras["default_run"] = default_run(Path(tmp))
            print("timing the data loader on JPEG files ...", file=sys.stderr)
            extras["loader_32px_img_s"] = loader_speed(Path(tmp))
    return results, extras


def _print_extras(extras: dict[str, Any]) -> None:
    if "default_run" not in extras:
        return
    d = extras["default_run"]
    print(f"default experiment (make run): {d.get('wall_s')} s wall, best top-1 "
          f"{d.get('best_eval_acc_top1')}, training {d.get('train_images_per_sec')} img/s"
          if "error" not in d else f"default experiment failed: {d['error']}")
    loader = ", ".join(f"{k.replace('_', ' ')}: {v} img/s"
                       for k, v in extras["loader_32px_img_s"].items())
    print(f"data loader, 32 px JPEG files, batch 64: {loader} (training above: "
          f"{d.get('train_images_per_sec')} img/s)")


def _macs(cases: list[Case]) -> dict[tuple, int]:
    """Forward MACs per image of each case's network (mbv2.model.count_macs)."""
    from mbv2.model import MobileNetV2, count_macs

    return {(c.scale, c.image_size, c.class_num): count_macs(
        MobileNetV2(class_num=c.class_num, scale=c.scale), c.image_size) for c in cases}


def _unavailable(with_torch: bool, skipped: bool) -> dict[str, str]:
    if with_torch:
        return {}
    why = "skipped (--no-torch)" if skipped else "torch not installed"
    return {b: why for b in TORCH_BACKENDS + ("best_torch",)}


def _versions(with_torch: bool) -> dict[str, str]:
    import paddle

    versions = {"paddle": paddle.__version__, "python": platform.python_version()}
    if with_torch:
        import torch
        versions["torch"] = torch.__version__
    return versions


def _report(args: argparse.Namespace, versions: dict[str, str], wall_s: float,
            rows: list[dict[str, Any]], extras: dict[str, Any],
            results: list[Result], peak: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: machine and its FP32 peak, versions, the table, extras and every
    run's timings."""
    return {
        "threads": args.threads,
        "cpu": _cpu_model(),
        "env": {k: os.environ.get(k) for k in ("MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS")},
        "versions": versions,
        "quick": args.quick,
        "wall_s": wall_s,
        "cpu_peak": peak,
        "table": rows,
        **extras,
        "runs": [{**asdict(r.case), "mode": r.mode, "backend": r.backend,
                  "img_s": r.img_s, "round_img_s": r.round_img_s, "seconds": r.seconds,
                  "load_before": r.load_before, "load_after": r.load_after,
                  "error": r.error} for r in results],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    if args.worker:
        return _run_worker(args)
    _configure(args.threads, paddle_threads=False)  # this process only starts workers
    import paddle  # noqa: F401  (loaded before torch, which torch_available imports)

    scales = args.scales or ([1.0] if args.quick else [1.0, 0.5])
    with_torch = not args.no_torch and torch_available()
    if not with_torch:
        print("PyTorch not importable (or --no-torch): no torch columns", file=sys.stderr)

    t0 = time.time()
    results, extras = _time_all(args, scales, with_torch)
    peak = cpu_peak(args.threads, measured_sgemm_gflops(args.threads))
    rows = table(results, _macs(default_cases(args.quick, scales)), peak["peak_gflop_s"],
                 _unavailable(with_torch, args.no_torch))
    print(format_table(rows, args.threads, peak))
    _print_extras(extras)

    report = _report(args, _versions(with_torch), round(time.time() - t0, 1), rows, extras,
                     results, peak)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['wall_s']} s)", file=sys.stderr)
    return report
