"""`train.profile_steps: [start, end]`: torch.profiler traces of a window of optimizer steps, on every rank.

Each rank writes one trace to output_dir/profile/ in the TensorBoard profiler plugin's format
(`rank<R>.<time>.pt.trace.json`), which chrome://tracing and https://ui.perfetto.dev open as well. Steps are
marked `ProfilerStep#<step>` with the run's own step numbers, so a trace says which steps it covers.
"""
from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    """Starts torch.profiler before step `start` and writes the trace after step `end` (1-based, inclusive)."""

    def __init__(self, steps: list[int], output_dir: str | Path, rank: int, device: torch.device):
        self.window = tuple(steps) if steps else None
        self.dir = Path(output_dir) / "profile"
        self.rank, self.device = rank, device
        self.prof = None

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if self.window is None or self.prof is not None or not self.window[0] <= step <= self.window[1]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True, with_stack=False,
            schedule=_record_every_step,  # a schedule makes the profiler mark steps; the window is ours
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.dir), worker_name=f"rank{self.rank}"))
        self.prof.step_num = step  # the first ProfilerStep# mark carries the run's step number
        self.prof.start()

    def after_step(self, step: int) -> None:
        """Call with the number of the step that just ran."""
        if self.prof is None:
            return
        if step >= self.window[1]:
            self.close()
        else:
            self.prof.step()

    def close(self) -> None:
        """Stop and write the trace (also when a run ends or stops inside the window)."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()


def _record_every_step(step: int) -> torch.profiler.ProfilerAction:
    return torch.profiler.ProfilerAction.RECORD
