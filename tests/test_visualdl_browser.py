"""What a person sees in VisualDL after two sweeps with the same grid and one single run:
a real `visualdl --logdir outputs` server, read in headless Chromium over the DevTools
protocol (the DOM, not only the server's JSON API). Screenshots go to pytest's tmp dir."""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.browser import Browser, BrowserError, missing_reason
from tests.conftest import TINY, run_cli, visualdl_server

pytestmark = pytest.mark.slow
ONE_EPOCH = [*TINY, "trainer.epochs=1"]
GRID = ["model.scale=0.25,0.35", "optim.lr=0.1,0.01"]
SINGLE_RUN = {"scale": 0.25, "lr": 0.03}  # TINY's width, the default optimizer's LR
BEST = "eval/best"
N_RUNS = 9  # 2 sweeps x 4 jobs + the single run


def _skip_without_browser() -> None:
    reason = missing_reason()
    if reason:
        print(f"SKIP browser test: {reason}", file=sys.stderr)
        pytest.skip(f"VisualDL browser test skipped: {reason}")


def _report(capsys, text: str) -> None:
    with capsys.disabled():  # seen without -s as well
        print(f"\n{text}", flush=True)


# -- the runs, the server, the browser -----------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    _skip_without_browser()  # before minutes of training
    cwd = tmp_path_factory.mktemp("vdl_browser")
    run_cli(["-m", *ONE_EPOCH, *GRID], cwd=cwd)
    run_cli(["-m", *ONE_EPOCH, *GRID], cwd=cwd)  # the same grid again: a second sweep
    run_cli(ONE_EPOCH, cwd=cwd)
    return cwd


@pytest.fixture(scope="module")
def runs(workdir) -> list[dict]:
    """Every run under outputs/: its paths, its name in VisualDL, expected values."""
    found = []
    for metrics_file in sorted((workdir / "outputs").rglob("metrics.json")):
        run_dir = metrics_file.parent
        metrics = json.loads(metrics_file.read_text())
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        kind = run_dir.relative_to(workdir / "outputs").parts[0]
        if kind == "sweeps":
            parts = dict(p.split("=", 1) for p in run_dir.name.split(","))
            expected = {"scale": float(parts["model.scale"]), "lr": float(parts["optim.lr"])}
        else:
            expected = dict(SINGLE_RUN)
        assert (cfg["model"]["scale"], cfg["optim"]["lr"]) == pytest.approx(
            (expected["scale"], expected["lr"])), run_dir
        assert metrics["status"] == "completed", run_dir
        found.append({"dir": run_dir, "rel": run_dir.relative_to(workdir).as_posix(),
                      "kind": kind, "sweep": run_dir.parent.name if kind == "sweeps" else None,
                      "name": metrics["run_name"], "best": metrics["best_eval_acc_top1"],
                      **expected})
    sweeps = {r["sweep"] for r in found if r["kind"] == "sweeps"}
    assert len(found) == N_RUNS and len(sweeps) == 2, [r["rel"] for r in found]
    return found


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    return body.get("data", body) if isinstance(body, dict) else body


@pytest.fixture(scope="module")
def vdl(workdir) -> str:
    with visualdl_server("outputs", workdir, log_file=workdir / "visualdl.log") as base:
        yield base


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def browser(tmp_path):
    """A fresh Chromium per test: a tab that one test freezes cannot spoil the next."""
    _skip_without_browser()
    try:
        b = Browser(tmp_path / "chromium-profile", width=1600, height=1000)
    except BrowserError as exc:
        pytest.fail(f"Chromium did not start: {exc}")
    yield b
    b.close()


def _screenshot(browser: Browser, path: Path, capsys, timeout: float = 30.0) -> None:
    try:
        browser.screenshot(path, timeout=timeout)
        _report(capsys, f"screenshot: {path}")
    except (BrowserError, TimeoutError) as exc:  # a frozen tab paints nothing
        _report(capsys, f"screenshot {path.name} not taken: {exc}")


# -- the HParams page ------------------------------------------------------------------

HPARAMS_URL = "/app/hyper-parameter"  # the app's HYPER PARAMETERS tab
READ_TABLE = """(() => {
  const rows = [...document.querySelectorAll('[role=row]')];
  const header = rows.find(r => !r.querySelector('[role=cell]'));
  const text = c => c.textContent.trim();  // CSS ellipsis cuts only what is painted
  return {
    headers: header ? [...header.children].map(text) : [],
    rows: rows.filter(r => r.querySelector('[role=cell]'))
              .map(r => [...r.querySelectorAll('[role=cell]')].map(text)),
  };
})()"""
N_TABLE_ROWS = "document.querySelectorAll('[role=row] [role=cell]:first-child').length"


def _open_hparams(browser: Browser, base: str, n: int) -> dict:
    browser.navigate(base + HPARAMS_URL)
    try:
        browser.wait_until(f"{N_TABLE_ROWS} >= {n}", timeout=30, what="HParams table rows")
    except TimeoutError:
        pass  # the assertions below say what is there
    time.sleep(0.5)  # let the last rows settle
    return browser.evaluate(READ_TABLE)


def _by_run(runs: list[dict]) -> dict[str, dict]:
    """A table's Trial ID is the run's path under the logdir's parent, or its name."""
    return {key: r for r in runs for key in (r["rel"], r["name"])}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def test_hparams_table_one_row_per_run_with_scale_lr_and_best(browser, vdl, runs, shots,
                                                              capsys):
    table = _open_hparams(browser, vdl, N_RUNS)
    _screenshot(browser, shots / "hparams_table.png", capsys)
    api = _get_json(vdl + "/app/api/hparams/list")
    seen = f"(table rows {[r[:3] for r in table['rows']]}; the API lists {len(api)} runs: " \
           f"{[(a['name'], a['hparams'].get('scale'), a['hparams'].get('lr')) for a in api]})"
    headers = table["headers"]
    for column in ("scale", "lr", BEST):
        assert column in headers, f"no {column!r} column in the HParams table: {headers}"
    i_scale, i_lr, i_best = (headers.index(c) for c in ("scale", "lr", BEST))

    rows = table["rows"]
    assert len(rows) == N_RUNS, f"{len(rows)} HParams rows, expected {N_RUNS} {seen}"
    by_run = _by_run(runs)
    matched = {}
    for row in rows:
        run = by_run.get(row[0])
        assert run is not None, f"row {row[0]!r} is none of the runs {sorted(by_run)}"
        assert run["rel"] not in matched, f"run {run['rel']} shows twice"
        matched[run["rel"]] = row
        for i, key in ((i_scale, "scale"), (i_lr, "lr")):
            cell = row[i]
            assert cell != "" and _number(cell) is not None, \
                f"{key} cell of {row[0]} is {cell!r}, expected {run[key]} {seen}"
            assert _number(cell) == pytest.approx(run[key], rel=1e-6), (row[0], key, cell)
        best = _number(row[i_best])
        assert best is not None, f"{BEST} cell of {row[0]} is {row[i_best]!r}"
        assert best == pytest.approx(run["best"], abs=5e-4), (row[0], row[i_best], run["best"])
    assert len(matched) == N_RUNS
    # both sweeps' jobs and the single run are there, each width x LR of the grid twice
    grid = sorted((r["scale"], r["lr"]) for r in runs if r["rel"] in matched
                  and r["kind"] == "sweeps")
    assert grid == sorted([(s, lr) for s in (0.25, 0.35) for lr in (0.1, 0.01)] * 2)
    # the best run can be read off the table
    table_best = {row[0] for row in rows if _number(row[i_best]) == max(
        _number(r[i_best]) for r in rows)}
    top = max(r["best"] for r in runs)
    metrics_best = {r["rel"] for r in runs if abs(r["best"] - top) < 5e-4}
    assert {by_run[t]["rel"] for t in table_best} == metrics_best


# -- the scalar page -------------------------------------------------------------------

def test_scalar_page_lists_every_run(browser, vdl, runs, shots, capsys):
    browser.navigate(vdl + "/app/scalar")
    read = "[...document.querySelectorAll('.run-item')].map(e => e.textContent.trim())"
    try:
        browser.wait_until(f"{read}.length >= {N_RUNS}", timeout=30, what="scalar run list")
        browser.wait_until("document.querySelectorAll('canvas').length > 0", timeout=20,
                           what="scalar charts")
    except TimeoutError:
        pass  # the assertions say what is there
    time.sleep(1)  # charts draw
    _screenshot(browser, shots / "scalars.png", capsys)
    listed = browser.evaluate(read)
    api = _get_json(vdl + "/app/api/runs")
    expected = sorted(r["name"] for r in runs)
    assert sorted(listed) == expected, f"the scalar page lists {listed}; the API: {api}"
    for sweep in {r["sweep"] for r in runs if r["sweep"]}:
        assert sum(f"/{sweep}/" in name for name in listed) == 4, (sweep, listed)
    # the tag groups; the charts (their titles too) are canvases: the open eval group's 4
    sections = browser.evaluate("document.body.innerText").split("\n")
    assert {"eval", "train"} <= set(sections), sections[:20]
    assert browser.evaluate("document.querySelectorAll('canvas').length") >= 4


# -- the HParams page's parallel coordinates (last: a frozen tab ends its browser) ----

def test_hparams_parallel_coordinates_render_and_tab_stays_responsive(browser, vdl, runs,
                                                                      shots, capsys):
    table = _open_hparams(browser, vdl, N_RUNS)
    axes = table["headers"][1:]  # every hyper-parameter and metric is an axis
    tab = browser.evaluate("""(() => {
      const a = [...document.querySelectorAll('a')]
        .find(e => e.textContent.trim() === 'Parallel Coordinates View');
      if (!a) return null;
      const b = a.getBoundingClientRect();
      return {x: b.x + b.width / 2, y: b.y + b.height / 2};
    })()""")
    assert tab, "no 'Parallel Coordinates View' tab on the HParams page"
    browser.click(tab["x"], tab["y"])
    started = time.monotonic()
    state = None
    while time.monotonic() - started < 10:
        t0 = time.monotonic()
        try:
            state = browser.evaluate("""(() => ({
              lines: document.querySelectorAll('svg path.line').length,
              axes: document.querySelectorAll('svg g.grid').length}))()""", timeout=5)
        except TimeoutError:
            frozen_after = time.monotonic() - started
            longest = max(axes, key=len) if axes else ""
            _screenshot(browser, shots / "hparams_parallel_coordinates.png", capsys, timeout=5)
            pytest.fail(
                f"the HParams tab froze {frozen_after:.1f} s after switching to Parallel "
                f"Coordinates: Runtime.evaluate got no answer within 5 s. {len(axes)} axes "
                f"({axes}); longest name {longest!r}. (VisualDL 2.5.3 shortens an axis name "
                f"wider than its column, (width - 20) / axes - 10 px with columns >= 60 px, "
                f"by `slice(0, -1) + '...'`, which never gets shorter: an endless loop)")
        answered = time.monotonic() - t0
        assert answered < 5, f"the tab took {answered:.1f} s to answer"
        if state["lines"] >= N_RUNS and state["axes"] == len(axes):
            break
        time.sleep(0.25)
    assert state and state["lines"] == N_RUNS and state["axes"] == len(axes), \
        f"parallel coordinates after 10 s: {state}; expected {N_RUNS} lines, {len(axes)} axes"
    time.sleep(1)  # still alive a moment later
    t0 = time.monotonic()
    assert browser.evaluate("1 + 1", timeout=5) == 2
    assert time.monotonic() - t0 < 5
    _screenshot(browser, shots / "hparams_parallel_coordinates.png", capsys)
