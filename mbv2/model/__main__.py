"""`python -m mbv2.model [--csv PATH] [Hydra overrides]`: the network a config builds,
layer by layer (see mbv2.model.summary)."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mbv2.cli import compose_run_config
from mbv2.runtime import configure_process

PROG = "mbv2.model"
DESCRIPTION = """\
Print MobileNetV2 as the composed config builds it: one row per leaf layer in forward
order (structured name, type, output shape [N, C, H, W] for one image, trainable params,
MACs), then a totals line: trainable params (= count_parameters; batch-norm running
statistics are not counted), MACs (= count_macs: convs and the head) and FLOPs = 2 x MACs,
the convention of PaddleClas's model zoo.

The overrides are those of `python -m mbv2.run` (default: the default config). Read:
model.scale, model.bottleneck, model.stem_stride, data.image_size (the input size), and
the class count: model.class_num when set, else data.num_classes when set, else 1000
(ImageNet's, as PaddleClas's published numbers). model.pretrained is not loaded.

examples:
  python -m mbv2.model model.scale=1.0 data.image_size=224
  python -m mbv2.model 'model.bottleneck=[[1,16,1,1],[6,24,2,2]]' model.class_num=10
  python -m mbv2.model experiment=<name> --csv summary.csv"""
DEFAULT_CLASSES = 1000


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Hydra overrides, as for python -m mbv2.run")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV file")
    return parser.parse_args(list(argv))


def class_count(cfg) -> tuple[int, str]:
    """The head's size and where it comes from: model.class_num, else data.num_classes,
    else DEFAULT_CLASSES."""
    if cfg.model.class_num is not None:
        return int(cfg.model.class_num), "model.class_num"
    if cfg.data.get("num_classes") is not None:
        return int(cfg.data.num_classes), "data.num_classes"
    return DEFAULT_CLASSES, "default: model.class_num and data.num_classes unset"


def main(argv: Sequence[str] | None = None) -> None:
    configure_process()  # before anything imports paddle
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose_run_config(args.overrides, PROG)  # a bad override: one line, naming it
    from mbv2.config import ConfigValueError, check_config
    from mbv2.model import ModelConfigError, build_network
    from mbv2.model.summary import format_summary, layer_summary, write_summary_csv

    try:
        check_config(cfg)
        classes, source = class_count(cfg)
        net = build_network(cfg.model, classes)
    except (ConfigValueError, ModelConfigError) as e:
        raise SystemExit(f"{PROG}: {e}") from None
    size = int(cfg.data.image_size)
    rows = layer_summary(net, size)
    print(f"MobileNetV2 x{net.scale:g}, {classes} classes ({source}), "
          f"input [1, 3, {size}, {size}] (data.image_size)")
    print(format_summary(rows, size))
    if args.csv:
        print(f"rows written to {write_summary_csv(rows, args.csv)}")


if __name__ == "__main__":
    main()
