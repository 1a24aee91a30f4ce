"""Helpers shared by the launcher and kill -9 tests (test_launch.py, test_slurm.py, test_resume.py, ...): one cached
2-rank reference run, waiting for a run to reach a step, killing a job as a dead node would, and proving it stays
dead."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from conftest import FAST, losses, train_nproc

# Long enough (about 0.3 s a step on 2 cores) that a signal sent after the first logged step lands mid-run.
RUN = [*FAST, "train.max_steps=24"]
_reference: dict[int, dict] = {}


def reference_rows(tmp_path_factory) -> dict[int, dict]:
    """Per-step training rows (train.log_every=1) of an uninterrupted local 2-rank `fsdp-ft run` of RUN (computed
    once per test session)."""
    if not _reference:
        from fsdp_ft.observability.metrics import read_metrics
        out = train_nproc(2, tmp_path_factory.mktemp("reference-2rank"), *RUN)
        _reference.update({r["step"]: r for r in read_metrics(out) if "split" not in r})
    return {step: dict(row) for step, row in _reference.items()}


def reference_losses(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the reference run above."""
    return {step: row["loss"] for step, row in reference_rows(tmp_path_factory).items()}


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
    from fsdp_ft.observability.metrics import read_metrics
    return [r for r in read_metrics(out) if r.get("split") == "setup"]


def kill9_job(proc) -> dict[int, str]:
    """SIGKILL a launcher and every process under it at once, as when a node dies. torchrun starts each rank in a
    session of its own, so killing the launcher's process group alone would leave the ranks training on. Returns
    the processes it killed: pid -> start time (what tells a pid reused since from the process killed)."""
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

    if proc.poll() is not None:  # ended and reaped: its pid may be another process's by now (its ranks, if any
        return {}                # outlived it, can no longer be found from it)
    pids = [*descendants(proc.pid), proc.pid]
    started = {pid: _stat(pid)[1] for pid in pids}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return started


def _stat(pid: int) -> tuple[str, str]:
    """(state, start time) of a process from /proc/PID/stat; ("", "") when there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return "", ""
    return fields[0], fields[19]  # fields 3 and 22 of proc(5)


def _running(pid: int, started: str | None = None) -> bool:
    """pid is a live process (not a zombie): the one started at `started`, or else one whose command line names
    fsdp_ft (a pid taken from a log could have been reused)."""
    state, start = _stat(pid)
    if state in ("", "Z", "X"):
        return False
    if started is not None:
        return start == started
    try:
        return b"fsdp_ft" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def assert_stays_dead(out: Path, killed: dict[int, str], ranks: int, wait: float = 2.0) -> int:
    """After kill9_job: no process of the job runs on (neither one it killed nor a rank named in the rank logs'
    newest headers, which kill9_job's walk of the process tree could have missed), and in `wait` seconds no step
    is logged. Returns the last step logged."""
    last = max(losses(out), default=0)
    time.sleep(wait)
    assert max(losses(out), default=0) == last, "a rank went on training after the kill"
    pids = {pid: killed.get(pid) for pid in [*killed, *(rank_pid(out, rank) for rank in range(ranks))]}
    alive = sorted(pid for pid, started in pids.items() if _running(pid, started))
    assert not alive, f"processes of the killed job still run: {alive}"
    return last
