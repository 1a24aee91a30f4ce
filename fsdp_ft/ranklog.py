"""Per-rank log files: output_dir/logs/rank-N.log gets everything a rank prints (tracebacks included).

With N ranks the console interleaves their output, and a crashing rank's traceback is easy to lose; each rank
therefore also appends its own stdout and stderr to one file, headed by where it ran, under every launcher.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path

LOG_DIR_ENV = "FSDP_FT_LOG_DIR"


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.file.write(text)
        return self.stream.write(text)

    def flush(self):
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... from the real stream
        return getattr(self.stream, name)


def rank_from_env() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def start(log_dir: str | Path | None = None) -> Path | None:
    """Tee this process's stdout/stderr into LOG_DIR/rank-N.log (LOG_DIR: argument, else $FSDP_FT_LOG_DIR)."""
    log_dir = log_dir or os.environ.get(LOG_DIR_ENV)
    if not log_dir or isinstance(sys.stderr, _Tee):
        return None
    path = Path(log_dir) / f"rank-{rank_from_env()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a", buffering=1, encoding="utf-8")
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1
    job = f" slurm job {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else ""
    when = datetime.datetime.now().isoformat(timespec="seconds")
    f.write(f"=== {when} rank {rank_from_env()} of {world} on node {node} pid {os.getpid()}{job} ===\n")
    sys.stdout, sys.stderr = _Tee(sys.stdout, f), _Tee(sys.stderr, f)
    return path
