"""mbv2.summary on synthetic job dirs laid out as Hydra and mbv2.run write them.

No paddle and no training: the job dirs are real YAML/JSON files in tmp_path, so these
tests pin the reading rules (running, failed, missing, corrupt jobs), the table and the
plot in well under a few seconds.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mbv2 import summary

CONFIG = """\
model:
  name: mobilenet_v2
  scale: {scale}
  bottleneck:
    - [1, 16, 1, 1]
    - [6, 24, 2, 2]
optim:
  name: momentum
  lr: {lr}
  weight_decay: 4.0e-05
sched:
  name: cosine
trainer:
  epochs: 10
  batch_size: ${{data.batch}}
data:
  name: {data}
  image_size: {image_size}
  batch: 64
run_dir: ${{hydra:runtime.output_dir}}
"""


def make_job(
    path: Path,
    scale: float | str,
    lr: float | str,
    metrics: dict[str, Any] | str | None,
    overrides: list[str] | None = None,
    data: str = "digits",
    image_size: int = 32,
) -> Path:
    """A Hydra job dir: .hydra/config.yaml, .hydra/overrides.yaml and maybe metrics.json.

    metrics may be a dict (valid JSON), a str (written verbatim) or None (no file).
    """
    (path / ".hydra").mkdir(parents=True)
    config = CONFIG.format(scale=scale, lr=lr, data=data, image_size=image_size)
    (path / ".hydra" / "config.yaml").write_text(config)
    if overrides is None:
        overrides = [f"model.scale={scale}", f"optim.lr={lr}"]
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if isinstance(metrics, dict):
        (path / "metrics.json").write_text(json.dumps(metrics))
    elif isinstance(metrics, str):
        (path / "metrics.json").write_text(metrics)
    return path


def completed(best: float, final: float, params: int, macs: int) -> dict[str, Any]:
    return {
        "status": "completed",
        "best_eval_acc_top1": best,
        "final_eval_acc_top1": final,
        "best_epoch": 9,
        "epochs_completed": 10,
        "epochs_planned": 10,
        "params_trainable": params,
        "macs": macs,
        "image_size": 32,
        "train_images_per_sec": 812.5,
        "wall_seconds": 123.4,
        "run_name": "x",
    }


# (dir, scale, lr, best, final, params, macs): a 2 widths x 2 LRs grid
GRID = [
    ("model.scale=0.5,optim.lr=0.1", 0.5, 0.1, 0.62, 0.60, 700_000, 6_000_000),
    ("model.scale=0.5,optim.lr=0.01", 0.5, 0.01, 0.55, 0.54, 700_000, 6_000_000),
    ("model.scale=1.0,optim.lr=0.1", 1.0, 0.1, 0.71, 0.70, 2_200_000, 80_000_000),
    ("model.scale=1.0,optim.lr=0.01", 1.0, 0.01, 0.66, 0.65, 2_200_000, 80_000_000),
]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep still running: 4 completed, 1 failed, 1 running, 1 unstarted, 1 corrupt."""
    root = tmp_path / "sweeps" / "2024-05-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for name, scale, lr, best, final, params, macs in GRID:
        make_job(root / name, scale, lr, completed(best, final, params, macs))
    make_job(
        root / "model.scale=1.4,optim.lr=0.1",
        1.4,
        0.1,
        {
            "status": "failed",
            "error": "RuntimeError: out of memory\nwhile allocating 2 GiB",
            "epochs_completed": 1,
            "epochs_planned": 10,
        },
    )
    make_job(
        root / "model.scale=0.75,optim.lr=0.1",
        0.75,
        0.1,
        {
            "status": "running",
            "best_eval_acc_top1": 0.40,
            "epochs_completed": 2,
            "epochs_planned": 10,
            "macs": 40_000_000,
        },
    )
    make_job(root / "model.scale=0.35,optim.lr=0.1", 0.35, 0.1, None)
    make_job(root / "model.scale=0.25,optim.lr=0.1", 0.25, 0.1, '{"status": "compl')
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


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


# ----------------------------------------------------------------------------- study


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def header_of(table: list[str]) -> list[str]:
    return [cell.strip() for cell in table[0].strip("|").split("|")]


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each figure saved while the test runs shows: its title, legend, texts, and
    each line's label, marker and points (the PNG itself is hard to assert on)."""
    from matplotlib.figure import Figure

    figures: list[dict[str, Any]] = []
    save = Figure.savefig

    def record(fig: Figure, *args: Any, **kwargs: Any) -> None:
        (ax,) = fig.axes
        legend = ax.get_legend()
        figures.append(
            {
                "title": ax.get_title(),
                "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
                "texts": [t.get_text() for t in ax.texts],
                "lines": [
                    (line.get_label(), line.get_marker(),
                     [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())])
                    for line in ax.lines
                ],
            }
        )
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def markers(figure: dict[str, Any]) -> list[tuple[str, tuple[float, float]]]:
    """(marker shape, point) of every job's marker; the Pareto step lines have none."""
    return [
        (marker, point)
        for _, marker, points in figure["lines"]
        if marker not in (None, "", "None", "none")
        for point in points
    ]


def test_table_has_columns_only_for_settings_that_vary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "sweeps" / "2026-12-01" / "09-30-00"
    shared = ["data=digits", "trainer.epochs=10", "+trainer.log_every=5"]
    for name, scale, lr, best, final, params, macs in GRID:
        overrides = [f"model.scale={scale}", f"optim.lr={lr}", *shared]
        make_job(root / name, scale, lr, completed(best, final, params, macs), overrides)
    assert summary.main([str(root), "--no-plot"]) == 0
    out = capsys.readouterr().out
    md = (root / "summary.md").read_text()
    for text in (md, out):
        table = table_lines(text)
        assert header_of(table)[:4] == ["job", "status", "scale", "lr"]
        constant = {"overrides", "optimizer", "schedule", "data", "batch", "image px"}
        assert not constant & set(header_of(table))
        body = "\n".join(table)
        for setting in ("data=digits", "trainer.epochs", "log_every", "momentum", "cosine"):
            assert setting not in body
        assert "| model.scale=1.0,optim.lr=0.1 " in body  # the job's dir name stays
    # ... and every shared setting is listed once, above the table
    for item in ("data.name=digits", "sched.name=cosine", "optim.name=momentum",
                 "trainer.epochs=10", "trainer.batch_size=64", "+trainer.log_every=5"):
        assert md.count(f"`{item}`") == 1
        assert md.index(f"`{item}`") < md.index("| job")
    assert "`data=digits`" not in md  # data.name=digits says it already
    shared_line = out.index("Shared settings: ")
    assert shared_line < out.index("| job") and "sched.name=cosine" in out[shared_line:]
    # the CSV keeps every column, the constant ones included
    top = read_csv(root / "summary.csv")[0]
    assert top["overrides"] == "model.scale=1.0,optim.lr=0.1,data=digits,trainer.epochs=10,"\
        "+trainer.log_every=5"
    assert (top["optimizer"], top["schedule"], top["data_name"]) == ("momentum", "cosine", "digits")
    assert (top["image_size"], top["batch_size"], top["best_epoch"]) == ("32", "64", "9")


def test_job_names_leave_out_shared_overrides(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    for time, scale, dropout in (("09-30-00", 0.5, 0.1), ("10-00-00", 1.0, 0.2)):
        overrides = ["data=digits", f"model.scale={scale}", f"+model.dropout={dropout}"]
        name = f"{time}_{','.join(overrides)}"
        make_job(outputs / "runs" / "2026-12-01" / name, scale, 0.1,
                 completed(0.5 + scale / 10, 0.5, 1, int(scale * 1e7)), overrides)
    result = summary.write_summary(outputs, plot=False)
    study = result["study"]
    assert [study.name(r) for r in result["rows"]] == [
        "runs/2026-12-01/10-00-00_model.scale=1.0,+model.dropout=0.2",
        "runs/2026-12-01/09-30-00_model.scale=0.5,+model.dropout=0.1",
    ]
    md = result["md"].read_text()
    assert md.splitlines()[0] == "# outputs — data=digits, 32 px — scale x model.dropout — 2 runs"
    table = table_lines(md)
    assert "lr" not in header_of(table) and "data=digits" not in "\n".join(table)
    assert "| runs/2026-12-01/09-30-00_model.scale=0.5,+model.dropout=0.1 " in md
    # the CSV's job column stays the dir's own name
    jobs = [r["job"] for r in read_csv(result["csv"])]
    assert jobs[1] == "runs/2026-12-01/09-30-00_data=digits,model.scale=0.5,+model.dropout=0.1"


def test_headline_names_the_dir_data_and_what_varies(
    sweep: Path, drawn: list[dict[str, Any]]
) -> None:
    result = summary.write_summary(sweep)
    headline = "sweeps/2024-05-01/12-00-00 — data=digits, 32 px — scale x lr — 8 runs"
    assert result["md"].read_text().splitlines()[0] == f"# {headline}"
    (figure,) = drawn
    title = figure["title"].splitlines()
    assert title[0] == headline
    assert "4 completed of 8 runs" in title[1]


def test_tie_offsets_spread_coinciding_points() -> None:
    points = [(6.0, 62.0), (80.0, 71.0), (6.0, 62.0), (6.0, 62.0), (6.0, 55.0)]
    offsets = summary.tie_offsets(points)
    assert offsets == summary.tie_offsets(points)  # deterministic
    assert offsets[1] == offsets[4] == 0.0  # alone: drawn where it is
    step = summary.TIE_STEP
    assert [offsets[0], offsets[2], offsets[3]] == pytest.approx([-step, 0.0, step])
    assert summary.tie_offsets([(6.0, 62.0), (6.0, 62.0)]) == pytest.approx([-step / 2, step / 2])


def test_tied_jobs_are_drawn_apart(tmp_path: Path, drawn: list[dict[str, Any]]) -> None:
    for lr in (0.1, 0.05):  # same width, so the same MACs, and the same top-1
        make_job(tmp_path / f"optim.lr={lr}", 0.5, lr, completed(0.62, 0.6, 1, 6_000_000))
    make_job(tmp_path / "wide", 1.0, 0.1, completed(0.71, 0.7, 1, 80_000_000))
    result = summary.write_summary(tmp_path)
    positions = summary.marker_positions(result["rows"])
    (x1, y1), (x2, y2) = positions["optim.lr=0.1"], positions["optim.lr=0.05"]
    assert y1 == y2 == pytest.approx(62.0)
    assert abs(x1 / x2 - 1) > 0.03  # a few percent apart on the log-MACs axis
    assert positions["wide"] == pytest.approx((80.0, 71.0))
    (figure,) = drawn
    tied = sorted(x for _, (x, y) in markers(figure) if y == pytest.approx(62.0))
    assert len(tied) == 2 and tied == pytest.approx(sorted([x1, x2]))
    assert "x0.5 (2 tied)" in figure["texts"]
    # the Pareto front stays on the true values
    (front,) = [points for label, _, points in figure["lines"] if label == "Pareto front"]
    assert front[0] == pytest.approx((6.0, 62.0))


@pytest.mark.parametrize(
    ("other", "classes", "group"),
    [
        pytest.param({"data": "cifar10"}, 10, "cifar10", id="data source"),
        pytest.param({"image_size": 64}, 10, "64 px", id="image size"),
        pytest.param({}, 100, "100 classes", id="classes"),  # as the runs reported them
    ],
)
def test_mixed_data_warns_and_marks_each_group(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    drawn: list[dict[str, Any]],
    other: dict[str, Any],
    classes: int,
    group: str,
) -> None:
    for scale, macs in ((0.5, 6_000_000), (1.0, 80_000_000)):
        metrics = {**completed(0.5 + scale / 4, 0.5, 1, macs), "num_classes": 10}
        make_job(tmp_path / "a" / f"model.scale={scale}", scale, 0.1, metrics)
        metrics = {**completed(0.3 + scale / 4, 0.3, 1, macs), "num_classes": classes}
        make_job(tmp_path / "b" / f"model.scale={scale}", scale, 0.1, metrics, **other)
    assert summary.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "mix data sets" in warning and group in warning and warning.count("2 jobs") == 2
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[2] == f"> **{warning}**"  # right under the heading
    assert "mixed data" in md[0]
    (figure,) = drawn
    assert "mixed data" in figure["title"]
    assert len({marker for marker, _ in markers(figure)}) == 2  # one shape per data group
    assert any(group in label for label in figure["legend"])
    assert sum(label.startswith("Pareto front (") for label in figure["legend"]) == 2


def test_one_data_set_gives_no_warning(
    sweep: Path, capsys: pytest.CaptureFixture[str], drawn: list[dict[str, Any]]
) -> None:
    assert summary.main([str(sweep)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "warning" not in (sweep / "summary.md").read_text()
    (figure,) = drawn
    assert "mixed" not in figure["title"]
    assert {marker for marker, _ in markers(figure)} == {"o"}
    assert "Pareto front" in figure["legend"]
