"""Throughput benchmark: MobileNetV2 on CPU, Paddle native vs Paddle + mbv2's CPU kernels
vs an exported Paddle Inference predictor vs PyTorch (same architecture): eager as installed,
eager with the kept heap, and (kept heap) channels_last, torch.compile and bf16 autocast.

    python -m mbv2.bench [--quick] [--out bench.json] [--threads N] [--scales 1.0 0.5]

Training img/s = forward + cross-entropy + backward + Momentum step (batch / step time);
inference img/s = eval-mode forward without gradients. Every backend runs in fresh
processes of its own, in two rounds that take turns; warm-up steps (3-5 per process: the
heap and caches fill) are excluded, each number is the median of the timed steps of both
rounds (each round's median is in the JSON). The table adds the fastest PyTorch backend per
case, mbv2's ratios to it, and each backend's GFLOP/s and fraction of the CPU's FP32 peak.
All frameworks use the same thread count (--threads sets OMP_NUM_THREADS/MKL_NUM_THREADS,
Paddle's math threads through mbv2.runtime.configure_process - Paddle alone stays on one -
and torch.set_num_threads). Classes: 10 at 32 px, 1000 at 224 px.

Modules: cases (Case, Result, the table); peak (FP32 peak, GFLOP/s); paddle_side (the Paddle backends, the exported
predictor); torch_side (the PyTorch reference, timed twice); workers (timing in fresh
processes, the default experiment, the data loader); driver (run_case, the command line,
the JSON report); parts (`python -m mbv2.bench.parts`: a training step's forward +
backward part by part, the stem, each inverted residual unit, the last conv).
"""
from mbv2.bench.cases import (BF16_BACKENDS, PADDLE_BACKENDS, TORCH_BACKENDS, Case, Result,
                              best_torch, default_cases, format_table, table)
from mbv2.bench.peak import (ASSUMED_FMA_UNITS_PER_CORE, achieved_gflops, cpu_peak, fp32_lanes,
                             fp32_peak_gflops)
from mbv2.bench.driver import main, run_case
from mbv2.bench.paddle_side import paddle_fns, predictor_fn
from mbv2.bench.torch_side import torch_available, torch_fns, torch_model
from mbv2.bench.workers import backend_worker, default_run, in_subprocess, loader_speed

__all__ = ["ASSUMED_FMA_UNITS_PER_CORE", "BF16_BACKENDS", "PADDLE_BACKENDS", "TORCH_BACKENDS", "Case", "Result",
           "achieved_gflops", "backend_worker", "best_torch", "cpu_peak",
           "fp32_lanes", "fp32_peak_gflops",
           "default_cases", "default_run", "format_table", "in_subprocess", "loader_speed",
           "main", "paddle_fns", "predictor_fn", "run_case", "table", "torch_available",
           "torch_fns", "torch_model"]
