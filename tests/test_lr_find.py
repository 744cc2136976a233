"""The LR range test: its ramp, smoothing and suggestion on known curves, and the command as
a user runs it (files, the printed command, weights left as they were)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mbv2.lr_find import lr_at, smooth, suggest
from tests.conftest import ROOT, TINY, run_cli


def test_ramp_is_exponential_from_start_to_end():
    lrs = [lr_at(s, 1e-5, 1.0, 101) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(1e-5 * 1e5 ** 0.5)  # the middle step: the geometric mean
    ratios = np.diff(np.log(lrs))
    assert np.allclose(ratios, ratios[0])


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    s = smooth([1.0, 3.0], beta=0.5)
    assert s[1] == pytest.approx((0.5 * 0.5 * 1.0 + 0.5 * 3.0) / (1 - 0.25))


def test_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = np.logspace(-5, 0, 200)
    x = np.log10(lrs)
    # flat, then a fall steepest at 1e-2, a minimum at 10**-1.2, then divergence
    loss = 2.5 - 1.0 / (1 + np.exp(-(x + 2) * 4)) + np.where(x > -1.2, 20 * (x + 1.2) ** 2, 0)
    s = suggest(lrs, loss)
    assert math.log10(s["steep"]) == pytest.approx(-2.0, abs=0.1)
    assert math.log10(s["min_loss_lr"]) == pytest.approx(-1.2, abs=0.15)
    assert s["min_10"] == pytest.approx(s["min_loss_lr"] / 10) == s["suggested"]


def test_lr_find_command_writes_its_files_and_the_train_command(tmp_path):
    overrides = [a for a in TINY if not a.startswith("trainer.log_freq")]
    proc = run_cli([*overrides, "--steps", "40", "--out", str(tmp_path / "lrf")], cwd=ROOT,
                   module="mbv2.lr_find")
    out = tmp_path / "lrf"
    result = json.loads((out / "lr_find.json").read_text())
    assert 10 <= len(result["losses"]) <= 40 and len(result["lrs"]) == len(result["losses"])
    assert result["lrs"][0] == pytest.approx(1e-5)
    assert (out / "lr_find.png").stat().st_size > 1000
    assert list(out.glob("vdlrecords.*"))
    lr = result["suggestion"]["suggested"]
    if lr is None:  # 40 steps on random tiny data may show no fall: said, no command given
        assert result["command"] is None and result["suggestion"]["why"]
        assert f"no LR to suggest: {result['suggestion']['why']}" in proc.stdout
        assert "python -m mbv2.run" not in proc.stdout
    else:
        assert 1e-5 <= lr <= 1.0
        assert f"optim.lr={lr:.3g}" in proc.stdout and "python -m mbv2.run" in proc.stdout
        assert "model.scale=0.25" in result["command"]


def test_no_suggestion_from_a_flat_noisy_curve_or_a_minimum_at_the_start():
    """A flat loss whose lowest point is noise, and one whose minimum is within a decade of
    the first LR (min/10 would be outside the tested range): no suggestion, and why. The
    same noise on a curve that falls keeps its suggestion."""
    rng = np.random.default_rng(0)
    lrs = np.logspace(-5, 0, 40)
    noisy = 1.7 + 0.25 * rng.standard_normal(40)
    s = suggest(lrs, smooth(list(noisy)), list(noisy))
    assert s["suggested"] is None and "did not fall" in s["why"] and "--steps" in s["why"]
    x = np.log10(lrs)
    early = np.where(x < -4.4, 2.0 - 2.5 * (x + 5), 0.5 + 0.3 * (x + 4.4))  # lowest at ~4e-5
    s = suggest(lrs, list(early), list(early))
    assert s["suggested"] is None and "lower --start" in s["why"]
    falling = 2.5 - 1.0 / (1 + np.exp(-(x + 2) * 4)) + np.where(x > -1.2, 20 * (x + 1.2) ** 2, 0)
    raw = falling + 0.25 * rng.standard_normal(40)
    s = suggest(lrs, smooth(list(raw)), list(raw))
    assert s["why"] is None and 1e-3 <= s["suggested"] <= 1e-1


def test_the_weights_are_restored(cfg_factory, monkeypatch):
    import mbv2.model
    from mbv2.lr_find import range_test

    built = {}
    real = mbv2.model.build_model

    def capture(*args, **kwargs):
        built["net"] = real(*args, **kwargs)
        built["before"] = {k: v.numpy().copy() for k, v in built["net"].state_dict().items()}
        return built["net"]

    monkeypatch.setattr(mbv2.model, "build_model", capture)
    result = range_test(cfg_factory(TINY), 1e-4, 1.0, 20)
    assert len(result["losses"]) >= 10
    after = {k: v.numpy() for k, v in built["net"].state_dict().items()}
    assert after.keys() == built["before"].keys()
    for k, v in built["before"].items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)  # weights and BN statistics
