"""The loss group: cross-entropy and Poly-1 against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from mbv2.train.losses import Poly1CrossEntropy, build_loss


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_poly1_equals_ce_plus_epsilon_times_one_minus_pt():
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    labels = [0, 2]
    expected = []
    for z, y in zip(logits, labels):
        p = _softmax(z)
        expected.append(-math.log(p[y]) + 1.0 * (1 - p[y]))  # epsilon 1
    loss = Poly1CrossEntropy(epsilon=1.0)(paddle.to_tensor(logits), paddle.to_tensor([[0], [2]]))
    assert float(loss) == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_poly1_with_label_smoothing_uses_the_smoothed_target():
    z, y, eps, ls = [1.0, -1.0, 0.5, 0.0], 1, 2.0, 0.1
    p = _softmax(z)
    target = [ls / 4 + (1 - ls) * (i == y) for i in range(4)]
    ce = -sum(t * math.log(q) for t, q in zip(target, p))
    pt = sum(t * q for t, q in zip(target, p))
    loss = Poly1CrossEntropy(eps, ls)(paddle.to_tensor([z]), paddle.to_tensor([[y]]))
    assert float(loss) == pytest.approx(ce + eps * (1 - pt), rel=1e-6)


def test_epsilon_zero_is_cross_entropy(cfg_factory):
    rng = np.random.default_rng(0)
    logits = paddle.to_tensor(rng.standard_normal((8, 5)).astype("float32"))
    labels = paddle.to_tensor(rng.integers(0, 5, size=(8, 1)))
    ce = build_loss(cfg_factory(["loss=cross_entropy"]).loss)
    poly0 = build_loss(cfg_factory(["loss=poly1", "loss.epsilon=0"]).loss)
    assert float(poly0(logits, labels)) == pytest.approx(float(ce(logits, labels)), rel=1e-5)


def test_label_smoothing_works_with_integer_labels(cfg_factory):
    """Paddle's own CrossEntropyLoss(label_smoothing=0.1) fails on int64 labels."""
    logits = paddle.to_tensor([[3.0, 0.0, 0.0]])
    smoothed = build_loss(cfg_factory(["loss.label_smoothing=0.3"]).loss)(logits, paddle.to_tensor([[0]]))
    p = _softmax([3.0, 0.0, 0.0])
    target = [0.7 + 0.1, 0.1, 0.1]
    assert float(smoothed) == pytest.approx(-sum(t * math.log(q) for t, q in zip(target, p)), rel=1e-6)
