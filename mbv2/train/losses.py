"""The training loss from the `loss` config: softmax cross-entropy, or Poly-1.

Poly-1 (Leng et al. 2022, "PolyLoss"; classification-pp's `utils/loss.py`) adds the first
term of the polynomial expansion of cross-entropy once more: CE + epsilon * (1 - p_t), where
p_t is the predicted probability of the target (with label smoothing: the smoothed target's
probability mass). epsilon = 1 is the paper's ImageNet choice.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from omegaconf import DictConfig


class Poly1CrossEntropy(nn.Layer):
    """Mean over the batch of CE + epsilon * (1 - p_t); labels are ids, [N] or [N, 1]."""

    def __init__(self, epsilon: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.epsilon, self.label_smoothing = float(epsilon), float(label_smoothing)

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        label = label.reshape([-1])
        classes = logits.shape[-1]
        target = F.one_hot(label, classes)
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        log_probs = F.log_softmax(logits, axis=-1)
        ce = -(target * log_probs).sum(axis=-1)
        pt = (target * log_probs.exp()).sum(axis=-1)
        return (ce + self.epsilon * (1.0 - pt)).mean()


def build_loss(loss: DictConfig) -> nn.Layer:
    """The loss `loss.name` names, with `loss.label_smoothing` (and `loss.epsilon`).

    Cross-entropy with smoothing is Poly-1 with epsilon 0: Paddle's own
    CrossEntropyLoss(label_smoothing=...) fails on integer labels (its label_smooth kernel
    has no int64 version), and a smoothed one-hot target is what it would compute."""
    smoothing = float(loss.label_smoothing)
    if loss.name == "poly1":
        return Poly1CrossEntropy(float(loss.epsilon), smoothing)
    if smoothing:
        return Poly1CrossEntropy(0.0, smoothing)
    return nn.CrossEntropyLoss()
