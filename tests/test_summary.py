"""mbv2.summary on synthetic job dirs laid out as Hydra and mbv2.run write them
(`summary_jobs`): the reading rules (running, failed, missing, corrupt jobs), the CSV and
markdown tables, the plot file and the command line; `test_summary_study.py` pins what the
table and plot show of a study.

No paddle and no training: the job dirs are real YAML/JSON files in tmp_path, so these
tests run in well under a few seconds.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mbv2 import summary
from tests.summary_jobs import completed, make_job, make_sweep, read_csv


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)



def test_csv_rows_order_statuses_and_values(sweep: Path) -> None:
    result = summary.write_summary(sweep)
    assert result["csv"] == sweep / "summary.csv"
    rows = read_csv(result["csv"])
    assert list(rows[0]) == list(summary.CSV_COLUMNS)
    assert [r["job"] for r in rows] == [
        "model.scale=1.0,optim.lr=0.1",
        "model.scale=1.0,optim.lr=0.01",
        "model.scale=0.5,optim.lr=0.1",
        "model.scale=0.5,optim.lr=0.01",
        "model.scale=0.75,optim.lr=0.1",  # running, ranked by its accuracy so far
        "model.scale=1.4,optim.lr=0.1",
        "model.scale=0.25,optim.lr=0.1",
        "model.scale=0.35,optim.lr=0.1",
    ]
    statuses = [r["status"] for r in rows]
    assert statuses[:4] == ["completed"] * 4
    assert statuses[4] == "running"
    assert statuses[5] == "failed: RuntimeError: out of memory"
    assert statuses[6].startswith("unreadable: invalid JSON")
    assert statuses[7] == "no metrics"

    top = rows[0]
    assert top["overrides"] == "model.scale=1.0,optim.lr=0.1"
    assert float(top["scale"]) == 1.0
    assert float(top["lr"]) == 0.1
    assert top["optimizer"] == "momentum"
    assert int(top["params"]) == 2_200_000
    assert float(top["macs_m"]) == 80.0
    assert float(top["best_top1_pct"]) == pytest.approx(71.0)
    assert float(top["final_top1_pct"]) == pytest.approx(70.0)
    assert (top["epochs_completed"], top["epochs_planned"]) == ("10", "10")
    assert float(top["wall_s"]) == pytest.approx(123.4)
    assert float(top["img_per_s"]) == pytest.approx(812.5)

    # rows without metrics still show their config; unknown numbers are empty cells
    missing = rows[7]
    assert float(missing["scale"]) == 0.35
    assert missing["epochs_planned"] == "10"
    assert missing["best_top1_pct"] == missing["params"] == missing["epochs_completed"] == ""


def test_collect_returns_rows_in_best_order(sweep: Path) -> None:
    rows = summary.collect(sweep)
    assert [r.best_top1 for r in rows[:5]] == [0.71, 0.66, 0.62, 0.55, 0.40]
    assert rows[0].path == sweep / "model.scale=1.0,optim.lr=0.1"
    assert rows[0].settings["trainer.batch_size"] == 64  # ${data.batch} resolved
    assert rows[0].settings["model.bottleneck"] == [[1, 16, 1, 1], [6, 24, 2, 2]]
    failed = next(r for r in rows if r.status == "failed")
    assert failed.error == "RuntimeError: out of memory"


def test_markdown_has_table_counts_and_plot_link(sweep: Path) -> None:
    result = summary.write_summary(sweep)
    md = result["md"].read_text()
    assert "| job " in md and "best top-1 (%)" in md
    assert "71.00" in md and "failed: RuntimeError: out of memory" in md
    assert "8 jobs: 4 completed" in md
    assert "`data.name=digits`" in md and "`trainer.batch_size=64`" in md
    assert "![best top-1 vs MACs](summary.png)" in md
    # every table line has the same width: aligned for a terminal as well
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 8
    assert len({len(line) for line in table}) == 1


def test_png_written_and_opens(sweep: Path) -> None:
    result = summary.write_summary(sweep)
    assert result["png"] == sweep / "summary.png"
    with Image.open(result["png"]) as image:
        image.load()
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert 600 <= width <= 2000 and 400 <= height <= 1500
    assert colours is None or len(colours) > 10  # something was drawn


def test_main_prints_table(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert summary.main([str(sweep), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| job" in out and "| status" in out and "best top-1 (%)" in out
    assert "model.scale=1.0,optim.lr=0.1" in out
    assert "71.00" in out and "no metrics" in out
    assert "summary.csv" in out
    assert not (sweep / "summary.png").exists()


def test_sort_by_job_is_natural_and_by_macs_ascending(tmp_path: Path) -> None:
    for number, macs in (("10", 1_000_000), ("2", 3_000_000), ("1", 2_000_000)):
        make_job(tmp_path / number, 0.5, 0.1, completed(0.5, 0.5, 1, macs), overrides=[])
    by_job = summary.write_summary(tmp_path, plot=False, sort="job")["rows"]
    assert [r.job for r in by_job] == ["1", "2", "10"]
    by_macs = summary.sort_rows(by_job, "macs")
    assert [r.job for r in by_macs] == ["10", "1", "2"]
    with pytest.raises(ValueError, match="unknown sort key"):
        summary.sort_rows(by_job, "accuracy")


def test_pareto_front_known_example() -> None:
    points = [(1, 50), (2, 40), (2, 55), (3, 55), (4, 70), (0.5, 10), (5, 60)]
    assert summary.pareto_front(points) == [(0.5, 10), (1, 50), (2, 55), (4, 70)]
    assert summary.pareto_front([]) == []


def test_unresolvable_interpolation_falls_back_to_override(tmp_path: Path) -> None:
    job = make_job(
        tmp_path / "job",
        0.5,
        "${mbv2_scaled_lr:0.1}",
        completed(0.5, 0.5, 1, 1_000_000),
        overrides=["model.scale=0.5", "+optim.lr=0.025"],
    )
    (row,) = summary.collect(tmp_path)
    assert row.path == job
    assert row.lr == 0.025
    assert row.settings["optim.lr"] == 0.025


def test_single_job_dir_as_root(tmp_path: Path) -> None:
    job = make_job(tmp_path / "run", 0.5, 0.1, completed(0.6, 0.58, 700_000, 6_000_000))
    result = summary.write_summary(job)
    (row,) = read_csv(result["csv"])
    assert row["job"] == "."
    assert row["status"] == "completed"
    assert result["png"] == job / "summary.png" and result["png"].is_file()


def test_no_completed_job_writes_tables_and_no_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traceback = 'Traceback (most recent call last):\n  File "x.py"\nValueError: bad lr\n'
    make_job(tmp_path / "0", 0.5, 0.1, {"status": "running", "epochs_completed": 0})
    make_job(tmp_path / "1", 1.0, 0.1, {"status": "failed", "error": traceback})
    assert summary.main([str(tmp_path)]) == 0
    assert "no plot written" in capsys.readouterr().out
    assert not (tmp_path / "summary.png").exists()
    assert "no plot written" in (tmp_path / "summary.md").read_text()
    statuses = [r["status"] for r in read_csv(tmp_path / "summary.csv")]
    assert statuses == ["running", "failed: ValueError: bad lr"]


def test_optuna_best_params_line(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (sweep / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  model.scale: 1.0\n  optim.lr: 0.1\nbest_value: 0.71\n"
    )
    assert summary.main([str(sweep), "--no-plot"]) == 0
    line = "Optuna best in .: value=0.71 with model.scale=1.0, optim.lr=0.1"
    assert line in capsys.readouterr().out
    assert line in (sweep / "summary.md").read_text()


def test_missing_dir_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert summary.main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        summary.collect(missing)


def test_a_dir_that_cannot_be_written_still_shows_the_table(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sweep kept read-only (an archive, someone else's results): the comparison is
    printed all the same, the error names the file and the way out (--out), exit 1; with
    --out the files go there, and the sweep dir gets none of them."""
    import errno
    import os

    from mbv2.summary import report

    real_write_csv = report.write_csv

    def read_only(rows, path):
        if Path(path).parent == sweep:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_write_csv(rows, path)

    monkeypatch.setattr(report, "write_csv", read_only)
    assert summary.main([str(sweep), "--no-plot"]) == 1
    captured = capsys.readouterr()
    assert "| job" in captured.out and "wrote" not in captured.out
    assert (f"cannot write {sweep / 'summary.csv'} (Read-only file system); give --out"
            in captured.err)

    out = tmp_path / "elsewhere"
    assert summary.main([str(sweep), "--out", str(out)]) == 0
    assert f"wrote {out / 'summary.csv'}" in capsys.readouterr().out
    assert read_csv(out / "summary.csv") and (out / "summary.md").is_file()
    assert not (sweep / "summary.csv").exists() and not (sweep / "summary.md").exists()


def test_dir_without_jobs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert summary.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "no job directories" in err
    with pytest.raises(summary.NoJobsError):
        summary.write_summary(tmp_path / "empty")
    assert not (tmp_path / "empty" / "summary.csv").exists()
