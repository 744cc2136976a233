"""The Paddle backends' step functions: dygraph with Paddle's ops or mbv2's CPU kernels,
and an exported Paddle Inference predictor.

The predictor (`paddle.jit.save` + `paddle.inference` with oneDNN) is inference only and
uses Paddle's own depthwise conv, since a custom op is not part of the exported program.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbv2.bench.cases import Case


def dygraph_net(case: Case, fast: bool, bf16: bool = False):
    """MobileNetV2 of the case's width and classes (seed 0) in dygraph; `fast`: on mbv2's
    CPU kernels (RuntimeError when they cannot be built here), else on Paddle's own ops;
    `bf16`: the kernels with mixed precision, as trainer.amp on CPU runs them."""
    import paddle

    from mbv2.model import MobileNetV2

    paddle.seed(0)
    net = MobileNetV2(class_num=case.class_num, scale=case.scale)
    if net.use_cpu_kernels(fast) != fast:
        raise RuntimeError("depthwise op unavailable")
    if bf16:
        from mbv2.ops import mixed_precision

        ops, why_not = mixed_precision(net.ops)
        if why_not:
            raise RuntimeError(f"no mixed precision: {why_not}")
        net.use_ops(ops)
    return net


def paddle_fns(case: Case, fast: bool,
               bf16: bool = False) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(train step, inference step) of MobileNetV2 in dygraph (`dygraph_net`)."""
    import paddle
    import paddle.nn.functional as F

    net = dygraph_net(case, fast, bf16)
    opt = paddle.optimizer.Momentum(learning_rate=0.01, momentum=0.9, parameters=net.parameters())
    x = paddle.randn([case.batch, 3, case.image_size, case.image_size], dtype="float32")
    y = paddle.randint(0, case.class_num, [case.batch], dtype="int64")

    def train() -> None:
        net.train()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        float(loss)

    def infer() -> None:
        net.eval()
        with paddle.no_grad():
            net(x).numpy()

    return train, infer


def predictor_fn(case: Case, threads: int, workdir: Path,
                 precision: str = "fp32", engine: str = "paddle") -> Callable[[], Any]:
    """An inference step of MobileNetV2 exported into `workdir` and run as `python -m
    mbv2.predict` runs one: engine "paddle", a Paddle Inference predictor (oneDNN, IR
    optimisation, `threads` math threads, FP32 or bf16 kernels); engine "kernels", mbv2's
    one-op CPU predictor reading the same exported files (FP32 or bf16 1x1 products)."""
    import numpy as np
    import paddle
    from paddle.static import InputSpec

    from mbv2.model import MobileNetV2
    from mbv2.predict import inference_config

    paddle.seed(0)
    net = MobileNetV2(class_num=case.class_num, scale=case.scale)
    net.use_cpu_kernels(False)  # an exported program holds Paddle's ops only
    net.eval()
    prefix = str(workdir / f"mbv2_x{case.scale}_{case.image_size}")
    paddle.jit.save(net, prefix,
                    input_spec=[InputSpec([None, 3, case.image_size, case.image_size], "float32")])
    program = prefix + ".json" if os.path.exists(prefix + ".json") else prefix + ".pdmodel"
    x = np.random.default_rng(0).standard_normal(
        (case.batch, 3, case.image_size, case.image_size)).astype("float32")
    if engine == "kernels":
        from mbv2.ops.inference import NetworkInference, layers_of_program

        run = NetworkInference(layers_of_program(Path(program), Path(prefix + ".pdiparams")),
                               precision)
        return lambda: run(x).numpy()
    config = inference_config(Path(program), Path(prefix + ".pdiparams"), threads, precision)
    predictor = paddle.inference.create_predictor(config)
    inp = predictor.get_input_handle(predictor.get_input_names()[0])
    out = predictor.get_output_handle(predictor.get_output_names()[0])

    def infer() -> None:
        inp.reshape(list(x.shape))
        inp.copy_from_cpu(x)
        predictor.run()
        out.copy_to_cpu()

    return infer
