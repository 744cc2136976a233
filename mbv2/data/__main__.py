"""`python -m mbv2.data lists <root> <out_dir>` writes PaddleClas lists from a folder tree."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

import mbv2.data
from mbv2.data.errors import DataError
from mbv2.data.folder_lists import write_label_lists


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mbv2.data",
                                     description=mbv2.data.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lists = sub.add_parser("lists", help="write PaddleClas train/val/label lists from a folder tree")
    lists.add_argument("root", help="root/train/<class>/* + root/val/<class>/*, or root/<class>/*")
    lists.add_argument("out_dir", help="where train_list.txt, val_list.txt, label_list.txt go")
    lists.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of each class for val when root has no train/ + val/")
    lists.add_argument("--seed", type=int, default=0, help="split seed (data.split_seed)")
    lists.add_argument("--classes", nargs="+", help="class folders to use, in id order")
    lists.add_argument("--delimiter", default=" ", help="between path and label; \\t or tab for a tab")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = write_label_lists(args.root, args.out_dir, args.val_fraction, args.seed,
                                    args.classes, args.delimiter)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    for split, path in written.items():
        lines = path.read_text(encoding="utf-8").count("\n")
        print(f"{path}: {lines} {'classes' if split == 'labels' else 'images'}")


if __name__ == "__main__":
    main()
