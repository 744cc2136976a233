"""Where a training step of MobileNetV2 goes, part by part: the stem, each inverted
residual unit, the last 1x1 conv.

    python -m mbv2.bench.parts [--scale 1.0] [--size 224] [--batch 32] [--bf16]
                               [--threads N] [--reps 7] [--no-kernels]

Each part runs forward + backward alone (training mode, a fixed random output gradient,
the input gradient where the network makes one: not for the stem, whose input is the
images), on the input the parts before it produce, in one process with the threads that
`python -m mbv2.bench` gives Paddle; the median of `reps` timed runs after two untimed
ones. The table gives each part's ms, its share of the parts' sum, its input and output
tensors' MB and its widest activation's (a unit's expanded map, 6x its input channels on
its input plane): a part whose ms is far above what its bytes and multiply-adds need is
where a step waits. The pool, classifier, loss and optimizer step (a few ms) are not
parts. Run apart, the stem keeps its batch norm's own passes, which a whole step with the
kernels folds into the first unit's expand conv (`CpuKernels.stem_block`).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Part:
    name: str
    in_shape: list[int]
    out_shape: list[int]
    ms: float
    widest_mb: float  # the part's widest activation (a unit's expanded map), MB

    @property
    def mb(self) -> float:
        """The part's input and output tensors, MB (float32)."""
        return (math.prod(self.in_shape) + math.prod(self.out_shape)) * 4 / 1e6


def _classes(image_size: int) -> int:
    return 1000 if image_size > 64 else 10  # as `make bench`


def _parts(net) -> list[tuple[str, Callable[[Any], Any], int]]:
    """(name, forward, channels of its widest activation) for every part, in order."""
    parts: list[tuple[str, Callable[[Any], Any], int]] = [
        ("stem", lambda x: net.conv1(x, if_act=True), net.conv1._conv._out_channels)]
    for b, block in enumerate(net.block_list):
        units = [block._first_block] + list(block._block_list)
        for i, unit in enumerate(units):
            parts.append((f"unit {b}.{i}", lambda x, u=unit, sc=i > 0: u(x, ifshortcut=sc),
                          unit._expand_conv._conv._out_channels))
    last = getattr(net, net._last_name)
    parts.append(("last conv", lambda x: last(x, if_act=True), last._conv._out_channels))
    return parts


def part_times(scale: float = 1.0, image_size: int = 224, batch: int = 32, bf16: bool = False,
               kernels: bool = True, reps: int = 7) -> list[Part]:
    """Forward + backward ms of every part of a MobileNetV2 of this width on this input
    (see the module docstring). bf16: the kernels with mixed precision (`trainer.amp=O1`
    on CPU); RuntimeError where that or the kernels are not available here."""
    import paddle

    from mbv2.bench.cases import Case
    from mbv2.bench.paddle_side import dygraph_net
    from mbv2.bench.workers import time_steps

    if reps < 1:
        raise ValueError(f"reps={reps}: at least one timed run a part")
    net = dygraph_net(Case(scale=scale, image_size=image_size, batch=batch,
                           class_num=_classes(image_size), warmup=2, reps=reps), kernels, bf16)
    net.train()
    params = net.parameters()
    x = paddle.randn([batch, 3, image_size, image_size], dtype="float32")
    out: list[Part] = []
    for name, fn, width in _parts(net):
        xi = x.detach()
        xi.stop_gradient = name == "stem"
        grad = paddle.randn(fn(xi).shape, dtype="float32")

        def run() -> Any:
            y = fn(xi)
            y.backward(grad)
            if not xi.stop_gradient:
                xi.clear_gradient()
            for p in params:
                p.clear_gradient()
            return y

        y = run()
        times = time_steps(run, 1, reps)
        # a unit's expanded map has the unit's input plane; the stem's and the last conv's
        # widest activation is their output
        h, w = (xi.shape[2:] if name.startswith("unit") else y.shape[2:])
        out.append(Part(name, list(xi.shape), list(y.shape), statistics.median(times) * 1e3,
                        batch * width * h * w * 4 / 1e6))
        x = y.detach()
    return out


def step_ms(scale: float = 1.0, image_size: int = 224, batch: int = 32, bf16: bool = False,
            kernels: bool = True, reps: int = 7) -> float:
    """The median ms of a whole training step as `python -m mbv2.bench` times it (forward,
    cross-entropy, backward, Momentum step), for the parts' sum to be read against."""
    from mbv2.bench.cases import Case
    from mbv2.bench.paddle_side import paddle_fns
    from mbv2.bench.workers import time_steps

    case = Case(scale=scale, image_size=image_size, batch=batch,
                class_num=_classes(image_size), warmup=2, reps=reps)
    train, _ = paddle_fns(case, kernels, bf16)
    return statistics.median(time_steps(train, case.warmup, reps)) * 1e3


def format_parts(parts: list[Part], step: float | None = None) -> str:
    total = sum(p.ms for p in parts)
    lines = [f"{'part':10s} {'input':>18s} {'output':>18s} {'ms':>8s} {'share':>6s} "
             f"{'in+out MB':>9s} {'widest MB':>9s}"]
    for p in parts:
        lines.append(f"{p.name:10s} {'x'.join(map(str, p.in_shape[1:])):>18s} "
                     f"{'x'.join(map(str, p.out_shape[1:])):>18s} {p.ms:8.2f} "
                     f"{100 * p.ms / total:5.1f}% {p.mb:9.1f} {p.widest_mb:9.1f}")
    lines.append(f"{'sum':10s} {'':>18s} {'':>18s} {total:8.2f}")
    if step is not None:
        lines.append(f"{'whole step':10s} {'':>18s} {'':>18s} {step:8.2f}  (with the pool, "
                     "classifier, loss and optimizer step)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Part]:
    ap = argparse.ArgumentParser(prog="python -m mbv2.bench.parts",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="width multiplier (default 1.0)")
    ap.add_argument("--size", type=int, default=224, help="input pixels a side (default 224)")
    ap.add_argument("--batch", type=int, default=32, help="batch (default 32)")
    ap.add_argument("--bf16", action="store_true", help="mixed precision, as trainer.amp=O1")
    ap.add_argument("--no-kernels", action="store_true", help="Paddle's own ops instead")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="math threads (default: all CPUs)")
    ap.add_argument("--reps", type=int, default=7, help="timed runs a part (default 7)")
    args = ap.parse_args(argv)
    for flag, value in (("--scale", args.scale), ("--size", args.size), ("--batch", args.batch),
                        ("--threads", args.threads), ("--reps", args.reps)):
        if not value > 0:
            ap.error(f"{flag} must be > 0, got {value}")
    from mbv2.bench.driver import _configure

    _configure(args.threads, paddle_threads=True)
    try:
        parts = part_times(args.scale, args.size, args.batch, args.bf16, not args.no_kernels,
                           args.reps)
    except (ValueError, RuntimeError) as e:  # a width or input the network cannot take
        ap.error(str(e))
    print(f"MobileNetV2 x{args.scale} at {args.size} px, batch {args.batch}, "
          f"{'bf16 mixed precision' if args.bf16 else 'float32'}, "
          f"{'Paddle ops' if args.no_kernels else 'mbv2 kernels'}, {args.threads} threads: "
          "forward + backward of each part alone")
    step = step_ms(args.scale, args.size, args.batch, args.bf16, not args.no_kernels, args.reps)
    print(format_parts(parts, step))
    return parts


if __name__ == "__main__":
    main()
