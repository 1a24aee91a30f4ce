"""The comparison as an HTML page per mode, drawn by fsdp_ft.observability.report (the same page kind as `fsdp-ft report`).

Each system's representative run (the repeat with the median tokens/s) is written as a small run directory with
a metrics.jsonl in fsdp_ft's row format — step, loss, tokens, tokens_per_s, mfu, and the peak memory on the last
row (peers report it once, at the end) — so `fsdp_ft.observability.report.compare_page` draws all systems on shared charts.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def _median_run(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "numbers" in r]
    if not ok:
        return None
    mid = statistics.median_low(r["numbers"]["tokens_per_s"] for r in ok)
    return next(r for r in ok if r["numbers"]["tokens_per_s"] == mid)


def _write_run_dir(run: dict, folder: Path, flops_per_token: float | None, peak_total: float | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows, seen = [], 0
    for i, (sec, tok) in enumerate(zip(run["step_s"], run["tokens"]), start=1):
        seen += tok
        row = {"step": i, "loss": run["losses"].get(i), "tokens": seen, "tokens_per_s": tok / sec}
        if flops_per_token and peak_total:
            row["mfu"] = flops_per_token * row["tokens_per_s"] / peak_total
        rows.append(row)
    rows[-1]["peak_mem_bytes"] = max(run["peak_mem_bytes_per_rank"])
    rows[-1]["peak_mem_bytes_per_rank"] = run["peak_mem_bytes_per_rank"]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_pages(report: dict, out: Path, head: list[str], rows: list[list[str]]) -> list[Path]:
    """OUT/bench-MODE.html for each mode; [] when fsdp_ft.observability.report is not available."""
    try:
        from fsdp_ft.observability.report import Run, compare_page
        from fsdp_ft.observability.svgplot import table_html
    except ImportError:
        return []
    pages = []
    for mode, case in report["cases"].items():
        fl = case.get("flops", {})
        runs = []
        for system, system_runs in case["runs"].items():
            rep = _median_run(system_runs)
            if rep is not None:
                folder = _write_run_dir(rep, out / "pages" / f"{mode}-{system}", fl.get("flops_per_token"),
                                        fl.get("peak_flops_total"))
                runs.append(Run(folder, name=system))
        if not runs:
            continue
        w = case["workload"]
        facts = table_html(["fact", "value"], [
            ["precision", w["precision"]], ["seq_len", str(w["seq_len"])],
            ["global batch", f"{w['micro_batch_size']} x {w['grad_accum']} x {w['nproc']}"],
            ["steps", f"{w['warmup_steps']} warm-up + {w['timed_steps']} timed"],
            ["tokens counted", report["token_count"]], ["timing", report["timing"]], ["memory", report["memory"]],
            ["same tokens per step", str(case["comparability"]["same_tokens_per_step"])],
            ["machine", f"{report['machine']['platform']}, {report['machine']['cpu_count']} cores, "
                        f"{report['machine']['nproc']} ranks x {report['machine']['threads_per_rank']} threads"]])
        table = table_html(head, [r for r in rows if r[0] == mode])
        html = compare_page(runs, f"fsdp_ft benchmark: {mode}", f"started {report['started']}",
                            extra_html=["<h2>Comparison (median over repeats)</h2>", table, "<h2>Set-up</h2>", facts])
        path = out / f"bench-{mode}.html"
        path.write_text(html, encoding="utf-8")
        pages.append(path)
    return pages
