"""Step timing, token counting and memory readings for a peer run, written as one JSON file per rank.

The step time is measured the way fsdp_ft's metrics.jsonl measures it, so the two are comparable: from the end of
the previous step's logging to the end of this step's optimizer update — data loading, forward, backward,
gradient reduction, clipping and the optimizer are inside; the per-step loss logging (a host sync every system
does here because the benchmark logs every step) is outside.
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def peak_host_rss_bytes() -> int:
    """This process's peak resident set size over its whole life (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Per optimizer step: seconds (without logging), local tokens; at the end: peak memory of this rank."""

    def __init__(self):
        self.step_s: list[float] = []
        self.tokens: list[int] = []  # local (this rank's) non-padding tokens per step
        self._pending_tokens = 0
        self._started = None
        self.rss_at_train_begin = None  # peak RSS up to here: set-up's share, beside fsdp_ft's setup row

    def add_tokens(self, n: int) -> None:
        self._pending_tokens += n

    def on_train_begin(self, args, state, control, **kwargs):
        _sync()
        self.rss_at_train_begin = peak_host_rss_bytes()
        self._started = time.perf_counter()  # peak memory is not reset: whole process, as fsdp_ft reports it

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        now = time.perf_counter()
        self.step_s.append(now - self._started)
        self.tokens.append(self._pending_tokens)
        self._pending_tokens = 0
        self._started = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._started = time.perf_counter()  # the next step starts after this step's logging

    def result(self, rank: int) -> dict:
        out = {"rank": rank, "step_s": self.step_s, "tokens": self.tokens,
               "peak_host_rss_bytes": peak_host_rss_bytes(), "peak_host_rss_at_train_begin_bytes": self.rss_at_train_begin}
        if torch.cuda.is_available():
            out["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return out


def write_rank_result(out_dir: str | os.PathLike, rank: int, payload: dict) -> None:
    path = Path(out_dir) / f"rank-{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class StepProfile(TrainerCallback):
    """torch.profiler around one optimizer step (1-based), written like fsdp_ft's train.profile_steps traces:
    RESULT_DIR/profile/rank<R>.pt.trace.json (chrome://tracing, ui.perfetto.dev) and a table of the top ops."""

    def __init__(self, step: int, out_dir: str | os.PathLike, rank: int):
        self.step, self.dir, self.rank, self.prof = step, Path(out_dir) / "profile", rank, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is None:
            return
        _sync()
        self.prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.pt.trace.json"))
        (self.dir / f"rank{self.rank}-ops.txt").write_text(
            self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        self.prof = None
