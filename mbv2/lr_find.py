"""`python -m mbv2.lr_find [--start 1e-5] [--end 1] [--steps 200] [Hydra overrides]`: the LR
range test (Smith 2017, "Cyclical learning rates", section 3.3; fastai's `lr_find`).

The run's model, data, optimizer and loss are built from the composed config exactly as
`python -m mbv2.run <overrides>` builds them; the LR then rises exponentially from `--start`
to `--end` over `--steps` training steps (or until the loss diverges: the smoothed loss
over 4x its minimum), recording the loss smoothed with an exponential moving average
(beta 0.98, bias-corrected). The suggestion is `min/10`: a tenth of the LR at the lowest
smoothed loss (fastai's rule of thumb, "an order of magnitude before the minimum"); the
LR of the steepest fall of the loss (`steep`) is reported beside it. Checked against the
committed width x LR study on the digits (experiments/results/width_lr_digits.md):
min/10 gave 0.0099 at x0.5 and 0.0105 at x1.0, inside the LRs within one point of the
best at x1.0 (0.01-0.03) and 1.1 points short of it at x0.5; `steep` gave 0.066 and 0.083,
on the unstable side (0.1 loses 13-44 points with this recipe), so it is not the default.
Where the curve shows no fall (its lowest point is noise) or its lowest point is within a
decade of `--start`, nothing is suggested and the output says why (`suggest`).
Nothing is trained for real: the weights are restored at the end, and nothing is written
into a run dir.

Writes into `outputs/lr_find/<date>/<time>/`: `lr_find.png` (loss against LR, log x, the
suggestion marked), `lr_find.json` (every step's LR and raw/smoothed loss, the
suggestions) and VisualDL scalars (`lr_find/loss`, `lr_find/smoothed_loss`, `lr_find/lr`).
"""
from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mbv2.runtime import configure_process

PROG = "mbv2.lr_find"
BETA = 0.98  # the loss's moving average
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum
log = logging.getLogger(PROG)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Hydra overrides, as for python -m mbv2.run")
    parser.add_argument("--start", type=float, default=1e-5, help="first LR (default 1e-5)")
    parser.add_argument("--end", type=float, default=1.0, help="last LR (default 1)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--out", help="output dir (default outputs/lr_find/<date>/<time>)")
    args = parser.parse_args(list(argv))
    if not 0 < args.start < args.end:
        parser.error(f"--start {args.start} and --end {args.end}: need 0 < start < end")
    if args.steps < 10:
        parser.error(f"--steps {args.steps}: give at least 10")
    return args


def lr_at(step: int, start: float, end: float, steps: int) -> float:
    """The exponential ramp: start at step 0, end at step steps - 1."""
    return start * (end / start) ** (step / max(1, steps - 1))


def smooth(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average (as fastai's lr_find)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def suggest(lrs: Sequence[float], smoothed: Sequence[float],
            losses: Sequence[float] | None = None) -> dict[str, Any]:
    """`suggested` (= `min_10`): a tenth of the LR at the smoothed loss's minimum; `steep`:
    the LR of its steepest fall against log10(LR), looked for before the minimum. Both skip
    the first 5 % of the points (the moving average's warm-up, where it is mostly noise).

    `suggested` is None, with `why`, where the curve does not support one: the raw losses
    (`losses`), averaged over a tenth of the steps, never fell below their first average by
    more than three times the scatter two such averages have (a flat curve whose minimum is
    noise), or its minimum lies within a decade of the first LR (min/10 would be below the
    range that was tested)."""
    lrs_a, loss_a = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    raw = loss_a if losses is None else np.asarray(losses, dtype=float)
    skip = max(1, len(lrs_a) // 20)  # the first few points are mostly the average's warm-up
    low = skip + int(np.nanargmin(loss_a[skip:]))
    window = slice(skip, max(skip + 2, low + 1))
    slopes = np.gradient(loss_a[window], np.log10(lrs_a[window]))
    steep = float(lrs_a[window][int(np.argmin(slopes))])
    min_10 = float(lrs_a[low] / 10)
    # Did the loss fall? Moving averages of the raw losses over w steps: the first against
    # the lowest up to the minimum, beside the step-to-step scatter (differences: a trend
    # does not count) that two such averages leave.
    w = max(3, len(raw) // 10)
    avg = np.convolve(raw[:max(low + 1, w)], np.ones(w) / w, mode="valid")
    fall = float(avg[0] - np.min(avg))
    scatter = float(np.std(np.diff(raw[:low + 1]))) / math.sqrt(2) if low >= 2 else 0.0
    noise = 3 * scatter * math.sqrt(2 / w)
    why = None
    if fall <= noise:
        why = (f"the loss did not fall before its lowest point at LR {lrs_a[low]:.3g} (by "
               f"{fall:.3g}, within its noise of {noise:.3g}): raise --end or --steps, or check "
               f"that the data can be learned")
    elif min_10 < lrs_a[0]:
        why = (f"the lowest loss is at LR {lrs_a[low]:.3g}, within a decade of --start "
               f"{lrs_a[0]:.3g}: lower --start to see where the loss falls")
    return {"suggested": None if why else min_10, "min_10": min_10, "steep": steep,
            "min_loss_lr": float(lrs_a[low]), "why": why}


def range_test(cfg, start: float, end: float, steps: int) -> dict[str, Any]:
    """Run the ramp on the config's model and data; the weights are restored afterwards."""
    import paddle

    from mbv2.data import build_data
    from mbv2.model import build_model
    from mbv2.train import setup
    from mbv2.train.losses import build_loss
    from mbv2.train.optim import build_optimizer

    device = setup.prepare_process(cfg.trainer)
    data = build_data(cfg.data)
    net = build_model(cfg.model, num_classes=data.num_classes, device=device)
    schedule = paddle.optimizer.lr.LambdaDecay(1.0, lambda s: lr_at(s, start, end, steps))
    optimizer = build_optimizer(cfg.optim, net.parameters(), schedule)
    loss_fn = build_loss(cfg.loss)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    loader = setup.train_loader(data.train, cfg.trainer, start_epoch=0)
    lrs, losses, started = [], [], time.perf_counter()
    try:
        net.train()
        while len(losses) < steps and not _diverged(losses):
            for images, labels in loader:
                lrs.append(float(optimizer.get_lr()))
                loss = loss_fn(net(images), labels)
                loss.backward()
                optimizer.step()
                optimizer.clear_grad()
                schedule.step()
                losses.append(float(loss))
                if len(losses) >= steps or _diverged(losses):
                    break
    finally:
        net.set_state_dict(saved)  # nothing trained for real
    return {"lrs": lrs, "losses": losses, "smoothed": smooth(losses),
            "seconds": time.perf_counter() - started, "start": start, "end": end,
            "steps_planned": steps}


def _diverged(losses: Sequence[float]) -> bool:
    if len(losses) < 10:
        return False
    s = smooth(losses)
    return not math.isfinite(s[-1]) or s[-1] > DIVERGED * min(s)


def write_results(result: dict[str, Any], out: Path, command: str | None) -> None:
    """lr_find.json, lr_find.png and VisualDL scalars in `out`."""
    from visualdl import LogWriter

    from mbv2.files import replace_atomic, write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "lr_find.json", {**result, "command": command})
    with LogWriter(logdir=str(out), file_name="vdlrecords.lr_find.log", display_name=out.name) as w:
        for step, (lr, raw, smoothed) in enumerate(zip(result["lrs"], result["losses"], result["smoothed"])):
            w.add_scalar("lr_find/loss", raw, step)
            w.add_scalar("lr_find/smoothed_loss", smoothed, step)
            w.add_scalar("lr_find/lr", lr, step)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax.plot(result["lrs"], result["losses"], color="0.8", lw=0.8, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed loss")
    chosen, steep = result["suggestion"]["suggested"], result["suggestion"]["steep"]
    if chosen is not None:
        ax.axvline(chosen, color="tab:red", ls="--", label=f"suggested LR {chosen:.3g} (min/10)")
    ax.axvline(steep, color="0.5", ls=":", label=f"steepest fall {steep:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), DIVERGED * min(finite)) * 1.05)
    ax.set_title("LR range test", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    replace_atomic(out / "lr_find.png", lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    configure_process()  # before anything imports paddle
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mbv2.cli import compose_run_config
    from mbv2.config import ConfigValueError, check_config

    cfg = compose_run_config(args.overrides, PROG)
    try:
        check_config(cfg)
    except ConfigValueError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    result = range_test(cfg, args.start, args.end, args.steps)
    if len(result["losses"]) < 10:
        raise SystemExit(f"{PROG}: only {len(result['losses'])} steps ran; the loss diverged at "
                         f"once - lower --start")
    result["suggestion"] = s = suggest(result["lrs"], result["smoothed"], result["losses"])
    out = Path(args.out) if args.out else Path("outputs/lr_find") / time.strftime("%Y-%m-%d/%H-%M-%S")
    kept = [o for o in args.overrides if not o.startswith("optim.lr=")]
    command = (shlex.join(["python", "-m", "mbv2.run", *kept, f"optim.lr={s['suggested']:.3g}"])
               if s["suggested"] is not None else None)
    write_results(result, out, command)
    ran = (f"{len(result['losses'])} steps in {result['seconds']:.1f} s (LR {args.start:g} -> "
           f"{result['lrs'][-1]:.3g})")
    files = f"-> {out / 'lr_find.png'}, {out / 'lr_find.json'}"
    if command is None:
        print(f"{ran}; no LR to suggest: {s['why']}\n{files}")
    else:
        print(f"{ran}; suggested LR {s['suggested']:.3g} (a tenth of the LR at the lowest loss; "
              f"steepest fall at {s['steep']:.3g})\n{files}\ntrain with it: {command}")
    return result


if __name__ == "__main__":
    main()
