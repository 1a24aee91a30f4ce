"""`fsdp-ft report RUN_DIR`: one self-contained HTML page of a run — charts over steps and the set-up facts.

The page holds its charts as inline SVG (`svgplot`), no scripts and no links, so it opens offline and can be
mailed or archived as one file. `compare_page` draws several runs on the same charts (the benchmark's page).
"""
from __future__ import annotations

import functools
import html
import math
import statistics
from pathlib import Path

import yaml

from fsdp_ft.errors import UserError
from fsdp_ft.observability.metrics import read_metrics_file
from fsdp_ft.observability.svgplot import Series, line_chart, page, save_page, table_html
from fsdp_ft.observability.units import fmt_bytes

_line_chart = line_chart

NOT_METRICS = {"step", "epoch", "split", "is_best", "best_step", "best_value"}
CONFIG_FACTS = ("model.path", "task", "engine", "finetune.method", "model.dtype", "fsdp.mixed_precision",
                "activation_checkpointing", "fsdp.reshard_after_forward", "fsdp.cpu_offload", "train.seq_len",
                "train.micro_batch_size", "train.grad_accum", "optim.lr", "train.max_steps")
SETUP_SKIP = {"split", "labels", "flop_counts", "step"}


def fmt_percent(v: float) -> str:
    return f"{v:.3g}%"


class Run:
    """A run directory's rows, split by kind."""

    def __init__(self, run_dir: str | Path, name: str | None = None):
        self.dir = Path(run_dir)
        if not (self.dir / "metrics.jsonl").is_file():
            raise UserError(f"'{self.dir}' is not a run directory: it has no metrics.jsonl")
        rows, self.cut_rows = read_metrics_file(self.dir / "metrics.jsonl")  # a run killed mid-row: 1
        self.name = name or self.dir.name
        self.train = _last_per_step([r for r in rows if "split" not in r])
        self.eval = _last_per_step([r for r in rows if r.get("split") == "eval"])
        self.setup = next((r for r in reversed(rows) if r.get("split") == "setup"), {})
        self.final = next((r for r in reversed(rows) if r.get("split") == "final"), {})
        cfg_path = self.dir / "config.yaml"
        self.config = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}

    def series(self, key: str, rows: list[dict] | None = None, scale: float = 1.0, name: str | None = None,
               markers: bool = False) -> Series:
        rows = self.train if rows is None else rows
        pts = [(r["step"], r[key] * scale) for r in rows if _number(r.get(key))]
        return Series(name or key, [p[0] for p in pts], [p[1] for p in pts], markers=markers)

    def per_rank(self, key: str) -> list[Series]:
        """One series per rank for a `*_per_rank` list."""
        ranks = max((len(r[key]) for r in self.train if isinstance(r.get(key), list)), default=0)
        out = []
        for i in range(ranks):
            pts = [(r["step"], r[key][i]) for r in self.train if isinstance(r.get(key), list) and len(r[key]) > i]
            out.append(Series(f"rank {i}", [p[0] for p in pts], [p[1] for p in pts]))
        return out

    def eval_metrics(self) -> list[str]:
        keys: list[str] = []
        for r in self.eval:
            keys += [k for k, v in r.items() if k not in NOT_METRICS and _number(v) and k not in keys]
        return keys

    def config_value(self, dotted: str):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def summary(self) -> dict:
        """Headline numbers: last loss and eval metrics, mean speed and MFU (first logged row left out: warm-up)."""
        steady = self.train[1:] or self.train
        out = {"steps": self.train[-1]["step"] if self.train else 0}
        if self.train:
            out["final train loss"] = self.train[-1].get("loss")
        for k in self.eval_metrics():
            out[f"eval {k} (last)"] = self.eval[-1].get(k) if self.eval else None
        for key, label in (("tokens_per_s", "tokens/s (mean)"), ("mfu", "MFU (mean)")):
            values = [r[key] for r in steady if _number(r.get(key))]
            if values:
                out[label] = statistics.fmean(values)
        for key, label in (("peak_mem_bytes", "peak memory per rank"), ("peak_tensor_bytes", "peak tensor bytes")):
            values = [r[key] for r in self.train if _number(r.get(key))]
            if values:
                out[label] = fmt_bytes(max(values))
        if "MFU (mean)" in out:
            out["MFU (mean)"] = f"{100 * out['MFU (mean)']:.3g}%"
        return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _last_per_step(rows: list[dict]) -> list[dict]:
    """A resumed run logs some steps twice: keep the last row of each step, in step order."""
    by_step = {r["step"]: r for r in rows if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def byte_chart(series: list[Series], title: str, **kw) -> str:
    """A chart of byte counts in one unit (MiB or GiB) picked from the largest value, so ticks are round."""
    top = max((y for s in series for y in s.ys), default=0)
    unit, size = ("GiB", 2 ** 30) if top >= 2 ** 30 else ("MiB", 2 ** 20)
    scaled = [Series(s.name, s.xs, [y / size for y in s.ys], s.color, s.markers) for s in series]
    return line_chart(scaled, title, y_label=unit, **kw)


def run_charts(run: Run) -> list[str]:
    """The charts of one run, in reading order, on the same step axis."""
    charts = []
    steps = [r["step"] for r in run.train + run.eval]
    line_chart = functools.partial(_line_chart, x_range=(min(steps), max(steps)) if steps else None)
    loss = [run.series("loss", name="train loss")]
    if any(_number(r.get("loss")) for r in run.eval):
        loss.append(run.series("loss", run.eval, name="eval loss", markers=True))
    charts.append(line_chart(loss, "Loss", y_label="loss"))
    for k in run.eval_metrics():
        if k != "loss":
            charts.append(line_chart([run.series(k, run.eval, name=f"eval {k}", markers=True)], f"Eval {k}",
                                     y_label=k))
    charts.append(line_chart([run.series("lr")], "Learning rate", y_label="lr"))
    charts.append(line_chart([run.series("tokens_per_s", name="tokens/s")], "Throughput", y_label="tokens / s"))
    if any(_number(r.get("mfu")) for r in run.train):
        charts.append(line_chart([run.series("mfu", scale=100, name="MFU")], "Model FLOPs utilisation",
                                 y_label="MFU (%)", y_format=lambda v: f"{v:.3g}%"))
    if any(_number(r.get("grad_norm")) for r in run.train):
        charts.append(line_chart([run.series("grad_norm")], "Gradient norm (before clipping)", y_label="norm"))
    device = str(run.setup.get("device", ""))
    mem_title = "Peak GPU memory allocated" if device.startswith("cuda") else "Peak host RSS"
    mem = run.per_rank("peak_mem_bytes_per_rank") or [run.series("peak_mem_bytes")]
    charts.append(byte_chart(mem, mem_title + " per rank", x_range=(min(steps), max(steps))))
    tensors = run.per_rank("peak_tensor_bytes_per_rank")
    if tensors:
        charts.append(byte_chart(tensors, "Peak live tensor bytes per rank", x_range=(min(steps), max(steps))))
    return charts


def facts_rows(run: Run) -> list[list]:
    rows = [[k, run.config_value(k)] for k in CONFIG_FACTS if run.config_value(k) is not None]
    for k, v in run.setup.items():
        if k in SETUP_SKIP or isinstance(v, dict):
            continue
        if isinstance(v, list):
            v = ", ".join(fmt_bytes(x) if "bytes" in k or "rss" in k else str(x) for x in v)
        elif "bytes" in k and _number(v):
            v = fmt_bytes(v)
        elif k == "peak_flops" and _number(v):
            v = f"{v:.4g} FLOP/s per rank"
        rows.append([k, v])
    rows += [[k, v] for k, v in run.final.items() if k not in ("split", "step")]
    return rows


def render_run(run_dir: str | Path) -> str:
    run = Run(run_dir)
    body = ["<h2>Summary</h2>", table_html(None, [[k, v] for k, v in run.summary().items()]),
            "<h2>Over steps</h2>", '<div class="charts">', *run_charts(run), "</div>",
            "<h2>Set-up</h2>", table_html(["fact", "value"], facts_rows(run))]
    sub = f"{run.dir.resolve()} — {len(run.train)} training rows, {len(run.eval)} eval rows"
    if run.cut_rows:
        sub += " (metrics.jsonl ends in a row cut short by a stopped run: left out)"
    return page(f"fsdp-ft run report: {run.name}", sub, body)


def compare_page(runs: list[Run], title: str, subtitle: str = "", extra_html: list[str] = ()) -> str:
    """Several runs on shared charts (the benchmark's page); `extra_html` goes first (e.g. its results table)."""
    charts = [line_chart([r.series("loss", name=r.name) for r in runs], "Train loss", y_label="loss"),
              line_chart([r.series("tokens_per_s", name=r.name) for r in runs], "Throughput",
                         y_label="tokens / s")]
    if any(_number(row.get("mfu")) for r in runs for row in r.train):
        charts.append(line_chart([r.series("mfu", scale=100, name=r.name) for r in runs], "MFU",
                                 y_label="MFU (%)", y_format=lambda v: f"{v:.3g}%"))
    charts.append(byte_chart([r.series("peak_mem_bytes", name=r.name) for r in runs],
                             "Peak memory (max over ranks)"))
    summary_keys: list[str] = []
    for r in runs:
        summary_keys += [k for k in r.summary() if k not in summary_keys]
    summary = table_html(["run", *summary_keys], [[r.name, *(r.summary().get(k, "") for k in summary_keys)]
                                                  for r in runs])
    body = [*extra_html, "<h2>Runs</h2>", summary, '<div class="charts">', *charts, "</div>"]
    return page(title, subtitle or ", ".join(html.escape(str(r.dir)) for r in runs), body)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page (default RUN_DIR/report.html) and return its path."""
    return save_page(render_run(run_dir), run_dir, out)

