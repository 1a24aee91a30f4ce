"""Where numbers go: metrics.jsonl (rank 0), optional TensorBoard and W&B, a progress bar, and memory readings."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from fsdp_ft.errors import DataError


def peak_host_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated on GPU; peak host RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_host_rss_bytes()


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per row to output_dir/metrics.jsonl; only rank 0 writes."""

    def __init__(self, output_dir: str | Path, is_main: bool, total_steps: int, tensorboard: bool = False,
                 progress_bar: bool = True, start_step: int = 0, wandb_run=None):
        self.is_main = is_main
        self.wandb = wandb_run  # observability.wandb_run.WandbRun on rank 0, or None
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not is_main:
            return
        end_partial_line(self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, disable=not sys.stderr.isatty())

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        if self.wandb is not None:
            self.wandb.log(row)  # before cleaning: W&B plots a non-finite loss as such
        row = {k: _clean(v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = row.get("step", 0)
        prefix = "eval" if row.get("split") == "eval" else "train"
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        live_bar = self.bar is not None and not self.bar.disable
        if live_bar and prefix == "train" and "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.2e}",
                                 tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                                 **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
        elif "loss" in row:
            keys = ("step", "loss", "accuracy", "perplexity", "lr", "grad_norm", "tokens_per_s", "mfu")
            print(f"[{prefix}] " + " ".join(f"{k}={_fmt(row[k])}" for k in keys if k in row), flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, stop_signal: int = 0) -> None:
        """`stop_signal`: the signal training stopped on (0: it ran to its end or its pruning)."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(stop_signal)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def end_partial_line(path: Path) -> None:
    """Before appending to a metrics.jsonl that a killed run left mid-row: a whole row missing only its newline
    gets one; a cut row is removed, so the next row starts on a line of its own instead of being glued to it."""
    try:
        f = path.open("rb+")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep = size
        while True:  # rows are short: the last newline is near the end
            keep = max(0, keep - (1 << 16))
            f.seek(keep)
            tail = f.read()
            cut = tail.rfind(b"\n")
            if cut >= 0 or keep == 0:
                break
        line = tail[cut + 1:]
        if _is_row(line):
            f.write(b"\n")
        else:
            f.truncate(keep + cut + 1)
            print(f"[fsdp_ft] {path}: removed a row cut short by a stopped run ({len(line)} bytes)",
                  file=sys.stderr, flush=True)


def _is_row(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def read_metrics_file(path: str | Path) -> tuple[list[dict], int]:
    """The rows of a metrics.jsonl, and 1 when its last line was cut short (a run killed mid-write: no newline at
    the end, not JSON) and left out, else 0. Any other line that is not a JSON object is an error naming it."""
    path = Path(path)
    if not path.exists():
        return [], 0
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows, cut = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if n == len(lines):  # the last line, with no newline after it: a write that never finished
                cut = 1
                continue
            raise DataError(f"metrics file '{path}' line {n} is not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"metrics file '{path}' line {n} is not a JSON object")
        rows.append(row)
    return rows, cut


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (used by tests and reports); a last row cut short is left out."""
    return read_metrics_file(Path(output_dir) / "metrics.jsonl")[0]
