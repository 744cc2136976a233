"""An exponential moving average of a network's weights (timm's ModelEmaV2)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import paddle


class ModelEma:
    """Exponential moving average of every weight and batch-norm statistic (as timm's
    ModelEmaV2): `ema = decay * ema + (1 - decay) * current`, after each optimizer step."""

    def __init__(self, net: paddle.nn.Layer, decay: float):
        self.net, self.decay = net, float(decay)
        self.shadow = {k: v.detach().clone() for k, v in net.state_dict().items()}

    @paddle.no_grad()
    def update(self) -> None:
        for key, value in self.net.state_dict().items():
            shadow = self.shadow[key]
            if paddle.is_floating_point(value):
                shadow.set_value(shadow * self.decay + value.detach() * (1.0 - self.decay))
            else:  # counters: the EMA copy follows the model
                shadow.set_value(value.detach())

    def state_dict(self) -> dict[str, paddle.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.shadow:
                self.shadow[key].set_value(paddle.to_tensor(value, dtype=self.shadow[key].dtype))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The network runs with the EMA weights inside the block, its own after."""
        backup = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.net.set_state_dict(self.shadow)
        try:
            yield
        finally:
            self.net.set_state_dict(backup)

