"""Per-rank log files: output_dir/logs/rank-N.log gets everything a rank prints (tracebacks included).

With N ranks the console interleaves their output, and a crashing rank's traceback is easy to lose; each rank
therefore also appends its own stdout and stderr to one file, headed by where it ran, under every launcher.

The copy is made at the file-descriptor level, so what C and C++ code writes (NCCL warnings, the c10d watchdog's
timeout report, faulthandler's stacks) reaches the file too, not only Python's `print`: fds 1 and 2 become pipes,
and a small helper process copies each byte to the console and to the file. A process, not a thread, because the
watchdog calls abort() right after its report, which would take a thread and its unread bytes along; the helper sits
in a session of its own and ignores stop signals, so the SIGTERM a launcher sends the rank's process group (to make
it save a checkpoint) cannot take the rank's output away while it saves. It ends when the rank's last copy of the
pipes closes, after copying everything.
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

LOG_DIR_ENV = "FSDP_FT_LOG_DIR"
# what the header's second line shows of the rank's environment (fsdp_ft.runtime.rank_env sets most of them)
SHOWN_ENV = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "CUDA_VISIBLE_DEVICES", "PYTORCH_ALLOC_CONF",
             "PYTORCH_CUDA_ALLOC_CONF", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE",
             "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE",
             "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")

# The helper: copies each pipe to its console fd and to the log; a console that went away (EPIPE) is dropped,
# the log goes on. Run with `python -I -S` (no site import: it starts in milliseconds).
_COPIER = r"""
import os, selectors, signal, sys
for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
to = {int(r): int(c) for r, c in (a.split(":") for a in sys.argv[2:])}
sel = selectors.DefaultSelector()
for r in to:
    sel.register(r, selectors.EVENT_READ)
def put(fd, data):
    while data:
        data = data[os.write(fd, data):]
while to:
    for key, _ in sel.select():
        data = os.read(key.fd, 1 << 16)
        if not data:
            sel.unregister(key.fd)
            del to[key.fd]
            continue
        if to[key.fd] >= 0:
            try:
                put(to[key.fd], data)
            except OSError:
                to[key.fd] = -1
        try:
            put(log, data)
        except OSError:
            pass
"""

_state: dict = {}


class _Tee:
    """Fallback where fds cannot be redirected: a Python stream that also writes to the log file."""

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


class _Console:
    """sys.stdout/sys.stderr once fd 1/2 is a pipe: isatty() still answers for the console (progress bars)."""

    def __init__(self, stream, tty: bool):
        self.stream, self.tty = stream, tty

    def isatty(self) -> bool:
        return self.tty

    def __getattr__(self, name):
        return getattr(self.stream, name)


def rank_from_env() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def _header() -> str:
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1
    job = f" slurm job {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else ""
    when = datetime.datetime.now().isoformat(timespec="seconds")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    env = "".join(f" {k}={os.environ[k]}" for k in SHOWN_ENV if k in os.environ)
    return (f"=== {when} rank {rank_from_env()} of {world} on node {node} pid {os.getpid()}{job} ===\n"
            f"=== cpus {cpus}{env} ===\n")


def start(log_dir: str | Path | None = None) -> Path | None:
    """Copy this process's stdout/stderr (fds 1 and 2) into LOG_DIR/rank-N.log (LOG_DIR: argument, else
    $FSDP_FT_LOG_DIR), keeping the console output."""
    log_dir = log_dir or os.environ.get(LOG_DIR_ENV)
    if not log_dir or _state:
        return None
    path = Path(log_dir) / f"rank-{rank_from_env()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(_header())
    _state["path"] = path
    try:
        _copy_fds(path)
    except (OSError, ValueError, AttributeError, subprocess.SubprocessError):  # no real fds 1/2: Python level only
        f = path.open("a", buffering=1, encoding="utf-8")
        sys.stdout, sys.stderr = _Tee(sys.stdout, f), _Tee(sys.stderr, f)
    return path


def _copy_fds(path: Path) -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    consoles = {fd: os.dup(fd) for fd in (1, 2)}  # raises where fd 1/2 is not open
    pipes = {fd: os.pipe() for fd in (1, 2)}
    ends = [f"{pipes[fd][0]}:{consoles[fd]}" for fd in (1, 2)]
    try:
        helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _COPIER, str(path), *ends],
                                  pass_fds=[*consoles.values(), *(r for r, _ in pipes.values())],
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        for fd in (*consoles.values(), *(e for p in pipes.values() for e in p)):
            os.close(fd)
        raise
    for fd, (r, w) in pipes.items():
        os.close(r)
        os.dup2(w, fd)  # from here on every write to fd 1/2, from Python, C or a child, goes through the helper
        os.close(w)
    ttys = {fd: os.isatty(c) for fd, c in consoles.items()}
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a pipe now: keep the log as current as the console was
    sys.stdout, sys.stderr = _Console(sys.stdout, ttys[1]), _Console(sys.stderr, ttys[2])
    _state.update(helper=helper, consoles=consoles, pid=os.getpid())
    atexit.register(_drain)


def _drain(timeout_s: float = 10.0) -> None:
    """At exit: hand fds 1/2 back to the console and wait until the helper has copied everything, so a launcher
    that reads the log after the rank exits sees its last lines."""
    if _state.get("pid") != os.getpid():  # a forked child exiting: the rank's helper is not its to wait for
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for fd, console in _state.get("consoles", {}).items():
        os.dup2(console, fd)
    try:
        _state["helper"].wait(timeout_s)  # longer only while a child of the rank still holds the pipes
    except (KeyError, subprocess.TimeoutExpired):
        pass
