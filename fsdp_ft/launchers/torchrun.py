"""`fsdp-ft run`: torchrun (torch.distributed.run) in this process, starting N `fsdp-ft train` ranks.

torchrun's agent starts the ranks, points their logs at output_dir/logs/rank-N.log and collects their exit codes.
It runs in a thread, and this process's main thread owns the signals: on the main thread the agent would turn
SIGTERM into an exception, give the ranks a fixed 30 s before SIGKILL (torch < 2.12 has no option for it) and report
128 + 15 without looking at what the ranks did; and it would not forward SIGUSR1/SIGUSR2 (SLURM's time-limit warning):
torch < 2.10 has no setting for that, later ones take it from torchrun's own --signals-to-handle only, and the launcher
died of the signal with its ranks left running. So the main thread forwards SIGTERM/INT/HUP/QUIT/USR1/USR2 to every rank, SIGKILLs the ranks still
running after the shutdown grace, and lets the agent's monitor see each rank exit. The same code runs on every torch
from 2.6 on, as the agent skips its own signal handlers off the main thread in all of them.

Before it starts the ranks, `fsdp-ft run` adds what a GPU user expects to their environment (fsdp_ft.runtime.rank_env).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from fsdp_ft.runtime.ranklog import LOG_DIR_ENV

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # fsdp_ft.runtime.preemption's: the ranks save, then exit
STOP_WARNING = "the newest checkpoint may not be from this stop"


def check_sizes(nproc_per_node: int, nnodes: int, node_rank: int, shutdown_grace_s: float) -> None:
    """One line naming the option, before anything starts (torchrun exits 1 silently on 0 ranks, and a node rank
    out of range waits for a rendezvous that never completes)."""
    from fsdp_ft.errors import ConfigError

    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be at least 1 (got {nproc_per_node})")
    if nnodes < 1:
        raise ConfigError(f"--nnodes must be at least 1 (got {nnodes})")
    if not 0 <= node_rank < nnodes:
        allowed = "0" if nnodes == 1 else f"in 0..{nnodes - 1}"
        raise ConfigError(f"--node-rank must be {allowed} with --nnodes {nnodes} (got {node_rank})")
    if shutdown_grace_s < 0:
        raise ConfigError(f"--shutdown-grace-s must be 0 or more seconds (got {shutdown_grace_s:g})")


def resolve_endpoint(endpoint: str | None, nnodes: int, node_rank: int) -> str:
    """HOST:PORT for the rendezvous: a free local port for a single machine when none is given; on node 0,
    a port already taken fails here with one line (torchrun would exit 1 without saying why)."""
    import socket

    from fsdp_ft.errors import ConfigError

    if endpoint is None:
        if nnodes > 1:
            raise ConfigError("--rdzv-endpoint HOST:PORT (of node 0) is required with --nnodes > 1")
        endpoint = "127.0.0.1:0"
    host, _, port = endpoint.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"--rdzv-endpoint '{endpoint}' must be HOST:PORT")
    if node_rank == 0:
        with socket.socket() as s:
            try:
                s.bind(("", int(port)))
            except OSError:
                raise ConfigError(f"--rdzv-endpoint '{endpoint}': port {port} is already in use on this machine; "
                                  "choose another (or leave --rdzv-endpoint out on a single machine)") from None
            port = str(s.getsockname()[1])
    return f"{host or '127.0.0.1'}:{port}"


def torchrun_argv(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str, config: str,
                  overrides: list[str]) -> list[str]:
    """Static rendezvous on HOST:PORT of node 0 (the same as `torchrun --master-addr --master-port`)."""
    host, _, port = rdzv_endpoint.rpartition(":")
    return [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--master-addr={host or '127.0.0.1'}", f"--master-port={port}",
            "-m", "fsdp_ft.cli", "train", config, *overrides]


# ---------------------------------------------------------------- running torchrun


def run(argv: list[str], output_dir: str | Path, shutdown_grace_s: float, hosts_rank0: bool = True) -> int:
    """Run torchrun with `argv`; returns 0 when every rank succeeded, 128 + S when a stop signal S stopped every
    rank after its checkpoint, else the failing rank's code (and one line about it when a stop was under way).
    `hosts_rank0`: this node runs rank 0, which prints a user error's one line."""
    os.environ[LOG_DIR_ENV] = str(Path(output_dir) / "logs")
    outcome: dict = {}
    stop = _Stop(shutdown_grace_s)
    if not os.path.isdir("/proc"):  # no way to find the ranks: torchrun's own signal handling (30 s grace)
        _torchrun(argv, outcome)
        return _settle(outcome, stop, hosts_rank0)
    agent = threading.Thread(target=_torchrun, args=(argv, outcome), name="torchrun-agent", daemon=True)
    previous = {sig: signal.signal(sig, stop.forward) for sig in FORWARDED}
    try:
        agent.start()
        while agent.is_alive():
            agent.join(0.2)
            if stop.signum and not stop.tick():  # a signal before any rank started: nothing to save or wait for
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(128 + stop.signum)  # the agent thread may be blocked in a rendezvous
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    return _settle(outcome, stop, hosts_rank0)


def _settle(outcome: dict, stop: "_Stop", hosts_rank0: bool) -> int:
    """The exit code, and torchrun's held-back reports shown unless rank 0's one-line error here said it all."""
    code = _exit_code(outcome, stop)
    _AGENT_LOG.removeFilter(_HELD)
    if code != USER_ERROR or not hosts_rank0:  # on the other nodes, torchrun's line is what says that ranks failed
        for record in _HELD.records:
            _AGENT_LOG.handle(record)
    _HELD.records.clear()
    return code


def _torchrun(argv: list[str], outcome: dict) -> None:
    from torch.distributed.run import main as torchrun_main

    _AGENT_LOG.addFilter(_HELD)
    try:
        torchrun_main(argv)
    except SystemExit as e:
        outcome["code"] = int(e.code or 0)
    except Exception as e:  # ChildFailedError (torchrun logged which rank failed), rendezvous errors
        outcome["error"] = e


USER_ERROR = 2  # fsdp-ft's exit code for bad input, after rank 0 printed its one-line error (every rank raises it)


class _HeldBack(logging.Filter):
    """torchrun's agent log, held until the ranks' outcome is known. When a rank exits with a user error, its line
    ("failed (exitcode: 2) local_rank: ...") and the SIGTERMs it sends the other ranks would follow, and bury, the
    error line rank 0 printed. Drops the agent's warning that it installs no signal handlers off the main thread:
    this launcher does."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "child thread" in record.getMessage():
            return False
        if record.levelno < logging.WARNING:
            return True
        self.records.append(record)
        return False


_AGENT_LOG = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
_HELD = _HeldBack()


class _Stop:
    """The signals this launcher got: forwarded to every rank; SIGKILL for ranks still running after the grace."""

    def __init__(self, grace_s: float):
        self.grace_s, self.signum, self.since = grace_s, 0, 0.0
        self.signalled: set[int] = set()  # rank pids
        self.killed: set[int] = set()  # pids of the ranks killed when the grace ran out

    def forward(self, signum: int, frame=None) -> None:
        if not self.signum:
            self.signum, self.since = signum, time.monotonic()
        for pid in _rank_pids():
            self._send(pid, signum)

    def tick(self) -> bool:
        """Signal ranks started since the signal came; kill them all once the grace is over. False: no rank has
        run since the signal came, after a second's wait for a start already under way."""
        ranks = _rank_pids()
        for pid in ranks - self.signalled:
            self._send(pid, self.signum)
        if time.monotonic() >= self.since + self.grace_s:
            for pid in ranks - self.killed:
                self.killed.add(pid)
                self._send(pid, signal.SIGKILL)
        return bool(self.signalled) or time.monotonic() < self.since + 1

    def _send(self, pid: int, signum: int) -> None:
        self.signalled.add(pid)
        try:
            os.killpg(pid, signum)  # torchrun starts each rank in a session of its own: its children get it too
        except (ProcessLookupError, PermissionError):
            pass


def _rank_pids() -> set[int]:
    """The running children of this process that torchrun started as ranks (LOCAL_RANK in their environment)."""
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = Path(f"/proc/{entry.name}/stat").read_text().rpartition(")")[2].split()[:2]
            if int(ppid) != os.getpid() or state == "Z":
                continue
            env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
            if any(var.startswith(b"LOCAL_RANK=") for var in env):
                pids.add(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return pids


def _exit_code(outcome: dict, stop: _Stop) -> int:
    """What the ranks did. A rank exits 128 + S (S: a stop signal) only after every rank saved the stop's checkpoint
    and passed the barrier after it (cmd_train), so one such exit proves the checkpoint; a sibling that dies after it,
    in teardown or of the SIGTERM torchrun sends the ranks still running once one has exited, changes nothing."""
    error = outcome.get("error")
    if error is None:
        return outcome.get("code", 0)
    if hasattr(error, "sigval"):  # SignalException: torchrun handled the signal itself (no /proc)
        return 128 + int(error.sigval)
    failures = getattr(error, "failures", None) or {}  # ChildFailedError: global rank -> ProcessFailure
    stops = {128 + s for s in (stop.signum, *STOP_SIGNALS) if s}
    saved = [f.exitcode for f in failures.values() if f.exitcode in stops]
    if saved:
        return saved[0]
    if stop.signum and stop.signum not in STOP_SIGNALS:  # SIGINT/HUP/QUIT: the ranks quit without saving
        return 128 + stop.signum
    if not failures:  # torchrun itself failed and said why
        return 1
    if not stop.signum:  # an ordinary failure: torchrun printed which rank failed first
        return _shell_code(min(failures.values(), key=lambda f: f.timestamp))
    # stable: ties (timestamps are whole seconds) keep the order torchrun saw the exits in
    rank, failure = min(failures.items(), key=lambda item: item[1].timestamp)
    if failure.exitcode > 0:
        how = f"exited with code {failure.exitcode}"
    else:
        how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        if failure.pid in stop.killed:
            how += f" after the {stop.grace_s:g} s shutdown grace (--shutdown-grace-s)"
    print(f"fsdp-ft: rank {rank} {how} while stopping on {signal.Signals(stop.signum).name}; {STOP_WARNING}",
          file=sys.stderr, flush=True)
    code = _shell_code(failure)
    return 1 if code in stops else code  # a rank killed by the stop signal itself: 128 + S would say 'saved'


def _shell_code(failure) -> int:
    """A rank's exit code as a shell reports it: 128 + S for a rank killed by signal S."""
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
