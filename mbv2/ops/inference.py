"""MobileNetV2 inference as one CPU op (`mbv2/ops/infer_net.cc`), from a network or from an
exported program.

`layers_of_network(net)` and `layers_of_program(model, params)` read the same `Layers`: the
stem, the inverted residual units, the last 1x1 conv and the classifier, each conv with its
batch norm's running statistics. The second reads the program `mbv2.export` writes (or any
Paddle inference program of this architecture: conv2d -> batch_norm -> relu6 units, a
shortcut add, average pool, matmul + add, an optional softmax) and raises `NotMobileNetV2`
naming the op where it differs. `pack_layers` folds every batch norm into its conv and packs
the weights channels-last in the op's order; `NetworkInference(layers)` runs batches
through the op: what the program (or `net` in eval mode) computes, in FP32 or, with
`precision="bf16"` on CPUs with AVX512-BF16, with bfloat16 products in the 1x1 convs (on
AMX tiles where the CPU has them: `amx()`). The op needs the kernels' library built with
Paddle's MKL (`available()`); any input size.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle

OP_NAME = "mbv2_infer_net"
SPEC_VERSION = 1
# a key per packed weight tensor: the op keeps MKL-packed copies of its 1x1 weights by key
_keys = itertools.count(1)


class NotMobileNetV2(ValueError):
    """An exported program this op cannot run: the message names the op and what differs."""


# fp32; bf16: every 1x1 conv multiplies bfloat16 activations and weights with float32 sums
# (AVX512-BF16's dot products), the rest stays float32
PRECISIONS = ("fp32", "bf16")


def bf16_why_not() -> str | None:
    """None where the op can run in bf16 here, else why not."""
    from mbv2.runtime import has_avx512_bf16

    if not has_avx512_bf16():
        return "mbv2's predictor runs bf16 on CPUs with AVX512-BF16 only; this one has none"
    return None


def _probe(name: str) -> int:
    """An int the op's library reports about this process (0 where it has no such entry)."""
    import ctypes

    from mbv2.ops.depthwise import load_kernel

    if not available():
        return 0
    probe = getattr(ctypes.CDLL(str(load_kernel().so_path)), name, None)
    return int(probe()) if probe else 0


def amx() -> bool:
    """True where the op's bf16 products run on AMX tiles in this process (the CPU has
    AMX-BF16, Linux granted the tile registers, and MBV2_AMX is not "off"); else they run
    on AVX512-BF16's dot products."""
    return bool(_probe("mbv2_infer_net_amx"))


def lanes() -> int:
    """The vector width of the op's own kernels (the products with a 16-32 channel side,
    the depthwise convs) in this process: 16 where the CPU has AVX-512 (MBV2_INFER_AVX512=off,
    read once a process: 8), else 8; the same bits either way."""
    return _probe("mbv2_infer_net_lanes")


def available() -> bool:
    """True when the kernels' library is built with the op (it needs Paddle's MKL)."""
    from mbv2.ops.depthwise import load_kernel

    kernel = load_kernel()
    return kernel is not None and kernel.pointwise


@dataclass
class ConvBN:
    """A bias-free conv (weight [C_out, C_in / groups, k, k]) and its batch norm."""
    weight: np.ndarray
    stride: int
    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(w * g / sqrt(var + eps), beta - mean * g / sqrt(var + eps)), in float64."""
        scale = self.gamma.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + self.eps)
        bias = self.beta.astype(np.float64) - self.mean.astype(np.float64) * scale
        return self.weight.astype(np.float64) * scale.reshape(-1, 1, 1, 1), bias


@dataclass
class Unit:
    expand: ConvBN
    depthwise: ConvBN
    project: ConvBN
    shortcut: bool


@dataclass
class Layers:
    stem: ConvBN
    units: list[Unit]
    last: ConvBN
    fc_weight: np.ndarray  # [in, out]
    fc_bias: np.ndarray
    softmax: bool = False  # the program ends in a softmax (mbv2.export's do)
    source: str = field(default="network")


def _conv_bn(layer) -> ConvBN:
    bn = layer._batch_norm
    return ConvBN(layer._conv.weight.numpy(), int(layer._conv._stride[0]), bn._mean.numpy(),
                  bn._variance.numpy(), bn.weight.numpy(), bn.bias.numpy(), float(bn._epsilon))


def layers_of_network(net) -> Layers:
    """A MobileNetV2's layers (its current parameters and running statistics)."""
    units = []
    for block in net.block_list:
        for i, unit in enumerate([block._first_block, *block._block_list]):
            units.append(Unit(_conv_bn(unit._expand_conv), _conv_bn(unit._bottleneck_conv),
                              _conv_bn(unit._linear_conv), shortcut=i > 0))
    return Layers(_conv_bn(net.conv1), units, _conv_bn(getattr(net, net._last_name)),
                  net.out.weight.numpy(), net.out.bias.numpy())


def layers_of_program(model: Path, params: Path) -> Layers:
    """The layers of an exported inference program (`model` .json/.pdmodel + `params`), or
    NotMobileNetV2. Reads the program in a static-graph scope of its own."""
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            exe = paddle.static.Executor(paddle.CPUPlace())
            prefix = str(model.with_suffix(""))
            if model.with_suffix("").name != params.with_suffix("").name:
                raise NotMobileNetV2(f"{model} and {params} are not one model's files")
            if model.suffix != ".json":
                raise NotMobileNetV2(f"{model.name} is in Paddle's older program format "
                                     f"(.pdmodel); mbv2's predictor reads PIR programs (.json, "
                                     f"what mbv2.export writes)")
            try:
                program, _, _ = paddle.static.load_inference_model(prefix, exe)
            except Exception as e:  # Paddle raises many kinds for a file it cannot parse
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise NotMobileNetV2(f"Paddle could not load {model.name} "
                                     f"({type(e).__name__}: {first})") from e
            return _ProgramReader(program, scope).read(str(model))
    finally:
        if was_dynamic:
            paddle.disable_static()


class _ProgramReader:
    """Walks a PIR program's ops in order and matches them to MobileNetV2's layers."""

    SKIP = {"pd_op.data", "pd_op.full_int_array", "pd_op.fetch", "builtin.parameter",
            "pd_op.full", "builtin.shadow_output"}

    def __init__(self, program, scope):
        self.all_ops = list(program.global_block().ops)
        self.ops = [op for op in self.all_ops if op.name() not in self.SKIP]
        self.scope = scope
        self.i = 0

    def fail(self, what: str):
        op = self.ops[self.i].name() if self.i < len(self.ops) else "the end of the program"
        raise NotMobileNetV2(f"op {self.i} ({op}): {what}")

    def peek(self) -> str | None:
        return self.ops[self.i].name() if self.i < len(self.ops) else None

    def take(self, *names: str):
        if self.peek() not in names:
            self.fail(f"expected {' or '.join(names)}")
        op = self.ops[self.i]
        self.i += 1
        return op

    def param(self, op, index: int) -> np.ndarray:
        source = op.operands()[index].source()
        define = source.get_defining_op()
        name = define.attrs().get("parameter_name") if define is not None else None
        if define is None or define.name() != "builtin.parameter" or name is None:
            self.fail(f"operand {index} is not a parameter")
        var = self.scope.find_var(name)
        if var is None:
            self.fail(f"parameter {name} has no value in the params file")
        return np.array(var.get_tensor())

    @staticmethod
    def feeds(op, value) -> bool:
        """`op`'s first operand is `value`."""
        return op.operands()[0].source().is_same(value)

    def conv_bn(self, value, kernel: int, depthwise: bool, act: bool):
        """conv (+ bn, + relu6) reading `value`: (ConvBN, output value)."""
        conv = self.take("pd_op.depthwise_conv2d", "pd_op.conv2d")
        if not self.feeds(conv, value):
            self.fail("the conv does not read the layer before it")
        a = conv.attrs()
        w = self.param(conv, 1)
        groups = int(a.get("groups", 1))
        if (w.ndim != 4 or w.shape[2:] != (kernel, kernel) or a.get("data_format", "NCHW") != "NCHW"
                or list(a.get("dilations", [1, 1])) != [1, 1]
                or a.get("padding_algorithm", "EXPLICIT") != "EXPLICIT"):
            self.i -= 1
            self.fail(f"expected a {kernel}x{kernel} NCHW conv, got weights {list(w.shape)}, {a}")
        pad = [int(p) for p in a.get("paddings", [0, 0])]
        strides = [int(s) for s in a.get("strides", [1, 1])]
        if pad not in ([kernel // 2] * 2, [kernel // 2] * 4) or strides[0] != strides[-1] or \
                strides[0] not in (1, 2) or (depthwise != (groups > 1)) or \
                (depthwise and (groups != w.shape[0] or w.shape[1] != 1)):
            self.i -= 1
            self.fail(f"conv paddings {pad}, strides {strides}, groups {groups} are not "
                      f"MobileNetV2's")
        bn = self.take("pd_op.batch_norm_", "pd_op.batch_norm")
        if not self.feeds(bn, conv.result(0)):
            self.fail("the batch norm does not read the conv")
        layer = ConvBN(w, strides[0], self.param(bn, 1), self.param(bn, 2), self.param(bn, 3),
                       self.param(bn, 4), float(bn.attrs().get("epsilon", 1e-5)))
        out = bn.result(0)
        if act:
            relu = self.take("pd_op.relu6")
            if not self.feeds(relu, out):
                self.fail("the relu6 does not read the batch norm")
            out = relu.result(0)
        return layer, out

    def read(self, where: str) -> Layers:
        data = [op for op in self.all_ops if op.name() == "pd_op.data"]
        if len(data) != 1:
            raise NotMobileNetV2(f"{where}: expected one input, found {len(data)}")
        stem, value = self.conv_bn(data[0].result(0), 3, False, True)
        if stem.weight.shape[1] != 3:
            raise NotMobileNetV2(f"{where}: the stem reads {stem.weight.shape[1]} channels, not 3")
        units, last, value = self.units(value)
        fc_w, fc_b, softmax = self.classifier(value)
        if self.i != len(self.ops):
            self.fail("ops after the classifier")
        return Layers(stem, units, last, fc_w, fc_b, softmax, source=where)

    def units(self, value):
        """The inverted residual units after the stem, then the last conv: (units, last
        conv's ConvBN, its output value)."""
        units: list[Unit] = []
        while True:
            start, unit_in = self.i, value
            head, value = self.conv_bn(value, 1, False, True)
            if self.peek() not in ("pd_op.depthwise_conv2d", "pd_op.conv2d") or \
                    self.ops[self.i].attrs().get("groups", 1) == 1:
                break  # conv -> bn -> relu6 and no depthwise conv after it: the last conv
            dw, value = self.conv_bn(value, 3, True, True)
            proj, value = self.conv_bn(value, 1, False, False)
            shortcut = False
            if self.peek() == "pd_op.add":
                add = self.ops[self.i]
                a, b = (o.source() for o in add.operands())
                if (a.is_same(unit_in) and b.is_same(value)) or \
                        (a.is_same(value) and b.is_same(unit_in)):
                    self.i += 1
                    shortcut, value = True, add.result(0)
            if shortcut and (dw.stride != 1 or head.weight.shape[1] != proj.weight.shape[0]):
                self.i = start
                self.fail("a shortcut around a unit that changes its shape")
            units.append(Unit(head, dw, proj, shortcut))
        if not units:
            self.fail("no inverted residual units")
        return units, head, value

    def classifier(self, value):
        """Global average pool, flatten, matmul + bias add (+ softmax) of the last conv's
        output: (fc weight, fc bias, softmax)."""
        pool = self.take("pd_op.pool2d")
        pa = pool.attrs()
        if not self.feeds(pool, value) or pa.get("pooling_type") != "avg" or not (
                pa.get("global_pooling") or pa.get("adaptive")):
            self.i -= 1
            self.fail("expected a global average pool of the last conv")
        value = pool.result(0)
        if pa.get("adaptive") and not pa.get("global_pooling"):
            size = pool.operands()[1].source().get_defining_op()
            values = size.attrs().get("value") if size is not None else None
            if values is None or [int(v) for v in values] not in ([1, 1], [1]):
                self.i -= 1
                self.fail("the adaptive pool's output is not 1x1")
        flat = self.take("pd_op.flatten", "pd_op.reshape", "pd_op.squeeze")
        if not self.feeds(flat, value):
            self.fail("the flatten does not read the pool")
        mm = self.take("pd_op.matmul")
        if not self.feeds(mm, flat.result(0)) or mm.attrs().get("transpose_x") or \
                mm.attrs().get("transpose_y"):
            self.i -= 1
            self.fail("expected the classifier's matmul (no transposes) of the pooled features")
        fc_w = self.param(mm, 1)
        add = self.take("pd_op.add")
        if not self.feeds(add, mm.result(0)):
            self.fail("the classifier's bias add does not read its matmul")
        fc_b = self.param(add, 1)
        softmax = False
        if self.peek() == "pd_op.softmax":
            sm = self.take("pd_op.softmax")
            if int(sm.attrs().get("axis", -1)) not in (-1, 1) or not self.feeds(sm, add.result(0)):
                self.i -= 1
                self.fail("a softmax that is not over the classes")
            softmax = True
        return fc_w, fc_b, softmax


def pack_layers(layers: Layers) -> tuple[list[int], np.ndarray]:
    """(spec, weights) for the op: the layer table and the folded weights, float32,
    channels-last ([C_in][C_out] matrices, [9][C] depthwise taps, [27][C] for the stem)."""
    w, b = layers.stem.folded()  # (C, 3, 3, 3) -> [27][C], k = (ci, ky, kx)
    parts: list[np.ndarray] = [w.reshape(w.shape[0], 27).T, b]
    spec = [SPEC_VERSION, int(w.shape[0]), int(layers.stem.stride), len(layers.units)]
    for u in layers.units:
        we, be = u.expand.folded()  # (hid, ci, 1, 1)
        wd, bd = u.depthwise.folded()  # (hid, 1, 3, 3)
        wp, bp = u.project.folded()  # (co, hid, 1, 1)
        hid, ci = we.shape[:2]
        co = wp.shape[0]
        if wd.shape[0] != hid or wp.shape[1] != hid:
            raise NotMobileNetV2(f"a unit's widths do not chain: expand {list(we.shape)}, "
                                 f"depthwise {list(wd.shape)}, projection {list(wp.shape)}")
        spec += [int(ci), int(hid), int(co), int(u.depthwise.stride), int(u.shortcut)]
        parts += [we.reshape(hid, ci).T, be, wd.reshape(hid, 9).T, bd, wp.reshape(co, hid).T, bp]
    wl, bl = layers.last.folded()
    parts += [wl.reshape(wl.shape[0], -1).T, bl, layers.fc_weight, layers.fc_bias]
    spec += [int(wl.shape[0]), int(layers.fc_weight.shape[1])]
    weights = np.concatenate([np.ascontiguousarray(p, dtype=np.float32).ravel() for p in parts])
    return spec, weights


class NetworkInference:
    """Batches through the op: `self(x)` -> logits (probabilities where the program ends in
    a softmax), x NCHW float32, a numpy array or a CPU tensor. The weights are packed once,
    here: a network whose parameters change afterwards needs a new object."""

    def __init__(self, source, precision: str = "fp32"):
        if not available():
            raise RuntimeError("mbv2's inference op is unavailable: the kernels' library "
                               "was not built, or without Paddle's MKL (see the log)")
        why = bf16_why_not() if precision == "bf16" else None
        if precision not in PRECISIONS or why:
            raise ValueError(f"precision={precision!r}: "
                             + (why or f"choose one of {', '.join(PRECISIONS)}"))
        self.precision = precision
        self.layers = source if isinstance(source, Layers) else layers_of_network(source)
        self.spec, weights = pack_layers(self.layers)
        self.weights = paddle.to_tensor(weights, place=paddle.CPUPlace())
        self.classes = self.spec[-1]
        self.key = next(_keys)

    def __call__(self, x) -> paddle.Tensor:
        if isinstance(x, np.ndarray):
            x = paddle.to_tensor(np.ascontiguousarray(x, dtype=np.float32), place=paddle.CPUPlace())
        with paddle.no_grad():
            y = paddle._C_ops._run_custom_op(OP_NAME, x.detach(), self.weights, self.spec,
                                             self.key, self.precision == "bf16")[0]
            return paddle.nn.functional.softmax(y, axis=-1) if self.layers.softmax else y
