"""Smoke test of `python -m mbv2.bench`'s machinery on a tiny case: every backend runs,
the table and JSON come out. The real numbers need the full run (minutes)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mbv2 import bench
from mbv2.runtime import has_avx512_bf16, has_bf16


def test_tiny_case_every_backend():
    case = bench.Case(scale=0.25, image_size=32, batch=2, class_num=4, warmup=0, reps=1)
    with_torch = bench.torch_available()
    results = bench.run_case(case, threads=1, with_torch=with_torch, log=lambda s: None)
    by = {(r.mode, r.backend): r for r in results}
    expected = {("train", "paddle_native"), ("infer", "paddle_native"), ("train", "paddle_kernel"),
                ("infer", "paddle_kernel"), ("train", "paddle_kernel_bf16"),
                ("infer", "paddle_predictor"), ("infer", "paddle_predictor_kernels"),
                ("infer", "paddle_predictor_kernels_bf16"),
                ("infer", "paddle_predictor_bf16")}
    if with_torch:
        expected |= {(m, b) for m in ("train", "infer") for b in bench.TORCH_BACKENDS}
    assert set(by) == expected
    for key, r in by.items():
        if key[1].startswith("paddle_kernel") and "depthwise op unavailable" in (r.error or ""):
            continue  # no compiler here: the kernel column stays empty, nothing else breaks
        if key[1].startswith("paddle_predictor_kernels") and "op is unavailable" in (r.error or ""):
            continue  # the same for mbv2's CPU predictor
        if key[1] in bench.BF16_BACKENDS and not has_bf16():
            assert (r.error or "").startswith("n/a")
            continue  # no bfloat16 instructions on this CPU: the column says n/a
        if key[1] == "paddle_predictor_kernels_bf16" and not has_avx512_bf16():
            assert (r.error or "").startswith("n/a")
            continue  # bf16 from AMX alone: mbv2's predictor says n/a
        assert r.error is None, (key, r.error)
        assert r.img_s and r.img_s > 0
    rows = bench.table(results)
    assert len(rows) == 2 and {r["mode"] for r in rows} == {"train", "infer"}
    text = bench.format_table(rows, threads=1)
    assert "native" in text and "x0.25" in text
    json.dumps(rows)  # JSON-serialisable


@pytest.mark.skipif(not bench.torch_available(), reason="PyTorch not installed")
def test_torch_model_matches_paddle_architecture():
    """Same parameter count as mbv2.model.MobileNetV2 means same channels and layers."""
    from mbv2.model import MobileNetV2, count_parameters

    for scale in (1.0, 0.5):
        tm = bench.torch_model(1000, scale)
        n_torch = sum(p.numel() for p in tm.parameters())
        assert n_torch == count_parameters(MobileNetV2(class_num=1000, scale=scale))
    out = bench.torch_model(10, 0.25)(__import__("torch").zeros(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 10) and np.isfinite(out.detach().numpy()).all()


def test_peak_and_gflops_arithmetic():
    assert bench.fp32_lanes({"avx512f", "avx2"}) == 16 and bench.fp32_lanes({"avx2"}) == 8
    assert bench.fp32_lanes(set()) == 4
    # 2 cores x 16 lanes x 2 FMA units x 2 flop x 2.5 GHz
    assert bench.fp32_peak_gflops(2, 16, 2, 2500.0) == pytest.approx(320.0)
    assert bench.fp32_peak_gflops(4, 8, 2, 3000.0) == pytest.approx(384.0)
    assert bench.achieved_gflops(300_000_000, 100.0) == pytest.approx(60.0)
    assert has_bf16({"avx512f", "amx_bf16"}) and not has_bf16({"avx2"})
    peak = bench.cpu_peak(1)
    assert peak["cores_used"] == 1 and peak["fma_units_per_core"] == bench.ASSUMED_FMA_UNITS_PER_CORE
    assert "assumed" in peak["formula"] and peak["assumption"]
    # a measured SGEMM faster than the clock read allows raises the clock (turbo), a
    # slower one leaves it: the peak is never below what was measured
    fast = bench.cpu_peak(1, sgemm_gflops=1e5)
    assert fast["peak_gflop_s"] == pytest.approx(1e5) and "at least" in fast["clock_source"]
    slow = bench.cpu_peak(1, sgemm_gflops=0.5)
    assert slow["sgemm_gflop_s"] == 0.5
    if peak["clock_mhz"]:  # a clock was read (x86 Linux): a slow product leaves it
        assert slow["clock_mhz"] == peak["clock_mhz"]


def test_best_torch_selection_and_ratios():
    assert bench.best_torch({"torch": 10.0, "torch_compile": 30.0, "torch_bf16": None,
                             "paddle_kernel": 99.0}) == ("torch_compile", 30.0)
    assert bench.best_torch({"paddle_kernel": 5.0, "torch": None}) == (None, None)
    case = bench.Case(scale=0.5, image_size=32, batch=10, class_num=10, warmup=0, reps=1)
    rs = [bench.Result(case, "infer", b, seconds=[s]) for b, s in
          (("paddle_kernel", 0.1), ("paddle_predictor", 0.01), ("torch", 0.2),
           ("torch_channels_last", 0.05))]
    rs.append(bench.Result(case, "infer", "torch_bf16", error="n/a: no bf16"))
    (row,) = bench.table(rs, macs={(0.5, 32, 10): 50_000_000}, peak_gflop_s=200.0)
    assert row["best_torch_backend"] == "torch_channels_last" and row["best_torch"] == 200.0
    assert row["paddle_kernel_vs_best_torch"] == 0.5 and row["paddle_predictor_vs_best_torch"] == 5.0
    assert row["paddle_kernel_vs_torch"] == 2.0
    assert row["gflop_s"]["paddle_kernel"] == pytest.approx(10.0)  # 2 x 50M x 100 img/s
    assert row["peak_fraction"]["paddle_kernel"] == pytest.approx(0.05)
    assert "torch_bf16" in row["unavailable"]
    text = bench.format_table([row], threads=2, peak=bench.cpu_peak(2))
    assert "n/a" in text and "best_t" in text and "FP32 peak" in text
    (bare,) = bench.table(rs[:1], unavailable={"torch": "torch not installed"})
    assert "no torch" in bench.format_table([bare], threads=1)


def test_bf16_columns_say_na_where_the_cpu_lacks_their_instructions(monkeypatch):
    """No bf16 instructions: every bf16 column n/a; AMX without AVX512-BF16: only mbv2's
    predictor in bf16 (its products are AVX512-BF16 code) is n/a."""
    from mbv2.bench import driver

    monkeypatch.setattr(driver, "has_bf16", lambda: False)
    assert all((driver._not_here(b) or "").startswith("n/a") for b in bench.BF16_BACKENDS)
    monkeypatch.setattr(driver, "has_bf16", lambda: True)
    monkeypatch.setattr(driver, "has_avx512_bf16", lambda: False)  # AMX alone
    assert "AVX512-BF16 only" in driver._not_here("paddle_predictor_kernels_bf16")
    assert driver._not_here("paddle_predictor_bf16") is None
    assert driver._not_here("paddle_kernel") is None


def test_parts_cover_the_network_and_time_each_one():
    """`python -m mbv2.bench.parts`: the parts, run one after another, are the network up to
    its pool (same logits as the network's own forward); each is timed with its backward,
    on the shape the one before it gives."""
    import paddle

    from mbv2.bench import parts as bench_parts
    from mbv2.model import MobileNetV2

    paddle.seed(0)
    net = MobileNetV2(class_num=10, scale=0.25)
    net.use_cpu_kernels(True)
    net.train()
    x = paddle.randn([2, 3, 32, 32])
    with paddle.no_grad():
        want = net(x).numpy()
        y = x
        for _, fn, _ in bench_parts._parts(net):
            y = fn(y)
        got = net.out(net.pool2d_avg(y).flatten(1)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    timed = bench_parts.part_times(scale=0.25, image_size=32, batch=2, reps=1)
    names = [p.name for p in timed]
    assert names[0] == "stem" and names[-1] == "last conv" and len(names) == 19
    assert len(set(names)) == len(names)
    for before, after in zip(timed, timed[1:]):
        assert after.in_shape == before.out_shape
    assert timed[0].in_shape == [2, 3, 32, 32] and timed[-1].out_shape[1] == 1280
    assert all(p.ms > 0 for p in timed)
    # unit 1.0 expands its 4 channels (x0.25) six times on its 16x16 input plane
    assert timed[2].in_shape == [2, 4, 16, 16]
    assert timed[2].widest_mb == pytest.approx(2 * 24 * 16 * 16 * 4 / 1e6)
    with pytest.raises(ValueError, match="reps"):
        bench_parts.part_times(scale=0.25, image_size=32, batch=2, reps=0)

    # the command, in a process of its own (it sets the process's threads)
    done = subprocess.run([sys.executable, "-m", "mbv2.bench.parts", "--scale", "0.25",
                           "--size", "32", "--batch", "2", "--reps", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unit 6.0" in done.stdout and "whole step" in done.stdout and "share" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "mbv2.bench.parts", "--reps", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--reps must be > 0, got 0" in bad.stderr
