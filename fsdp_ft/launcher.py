"""`fsdp-ft run`: torchrun (torch.distributed.run) in this process, starting N `fsdp-ft train` ranks.

torchrun's agent starts the ranks, kills the rest when one fails and forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT; we add
SIGUSR1/SIGUSR2 (what SLURM sends before a time limit) so ranks can checkpoint and stop, point every rank's
log at output_dir/logs/rank-N.log, and exit with the failing rank's code (128 + signal when a signal stopped us).
"""
from __future__ import annotations

import os
from pathlib import Path

from fsdp_ft.ranklog import LOG_DIR_ENV

FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


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


def run(argv: list[str], output_dir: str | Path) -> int:
    """Run torchrun with `argv`; returns the exit code of the first failing rank (0 when all succeed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    os.environ[LOG_DIR_ENV] = str(Path(output_dir) / "logs")
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", FORWARDED_SIGNALS)
    try:
        torchrun_main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    except SignalException as e:  # the agent already sent the signal on to the ranks and waited for them
        return 128 + int(e.sigval)
    except Exception as e:  # ChildFailedError: torchrun already printed which rank failed
        return _child_exit_code(e)
    return 0


def _child_exit_code(e: Exception) -> int:
    """The code of the rank that failed first (the others were then stopped by the agent)."""
    if hasattr(e, "get_first_failure"):
        _, failure = e.get_first_failure()
        code = failure.exitcode
        if code:
            return code if code > 0 else 128 - code  # a rank killed by signal S reports -S
    return 1
