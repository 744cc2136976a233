"""data=list, seed_list, cifar10, folder splits and the list writer, on files written here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mbv2.config import check_config
from mbv2.data import CIFAR10_CLASSES, DataError, build_data, measure_loader, write_label_lists
from tests.conftest import run_cli
from tests.image_files import cifar_archive, class_tree, write_jpeg


def _labels(ds) -> list[int]:
    return [label for _, label in ds.samples]


def test_paddleclas_lists_with_class_names(tmp_path, cfg_factory):
    root = tmp_path / "flowers"
    for i, (rel, label) in enumerate([("jpg/a 1.jpg", 0), ("jpg/b.jpg", 1), ("jpg/c.jpg", 2),
                                      ("jpg/d.jpg", 0), ("jpg/e.jpg", 2)]):
        write_jpeg(root / rel, color=(40 * i, 90, 90))
    (root / "train_list.txt").write_text("jpg/a 1.jpg\t0\njpg/b.jpg\t1\njpg/c.jpg\t2\n")
    (root / "val_list.txt").write_text("jpg/d.jpg\t0\njpg/e.jpg\t2\n\n")  # trailing blank: fine
    (root / "label_list.txt").write_text("2 red rose\n0 pink primrose\n1 tulip\n")
    cfg = cfg_factory(["data=list", f"data.root={root}", "data.delimiter=tab",
                       "data.class_names=label_list.txt", "data.image_size=16"])
    check_config(cfg)
    bundle = build_data(cfg.data)
    assert bundle.class_names == ["pink primrose", "tulip", "red rose"]
    assert bundle.train.samples[0] == (str(root / "jpg/a 1.jpg"), 0)  # path with a space
    assert _labels(bundle.val) == [0, 2]
    x, y = bundle.train[0]
    assert x.shape == (3, 16, 16) and int(y) == 0


def test_list_space_delimiter_and_paths_relative_to_list_dir(tmp_path, cfg_factory):
    write_jpeg(tmp_path / "data" / "img" / "x.jpg")
    write_jpeg(tmp_path / "data" / "img" / "y.jpg")
    lists = tmp_path / "data"
    (lists / "tr.txt").write_text("img/x.jpg 0\nimg/y.jpg 1\n")
    (lists / "va.txt").write_text("img/y.jpg 1\n")
    # root null: image paths start at the list file's directory
    bundle = build_data(cfg_factory(["data=list", f"data.train_list={lists / 'tr.txt'}",
                                     f"data.val_list={lists / 'va.txt'}"]).data)
    assert bundle.class_names == ["0", "1"]  # no names file: the ids
    assert bundle.val.samples == [(str(lists / "img" / "y.jpg"), 1)]


def test_seed_lists_absolute_and_relative_paths(tmp_path, cfg_factory):
    repo = tmp_path / "classification-pp"
    class_tree(repo / "datasets" / "train", {"cat": 2, "dog": 2})
    class_tree(repo / "datasets" / "test", {"cat": 1, "dog": 1})
    absolute = repo / "datasets" / "train" / "dog" / "000.jpg"
    (repo / "cls_train.txt").write_text(
        f"0;datasets/train/cat/000.jpg\n0;datasets/train/cat/001.jpg\n1;{absolute}\n"
        "1;datasets/train/dog/001.jpg\n")
    (repo / "cls_test.txt").write_text("0;datasets/test/cat/000.jpg\n1;datasets/test/dog/000.jpg\n")
    (repo / "model_data").mkdir()
    (repo / "model_data" / "cls_classes.txt").write_text("cat\ndog\n")
    cfg = cfg_factory(["data=seed_list", f"data.train_list={repo / 'cls_train.txt'}",
                       f"data.val_list={repo / 'cls_test.txt'}",
                       f"data.class_names={repo / 'model_data' / 'cls_classes.txt'}"])
    check_config(cfg)
    bundle = build_data(cfg.data)
    assert bundle.class_names == ["cat", "dog"]
    assert bundle.train.samples[0] == (str(repo / "datasets/train/cat/000.jpg"), 0)
    assert bundle.train.samples[2] == (str(absolute), 1)
    assert _labels(bundle.val) == [0, 1]
    # with data.root, relative paths start there and the list names are looked up there too
    cfg = cfg_factory(["data=seed_list", f"data.root={repo}"])
    assert len(build_data(cfg.data).train) == 4


def test_cifar10_reads_a_local_archive(tmp_path, cfg_factory):
    archive = cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    cfg = cfg_factory(["data=cifar10", f"data.archive={archive}"])
    check_config(cfg)
    bundle = build_data(cfg.data)
    assert len(bundle.train) == 20 and len(bundle.val) == 6
    assert bundle.class_names == CIFAR10_CLASSES and bundle.num_classes == 10
    x, y = bundle.val[1]
    assert x.shape == (3, 32, 32) and int(y) == 1
    mean, std = np.asarray(cfg.data.mean), np.asarray(cfg.data.std)
    np.testing.assert_allclose(x[:, 16, 16], (np.array([1.0, 0, 0]) - mean) / std, atol=1e-4)


def test_cifar10_missing_archive_says_where_to_put_it(tmp_path, cfg_factory):
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match=f"put it at {missing}.*data.archive") as e:
        build_data(cfg_factory(["data=cifar10", f"data.archive={missing}"]).data)
    assert "cifar-10-python.tar.gz (https://" in str(e.value)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(DataError, match="cannot read it.*download it again"):
        build_data(cfg_factory(["data=cifar10", f"data.archive={bad}"]).data)


def test_folder_single_tree_split_is_stratified_and_seeded(tmp_path, cfg_factory):
    root = class_tree(tmp_path / "pets", {"cat": 10, "dog": 5, "eel": 2})
    args = ["data=folder", f"data.root={root}", "data.val_fraction=0.2", "data.image_size=16"]
    a, b = build_data(cfg_factory(args).data), build_data(cfg_factory(args).data)
    assert a.class_names == ["cat", "dog", "eel"]
    assert sorted(_labels(a.val)) == [0, 0, 1, 2]  # round(10*.2)=2, round(5*.2)=1, min 1
    assert len(a.train) == 13 and a.val.samples == b.val.samples
    assert not {p for p, _ in a.train.samples} & {p for p, _ in a.val.samples}
    c = build_data(cfg_factory(args + ["data.split_seed=1"]).data)
    assert c.val.samples != a.val.samples


def test_folder_classes_override_sets_ids(tmp_path, cfg_factory):
    root = class_tree(tmp_path / "pets", {"cat": 3, "dog": 3, "eel": 3})
    bundle = build_data(cfg_factory(["data=folder", f"data.root={root}",
                                     "data.classes=[eel,cat]"]).data)
    assert bundle.class_names == ["eel", "cat"]
    assert {p.split("/")[-2]: lab for p, lab in bundle.train.samples} == {"eel": 0, "cat": 1}
    with pytest.raises(DataError, match=r"no folder for data.classes \['cow'\]"):
        build_data(cfg_factory(["data=folder", f"data.root={root}", "data.classes=[cat,cow]"]).data)


def test_write_label_lists_round_trips_through_data_list(tmp_path, cfg_factory):
    root = class_tree(tmp_path / "pets", {"cat": 5, "dog": 5})
    written = write_label_lists(root, root, val_fraction=0.4, seed=3)
    assert (root / "label_list.txt").read_text() == "0 cat\n1 dog\n"
    first = (root / "train_list.txt").read_text().splitlines()[0]
    assert first.startswith("cat/") and first.endswith(".jpg 0")
    listed = build_data(cfg_factory(["data=list", f"data.root={root}",
                                     "data.class_names=label_list.txt"]).data)
    folder = build_data(cfg_factory(["data=folder", f"data.root={root}", "data.val_fraction=0.4",
                                     "data.split_seed=3"]).data)
    assert listed.class_names == ["cat", "dog"] and set(written) == {"train", "val", "labels"}
    assert listed.val.samples == folder.val.samples and listed.train.samples == folder.train.samples


def test_lists_command_line(tmp_path):
    root = class_tree(tmp_path / "pets", {"cat": 3, "dog": 3})
    proc = run_cli(["lists", str(root), str(tmp_path / "out"), "--val-fraction", "0.34"],
                   cwd=tmp_path, module="mbv2.data", timeout=120)
    assert "train_list.txt: 4 images" in proc.stdout and "label_list.txt: 2 classes" in proc.stdout
    assert len((tmp_path / "out" / "val_list.txt").read_text().splitlines()) == 2
    proc = run_cli(["lists", str(tmp_path / "missing"), str(tmp_path / "o")], cwd=tmp_path,
                   module="mbv2.data", timeout=120, check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_measure_loader_reports_images_per_second(tmp_path, cfg_factory):
    root = class_tree(tmp_path / "pets", {"cat": 8, "dog": 8})
    rate = measure_loader(cfg_factory(["data=folder", f"data.root={root}",
                                       "data.image_size=32"]).data, batch_size=4, batches=3)
    assert 1 < rate < 1e6


def test_seed_list_names_from_the_seeds_datasets_tree(tmp_path, cfg_factory):
    """classification-pp writes no names file: its txt_annotation.py numbers the folders of
    datasets/train in os.listdir order; data.class_names may name that folder."""
    import os

    repo = tmp_path / "seed"
    for name in ("tulip", "rose", "daisy"):
        for split in ("train", "test"):
            write_jpeg(repo / "datasets" / split / name / "1.jpg")
    order = [n for n in os.listdir(repo / "datasets" / "train")]
    for split, list_name in (("train", "cls_train.txt"), ("test", "cls_test.txt")):
        (repo / list_name).write_text("".join(
            f"{i};datasets/{split}/{n}/1.jpg\n" for i, n in enumerate(order)))
    cfg = cfg_factory(["data=seed_list", f"data.root={repo}", "data.class_names=datasets/train",
                       "data.image_size=16"])
    bundle = build_data(cfg.data)
    assert bundle.class_names == order  # id i is the i-th folder os.listdir gives
    assert all(Path(p).parent.name == order[label] for p, label in bundle.train.samples)
