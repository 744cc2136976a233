"""Throughput benchmark: MobileNetV2 on CPU, Paddle native vs Paddle + the C++ depthwise
op vs an exported Paddle Inference predictor vs PyTorch eager (same architecture).

    python -m mbv2.bench [--quick] [--out bench.json] [--threads N] [--scales 1.0 0.5]

Training img/s = forward + cross-entropy + backward + Momentum step (batch / step time);
inference img/s = eval-mode forward without gradients. Every backend runs in fresh
processes of its own, in two rounds that take turns; warm-up steps (3-5 per process: the
heap and caches fill) are excluded, each number is the median of the timed steps of both
rounds (each round's median is in the JSON).
PyTorch is timed twice: as installed ("torch", glibc's default allocator) and with the
allocator setting every mbv2 process uses ("torch_kept_heap", mbv2.runtime.configure_malloc),
so both the user-facing and the like-for-like ratio are in the table.
All frameworks use the same thread count (--threads sets OMP_NUM_THREADS/MKL_NUM_THREADS,
Paddle's math threads through mbv2.runtime.set_cpu_threads - Paddle alone stays on one - and
torch.set_num_threads). Classes: 10 at 32 px, 1000 at 224 px.
The predictor (`paddle.jit.save` + `paddle.inference` with oneDNN) is inference only and
uses Paddle's own depthwise conv, since a custom op is not part of the exported program.
The machine may be shared: the 1-minute load average before and after each case goes into
the JSON so a noisy number can be recognised.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Case:
    scale: float
    image_size: int
    batch: int
    class_num: int
    warmup: int
    reps: int  # timed training steps; inference uses 2x (it is cheaper)


def default_cases(quick: bool, scales: list[float]) -> list[Case]:
    if quick:  # smoke: every code path once or twice, ~1 minute
        return [Case(s, 32, 32, 10, 1, 2) for s in scales] + \
               [Case(s, 224, 4, 1000, 1, 2) for s in scales]
    # 224 px x1.0 native training is ~3 s a step here: few reps keep the run < 10 min.
    # 5 warm-up steps there: the heap keeps growing (page faults) for the first few.
    return [Case(s, 32, 128, 10, 3, 8) for s in scales] + \
           [Case(s, 224, 32, 1000, 5, 5) for s in scales]


@dataclass
class Result:
    case: Case
    mode: str  # train | infer
    backend: str  # paddle_native | paddle_kernel | paddle_predictor | torch
    seconds: list[float] = field(default_factory=list)
    load_before: float = 0.0
    load_after: float = 0.0
    error: str | None = None
    round_img_s: list[float] = field(default_factory=list)  # median of each round

    @property
    def img_s(self) -> float | None:
        return self.case.batch / statistics.median(self.seconds) if self.seconds else None


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ----------------------------------------------------------------------------- Paddle

def paddle_fns(case: Case, fast: bool) -> tuple[Callable[[], Any], Callable[[], Any]]:
    import paddle
    import paddle.nn.functional as F

    from mbv2.model import MobileNetV2
    from mbv2.ops.depthwise import fast_depthwise_fn

    paddle.seed(0)
    net = MobileNetV2(class_num=case.class_num, scale=case.scale)
    if fast:
        fn = fast_depthwise_fn("on", "cpu")
        if fn is None:
            raise RuntimeError("depthwise op unavailable")
        net.set_fast_depthwise(fn)
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


def predictor_fn(case: Case, threads: int, workdir: Path) -> Callable[[], Any]:
    import numpy as np
    import paddle
    from paddle.static import InputSpec

    from mbv2.model import MobileNetV2

    paddle.seed(0)
    net = MobileNetV2(class_num=case.class_num, scale=case.scale)
    net.eval()
    prefix = str(workdir / f"mbv2_x{case.scale}_{case.image_size}")
    paddle.jit.save(net, prefix,
                    input_spec=[InputSpec([None, 3, case.image_size, case.image_size], "float32")])
    program = prefix + ".json" if os.path.exists(prefix + ".json") else prefix + ".pdmodel"
    config = paddle.inference.Config(program, prefix + ".pdiparams")
    config.disable_gpu()
    (config.enable_onednn if hasattr(config, "enable_onednn") else config.enable_mkldnn)()
    config.set_cpu_math_library_num_threads(threads)
    config.switch_ir_optim(True)
    config.disable_glog_info()
    predictor = paddle.inference.create_predictor(config)
    inp = predictor.get_input_handle(predictor.get_input_names()[0])
    out = predictor.get_output_handle(predictor.get_output_names()[0])
    x = np.random.default_rng(0).standard_normal(
        (case.batch, 3, case.image_size, case.image_size)).astype("float32")

    def infer() -> None:
        inp.reshape(list(x.shape))
        inp.copy_from_cpu(x)
        predictor.run()
        out.copy_to_cpu()

    return infer


# ----------------------------------------------------------------------------- PyTorch

def torch_model(class_num: int, scale: float):
    """mbv2.model.MobileNetV2 in PyTorch: same table, channels, BN and ReLU6 placement
    (including the t=1 unit's expand conv, which PaddleClas keeps)."""
    import torch.nn as tnn

    from mbv2.model import DEFAULT_BOTTLENECK

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
            for t, c, n, s in DEFAULT_BOTTLENECK:
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


def torch_fns(case: Case, threads: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_model(case.class_num, case.scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size)
    y = torch.randint(0, case.class_num, (case.batch,))

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return train, infer


# Backends, each timed in a process of its own. "torch" is PyTorch as installed (glibc's
# default allocator); "torch_kept_heap" is PyTorch given the allocator setting every mbv2
# process runs with (mbv2.runtime.configure_malloc), for a like-for-like ratio.
PADDLE_BACKENDS = ("paddle_native", "paddle_kernel", "paddle_predictor")
TORCH_BACKENDS = ("torch", "torch_kept_heap")


def backend_worker(backend: str, case: Case, threads: int) -> dict[str, list[float]]:
    """Time one backend on one case in this process: {'train': [s...], 'infer': [s...]}.
    Each mode runs `case.warmup` untimed steps first (the heap and caches fill), then its
    timed steps back to back."""
    fns: dict[str, Callable[[], Any]]
    with tempfile.TemporaryDirectory(prefix="mbv2_bench_") as tmp:
        if backend in PADDLE_BACKENDS:
            import paddle

            from mbv2.runtime import set_cpu_threads

            paddle.set_device("cpu")
            set_cpu_threads(threads)  # Paddle's math stays on one thread otherwise
        if backend in ("paddle_native", "paddle_kernel"):
            train, infer = paddle_fns(case, backend == "paddle_kernel")
            fns = {"train": train, "infer": infer}
        elif backend == "paddle_predictor":
            fns = {"infer": predictor_fn(case, threads, Path(tmp))}
        elif backend in TORCH_BACKENDS:
            train, infer = torch_fns(case, threads)
            fns = {"train": train, "infer": infer}
        else:
            raise ValueError(f"unknown backend {backend!r}")
        out: dict[str, list[float]] = {}
        for mode, fn in fns.items():
            reps = case.reps if mode == "train" else 2 * case.reps
            for _ in range(case.warmup):
                fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[mode] = times
    return out


def in_subprocess(backend: str, case: Case, threads: int) -> dict[str, list[float]]:
    """`backend_worker` in a fresh interpreter. Separate processes keep the backends from
    disturbing each other: measured here, building the oneDNN predictor in the same process
    slowed the kernel's training steps from ~90 to ~125 ms, and torch's GNU OpenMP threads
    next to Paddle's Intel OpenMP pool made torch 8x slower at 2 threads."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("MBV2_MALLOC", None)
    if backend == "torch":  # PyTorch as a user runs it: glibc's default allocator
        env["MBV2_MALLOC"] = "system"
    proc = subprocess.run(
        [sys.executable, "-m", "mbv2.bench", "--threads", str(threads),
         "--worker", backend, json.dumps(asdict(case))],
        capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{backend} worker exited {proc.returncode}: {tail[0][-400:]}")
    return json.loads(lines[-1])


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # broken installs raise more than ImportError
        return False
    return True


# ------------------------------------------------------------- end to end and data

def default_run(workdir: Path) -> dict[str, Any]:
    """`make run`'s experiment (python -m mbv2.run with its defaults), timed from the
    shell's point of view: interpreter start, data, build, training, evaluation."""
    import subprocess

    run_dir = workdir / "default_run"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mbv2.run", "trainer.verbose=0",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": proc.stderr[-800:]}
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "best_eval_acc_top1": m["best_eval_acc_top1"],
            "final_eval_acc_top1": m["final_eval_acc_top1"],
            "train_images_per_sec": round(m["train_images_per_sec"], 1),
            "epochs": m["epochs_completed"]}


def loader_speed(workdir: Path, image_size: int = 32, workers: tuple[int, ...] = (0, 2)) -> dict[str, Any]:
    """Data-loader img/s decoding JPEG files from disk (the digits written as 32 px
    JPEGs in class folders), to hold against training img/s at the same size."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image
    from sklearn.datasets import load_digits

    from mbv2.config import DataConfig
    from mbv2.data import measure_loader

    root = workdir / "digits_jpeg"
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if i % 5 == 0 else "train"
        d = root / split / str(label)
        d.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((image_size, image_size))
        big.convert("RGB").save(d / f"{i}.jpg", quality=90)
    cfg = OmegaConf.structured(DataConfig(name="folder", root=str(root), image_size=image_size,
                                          hflip=False))
    return {f"workers_{w}": round(measure_loader(cfg, batch_size=64, num_workers=w, batches=20), 1)
            for w in workers}


# ----------------------------------------------------------------------------- driver

def run_case(case: Case, threads: int, with_torch: bool, log: Callable[[str], None],
             rounds: int = 2) -> list[Result]:
    """Time every backend on `case`, each in a fresh process (see `in_subprocess`), in
    `rounds` rounds that take turns (A B C .. A B C ..), each round half the timed steps.
    A slow spell of the shared machine then lands on several backends instead of one
    (single processes of PyTorch at 32 px ran at either ~800 or ~400 img/s here), and the
    per-round medians in the JSON (`round_img_s`) show when that happened."""
    backends = PADDLE_BACKENDS + (TORCH_BACKENDS if with_torch else ())
    results: dict[tuple[str, str], Result] = {}
    for backend in backends:
        for m in (("infer",) if backend == "paddle_predictor" else ("train", "infer")):
            results[(backend, m)] = Result(case, m, backend, load_before=_loadavg())
    rounds = max(1, min(rounds, case.reps))
    for rnd in range(rounds):
        # this round's share of the timed steps (train: reps, infer: 2 x reps in all)
        share = replace(case, reps=case.reps // rounds + (1 if rnd < case.reps % rounds else 0))
        for backend in backends:
            rs = {m: r for (b, m), r in results.items() if b == backend and not r.error}
            if not rs:
                continue
            try:
                times = in_subprocess(backend, share, threads)
                for m, r in rs.items():
                    r.seconds += times[m]
                    r.round_img_s.append(round(case.batch / statistics.median(times[m]), 2))
            except Exception as e:  # one broken backend must not lose the others' numbers
                for r in rs.values():
                    r.error, r.seconds = f"{type(e).__name__}: {e}", []
    for r in results.values():
        r.load_after = _loadavg()
        shown = f"{r.img_s:8.1f} img/s" if r.img_s else f"failed ({r.error})"
        log(f"x{case.scale} {case.image_size}px b{case.batch} {r.mode:5s} {r.backend:16s} "
            f"{shown}" + (f"  (rounds: {r.round_img_s})" if len(r.round_img_s) > 1 else ""))
    return list(results.values())


def table(results: list[Result]) -> list[dict[str, Any]]:
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r.case.scale, r.case.image_size, r.case.batch, r.mode)
        row = rows.setdefault(key, {"scale": r.case.scale, "image_size": r.case.image_size,
                                    "batch": r.case.batch, "mode": r.mode})
        row[r.backend] = round(r.img_s, 2) if r.img_s else None
    for row in rows.values():
        for ref in TORCH_BACKENDS:
            t = row.get(ref)
            for b in PADDLE_BACKENDS:
                if t and row.get(b):
                    row[f"{b}_vs_{ref}"] = round(row[b] / t, 2)
    return list(rows.values())


def format_table(rows: list[dict[str, Any]], threads: int) -> str:
    head = (f"{'model':6s} {'px':>4s} {'batch':>5s} {'mode':5s} | {'native':>8s} {'kernel':>8s} "
            f"{'predict':>8s} {'torch':>8s} {'torch*':>8s} | {'kern/t':>6s} {'kern/t*':>7s} "
            f"{'pred/t':>6s}")
    lines = [f"MobileNetV2 img/s, {threads} threads (median of timed steps; higher is better)",
             head, "-" * len(head)]

    def f(v: Any, w: int, p: int = 1) -> str:
        return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"

    for r in rows:
        lines.append(f"x{r['scale']:<5} {r['image_size']:4d} {r['batch']:5d} {r['mode']:5s} | "
                     f"{f(r.get('paddle_native'), 8)} {f(r.get('paddle_kernel'), 8)} "
                     f"{f(r.get('paddle_predictor'), 8)} {f(r.get('torch'), 8)} "
                     f"{f(r.get('torch_kept_heap'), 8)} | "
                     f"{f(r.get('paddle_kernel_vs_torch'), 6, 2)} "
                     f"{f(r.get('paddle_kernel_vs_torch_kept_heap'), 7, 2)} "
                     f"{f(r.get('paddle_predictor_vs_torch'), 6, 2)}")
    lines.append("torch: PyTorch as installed (glibc's default allocator); torch*: PyTorch with "
                 "the kept heap every mbv2 process uses (MBV2_MALLOC)")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m mbv2.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run (small batches)")
    ap.add_argument("--out", default="outputs/bench.json", help="JSON results file")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for every framework (default: all CPUs)")
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="width multipliers (default 1.0 0.5; --quick: 1.0)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    ap.add_argument("--worker", nargs=2, metavar=("BACKEND", "CASE_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # internal: one backend on one case, JSON timings on stdout
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        import mbv2  # noqa: F401  (MKL_DEBUG_CPU_TYPE and the allocator, before paddle/torch)
        result = backend_worker(args.worker[0], Case(**json.loads(args.worker[1])), args.threads)
        print(json.dumps(result), flush=True)
        return result

    # Before Paddle/torch load their OpenMP/MKL runtimes, which read these once.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import mbv2  # noqa: F401  (sets MKL_DEBUG_CPU_TYPE before paddle loads MKL)
    import paddle

    scales = args.scales or ([1.0] if args.quick else [1.0, 0.5])
    with_torch = not args.no_torch and torch_available()
    if not with_torch:
        print("PyTorch not importable (or --no-torch): torch columns left empty", file=sys.stderr)

    t0 = time.time()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mbv2_bench_") as tmp:
        for case in default_cases(args.quick, scales):
            results += run_case(case, args.threads, with_torch,
                                lambda s: print(s, file=sys.stderr, flush=True))
        extras: dict[str, Any] = {}
        if not args.quick:
            print("timing the default experiment (python -m mbv2.run) ...", file=sys.stderr)
            extras["default_run"] = default_run(Path(tmp))
            print("timing the data loader on JPEG files ...", file=sys.stderr)
            extras["loader_32px_img_s"] = loader_speed(Path(tmp))
    rows = table(results)
    text = format_table(rows, args.threads)
    print(text)
    if "default_run" in extras:
        d = extras["default_run"]
        print(f"default experiment (make run): {d.get('wall_s')} s wall, best top-1 "
              f"{d.get('best_eval_acc_top1')}, training {d.get('train_images_per_sec')} img/s"
              if "error" not in d else f"default experiment failed: {d['error']}")
        loader = ", ".join(f"{k.replace('_', ' ')}: {v} img/s"
                           for k, v in extras["loader_32px_img_s"].items())
        print(f"data loader, 32 px JPEG files, batch 64: {loader} (training above: "
              f"{d.get('train_images_per_sec')} img/s)")

    versions = {"paddle": paddle.__version__, "python": platform.python_version()}
    if with_torch:
        import torch
        versions["torch"] = torch.__version__
    report = {
        "threads": args.threads,
        "cpu": _cpu_model(),
        "env": {k: os.environ.get(k) for k in ("MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS")},
        "versions": versions,
        "quick": args.quick,
        "wall_s": round(time.time() - t0, 1),
        "table": rows,
        **extras,
        "runs": [{**asdict(r.case), "mode": r.mode, "backend": r.backend,
                  "img_s": r.img_s, "round_img_s": r.round_img_s, "seconds": r.seconds,
                  "load_before": r.load_before, "load_after": r.load_after,
                  "error": r.error} for r in results],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['wall_s']} s)", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
