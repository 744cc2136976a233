"""Adversarial cases outside the data path (those are in test_faults_data.py): bad config
values and arguments, crafted run dirs and checkpoints, resumes that go wrong. Each asserts
the sentence a user gets (the key or file, and what to do) or the data that was kept."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, TINY, run_cli
from tests.image_files import write_jpeg

pytestmark = pytest.mark.slow


# -- config values: a sentence naming the key, before anything is built ----------------------
@pytest.mark.parametrize("override,key,want", [
    ("model.scale=100", "model.scale", "<= 8"),
    ("data.image_size=100000", "data.image_size", "between 8 and 2048"),
    ("trainer.batch_size=0", "trainer.batch_size", "between 1 and 65536"),
    ("trainer.batch_size=10000000", "trainer.batch_size", "between 1 and 65536"),
    ("trainer.early_stop_patience=0", "trainer.early_stop_patience", ">= 1"),
    ("optim.lr=0", "optim.lr", "> 0"),
])
def test_out_of_range_values_name_the_key(cfg_factory, override, key, want):
    from mbv2.config import ConfigValueError, check_config

    with pytest.raises(ConfigValueError) as e:
        check_config(cfg_factory([override]))
    assert key in str(e.value) and want in str(e.value)


def test_warmup_longer_than_the_run_is_a_warning_naming_the_key(cfg_factory, caplog):
    from mbv2.config import check_config

    with caplog.at_level("WARNING", logger="mbv2.config"):
        check_config(cfg_factory(["trainer.epochs=3", "sched.warmup_epochs=5"]))
    assert "sched.warmup_epochs=5.0 is not shorter than trainer.epochs=3" in caplog.text


def test_gpu_on_a_machine_without_one_is_a_sentence():
    import paddle

    from mbv2.runtime import DeviceError, select_device

    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match=r"trainer.device=gpu: this Paddle .* use trainer.device=cpu"):
        select_device("gpu")


# -- a trained run to break things on ----------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    run_cli([*TINY, "trainer.epochs=3", "trainer.keep_top_k=3", f"hydra.run.dir={run_dir}"], cwd=ROOT)
    return run_dir


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, symlinks=True)
    return dst


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("run.log", ".mbv2.lock")}


# -- entry-point arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("module,args,want", [
    ("mbv2.eval", ["batch_size=0"], "mbv2.eval: batch_size=0 must be >= 1"),
    ("mbv2.eval", ["out=FILE"], "is a file; give a directory"),
    ("mbv2.export", ["out=FILE"], "is a file; give a directory"),
    ("mbv2.predict", ["inputs=IMG", "topk=0"], "mbv2.predict: topk=0 must be >= 1"),
    ("mbv2.predict", ["inputs=IMG", "out=FILE"], "is a file; give a directory"),
    ("mbv2.eval", ["device=gpu"], "device=gpu: this Paddle"),
])
def test_wrong_arguments_are_one_sentence(run, tmp_path, module, args, want):
    import paddle

    if "device=gpu" in args and paddle.is_compiled_with_cuda():
        pytest.skip("this Paddle has CUDA")
    (tmp_path / "file.txt").write_text("x")
    img = write_jpeg(tmp_path / "img.jpg")
    key = "model" if module == "mbv2.predict" else "ckpt"
    args = [a.replace("FILE", str(tmp_path / "file.txt")).replace("IMG", str(img)) for a in args]
    proc = run_cli([f"{key}={run}", *args], cwd=tmp_path, module=module, check=False)
    assert proc.returncode != 0 and want in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_dir_that_is_a_file_is_a_sentence(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli([*TINY, f"hydra.run.dir={tmp_path / 'file' / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"{tmp_path / 'file'} is a file, not a directory" in proc.stderr


def test_a_checkpoint_the_disk_refuses_fails_the_run_with_a_sentence(tmp_path):
    """A real write failure, from the kernel: the run's file-size limit (RLIMIT_FSIZE, below
    the checkpoint's ~2 MB, above every other file of the run) makes the checkpoint's write
    fail with EFBIG, as a full disk fails it with ENOSPC. The run ends failed with the
    file, the reason and what to do; no partial or temporary file is left; once the
    limit is gone the same command trains."""
    import resource
    import subprocess
    import sys

    from mbv2.ops.depthwise import load_kernel

    load_kernel()  # built (or found) now, so the limited run only loads the op library
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.epochs=2", f"hydra.run.dir={run_dir}"]
    limit = 1_500_000  # bytes a file; Python ignores SIGXFSZ, so the write fails instead

    proc = subprocess.run([sys.executable, "-m", "mbv2.run", *args], cwd=tmp_path,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (f"{run_dir / 'checkpoints' / 'last.pdckpt'}: could not write the epoch 1 checkpoint: "
            f"File too large; the run saved no checkpoint") in proc.stderr
    assert "run the same command again" in proc.stderr
    assert list((run_dir / "checkpoints").iterdir()) == []
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "CheckpointSaveError" in metrics["error"]
    assert "could not write the epoch 1 checkpoint" in (run_dir / "run.log").read_text()

    run_cli(args, cwd=tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 2


def test_an_export_the_disk_truncates_fails_and_keeps_the_export_there(run, tmp_path):
    """Paddle writes the parameters without checking the write: under a file-size limit
    (RLIMIT_FSIZE, EFBIG, as a full disk gives ENOSPC) the .pdiparams is cut short and
    Paddle reports nothing. The export runs the model back before replacing anything, so
    it fails with a sentence and the earlier export is byte for byte as it was."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "export"
    run_cli([f"ckpt={run}", f"out={out}"], cwd=tmp_path, module="mbv2.export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert (out / "inference.pdiparams").stat().st_size > 600_000
    limit = 500_000
    proc = subprocess.run([sys.executable, "-m", "mbv2.export", f"ckpt={run}", f"out={out}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "mbv2.export: the model it wrote" in proc.stderr and "is not whole" in proc.stderr
    assert f"{out} was left as it was" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging dir left


@pytest.fixture
def read_only_copy(run, tmp_path):
    """A copy of the trained run that cannot be written: on a tmpfs remounted read-only
    where this process may mount (root here), else (not root) by permissions; skipped
    where neither is possible."""
    import subprocess

    where = tmp_path / "ro"
    where.mkdir()
    mounted = False
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(where)],
                          capture_output=True).returncode != 0:
            pytest.skip("root without mount permission: no way to make a read-only dir")
        mounted = True
    copy = where / "run"
    shutil.copytree(run, copy, symlinks=True)
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    else:
        for p in [copy, *copy.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        where.chmod(0o555)
    try:
        yield copy
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], check=False)
        else:
            where.chmod(0o755)
            for p in [copy, *copy.rglob("*")]:
                p.chmod(0o755)


def test_a_read_only_run_dir_is_a_sentence_for_every_tool(read_only_copy, tmp_path):
    """eval/export write into the run dir by default, a resume continues there, and a new
    run under it is refused: each says so before any work, naming the dir and the way out;
    with out= elsewhere eval works and leaves the read-only record alone."""
    ro = read_only_copy
    cases = [
        ("mbv2.eval", [f"ckpt={ro}"], f"mbv2.eval: cannot write {ro / 'eval'}, the default out= "
                                      f"inside the run dir (Read-only file system); give out="),
        ("mbv2.export", [f"ckpt={ro}"], f"mbv2.export: cannot write {ro / 'export'}"),
        ("mbv2.run", [f"trainer.resume={ro}"], f"trainer.resume: the run dir {ro} cannot be "
                                               f"written (Read-only file system)"),
        ("mbv2.run", [*TINY, f"hydra.run.dir={ro / 'new'}"], f"hydra.run.dir={ro / 'new'}: {ro} "
                                                             f"cannot be written"),
    ]
    for module, args, want in cases:
        proc = run_cli(args, cwd=tmp_path, module=module, check=False)
        if os.geteuid() != 0:  # permissions, not a read-only mount
            want = want.replace("Read-only file system", "Permission denied")
        assert proc.returncode != 0 and want in proc.stderr, (module, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, module
    before = _snapshot(ro)
    proc = run_cli([f"ckpt={ro}", f"out={tmp_path / 'ev'}"], cwd=tmp_path, module="mbv2.eval")
    assert (tmp_path / "ev" / "eval.json").is_file()
    assert "cannot be written (read-only); the confusion matrix is in the PNG only" in proc.stderr
    assert _snapshot(ro) == before


# -- crafted run dirs and checkpoints: nothing in them runs ------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_checkpoints_hold_no_pickle(run):
    ckpt = run / "checkpoints" / "last.pdckpt"
    with np.load(ckpt, allow_pickle=False) as npz:  # raises on any object array
        assert "model/conv1._conv.weight" in npz.files and "__json__" in npz.files
        assert all(npz[k].dtype != object for k in npz.files)


@pytest.mark.parametrize("module", ["mbv2.eval", "mbv2.export", "mbv2.predict", "mbv2.run"])
def test_a_crafted_pickle_checkpoint_is_refused_and_runs_nothing(run, tmp_path, module):
    crafted = _copy(run, tmp_path)
    _Evil.marker = tmp_path / "pwned"
    payload = {"format": 1, "model": {}, "meta": {"epoch": 1}, "x": _Evil()}
    (crafted / "checkpoints" / "last.pdckpt").write_bytes(pickle.dumps(payload))
    args = {"mbv2.eval": [f"ckpt={crafted}"], "mbv2.export": [f"ckpt={crafted}"],
            "mbv2.predict": [f"model={crafted}", f"inputs={write_jpeg(tmp_path / 'a.jpg')}"],
            "mbv2.run": [f"trainer.resume={crafted}"]}[module]
    proc = run_cli(args, cwd=tmp_path, module=module, check=False)
    assert proc.returncode != 0
    assert "earlier pickle format: reading it would run any code" in proc.stderr
    assert "MBV2_TRUST_PICKLE=1" in proc.stderr
    assert not _Evil.marker.exists()


def test_resume_replays_only_the_runs_own_config_keys(run, tmp_path):
    from mbv2.rundirs import resume_argv

    crafted = _copy(run, tmp_path)
    overrides = yaml.safe_load((crafted / ".hydra" / "overrides.yaml").read_text())
    overrides += ["hydra.run.dir=/somewhere/else", "hydra.callbacks.x._target_=os.system",
                  "+hydra.job.env_set.LD_PRELOAD=/tmp/x.so"]
    (crafted / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    argv = resume_argv(["mbv2.run", f"trainer.resume={crafted}"])
    replayed = argv[1:]
    assert "model.scale=0.25" in replayed
    hydra_keys = [a for a in replayed if "hydra." in a.split("=", 1)[0]]
    assert sorted(k.split("=", 1)[0] for k in hydra_keys) == ["hydra.output_subdir", "hydra.run.dir"]
    assert f"hydra.run.dir='{crafted}'" in replayed  # the run's own dir, not the crafted one


# -- resumes that go wrong: the run dir stays as it was ----------------------------------------
def test_failed_resume_leaves_the_run_dir_as_it_was(run, tmp_path):
    victim = _copy(run, tmp_path)
    before = _snapshot(victim)
    proc = run_cli([f"trainer.resume={victim}", "model.scale=0.5"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "does not fit the model this config builds" in proc.stderr
    assert "a model.* setting differs" in proc.stderr and "nothing was written" in proc.stderr
    assert _snapshot(victim) == before  # .hydra/, config_resolved.yaml, metrics, checkpoints


def test_resume_from_an_earlier_epoch_keeps_the_later_checkpoints(run, tmp_path):
    victim = _copy(run, tmp_path)
    best_before = (victim / "checkpoints" / "best.pdckpt").read_bytes()
    last_before = (victim / "checkpoints" / "last.pdckpt").read_bytes()
    proc = run_cli([f"trainer.resume={victim}/checkpoints/epoch_0001.pdckpt", "optim.lr=1e-4"],
                   cwd=tmp_path)
    (aside,) = (victim / "checkpoints").glob("superseded-*")
    kept = {p.name: p.read_bytes() for p in aside.iterdir()}
    assert kept["last.pdckpt"] == last_before and kept["best.pdckpt"] == best_before
    assert {"epoch_0002.pdckpt", "epoch_0003.pdckpt", "records.mbv2.log", "metrics.json"} <= set(kept)
    assert "are kept in" in proc.stdout + proc.stderr
    m = json.loads((victim / "metrics.json").read_text())
    assert m["status"] == "completed" and m["resumed"][-1]["epoch"] == 1


def test_resumes_leave_no_temporary_files(run, tmp_path):
    victim = _copy(run, tmp_path)
    for epochs in (4, 5):  # each resume extends the run by one epoch
        proc = run_cli([f"trainer.resume={victim}", f"trainer.epochs={epochs}"], cwd=tmp_path)
        assert "the LR jumps at epoch" in proc.stdout + proc.stderr  # the schedule changed
    leftovers = [p.name for p in victim.rglob("*.tmp")]
    assert leftovers == []
    assert json.loads((victim / "metrics.json").read_text())["epochs_completed"] == 5


# -- weights and files that would give wrong answers ---------------------------------------------
def test_non_finite_weights_never_reach_a_checkpoint():
    import paddle

    from mbv2.model import MobileNetV2
    from mbv2.train.callbacks import NonFiniteLossError, _check_weights_finite

    net = MobileNetV2(class_num=3, scale=0.25)
    _check_weights_finite(net, 1)  # finite: fine
    w = net.conv1._conv.weight
    w.set_value(paddle.full(w.shape, float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"hold NaN/inf after epoch 2 \(first: conv1._conv.weight\)"):
        _check_weights_finite(net, 2)


def test_pretrained_of_another_width_is_refused_with_the_fix(tmp_path):
    import paddle

    from mbv2.model import MobileNetV2, load_pretrained

    path = tmp_path / "MobileNetV2_pretrained.pdparams"
    paddle.save(MobileNetV2(class_num=1000, scale=1.0).state_dict(), str(path))
    with pytest.raises(ValueError) as e:
        load_pretrained(MobileNetV2(class_num=10, scale=0.5), str(path))
    text = str(e.value)
    assert "backbone tensors fit this model" in text and "model.scale" in text and "e.g. 1" in text


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folder") / "data"
    for c, name in enumerate(("cat", "dog")):
        for split, n in (("train", 8), ("val", 4)):
            for i in range(n):
                write_jpeg(root / split / name / f"{i}.jpg", size=(36, 36), color=(40 + 150 * c, 60, 90))
    run_dir = root.parent / "run"
    run_cli([*TINY, "trainer.epochs=1", "data=folder", f"data.root={root}", "data.image_size=32",
             f"hydra.run.dir={run_dir}"], cwd=ROOT)
    return run_dir, root


def test_eval_with_the_class_names_swapped_is_refused(folder_run):
    run_dir, _ = folder_run
    proc = run_cli([f"ckpt={run_dir}", "data.classes=[dog,cat]"], cwd=ROOT, module="mbv2.eval",
                   check=False)
    assert proc.returncode != 0 and "in another order" in proc.stderr and "class_names.txt" in proc.stderr


def test_eval_on_other_classes_of_the_same_count_is_refused(folder_run, tmp_path):
    run_dir, _ = folder_run
    other = tmp_path / "other"
    for c, name in enumerate(("car", "bus")):
        for split in ("train", "val"):
            for i in range(2):
                write_jpeg(other / split / name / f"{i}.jpg", size=(36, 36))
    proc = run_cli([f"ckpt={run_dir}", f"data.root={other}"], cwd=ROOT, module="mbv2.eval", check=False)
    assert proc.returncode != 0
    assert "are not the classes" in proc.stderr and "bus" in proc.stderr
