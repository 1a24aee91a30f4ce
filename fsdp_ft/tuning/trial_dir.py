"""One trial's folder, `output_dir/trials/NNNN/`: an ordinary run folder plus what the search keeps beside it.

- `trial.yaml`: the trial's whole config (the base config with the sampled values); `fsdp-ft train trial.yaml`
  reruns it by hand;
- `trial.json`: what the run's rank 0 needs to report to the study (storage, study, number, objective, pruner),
  and the trial's parameters and provenance (seed, config hash, git revision, package versions);
- `claim.json`: which worker runs the trial (host, pid, worker name) or that nobody does (released);
- `heartbeat`: touched by the running worker; a claim whose heartbeat stopped is stale;
- `console.log`: the run's terminal output, every launch appended.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

TRIALS = "trials"
TRIAL_ENV = "FSDP_FT_TRIAL"  # the trial.json a trial's ranks read (fsdp_ft.training.trial_link)


def trial_path(output_dir: str | Path, number: int) -> Path:
    return Path(output_dir) / TRIALS / f"{number:04d}"


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a reader on another machine never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Claim:
    worker: str
    host: str
    pid: int
    state: str      # running / released

    @staticmethod
    def mine(worker: str) -> "Claim":
        return Claim(worker=worker, host=socket.gethostname(), pid=os.getpid(), state="running")


def claim(folder: Path, c: Claim) -> None:
    write_json(folder / "claim.json", vars(c))
    beat(folder)


def release(folder: Path) -> None:
    data = read_json(folder / "claim.json") or {}
    write_json(folder / "claim.json", {**data, "state": "released"})


def beat(folder: Path) -> None:
    (folder / "heartbeat").touch()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def adoptable(folder: Path, stale_after_s: float, started: float | None) -> tuple[bool, str]:
    """Whether a RUNNING trial may be taken over, and why: released by its worker (stopped by a signal), its
    worker's process is gone (same host), or no heartbeat for `stale_after_s` (another host, a killed job)."""
    data = read_json(folder / "claim.json")
    if data is None:  # asked but never claimed: its worker died in between
        age = time.time() - (started or 0)
        return age > stale_after_s, f"never claimed, {age:.0f} s old"
    if data.get("state") == "released":
        return True, f"released by {data.get('worker')}"
    if data.get("host") == socket.gethostname() and not _alive(int(data.get("pid", 0))):
        return True, f"its worker (pid {data.get('pid')}) is gone"
    try:
        silent = time.time() - (folder / "heartbeat").stat().st_mtime
    except OSError:
        silent = math.inf
    if silent > stale_after_s:
        return True, f"no heartbeat from {data.get('worker')} for {silent:.0f} s"
    return False, f"run by {data.get('worker')}"


def claimed_by(folder: Path) -> str | None:
    data = read_json(folder / "claim.json")
    return data.get("worker") if data else None


def has_checkpoint(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("step-*")) if (folder / "checkpoints").is_dir() else False
