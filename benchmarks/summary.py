"""From raw runs to the comparison: per-run numbers over the timed steps, medians over repeats, ratios, table.

Tokens counted: every token of every sample (seq_len x global batch per step; the samples have no padding, so
this is also the non-padding count each system reports). Timed steps: all but the first `warmup_steps`.
"""
from __future__ import annotations

import statistics


def run_numbers(result: dict, warmup_steps: int, flops_per_token: float | None, peak_flops_total: float | None) -> dict:
    """tokens/s, median step seconds and MFU of one run over its timed steps."""
    steps = result["step_s"][warmup_steps:]
    tokens = result["tokens"][warmup_steps:]
    if not steps:
        raise ValueError(f"{result['system']}: no timed steps (ran {len(result['step_s'])}, warm-up {warmup_steps})")
    tps = sum(tokens) / sum(steps)
    out = {"tokens_per_s": tps, "median_step_s": statistics.median(steps), "timed_steps": len(steps),
           "peak_mem_bytes_per_rank": result["peak_mem_bytes_per_rank"],
           "peak_mem_bytes": max(result["peak_mem_bytes_per_rank"])}
    if flops_per_token and peak_flops_total:
        out["mfu"] = flops_per_token * tps / peak_flops_total
    return out


def aggregate(runs: list[dict]) -> dict:
    """Median over repeats of each number (peak memory: median of the per-run max over ranks)."""
    ok = [r for r in runs if "numbers" in r]
    if not ok:
        return {"ok": False, "error": runs[-1].get("error", "no run finished") if runs else "not run",
                "repeats": 0}
    med = lambda key: statistics.median(r["numbers"][key] for r in ok)  # noqa: E731
    out = {"ok": True, "repeats": len(ok), "failed_repeats": len(runs) - len(ok),
           "tokens_per_s": med("tokens_per_s"), "median_step_s": med("median_step_s"),
           "peak_mem_bytes": med("peak_mem_bytes"),
           "tokens_per_s_each": [r["numbers"]["tokens_per_s"] for r in ok],
           "peak_mem_bytes_per_rank_each": [r["numbers"]["peak_mem_bytes_per_rank"] for r in ok],
           "tokens_per_step": ok[0]["tokens"], "losses": ok[0]["losses"],
           "trainable_params": ok[0].get("trainable_params"), "optimizer": ok[0].get("optimizer"),
           "wrapping": ok[0].get("wrapping")}
    if all("mfu" in r["numbers"] for r in ok):
        out["mfu"] = med("mfu")
    return out


def comparability(systems: dict[str, dict], tokens_per_step: int) -> dict:
    """Do all systems train the same tokens per step, and start from the same loss (same weights, same batch)?"""
    ok = {name: s for name, s in systems.items() if s.get("ok")}
    tokens = {name: sorted(set(s["tokens_per_step"])) for name, s in ok.items()}
    first = {name: s["losses"].get(1) for name, s in ok.items()}
    ref = first.get("fsdp_ft")
    rel = {name: abs(v - ref) / abs(ref) for name, v in first.items() if ref and v is not None}
    return {"expected_tokens_per_step": tokens_per_step,
            "tokens_per_step": tokens,
            "same_tokens_per_step": all(t == [tokens_per_step] for t in tokens.values()),
            "step1_loss": first, "step1_loss_rel_diff_vs_fsdp_ft": rel}


def ratios(systems: dict[str, dict]) -> dict:
    """fsdp_ft / peer for tokens/s (higher is better for fsdp_ft) and peak memory (lower is better)."""
    ours = systems.get("fsdp_ft", {})
    out = {}
    if not ours.get("ok"):
        return out
    for name, s in systems.items():
        if name != "fsdp_ft" and s.get("ok"):
            out[name] = {"tokens_per_s": ours["tokens_per_s"] / s["tokens_per_s"],
                         "peak_mem": ours["peak_mem_bytes"] / s["peak_mem_bytes"]}
    return out


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows, one row per (mode, system); a failed system says why."""
    mem = "peak GPU allocated / rank (GB)" if report["machine"].get("cuda") else "peak host RSS / rank (GB)"
    head = ["mode", "system", "tokens/s", "median step (s)", "MFU", mem, "tokens/step", "loss step 1",
            "fsdp_ft / peer tokens/s", "fsdp_ft / peer memory"]
    rows = []
    for mode, case in report["cases"].items():
        for name, s in case["systems"].items():
            if not s.get("ok"):
                rows.append([mode, name, f"failed: {s.get('error', '?')}"] + [""] * (len(head) - 3))
                continue
            r = case["ratios"].get(name)
            rows.append([mode, name, f"{s['tokens_per_s']:.1f}", f"{s['median_step_s']:.3f}",
                         f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a",
                         _gb(s["peak_mem_bytes"]), ",".join(str(t) for t in sorted(set(s["tokens_per_step"]))),
                         f"{s['losses'].get(1, float('nan')):.4f}",
                         f"{r['tokens_per_s']:.2f}x" if r else "–", f"{r['peak_mem']:.2f}x" if r else "–"])
    return head, rows


def markdown_table(report: dict) -> str:
    head, rows = table(report)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)
