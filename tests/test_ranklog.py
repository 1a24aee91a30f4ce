"""Per-rank logs (fsdp_ft.runtime.ranklog) copy file descriptors 1 and 2, not only Python's streams: what C/C++ code writes
(NCCL warnings, the c10d watchdog's timeout report before its abort(), faulthandler) reaches output_dir/logs/rank-N.log
and still reaches the console. Each test runs a small rank process (no torch: a fraction of a second)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from conftest import REPO

RANK = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from fsdp_ft.runtime import ranklog
    ranklog.start(sys.argv[1])
    print("python print", flush=True)
    os.write(2, b"raw write to fd 2, as C++ does\\n")
    subprocess.run(["sh", "-c", "echo child process stderr >&2"])
    what = sys.argv[2]
    if what == "abort":  # the NCCL watchdog: its report, then abort()
        os.write(2, b"watchdog: collective timed out\\n")
        os.abort()
    if what == "sigterm":  # a launcher signals the rank's process group; the rank saves, printing as it goes
        stopped = []
        signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
        print("ready", flush=True)
        while not stopped:
            time.sleep(0.01)
        time.sleep(0.2)
        print("saving the checkpoint after SIGTERM", flush=True)
        os.write(2, b"saved\\n")
""")


def _rank(tmp_path, what: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "RANK": "3", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path / "logs"), what], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_c_level_writes_reach_the_rank_log_and_the_console(tmp_path):
    proc = _rank(tmp_path, "plain")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    log = (tmp_path / "logs" / "rank-3.log").read_text()
    for line in ("python print", "raw write to fd 2, as C++ does", "child process stderr"):
        assert line in log, log
    assert "python print" in out and "raw write to fd 2" in err and "child process stderr" in err  # console kept
    assert "raw write" not in out and "python print" not in err  # stdout and stderr stay apart on the console
    assert log.startswith("=== ") and " rank 3 of " in log.splitlines()[0]


def test_output_written_just_before_an_abort_is_kept(tmp_path):
    """The copier is a process of its own: the rank's abort() cannot take the last lines with it."""
    proc = _rank(tmp_path, "abort")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGABRT
    log = (tmp_path / "logs" / "rank-3.log").read_text()
    assert "watchdog: collective timed out" in log and "Fatal Python error: Aborted" in log, log
    assert "watchdog: collective timed out" in err


def test_a_stop_signal_to_the_ranks_process_group_leaves_its_output_working(tmp_path):
    """fsdp-ft run sends SIGTERM to each rank's process group; the rank saves a checkpoint and prints meanwhile.
    The copier (a child of the rank) must neither die of that signal nor stop copying."""
    proc = _rank(tmp_path, "sigterm", start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "python print"
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "saving the checkpoint after SIGTERM" in out and "saved" in err
    log = (tmp_path / "logs" / "rank-3.log").read_text()
    assert "saving the checkpoint after SIGTERM" in log and "saved\n" in log
