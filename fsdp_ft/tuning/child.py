"""`python -m fsdp_ft.tuning.child CPUS CMD...`: how a worker starts a trial. The trial gets SIGTERM (and saves a
checkpoint) when the worker thread that started it dies, even by kill -9, and keeps to the CPU cores CPUS (a comma
list; empty: all). Done here, before exec, because a preexec_fn is unsafe in a process with threads."""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    cpus, cmd = sys.argv[1], sys.argv[2:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the heartbeat still finds the orphan's trial stale
        pass
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
