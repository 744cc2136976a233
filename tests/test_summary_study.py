"""What mbv2.summary's table and plot show of a study (synthetic job dirs of
`summary_jobs`): columns only for the settings that vary, job names without the shared
overrides, the headline, ties drawn apart, and the warning and markers when the jobs ran on
different data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mbv2 import summary
from tests.summary_jobs import GRID, completed, make_job, make_sweep, read_csv


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)


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
