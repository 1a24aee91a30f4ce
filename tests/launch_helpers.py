"""Helpers shared by the launcher tests (test_launch.py, test_slurm.py): one cached 2-rank reference run, and
waiting for a run to reach a step."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from conftest import FAST, losses, train_nproc

# Long enough (about 0.3 s a step on 2 cores) that a signal sent after the first logged step lands mid-run.
RUN = [*FAST, "train.max_steps=24"]
_reference: dict[int, float] = {}


def reference_losses(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of an uninterrupted local 2-rank `fsdp-ft run` (computed once per test session)."""
    if not _reference:
        out = train_nproc(2, tmp_path_factory.mktemp("reference-2rank"), *RUN)
        _reference.update(losses(out))
    return dict(_reference)


def wait_for_step(out: Path, step: int = 1, timeout: float = 120, alive=lambda: True) -> None:
    """Block until metrics.jsonl has a training row at or past `step`."""
    path = Path(out) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        if path.exists() and any('"split"' not in line and json.loads(line).get("step", 0) >= step
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} reached no step {step} in {timeout} s")


def rank_pid(out: Path, rank: int) -> int:
    """The pid in the newest header of output_dir/logs/rank-N.log."""
    headers = re.findall(r"=== .* rank \d+ of \d+ on node \S+ pid (\d+)", (Path(out) / "logs" / f"rank-{rank}.log").read_text())
    return int(headers[-1])


def setup_rows(out: Path) -> list[dict]:
    from fsdp_ft.metrics import read_metrics
    return [r for r in read_metrics(out) if r.get("split") == "setup"]


def kill9_job(proc) -> None:
    """SIGKILL a launcher and every process under it at once, as when a node dies. torchrun starts each rank in a
    session of its own, so killing the launcher's process group alone would leave the ranks training on."""
    import os
    import signal

    def descendants(pid: int) -> list[int]:
        kids = []
        for task in Path(f"/proc/{pid}/task").glob("*"):  # every thread: the launcher starts ranks from one
            try:
                kids += task.joinpath("children").read_text().split()
            except OSError:
                pass
        return [int(k) for k in kids] + [d for k in kids for d in descendants(int(k))]

    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
