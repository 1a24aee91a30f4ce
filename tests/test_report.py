"""`fsdp-ft report`: a self-contained HTML page of a real run, rendered by headless Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, cli, train_1proc
from fsdp_ft.metrics import read_metrics

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
    train = [r for r in read_metrics(run_dir) if "split" not in r]
    loss_line = re.search(r'<polyline points="([^"]+)"[^>]*data-series="train loss"', text).group(1)
    assert len(loss_line.split()) == len(train) == 4
    assert "peak_flops_source" in text and "trainable_params" in text  # the set-up facts


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
    from fsdp_ft.report import Run, compare_page

    text = compare_page([Run(run_dir, "first"), Run(run_dir, "second")], "two runs")
    assert text.count('data-series="first"') >= 3 and text.count('data-series="second"') >= 3
    assert "<th>run</th>" in text


def test_report_of_a_folder_that_is_no_run(tmp_path):
    proc = cli("report", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fsdp-ft: error: '{tmp_path}' is not a run directory: it has no "
                                                "metrics.jsonl"]
