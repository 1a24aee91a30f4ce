"""What every launcher puts in its ranks' environment unless the user set it: OpenMP threads, the CUDA allocator's
expandable segments, the NCCL flight recorder, gloo's network interface (see `rank_env_defaults`).

`fsdp-ft run` applies it before torchrun starts the ranks; `fsdp-ft submit` in each rank, before torch loads.
"""
from __future__ import annotations

import os
from pathlib import Path


def cores_per_rank(ranks_on_node: int, environ=os.environ) -> int:
    """This process's CPUs (its affinity, at most SLURM_CPUS_PER_TASK inside a SLURM step) shared by the ranks
    it starts here."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus // max(ranks_on_node, 1))


def interface_to(host: str) -> str | None:
    """The network interface that holds this machine's address toward `host` (Linux, IPv4); None if unknown."""
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))  # UDP: picks the route, sends nothing
            local = s.getsockname()[0]
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue  # no IPv4 address
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except (OSError, ValueError):
        pass
    return None


def _torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch, read without importing it (launchers apply this before torch loads)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = version("torch").split(".")[:2]
        return int(major), int(minor)
    except (PackageNotFoundError, ValueError):
        return 0, 0


# the flight recorder's size: torch 2.11 and 2.13 (the supported range) read it as TORCH_FR_BUFFER_SIZE first and warn
# on every rank about the old name, a gloo-only CPU run included (its NCCL process group's own default is the same
# 2000 there); older ones get the old name
TRACE_BUFFER_SIZE = "TORCH_FR_BUFFER_SIZE" if _torch_version() >= (2, 11) else "TORCH_NCCL_TRACE_BUFFER_SIZE"
# where the recorder dumps: renamed the same way (both names are in torch 2.11's library; the new one is read first)
DUMP_TEMP_FILE = "TORCH_FR_DUMP_TEMP_FILE" if _torch_version() >= (2, 11) else "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"


def rank_env_defaults(log_dir: str | Path, ranks_on_node: int, master_addr: str | None, nnodes: int,
                      environ=os.environ) -> dict[str, str]:
    """The variables every launcher gives its ranks unless the user set them (or a newer name of them):
    - OMP_NUM_THREADS: this process's cores shared by its ranks (torchrun sets 1 for several ranks, which leaves
      set-up work such as loading and quantizing on one core; SLURM's share is SLURM_CPUS_PER_TASK);
    - PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF (torch >= 2.9 reads the new name first and warns on the old
      one alone) = expandable_segments:True: FSDP2's all-gather buffers and variable-length batches fragment
      the caching allocator's fixed segments;
    - the NCCL flight recorder: the last 2000 collectives of each rank, dumped to LOG_DIR/nccl-trace-rank-N on a
      watchdog timeout (TORCH_NCCL_* names; torch >= 2.9 also reads them under TORCH_FR_*), the record that says
      which rank stopped in which collective; the buffer's size under its new name where the old one warns;
    - GLOO_SOCKET_IFNAME across machines: the interface that reaches the rendezvous host. gloo (the CPU half of
      cpu:gloo,cuda:nccl) otherwise binds the address the hostname resolves to, which on many clusters is a
      loopback entry (127.0.1.1 in /etc/hosts) or a network the other nodes cannot reach."""
    def unset(*names: str) -> bool:
        return not any(environ.get(n) for n in names)

    out = {}
    if unset("OMP_NUM_THREADS"):
        out["OMP_NUM_THREADS"] = str(cores_per_rank(ranks_on_node, environ))
    if unset("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        out["PYTORCH_ALLOC_CONF"] = out["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if unset("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"):
        out[TRACE_BUFFER_SIZE] = "2000"
    if unset("TORCH_NCCL_DUMP_ON_TIMEOUT"):
        out["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
    if unset("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"):
        out[DUMP_TEMP_FILE] = str(Path(log_dir).absolute() / "nccl-trace-rank-")
    if nnodes > 1 and master_addr and unset("GLOO_SOCKET_IFNAME"):
        iface = interface_to(master_addr)
        if iface:
            out["GLOO_SOCKET_IFNAME"] = iface
    return out


def apply(log_dir: str | Path, ranks_on_node: int, master_addr: str | None,
                            nnodes: int) -> dict[str, str]:
    """rank_env_defaults() into this process's environment, which the ranks it starts (or it itself) inherit."""
    added = rank_env_defaults(log_dir, ranks_on_node, master_addr, nnodes)
    os.environ.update(added)
    return added
