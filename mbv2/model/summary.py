"""Per-layer summary of a network: one row per leaf layer in forward order, with its output
shape for one image, trainable parameters and multiply-adds (MACs).

The rows add up to `count_parameters(net)` and `count_macs(net, image_size)` exactly, and
`layer_summary` checks that: a MAC counted here is one `count_macs` counts (convs and the
head; batch norm, ReLU6 and pooling cost none), a parameter one `count_parameters` counts
(trainable: batch-norm running statistics are buffers and never counted). FLOPs are
PaddleClas's model-zoo convention, 2 x MACs.
"""
from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterator
from pathlib import Path

import paddle
import paddle.nn as nn

from mbv2.model.counting import count_macs, count_parameters

COLUMNS = ("name", "type", "output_shape", "params", "macs")
NOT_RUN = "not run"


def leaf_layers(net: nn.Layer) -> list[tuple[str, nn.Layer]]:
    """(structured name, layer) of every layer without sublayers, in the layer tree's order."""
    return [(name, layer) for name, layer in net.named_sublayers() if not list(layer.children())]


def layer_params(layer: nn.Layer) -> int:
    """Trainable parameters held by `layer` itself (not its sublayers)."""
    return sum(math.prod(int(d) for d in p.shape)
               for p in layer.parameters(include_sublayers=False) if not p.stop_gradient)


def layer_macs(layer: nn.Layer, output) -> int:
    """Multiply-adds of one call: a conv does c_in/groups x kh x kw per output value, the
    head in x out; every other layer none (the rule `count_macs` applies)."""
    if isinstance(layer, nn.Conv2D):
        per_output = math.prod(int(d) for d in layer.weight.shape[1:])
        return per_output * math.prod(int(d) for d in output.shape[1:])
    if isinstance(layer, nn.Linear):
        return math.prod(int(d) for d in layer.weight.shape)
    return 0


@contextlib.contextmanager
def _one_image_pass(net: nn.Layer) -> Iterator[None]:
    """Eval mode on Paddle's own ops (the hooks sit on nn.Conv2D, which only they call),
    no autograd; the network's mode and ops as they were afterwards."""
    was_training = net.training
    net.eval()
    reference = getattr(net, "reference_ops", contextlib.nullcontext)
    try:
        with reference(), paddle.no_grad():
            yield
    finally:
        if was_training:
            net.train()


def layer_summary(net: nn.Layer, image_size: int) -> list[dict]:
    """One row per leaf layer, in the order the forward pass of one `image_size` x
    `image_size` image calls them: name, type, output_shape ([N, C, H, W], N = 1; None for
    a layer this size does not run, as the average pool on a 1x1 map), params, macs.
    Raises AssertionError when the rows do not add up to count_parameters/count_macs."""
    leaves = leaf_layers(net)
    name_of = {id(layer): name for name, layer in leaves}
    called: dict[str, dict] = {}  # insertion order is call order

    def record(layer, inputs, output):
        name = name_of[id(layer)]
        row = called.setdefault(name, {"output_shape": [int(d) for d in output.shape], "macs": 0})
        row["macs"] += layer_macs(layer, output)

    hooks = [layer.register_forward_post_hook(record) for _, layer in leaves]
    try:
        with _one_image_pass(net):
            net(paddle.zeros([1, 3, image_size, image_size], dtype="float32"))
    finally:
        for hook in hooks:
            hook.remove()
    layers = dict(leaves)
    rows = []
    for name in _forward_order([name for name, _ in leaves], list(called)):
        layer, seen = layers[name], called.get(name)
        rows.append({"name": name, "type": type(layer).__name__,
                     "output_shape": seen["output_shape"] if seen else None,
                     "params": layer_params(layer), "macs": seen["macs"] if seen else 0})
    _check_totals(net, image_size, rows)
    return rows


def _forward_order(tree_order: list[str], call_order: list[str]) -> list[str]:
    """The layers as the forward pass called them; one it did not call goes right after
    the layer before it in the layer tree."""
    order = list(call_order)
    for i, name in enumerate(tree_order):
        if name in order:
            continue
        before = next((n for n in reversed(tree_order[:i]) if n in order), None)
        order.insert(order.index(before) + 1 if before is not None else 0, name)
    return order


def summary_totals(rows: list[dict]) -> dict[str, int]:
    macs = sum(r["macs"] for r in rows)
    return {"layers": len(rows), "params": sum(r["params"] for r in rows), "macs": macs,
            "flops": 2 * macs}


def _check_totals(net: nn.Layer, image_size: int, rows: list[dict]) -> None:
    totals = summary_totals(rows)
    expected = {"params": count_parameters(net), "macs": count_macs(net, image_size)}
    got = {key: totals[key] for key in expected}
    if got != expected:
        raise AssertionError(f"layer summary at {image_size} px adds up to {got}, but "
                             f"count_parameters/count_macs give {expected}")


def _shape_text(shape: list[int] | None) -> str:
    return NOT_RUN if shape is None else f"[{', '.join(str(d) for d in shape)}]"


def totals_line(rows: list[dict], image_size: int) -> str:
    """`total: ...` - parameters, MACs and FLOPs (2 x MACs, PaddleClas's model zoo)."""
    t = summary_totals(rows)
    return (f"total: {t['layers']} layers, {t['params']:,} trainable params "
            f"({t['params'] / 1e6:.2f} M), {t['macs']:,} MACs ({t['macs'] / 1e6:.2f} M), "
            f"{t['flops']:,} FLOPs = 2 x MACs ({t['flops'] / 1e9:.3f} G, PaddleClas model zoo) "
            f"at {image_size} px")


def format_summary(rows: list[dict], image_size: int) -> str:
    """The rows as an aligned text table, then the totals line."""
    cells = [(r["name"], r["type"], _shape_text(r["output_shape"]), f"{r['params']:,}",
              f"{r['macs']:,}") for r in rows]
    header = ("layer", "type", "output shape", "params", "MACs")
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

    def line(row) -> str:
        left = [f"{row[i]:<{widths[i]}}" for i in range(3)]
        right = [f"{row[i]:>{widths[i]}}" for i in range(3, len(row))]
        return "  ".join(left + right)

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, cells), rule, totals_line(rows, image_size)])


def write_summary_csv(rows: list[dict], path: str | Path) -> Path:
    """`rows` as CSV: a header (name,type,output_shape,params,macs), one line per layer;
    output_shape as `[1, C, H, W]`, empty for a layer that did not run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            shape = "" if r["output_shape"] is None else _shape_text(r["output_shape"])
            writer.writerow([r["name"], r["type"], shape, r["params"], r["macs"]])
    return path
