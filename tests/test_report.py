"""`fsdp-ft report`: a self-contained HTML page of a real run, rendered by headless Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, cli, train_1proc
from fsdp_ft.observability.metrics import read_metrics

INSTALL = REPO / "tests" / "report" / "install_chromium.sh"
CHARTS = ["Loss", "Eval perplexity", "Learning rate", "Throughput", "Model FLOPs utilisation",
          "Gradient norm (before clipping)", "Peak host RSS per rank", "Peak live tensor bytes per rank"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    return train_1proc(out, "train.max_steps=4", "train.eval_every=2", "train.track_memory=true")


@pytest.fixture(scope="module")
def page(run_dir) -> Path:
    out = run_dir.parent / "page" / "report.html"
    assert "wrote" in cli("report", str(run_dir), "--out", str(out)).stdout
    return out


def chromium() -> str:
    """Debian's chromium; installed by tests/report/install_chromium.sh (as root) when missing."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0:
        proc = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium")
        pytest.skip(f"chromium could not be installed: {proc.stderr.strip()[-300:]}")
    pytest.skip("chromium is not installed and installing it needs root (run tests/report/install_chromium.sh)")


def headless(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--disable-dev-shm-usage", *args],
                          capture_output=True, text=True, timeout=180)


def test_page_is_self_contained_with_a_chart_per_metric(page, run_dir):
    text = page.read_text()
    assert "<script" not in text and "<link" not in text and " src=" not in text  # nothing to fetch
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"] * text.count("<svg")
    titles = re.findall(r'<text [^>]*class="title">([^<]+)</text>', text)
    assert titles == CHARTS
    rows = read_metrics(run_dir)
    train = [r for r in rows if "split" not in r]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert len(train) == 4 and len(evals) == 2
    # the lines, read back through their chart's own axes, are the logged values at the logged steps
    for title, series, logged, key in (("Loss", "train loss", train, "loss"), ("Loss", "eval loss", evals, "loss"),
                                       ("Learning rate", "lr", train, "lr")):
        tol_x, tol_y = axis_tolerance(text, title)
        assert chart_points(text, title, series) == [
            (pytest.approx(r["step"], abs=tol_x), pytest.approx(r[key], abs=tol_y)) for r in logged], series
    assert "peak_flops_source" in text and "trainable_params" in text  # the set-up facts


def _chart(page: str, title: str) -> str:
    charts = re.findall(r"<svg .*?</svg>", page, flags=re.S)
    found = [c for c in charts if f'class="title">{title}</text>' in c]
    assert len(found) == 1, title
    return found[0]


def _axes(chart: str):
    """Pixel -> value maps of a chart from its first and last tick: y ticks are the right-aligned labels (drawn 4 px
    below their grid line), x ticks the centred ones under the frame."""
    y_ticks = [(float(y) - 4, float(v)) for y, v in
               re.findall(r'<text x="[^"]+" y="([^"]+)" text-anchor="end" class="tick">([^<]+)</text>', chart)]
    x_ticks = [(float(x), float(v)) for x, v in
               re.findall(r'<text x="([^"]+)" y="[^"]+" text-anchor="middle" class="tick">([^<]+)</text>', chart)]
    assert len(y_ticks) >= 2 and len(x_ticks) >= 2, chart[:300]

    def linear(ticks):
        (p0, v0), (p1, v1) = ticks[0], ticks[-1]
        return (lambda p: v0 + (p - p0) * (v1 - v0) / (p1 - p0)), abs((v1 - v0) / (p1 - p0))
    return linear(x_ticks), linear(y_ticks)


def chart_points(page: str, title: str, series: str) -> list[tuple[float, float]]:
    """(x, y) in data units of a series' polyline in the chart titled `title`."""
    chart = _chart(page, title)
    (to_x, _), (to_y, _) = _axes(chart)
    points = re.search(rf'<polyline points="([^"]+)"[^>]*data-series="{re.escape(series)}"', chart).group(1)
    return [(to_x(float(x)), to_y(float(y))) for x, y in (p.split(",") for p in points.split())]


def axis_tolerance(page: str, title: str) -> tuple[float, float]:
    """Coordinates are written to 0.1 px: a point and the two ticks each round by up to 0.05 px, so a value read
    back may be off by 0.15 px in data units (plus float slack)."""
    (_, x_per_px), (_, y_per_px) = _axes(_chart(page, title))
    return 0.16 * x_per_px, 0.16 * y_per_px


def test_chromium_renders_the_page(page, tmp_path):
    dom = headless("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == len(CHARTS)
    for title in CHARTS:
        assert f">{title}</text>" in dom.stdout
    shot = tmp_path / "report.png"
    proc = headless(f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pil = pytest.importorskip("PIL.Image")
    img = pil.open(shot).convert("RGB")
    assert img.size == (1280, 1600)
    colors = img.getcolors(maxcolors=1 << 20)
    background = max(colors)[1]
    drawn = sum(n for n, c in colors if c != background)
    assert drawn > 0.05 * img.size[0] * img.size[1]  # not blank: text, frames and lines cover the page
    assert any(c == (0x00, 0x72, 0xB2) for _, c in colors)  # the series colour: lines were drawn


def test_comparison_page_overlays_runs(run_dir, tmp_path):
    from fsdp_ft.observability.report import Run, compare_page

    text = compare_page([Run(run_dir, "first"), Run(run_dir, "second")], "two runs")
    assert text.count('data-series="first"') >= 3 and text.count('data-series="second"') >= 3
    assert "<th>run</th>" in text


def test_report_of_a_folder_that_is_no_run(tmp_path):
    proc = cli("report", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fsdp-ft: error: '{tmp_path}' is not a run directory: it has no "
                                                "metrics.jsonl"]
