"""Bad input never costs a run: every kind is decoded correctly, or reported with its file
(and list line) before training, or replaced and counted during training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbv2.data import DataError, ImageDecoder, build_data, load_image
from tests.conftest import run_cli
from tests.image_files import class_tree, truncate, write_image, write_jpeg


@pytest.fixture(autouse=True)
def _pillow_limit():
    # the decoder sets Pillow's process-wide limit; leave it as other tests expect it
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/train/{a,b}/*.jpg and root/val/{a,b}/*.jpg, all readable."""
    class_tree(tmp_path / "d" / "train", {"a": 4, "b": 4})
    class_tree(tmp_path / "d" / "val", {"a": 2, "b": 2})
    return tmp_path / "d"


def _folder(cfg_factory, root, *extra):
    return build_data(cfg_factory(["data=folder", f"data.root={root}", "data.image_size=16", *extra]).data)


# -- files Pillow must decode correctly ---------------------------------------------
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth16.png"
    Image.fromarray(np.array([[65535, 32896], [257, 0]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    img = load_image(path)
    assert img.mode == "RGB"
    assert [img.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [255, 128, 1, 0]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in ink
    r, g, b = load_image(path).getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "pal.png"
    img = Image.new("P", (4, 1))
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, 1 blue
    img.putdata([0, 0, 1, 1])
    img.save(path, transparency=0)  # index 0 (black) is transparent
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 0)) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # stored: left half red, right half blue
    pixels[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (10, 20)  # portrait, as the camera meant it
    assert out.getpixel((5, 2))[0] > 200 and out.getpixel((5, 17))[2] > 200  # red on top


def test_very_large_image_names_file_and_limit_key(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (1500, 1000)).save(path)
    with pytest.raises(DataError, match=r"huge.png: 1500x1000 = 1500000 pixels is over "
                                        r"data.max_image_pixels=1000000.*raise the limit"):
        ImageDecoder(max_pixels=1_000_000)(path)
    bigger = tmp_path / "bigger.png"
    Image.new("L", (3000, 1000)).save(bigger)  # > 2x: Pillow's own DecompressionBombError
    with pytest.raises(DataError, match=r"bigger.png: .*decompression bomb.*data.max_image_pixels="):
        ImageDecoder(max_pixels=1_000_000)(bigger)
    assert ImageDecoder(max_pixels=5_000_000)(bigger).size == (3000, 1000)
    assert ImageDecoder(max_pixels=None)(bigger).size == (3000, 1000)


# -- files that cannot be used: all reported at once, before training ------------------
def test_start_up_scan_lists_every_bad_file(tree, cfg_factory):
    (tree / "train" / "a" / "zero.jpg").write_bytes(b"")
    (tree / "train" / "b" / "notes.png").write_text("this is text, not a PNG")
    (tree / "val" / "a" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    truncate(write_image(tree / "val" / "b" / "cut.png", size=(64, 64)), keep=0.6)
    with pytest.raises(DataError) as e:
        _folder(cfg_factory, tree)
    msg = str(e.value)
    assert msg.startswith("4 unusable image file(s) found before training")
    for name in ("zero.jpg", "notes.png", "garbage.jpg", "cut.png"):
        assert name in msg
    assert "data.on_bad_image=skip" in msg


def test_zero_byte_file_is_reported(tree, cfg_factory):
    (tree / "train" / "a" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"(?s)1 unusable.*empty.jpg: not a readable image"):
        _folder(cfg_factory, tree)


def test_non_image_file_with_image_extension_is_reported(tree, cfg_factory):
    (tree / "val" / "b" / "readme.jpg").write_text("hello")
    with pytest.raises(DataError, match=r"val: .*readme.jpg: not a readable image \(Unidentified"):
        _folder(cfg_factory, tree)


def test_truncated_jpeg_found_by_full_scan_only(tree, cfg_factory):
    truncate(write_jpeg(tree / "train" / "a" / "cut.jpg", size=(64, 64)))
    bundle = _folder(cfg_factory, tree)  # header scan: the header is intact
    assert any(p.endswith("cut.jpg") for p, _ in bundle.train.samples)
    with pytest.raises(DataError, match=r"cut.jpg: cannot decode image \(OSError: image file is truncated"):
        _folder(cfg_factory, tree, "data.scan=full")


def test_skip_policy_drops_and_counts(tree, cfg_factory, tmp_path, caplog):
    (tree / "train" / "a" / "zero.jpg").write_bytes(b"")
    (tree / "val" / "b" / "bad.png").write_text("nope")
    bundle = build_data(cfg_factory(["data=folder", f"data.root={tree}", "data.on_bad_image=skip"]).data,
                        bad_image_log=tmp_path / "bad_images.tsv")
    assert len(bundle.train) == 8 and len(bundle.val) == 4
    assert bundle.bad_image_counts() == {"bad_images_skipped_at_scan": 2, "bad_images_replaced": 0}
    rows = [line.split("\t") for line in (tmp_path / "bad_images.tsv").read_text().splitlines()]
    assert sorted(Path(r[1]).name for r in rows) == ["bad.png", "zero.jpg"] and rows[0][0] == "scan"
    assert "skipping 2 unusable image file(s)" in caplog.text


def test_file_going_bad_during_training_is_replaced_and_counted_across_workers(tree, cfg_factory):
    from paddle.io import DataLoader

    bundle = _folder(cfg_factory, tree)
    victim = bundle.train.samples[3][0]
    Path(victim).write_bytes(b"corrupted after the scan")
    loader = DataLoader(bundle.train, batch_size=4, num_workers=2, shuffle=False, return_list=True)
    labels = np.concatenate([y.numpy().reshape(-1) for _, y in loader])
    assert len(labels) == 8  # every batch full: the bad sample was replaced, nothing crashed
    assert labels[3] == bundle.train.samples[4][1]  # by the next sample
    assert bundle.bad_image_counts()["bad_images_replaced"] == 1  # counted in a worker, seen here
    assert "0 skipped at the start-up scan, 1 replaced during training" in bundle.bad_image_summary()


# -- list files: errors name the file and line ---------------------------------------
@pytest.fixture
def listed(tmp_path) -> Path:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_jpeg(tmp_path / "img" / name)
    (tmp_path / "val_list.txt").write_text("img/a.jpg 0\nimg/b.jpg 1\n")
    return tmp_path


def _list_error(cfg_factory, root, train_text: str, *extra) -> str:
    (root / "train_list.txt").write_text(train_text)
    with pytest.raises(DataError) as e:
        build_data(cfg_factory(["data=list", f"data.root={root}", *extra]).data)
    return str(e.value)


def test_list_missing_list_file(listed, cfg_factory):
    with pytest.raises(DataError, match=r"data.train_list='nope.txt': no such file \(looked at .*nope.txt"):
        build_data(cfg_factory(["data=list", f"data.root={listed}", "data.train_list=nope.txt"]).data)


def test_list_missing_image_names_list_line(listed, cfg_factory):
    msg = _list_error(cfg_factory, listed, "img/a.jpg 0\nimg/gone.jpg 1\n")
    assert "gone.jpg: no such file" in msg and f"[{listed / 'train_list.txt'}:2]" in msg


def test_list_label_not_an_integer(listed, cfg_factory):
    msg = _list_error(cfg_factory, listed, "img/a.jpg 0\nimg/b.jpg one\n")
    assert f"{listed / 'train_list.txt'}:2: label 'one' is not an integer" in msg


def test_list_label_out_of_range(listed, cfg_factory):
    (listed / "names.txt").write_text("0 cat\n1 dog\n")
    msg = _list_error(cfg_factory, listed, "img/a.jpg 0\nimg/b.jpg 1\nimg/c.jpg 2\n",
                      "data.class_names=names.txt")
    assert "train_list.txt:3: label 2 is out of range; labels must be below the number of classes (2)" in msg
    msg = _list_error(cfg_factory, listed, "img/a.jpg -1\n")
    assert "train_list.txt:1: label -1 is out of range" in msg


def test_list_empty_line_in_the_middle(listed, cfg_factory):
    msg = _list_error(cfg_factory, listed, "img/a.jpg 0\n\nimg/b.jpg 1\n")
    assert "train_list.txt:2: empty line" in msg


def test_list_line_with_a_missing_field_and_all_bad_lines_at_once(listed, cfg_factory):
    msg = _list_error(cfg_factory, listed, "img/a.jpg\nimg/b.jpg 1\nimg/c.jpg x\n")
    assert msg.startswith("2 bad line(s) in the label list")
    assert "train_list.txt:1: expected 'relative/path' 'label', got 'img/a.jpg'" in msg
    assert "train_list.txt:3: label 'x'" in msg
    msg = _list_error(cfg_factory, listed, "0;img/a.jpg\n1\n", "data=seed_list",
                      "data.train_list=train_list.txt", "data.val_list=train_list.txt")
    assert "train_list.txt:2: expected '<class_id>;<path>', got '1'" in msg


def test_bad_class_names_file(listed, cfg_factory):
    (listed / "names.txt").write_text("0 cat\n0 dog\nthree\n")
    msg = _list_error(cfg_factory, listed, "img/a.jpg 0\n", "data.class_names=names.txt")
    assert "names.txt:2: class id 0 appears twice" in msg and "names.txt:3: expected 'class_id name'" in msg


# -- splits and classes ---------------------------------------------------------------
def test_empty_split(listed, cfg_factory, tree):
    msg = _list_error(cfg_factory, listed, "\n\n")
    assert "train_list.txt: the label list has no samples" in msg
    for f in (tree / "val" / "a").iterdir():
        f.write_bytes(b"")
    for f in (tree / "val" / "b").iterdir():
        f.write_bytes(b"")
    with pytest.raises(DataError, match="the val split has no usable images left"):
        _folder(cfg_factory, tree, "data.on_bad_image=skip")


def test_class_folder_without_images(tree, cfg_factory):
    (tree / "train" / "c").mkdir()
    (tree / "val" / "c").mkdir()
    (tree / "val" / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"train: class folders without images: \['c'\].*data.classes"):
        _folder(cfg_factory, tree)


def test_train_and_val_classes_differ(tree, cfg_factory, listed):
    class_tree(tree / "val", {"a": 2, "b": 2, "z": 1})
    with pytest.raises(DataError, match=r"only in train: \[\], only in val: \['z'\]"):
        _folder(cfg_factory, tree)
    (listed / "val_list.txt").write_text("img/a.jpg 0\nimg/b.jpg 2\n")
    msg = _list_error(cfg_factory, listed, "img/a.jpg 0\nimg/c.jpg 1\n")
    assert "ids [2]) have val images but no train images" in msg


def test_single_tree_class_too_small_to_split(tmp_path, cfg_factory):
    root = class_tree(tmp_path / "pets", {"cat": 3, "dog": 1})
    with pytest.raises(DataError, match=r"fewer than 2 images.*\['dog \(1\)'\]"):
        _folder(cfg_factory, root)


# -- end to end: the counts reach metrics.json and the log ---------------------------
def test_run_records_skipped_and_replaced_images(tmp_path):
    root = tmp_path / "data"
    class_tree(root / "img", {"a": 6, "b": 6}, size=(32, 32))
    (root / "img" / "a" / "zero.jpg").write_bytes(b"")  # found by the scan, skipped
    truncate(write_jpeg(root / "img" / "b" / "cut.jpg", size=(64, 64)))  # fails in training
    rows = [f"img/{c}/{i:03d}.jpg {k}" for k, c in enumerate("ab") for i in range(6)]
    (root / "train_list.txt").write_text("\n".join(rows + ["img/a/zero.jpg 0", "img/b/cut.jpg 1"]) + "\n")
    (root / "val_list.txt").write_text("img/a/000.jpg 0\nimg/b/000.jpg 1\n")
    (root / "labels.txt").write_text("0 apple\n1 banana\n")
    out = tmp_path / "run"
    proc = run_cli(["model.scale=0.25", "data=list", f"data.root={root}", "data.class_names=labels.txt",
                    "data.image_size=32", "data.on_bad_image=skip", "trainer.epochs=1",
                    "trainer.batch_size=7", "trainer.num_workers=1", "trainer.verbose=0",
                    f"hydra.run.dir={out}"], cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["bad_images_skipped_at_scan"] == 1 and metrics["bad_images_replaced"] == 1
    assert metrics["train_images"] == 13
    assert (out / "class_names.txt").read_text() == "apple\nbanana\n"
    assert "1 skipped at the start-up scan, 1 replaced during training" in proc.stdout + proc.stderr
