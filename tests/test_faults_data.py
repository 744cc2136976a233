"""Adversarial data inputs: each one either loads as a user would expect, or stops before
anything is built with one sentence naming the file:line or config key and the fix, or
(legal but suspicious) logs one WARNING line naming files, lines and counts."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mbv2.data import DataError, build_data, write_label_lists
from tests.image_files import class_tree, write_jpeg


@pytest.fixture
def root(tmp_path) -> Path:
    """tmp/d/img/{a..f}.jpg, readable JPEGs; the lists are written by each test."""
    for name in "abcdef":
        write_jpeg(tmp_path / "d" / "img" / f"{name}.jpg", size=(16, 16))
    return tmp_path / "d"


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _build(cfg_factory, root: Path, train: str | bytes | None = None,
           val: str | bytes | None = "img/e.jpg 0\nimg/f.jpg 1\n", *extra, source: str = "list"):
    if train is not None:
        _write(root / "train_list.txt", train)
    if val is not None:
        _write(root / "val_list.txt", val)
    args = [f"data={source}", f"data.root={root}", "data.image_size=16"]
    if source == "seed_list":
        args += ["data.train_list=train_list.txt", "data.val_list=val_list.txt"]
    return build_data(cfg_factory(args + list(extra)).data)


def _error(cfg_factory, root: Path, *args, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        _build(cfg_factory, root, *args, **kwargs)
    return str(e.value)


def _folder(cfg_factory, root: Path, *extra):
    return build_data(cfg_factory(["data=folder", f"data.root={root}", "data.image_size=16",
                                   *extra]).data)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- the class count inferred from the labels ------------------------------------------
@pytest.mark.parametrize("typo", ["99999999", "150", "123456789012345678901234567890"])
def test_typo_label_stops_before_a_huge_head_is_built(root, cfg_factory, typo):
    msg = _error(cfg_factory, root, f"img/a.jpg 0\nimg/b.jpg 1\nimg/c.jpg {typo}\nimg/d.jpg 1\n")
    assert msg.startswith(f"{root / 'train_list.txt'}:3: label {int(typo)} would make "
                          f"{int(typo) + 1} classes")
    assert "only 3 distinct label(s)" in msg and "the largest label + 1" in msg
    assert "set data.num_classes=<K> or data.class_names=<file naming every class>" in msg


def test_typo_label_in_seed_list_names_its_line(root, cfg_factory):
    msg = _error(cfg_factory, root, "0;img/a.jpg\n1;img/b.jpg\n", "0;img/e.jpg\n5000;img/f.jpg\n",
                 source="seed_list")
    assert msg.startswith(f"{root / 'val_list.txt'}:2: label 5000 would make 5001 classes")


def test_typo_label_only_in_val_names_its_line(root, cfg_factory):
    msg = _error(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 1\n", "img/e.jpg 0\nimg/f.jpg 7\nimg/c.jpg 7\n")
    assert msg == (f"classes ['7'] (ids [7]) have val images but no train images (first at "
                   f"{root / 'val_list.txt'}:2); the model could never predict them: fix those "
                   f"labels or add train images of those classes")


def test_large_label_with_num_classes_given_is_allowed(root, cfg_factory, caplog):
    bundle = _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 150\n", "img/e.jpg 0\nimg/f.jpg 150\n",
                    "data.num_classes=151")
    assert bundle.num_classes == 151
    assert any("(ids [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]...) have no images" in w for w in _warnings(caplog))


def test_label_gaps_warn_with_the_missing_ids(root, cfg_factory, caplog):
    bundle = _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 1\nimg/c.jpg 5\n",
                    "img/e.jpg 0\nimg/f.jpg 5\n")
    assert bundle.num_classes == 6
    gap = [w for w in _warnings(caplog) if "used by no image" in w]
    assert gap == [("label ids [2, 3, 4] are used by no image: the class count 6 is the largest "
                    "label + 1, so 3 of the head's outputs are never trained; renumber the labels "
                    "0..K-1 without gaps, or name every class with data.class_names")]


def test_one_based_labels_warn_that_ids_start_at_0(root, cfg_factory, caplog):
    _build(cfg_factory, root, "img/a.jpg 1\nimg/b.jpg 2\n", "img/e.jpg 1\nimg/f.jpg 2\n")
    assert any("label ids [0] are used by no image" in w and "labels look 1-based" in w
               for w in _warnings(caplog))


# -- legal but suspicious: one warning line each ------------------------------------
def test_duplicate_lines_warn_with_line_numbers(root, cfg_factory, caplog):
    bundle = _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 1\nimg/./a.jpg 0\nimg/c.jpg 1\nimg/c.jpg 0\n")
    assert len(bundle.train) == 5  # legal: nothing dropped
    (dup,) = [w for w in _warnings(caplog) if "more than once" in w]
    assert "\n" not in dup
    assert dup.startswith(f"train list {root / 'train_list.txt'}: 2 image(s) listed more than "
                          f"once, 1 of them with different labels")
    assert "img/a.jpg on lines 1, 3" in dup and "img/c.jpg on lines 4, 5 (labels [0, 1])" in dup


def test_image_in_train_and_val_warns_with_count_and_paths(root, cfg_factory, caplog):
    _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 1\nimg/c.jpg 1\n", "img/a.jpg 0\nimg/c.jpg 1\n")
    (overlap,) = [w for w in _warnings(caplog) if "in both train" in w]
    assert overlap.startswith(f"2 image(s) are in both train {root / 'train_list.txt'} and val "
                              f"{root / 'val_list.txt'}, so val accuracy is partly measured on "
                              f"training images")
    assert overlap.endswith(f"{root / 'img' / 'a.jpg'}, {root / 'img' / 'c.jpg'}")


@pytest.mark.parametrize("source", ["list", "folder"])
def test_single_class_warns_that_top1_is_trivial(root, cfg_factory, caplog, tmp_path, source):
    if source == "list":
        bundle = _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 0\n", "img/e.jpg 0\n")
    else:
        bundle = _folder(cfg_factory, class_tree(tmp_path / "one", {"cat": 3}))
    assert bundle.num_classes == 1
    assert any(f"data {source} has a single class" in w and "top-1 accuracy is trivially 1.0" in w
               for w in _warnings(caplog))


def test_class_without_val_images_still_warns(root, cfg_factory, caplog):
    _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 1\n", "img/e.jpg 0\n")
    assert "classes without val images: ['1']" in _warnings(caplog)


def test_unused_and_repeated_class_names_warn(root, cfg_factory, caplog):
    _write(root / "names.txt", "0 cat\n1 dog\n2 cat\n3 emu\n")
    _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 1\nimg/c.jpg 2\n", "img/e.jpg 0\nimg/f.jpg 1\n",
           "data.class_names=names.txt")
    warnings = _warnings(caplog)
    assert ("classes 'emu' (ids [3]) have no images in train or val; their outputs are never "
            "trained") in warnings
    assert any(w.startswith(f"data.class_names {root / 'names.txt'}: 1 class name(s) given to more "
                            f"than one id") and "'cat' (ids 0, 2)" in w for w in warnings)


# -- hidden and system folders in a class tree -----------------------------------------
@pytest.mark.parametrize("junk", [".ipynb_checkpoints", ".thumbs", "__pycache__", "__MACOSX", "lost+found"])
def test_hidden_and_system_folders_are_not_classes(tmp_path, cfg_factory, caplog, junk):
    caplog.set_level(logging.INFO, logger="mbv2.data.folders")
    tree = class_tree(tmp_path / "pets", {"cat": 3, "dog": 3, junk: 2})
    write_jpeg(tree / "cat" / "._000.jpg")  # macOS resource fork beside a real image
    bundle = _folder(cfg_factory, tree)
    assert bundle.class_names == ["cat", "dog"]
    assert len(bundle.train) + len(bundle.val) == 6
    (info,) = [r.getMessage() for r in caplog.records if "hidden or system" in r.getMessage()]
    assert info.startswith(f"{tree}: skipped 2 hidden or system entries")
    assert junk in info and "cat/._000.jpg" in info


def test_hidden_folders_skipped_in_train_and_val_and_by_the_lists_command(tmp_path):
    tree = tmp_path / "t"
    for split in ("train", "val"):
        class_tree(tree / split, {"a": 2, "b": 2, ".ipynb_checkpoints": 1})
    written = write_label_lists(tree, tmp_path / "out")
    assert written["labels"].read_text() == "0 a\n1 b\n"
    assert ".ipynb" not in written["train"].read_text()


def test_only_hidden_folders_is_an_error_naming_them(tmp_path, cfg_factory):
    tree = class_tree(tmp_path / "t", {".git": 2, ".cache": 2})
    with pytest.raises(DataError, match=r"no class folders \(only hidden ones or broken links: "
                                        r"\.cache, \.git\); put images in .*/<class>/"):
        _folder(cfg_factory, tree)


def test_a_hidden_folder_named_in_data_classes_is_used(tmp_path, cfg_factory):
    tree = class_tree(tmp_path / "t", {".odd": 3, "b": 3})
    assert _folder(cfg_factory, tree, "data.classes=[.odd,b]").class_names == [".odd", "b"]


def test_symlink_loops_and_dangling_links_are_skipped_with_a_warning(tmp_path, cfg_factory, caplog):
    tree = class_tree(tmp_path / "t", {"a": 3, "b": 3})
    (tree / "loop").symlink_to(tree / "loop")  # a class folder that is a loop
    (tree / "a" / "self.jpg").symlink_to(tree / "a" / "self.jpg")
    (tree / "b" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tree / "a" / "up").symlink_to(tree)  # a loop through a directory: not followed
    bundle = _folder(cfg_factory, tree)
    assert bundle.class_names == ["a", "b"] and len(bundle.train) + len(bundle.val) == 6
    (w,) = [w for w in _warnings(caplog) if "broken symbolic link" in w]
    assert w == (f"{tree}: skipped 3 broken symbolic link(s) (missing target or a loop): "
                 f"loop, a/self.jpg, b/gone.jpg")


def test_folder_with_only_non_image_files_says_what_it_found(tmp_path, cfg_factory):
    tree = class_tree(tmp_path / "t", {"a": 3})
    (tree / "b").mkdir()
    (tree / "b" / "scan.tif.txt").write_text("x")
    (tree / "b" / "sub").mkdir()
    with pytest.raises(DataError, match=r"class folders without images: \['b'\] \(looked for .jpg.*; "
                                        r"found only scan.tif.txt, sub/\); add images or leave them "
                                        r"out with data.classes"):
        _folder(cfg_factory, tree)


# -- files that are not what the key says -------------------------------------------
@pytest.mark.parametrize("fmt", ["list", "seed_list"])
def test_empty_class_names_file(root, cfg_factory, fmt):
    _write(root / "names.txt", "\n\n")
    train = "img/a.jpg 0\n" if fmt == "list" else "0;img/a.jpg\n"
    msg = _error(cfg_factory, root, train, train, "data.class_names=names.txt", source=fmt)
    assert msg.startswith(f"data.class_names: {root / 'names.txt'} has no class names; write one ")
    assert msg.endswith("or leave data.class_names unset to number the classes 0..K-1 from the labels")


def test_class_names_file_with_fewer_names_than_labels(root, cfg_factory):
    _write(root / "names.txt", "cat\ndog\n")
    msg = _error(cfg_factory, root, "0;img/a.jpg\n3;img/b.jpg\n", "0;img/e.jpg\n",
                 "data.class_names=names.txt", source="seed_list")
    assert (f"train_list.txt:2: label 3 is out of range; labels must be below the number of "
            f"classes (2) that data.class_names='names.txt' names; add the missing names to "
            f"{root / 'names.txt'} or fix the label") in msg


@pytest.mark.parametrize("text, problem", [
    ("cat\n\ndog\n", "names.txt:2: empty line, so class 1 has no name; write its name or remove the line"),
    ("0 cat\n2 dog\n", "class ids must be 0..1 without gaps; missing [1], extra [2]"),
    ("0 cat\n²1 dog\n", "names.txt:2: expected 'class_id name', got '²1 dog'"),
])
def test_bad_class_names_lines(root, cfg_factory, text, problem):
    _write(root / "names.txt", text)
    source = "seed_list" if "cat\n\n" in text else "list"
    lists = (("0;img/a.jpg\n", "0;img/e.jpg\n") if source == "seed_list"
             else ("img/a.jpg 0\n", "img/e.jpg 0\n"))
    msg = _error(cfg_factory, root, *lists, "data.class_names=names.txt", source=source)
    assert msg.startswith("bad class names file (data.class_names):") and problem in msg


@pytest.mark.parametrize("key", ["train_list", "val_list", "class_names"])
def test_list_file_that_is_a_directory(root, cfg_factory, key):
    (root / "lists").mkdir()
    _write(root / "lists" / "train.txt", "img/a.jpg 0\n")
    msg = _error(cfg_factory, root, "img/a.jpg 0\n", "img/e.jpg 0\n", f"data.{key}=lists")
    assert msg == (f"data.{key}='lists': {root / 'lists'} is a directory, not a list file; "
                   f"point data.{key} at the file itself (it holds train.txt)")


@pytest.mark.parametrize("junk, what", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "train_list.txt:3 holds a NUL byte, so it is a binary file"),
    (b"img/a.jpg 0\nimg/caf\xe9.jpg 1\n",
     "train_list.txt:2 is not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    (bytes(range(128, 256)) * 4, "train_list.txt:1 is not UTF-8 text (byte 0x80)"),
])
def test_list_file_that_is_not_utf8_text(root, cfg_factory, junk, what):
    msg = _error(cfg_factory, root, junk)
    assert msg.startswith("data.train_list: ") and what in msg and "data.train_list" in msg.split(";")[-1]


@pytest.mark.parametrize("source, need", [
    ("list", "point it at the directory the image paths in data.train_list and data.val_list start from"),
    ("folder", "point it at the directory holding train/ and val/, or one folder per class"),
])
def test_data_root_that_is_a_file(root, cfg_factory, source, need):
    for name, hint in (("notes.txt", need), ("photos.zip", "unpack it and point it at the unpacked folder")):
        _write(root / name, "x")
        with pytest.raises(DataError) as e:
            build_data(cfg_factory([f"data={source}", f"data.root={root / name}"]).data)
        assert str(e.value) == f"data.root={str(root / name)!r} is a file, not a directory; {hint}"


def test_empty_list_file(root, cfg_factory):
    msg = _error(cfg_factory, root, "")
    assert msg == (f"{root / 'train_list.txt'}: the label list has no samples (data.train_list); "
                   f"write one 'path label' line per image")


# -- lines: what works, what stops ---------------------------------------------------
def test_bom_crlf_tabs_and_utf16_lists_load(root, cfg_factory):
    bundle = _build(cfg_factory, root, "\ufeffimg/a.jpg\t0\r\nimg/b.jpg\t 1 \r\n\r\n",
                    "img/e.jpg\t0\r\nimg/f.jpg\t1", "data.delimiter=tab")
    assert [lab for _, lab in bundle.train.samples] == [0, 1]
    bundle = _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 1\n".encode("utf-16"))
    assert [Path(p).name for p, _ in bundle.train.samples] == ["a.jpg", "b.jpg"]


def test_unicode_paths_and_paths_with_the_delimiter_load(root, cfg_factory):
    write_jpeg(root / "img" / "猫 tabby.jpg", size=(16, 16))
    write_jpeg(root / "img" / "a;b é.jpg", size=(16, 16))
    bundle = _build(cfg_factory, root, "img/猫 tabby.jpg 0\nimg/b.jpg 1\n")
    assert bundle.train.samples[0] == (str(root / "img" / "猫 tabby.jpg"), 0)
    bundle = _build(cfg_factory, root, "0;img/a;b é.jpg\n1;img/b.jpg\n", "0;img/e.jpg\n1;img/f.jpg\n",
                    source="seed_list")
    assert bundle.train.samples[0] == (str(root / "img" / "a;b é.jpg"), 0)


def test_signed_and_zero_padded_labels_are_integers(root, cfg_factory):
    bundle = _build(cfg_factory, root, "img/a.jpg +1\nimg/b.jpg  01\nimg/c.jpg 00\n")
    assert [lab for _, lab in bundle.train.samples] == [1, 1, 0]


@pytest.mark.parametrize("label, problem", [
    ("1.0", "label '1.0' is not an integer; write it as 1"),
    ("1_0", "label '1_0' is not an integer"),
    ("\u0663", "label '\u0663' is not an integer"),  # an Arabic-Indic 3, which int() takes
    ("0x1", "label '0x1' is not an integer"),
    ("-1", "label -1 is out of range; labels must be >= 0 (class ids count from 0)"),
])
def test_labels_that_are_not_class_ids(root, cfg_factory, label, problem):
    msg = _error(cfg_factory, root, f"img/a.jpg 0\nimg/b.jpg {label}\n")
    assert f"{root / 'train_list.txt'}:2: {problem}" in msg


@pytest.mark.parametrize("line, hint", [
    ("img/a.jpg\t0", "; the line is split by tab: set data.delimiter=tab"),
    ("img/my photo.jpg\t0", "; the line is split by tab: set data.delimiter=tab"),
    ("img/a.jpg,0", "; the line is split by ',': set data.delimiter=','"),
])
def test_wrong_delimiter_says_which_one_to_set(root, cfg_factory, line, hint):
    msg = _error(cfg_factory, root, f"img/b.jpg 1\n{line}\n")
    assert "train_list.txt:2: " in msg and msg.endswith(hint)


def test_seed_line_written_path_first_and_a_header_line(root, cfg_factory):
    msg = _error(cfg_factory, root, "0;img/a.jpg\nimg/b.jpg;1\n", "0;img/e.jpg\n", source="seed_list")
    assert msg.endswith("train_list.txt:2: label 'img/b.jpg' is not an integer; the class id comes first")
    msg = _error(cfg_factory, root, "path label\nimg/a.jpg 0\n")
    assert msg.endswith("train_list.txt:1: label 'label' is not an integer; if this is a header "
                        "line, remove it")


@pytest.mark.parametrize("listed, reason", [
    ("img", "img: is a directory, not an image file"),
    ("img\\a.jpg", "img\\a.jpg: no such file; write paths with '/', not '\\'"),
    ("img/zero.jpg", "zero.jpg: not a readable image"),
])
def test_listed_path_that_is_no_image_names_its_line(root, cfg_factory, listed, reason):
    _write(root / "img" / "zero.jpg", b"")
    msg = _error(cfg_factory, root, f"img/a.jpg 0\n{listed} 1\n")
    assert msg.startswith("1 unusable image file(s) found before training")
    assert reason in msg and f"[{root / 'train_list.txt'}:2]" in msg


def test_importing_the_errors_module_does_not_load_paddle():
    code = "import sys, mbv2.data.errors; print('paddle' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_clean_lists_log_no_warning(root, cfg_factory, caplog):
    _write(root / "names.txt", "0 cat\n1 dog\n")
    bundle = _build(cfg_factory, root, "img/a.jpg 0\nimg/b.jpg 1\nimg/c.jpg 0\n", "img/e.jpg 0\nimg/f.jpg 1\n",
                    "data.class_names=names.txt")
    assert bundle.class_names == ["cat", "dog"] and _warnings(caplog) == []


def test_class_names_and_num_classes_that_disagree(root, cfg_factory):
    _write(root / "names.txt", "0 cat\n1 dog\n")
    msg = _error(cfg_factory, root, "img/a.jpg 0\n", "img/e.jpg 0\n", "data.class_names=names.txt",
                 "data.num_classes=3")
    assert msg == ("data.class_names has 2 names but data.num_classes=3; make them agree, or leave "
                   "data.num_classes unset")
