"""The kernels' parallel loops (`mbv2/ops/work_chunks.h`): a thread that finishes its share
takes chunks from the back of the other's, and the sums across chunks (weight gradients,
batch norm statistics) are kept per chunk, so a training step gives the same bits
whichever thread ran which chunk."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

import paddle
import paddle.nn.functional as F

from mbv2.model import MobileNetV2
from mbv2.ops import fused

pytestmark = pytest.mark.usefixtures("op_threads", "kernel")


@contextlib.contextmanager
def _one_core():
    """Every thread of this process (Paddle's OpenMP workers included) on one CPU: the OS
    runs them in turns, so each parallel loop's threads finish their shares far apart and
    the first to run takes most of the other's chunks."""
    tasks = [int(t) for t in os.listdir("/proc/self/task")]
    before = {t: os.sched_getaffinity(t) for t in tasks}
    cpu = min(os.sched_getaffinity(0))
    try:
        for t in tasks:
            try:
                os.sched_setaffinity(t, {cpu})
            except PermissionError:
                pytest.skip("this process may not pin its threads to a CPU here")
        yield
    finally:
        for t, mask in before.items():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(t, mask)


def _step() -> dict[str, np.ndarray]:
    """Logits, every gradient and the batch norm running statistics after one training
    step of x0.5 at 64 px (the expand -> depthwise op on its 32x32 maps, the fused
    depthwise and 1x1 ops, the plain 1x1 and batch norm ops below)."""
    paddle.seed(0)
    net = MobileNetV2(class_num=10, scale=0.5)
    assert net.use_cpu_kernels(True)
    net.train()
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((8, 3, 64, 64)).astype("float32"))
    y = paddle.to_tensor(rng.integers(0, 10, 8))
    logits = net(x)
    F.cross_entropy(logits, y).backward()
    out = {"logits": logits.numpy()}
    for name, p in net.named_parameters():
        if p.grad is not None:
            out["grad " + name] = p.grad.numpy()
    for name, b in net.named_buffers():
        out[name] = b.numpy()
    return out


def test_a_step_gives_the_same_bits_whichever_thread_runs_which_chunk(monkeypatch):
    # the sums a conv takes for the batch norm after it, on outputs of every size
    monkeypatch.setenv("MBV2_STREAM_BYTES", "0")
    calls = []
    expand = fused.expand_bn_relu6_depthwise
    monkeypatch.setattr(fused, "expand_bn_relu6_depthwise",
                        lambda *a: calls.append(1) or expand(*a))
    apart = _step()
    assert calls, "the expand -> depthwise op was not run"
    with _one_core():
        together = _step()
    assert apart.keys() == together.keys()
    differ = [k for k in apart if not np.array_equal(apart[k], together[k], equal_nan=True)]
    assert not differ, f"not bit for bit with the threads on one core: {differ[:5]}"
    # and the same again on two cores
    again = _step()
    assert all(np.array_equal(apart[k], again[k], equal_nan=True) for k in apart)
