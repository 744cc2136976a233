"""Smoke test of `python -m mbv2.bench`'s machinery on a tiny case: every backend runs,
the table and JSON come out. The real numbers need the full run (minutes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mbv2 import bench


def test_tiny_case_every_backend():
    case = bench.Case(scale=0.25, image_size=32, batch=2, class_num=4, warmup=0, reps=1)
    with_torch = bench.torch_available()
    results = bench.run_case(case, threads=1, with_torch=with_torch, log=lambda s: None)
    by = {(r.mode, r.backend): r for r in results}
    expected = {("train", "paddle_native"), ("infer", "paddle_native"), ("train", "paddle_kernel"),
                ("infer", "paddle_kernel"), ("infer", "paddle_predictor")}
    if with_torch:
        expected |= {(m, b) for m in ("train", "infer") for b in bench.TORCH_BACKENDS}
    assert set(by) == expected
    for key, r in by.items():
        if key[1] == "paddle_kernel" and "depthwise op unavailable" in (r.error or ""):
            continue  # no compiler here: the kernel column stays empty, nothing else breaks
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
