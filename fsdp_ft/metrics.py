"""Where numbers go: metrics.jsonl (rank 0), optional TensorBoard, a progress bar, and memory readings."""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


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
                 progress_bar: bool = True, start_step: int = 0):
        self.is_main = is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not is_main:
            return
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (used by tests and reports)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
