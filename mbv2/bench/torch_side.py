"""The PyTorch reference: mbv2's MobileNetV2 rebuilt in PyTorch, and its step functions.

PyTorch is timed twice: as installed ("torch", glibc's default allocator) and with the
allocator setting every mbv2 process uses ("torch_kept_heap", mbv2.runtime.configure_malloc
and configure_hugepages),
so both the user-facing and the like-for-like ratio are in the table; then, with the kept
heap, as a speed-minded user runs it: channels_last, torch.compile, bfloat16 autocast.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mbv2.bench.cases import Case

VARIANTS = ("eager", "channels_last", "compile", "bf16")
# Untimed steps torch.compile gets at least, per mode: the first call compiles (tens of
# seconds), a mode switch (train/eval, no_grad) compiles again.
COMPILE_WARMUP = 2


def torch_model(class_num: int, scale: float):
    """mbv2.model.MobileNetV2 in PyTorch: same table, channels, BN and ReLU6 placement
    (including the t=1 unit's expand conv, which PaddleClas keeps)."""
    import torch.nn as tnn

    from mbv2.model.table import PADDLECLAS_BOTTLENECK

    class ConvBN(tnn.Module):
        def __init__(self, cin: int, cout: int, k: int, s: int, p: int, groups: int = 1):
            super().__init__()
            self.conv = tnn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False)
            self.bn = tnn.BatchNorm2d(cout)

        def forward(self, x, act: bool = True):
            y = self.bn(self.conv(x))
            return tnn.functional.relu6(y) if act else y

    class Unit(tnn.Module):
        def __init__(self, cin: int, expand_from: int, cout: int, s: int, t: int, shortcut: bool):
            super().__init__()
            hidden = int(round(expand_from * t))
            self.expand = ConvBN(cin, hidden, 1, 1, 0)
            self.dw = ConvBN(hidden, hidden, 3, s, 1, groups=hidden)
            self.linear = ConvBN(hidden, cout, 1, 1, 0)
            self.shortcut = shortcut

        def forward(self, x):
            y = self.linear(self.dw(self.expand(x)), act=False)
            return x + y if self.shortcut else y

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            in_c = int(32 * scale)
            self.conv1 = ConvBN(3, in_c, 3, 2, 1)
            units = []
            for t, c, n, s in PADDLECLAS_BOTTLENECK:
                out_c = int(c * scale)
                units.append(Unit(in_c, in_c, out_c, s, t, False))
                units += [Unit(out_c, out_c, out_c, 1, t, True) for _ in range(1, n)]
                in_c = out_c
            self.units = tnn.Sequential(*units)
            out_c = int(1280 * scale) if scale > 1.0 else 1280
            self.last = ConvBN(in_c, out_c, 1, 1, 0)
            self.pool = tnn.AdaptiveAvgPool2d(1)
            self.fc = tnn.Linear(out_c, class_num)

        def forward(self, x):
            y = self.last(self.units(self.conv1(x)))
            return self.fc(self.pool(y).flatten(1))

    return Net()


def _prepare(case: Case, variant: str):
    """(model, the callable that runs it, input, labels, autocast context factory)."""
    import contextlib

    import torch

    model = torch_model(case.class_num, case.scale)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size)
    y = torch.randint(0, case.class_num, (case.batch,))
    if variant != "eager":  # every speed variant runs channels_last
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if variant == "compile" else model
    if variant == "bf16":
        return model, run, x, y, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return model, run, x, y, contextlib.nullcontext


def torch_fns(case: Case, threads: int,
              variant: str = "eager") -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(train step, inference step) in PyTorch; `variant`: eager (NCHW), channels_last,
    compile (channels_last + torch.compile, default mode) or bf16 (channels_last + bfloat16
    autocast). Training = forward + cross-entropy + backward + SGD momentum step."""
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"unknown torch variant {variant!r}")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, run, x, y, autocast = _prepare(case, variant)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        loss.item()

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast():
            run(x)

    return train, infer


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # broken installs raise more than ImportError
        return False
    return True
