"""Data sources on real files: PNG/JPEG written here, decoded by Pillow."""
from __future__ import annotations

import numpy as np
import pytest

from mbv2.artifacts import read_class_names, write_class_names
from mbv2.data import DataError, build_data, load_image
from tests.image_files import write_image as _write


@pytest.fixture
def folder_tree(tmp_path):
    root = tmp_path / "flowers"
    for split, n in (("train", 3), ("val", 2)):
        for ci, cls in enumerate(["tulip", "daisy", "rose"]):
            for i in range(n):
                d = root / split / cls
                kinds = [("RGB", f"{i}.png", None), ("L", f"{i}_gray.jpg", "JPEG"),
                         ("RGBA", f"{i}_alpha.PNG", "PNG"), ("P", f"{i}_pal.bmp", "BMP"),
                         ("RGB", f"{i}.webp", "WEBP")]
                mode, name, fmt = kinds[(i + ci) % len(kinds)]
                _write(d / name, mode, fmt=fmt, color=40 * ci)
    (root / "train" / "rose" / "notes.txt").write_text("not an image")
    return root


def test_folder_dataset_reads_every_kind(cfg_factory, folder_tree):
    cfg = cfg_factory(["data=folder", f"data.root={folder_tree}", "data.image_size=16"])
    bundle = build_data(cfg.data)
    assert bundle.class_names == ["daisy", "rose", "tulip"]  # sorted folder names
    assert len(bundle.train) == 9 and len(bundle.val) == 6
    labels = sorted(int(bundle.train[i][1]) for i in range(len(bundle.train)))
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for ds in (bundle.train, bundle.val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 16, 16) and x.dtype == np.float32
    # upper-case extension is picked up, the .txt file is not
    assert any(p.endswith("_alpha.PNG") for p, _ in bundle.train.samples)
    assert not any(p.endswith(".txt") for p, _ in bundle.train.samples)


def test_eval_transform_is_deterministic(cfg_factory, folder_tree):
    bundle = build_data(cfg_factory(["data=folder", f"data.root={folder_tree}", "data.image_size=16"]).data)
    np.testing.assert_array_equal(bundle.val[0][0], bundle.val[0][0])


def test_gray_rgba_and_palette_become_rgb(tmp_path):
    for mode in ("L", "RGBA", "P", "LA"):
        img = load_image(_write(tmp_path / f"x_{mode}.png", mode, fmt="PNG"))
        assert img.mode == "RGB"


def test_corrupt_image_error_names_the_file(tmp_path, cfg_factory):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            _write(root / split / cls / "ok.png")
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):  # found by the start-up scan
        build_data(cfg_factory(["data=folder", f"data.root={root}"]).data)
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(bad)


def test_folder_errors_before_training(tmp_path, cfg_factory):
    root = tmp_path / "d"
    _write(root / "train" / "a" / "1.png")
    _write(root / "train" / "b" / "1.png")
    _write(root / "val" / "a" / "1.png")
    with pytest.raises(DataError, match="only in train: \\['b'\\]"):
        build_data(cfg_factory(["data=folder", f"data.root={root}"]).data)
    (root / "val" / "b").mkdir()
    with pytest.raises(DataError, match="without images: \\['b'\\]"):
        build_data(cfg_factory(["data=folder", f"data.root={root}"]).data)
    with pytest.raises(DataError, match="data.root"):
        build_data(cfg_factory(["data=folder", f"data.root={tmp_path / 'missing'}"]).data)


def test_digits_split_is_stratified_and_fixed(cfg_factory):
    cfg = cfg_factory(["data=digits", "data.image_size=16"]).data
    a, b = build_data(cfg), build_data(cfg)
    assert len(a.train) + len(a.val) == 1797 and len(a.val) == 360
    assert a.class_names == [str(i) for i in range(10)]
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    counts = np.bincount(a.val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    x, _ = a.val[0]
    assert x.shape == (3, 16, 16)


def test_fake_data_shapes(cfg_factory):
    b = build_data(cfg_factory(["data=fake", "data.num_samples=12", "data.num_classes=3",
                                "data.image_size=24"]).data)
    assert len(b.train) == 12 and b.num_classes == 3
    assert b.train[0][0].shape == (3, 24, 24)


def test_class_names_file(tmp_path):
    write_class_names(["cat", "dog"], tmp_path)
    assert (tmp_path / "class_names.txt").read_text() == "cat\ndog\n"
    assert read_class_names(tmp_path, 2) == ["cat", "dog"]
