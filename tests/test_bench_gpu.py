"""`python -m mbv2.bench.gpu`, the one prepared script for a GPU machine, run on the CPU at
a tiny size: Model.fit is timed at FP32 and O1 through mbv2's own prepare_model, PyTorch
(where installed) in every variant, and a side that cannot run says why instead of failing."""
from __future__ import annotations

import builtins
import json

import pytest

from mbv2.bench import gpu
from mbv2.bench.cases import Case

TINY = ["--device", "cpu", "--scale", "0.25", "--image-size", "32", "--classes", "4",
        "--batches", "4", "--steps", "2", "--warmup", "1", "--workers", "0", "--skip-compile"]


def test_rate_leaves_warmup_out_and_needs_two_timed_steps():
    # steps end at 0, 10 (warm-up), then 11, 12, 13: 3 timed intervals of 1 s, batch 8
    assert gpu._rate([0.0, 10.0, 11.0, 12.0, 13.0], batch=8, warmup=1) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="--steps"):
        gpu._rate([0.0, 1.0], batch=8, warmup=1)


def test_tiny_run_on_cpu_writes_both_sides(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    report = gpu.main(TINY + ["--out", str(out)])
    assert json.loads(out.read_text()) == report
    (row,) = report["rows"]
    assert (row["scale"], row["image_size"], row["batch"]) == (0.25, 32, 4)
    fit = row["paddle_fit"]
    assert set(fit) == {"version", "fp32", "amp_O1"}
    assert fit["fp32"] > 0 and fit["amp_O1"] > 0
    torch_row = row["torch"]
    if "skipped" in torch_row:  # the test venv has no PyTorch
        assert "torch not importable" in torch_row["skipped"]
    else:
        assert set(torch_row) == {"version"} | set(gpu.TORCH_VARIANTS[:-1])
        assert all(isinstance(torch_row[v], float) and torch_row[v] > 0
                   for v in gpu.TORCH_VARIANTS[:-1])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row


def test_sides_say_why_they_cannot_run(monkeypatch):
    real_import = builtins.__import__

    def no_frameworks(name, *args, **kwargs):
        if name.split(".")[0] in ("paddle", "torch"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_frameworks)
    case = Case(0.25, 32, 4, 4, 1, 2)
    assert gpu.paddle_side(case, "gpu", 0) == {"skipped": "paddle not importable: No module named 'paddle'"}
    assert gpu.torch_side(case, "gpu", ("fp32",))["skipped"].startswith("torch not importable")


def test_paddle_without_cuda_is_skipped_on_gpu():
    import paddle

    if paddle.is_compiled_with_cuda():
        pytest.skip("this Paddle has CUDA")
    result = gpu.paddle_side(Case(0.25, 32, 4, 4, 1, 2), "gpu", 0)
    assert result == {"skipped": f"paddle {paddle.__version__} is built without CUDA"}
