"""Process-group set-up from whatever launched us: torchrun, srun, or a plain `python`.

Every launcher ends in the same env:// variables, so the trainer never asks how it was started. A plain
single process still gets a (world size 1) process group, so one code path serves 1 and N ranks.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fsdp_ft.errors import ConfigError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def read_launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's (srun), else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", default=0))
    if "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("running under srun without MASTER_ADDR/MASTER_PORT; launch with `fsdp-ft submit` "
                              "or export them in the batch script")
        return (_env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID", default=0))
    return 0, 1, 0


SETUP_TIMEOUT_MINUTES = 120.0  # the defaults of config keys dist.setup_timeout_minutes / dist.timeout_minutes
STEP_TIMEOUT_MINUTES = 30.0
_timeouts = {"setup": SETUP_TIMEOUT_MINUTES, "steps": STEP_TIMEOUT_MINUTES, "now": SETUP_TIMEOUT_MINUTES}


def init_distributed(setup_timeout_minutes: float = SETUP_TIMEOUT_MINUTES,
                     timeout_minutes: float = STEP_TIMEOUT_MINUTES) -> DistEnv:
    """Initialise the default process group (nccl on CUDA, gloo on CPU) and pick this rank's device.

    The group starts with the set-up timeout: rank 0 alone prepares the data (main_process_first) or fingerprints
    the run while the others wait in a collective, which the NCCL watchdog would abort after the step timeout.
    `step_timeout()` shortens it around training, where a long wait means a hung or dead rank."""
    _timeouts.update(setup=setup_timeout_minutes, steps=timeout_minutes, now=setup_timeout_minutes)
    rank, world, local_rank = read_launch_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # gloo for CPU-offloaded tensors, nccl for the rest
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=setup_timeout_minutes)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    **({"device_id": device} if device.type == "cuda" else {}))
    else:  # a second run in this process (tests, tune): the group outlives the first
        _set_timeout(setup_timeout_minutes)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device,
                   backend=dist.get_backend())


def _set_timeout(minutes: float) -> None:
    """Give every process group of this rank (the default one and the mesh's sub-groups, which torch creates with
    its own 10/30-minute defaults) this timeout for the collectives issued from now on."""
    _timeouts["now"] = minutes
    if not dist.is_initialized():
        return
    setter = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # neither API (torch >= 2.3 has the private one): the set-up timeout stays, the safe side
        return
    world = getattr(dist.distributed_c10d, "_world", None)
    groups = list(getattr(world, "pg_map", {}) or []) or [dist.group.WORLD]
    for group in groups:
        try:
            setter(datetime.timedelta(minutes=minutes), group)
        except (ValueError, RuntimeError, TypeError, AttributeError):
            pass  # a group this rank is not in, or a backend that cannot (fake): it keeps its timeout


@contextlib.contextmanager
def step_timeout():
    """Collectives inside use dist.timeout_minutes (training steps, eval, saves); after it, the set-up timeout again
    (the final export runs on rank 0 alone while the others wait)."""
    _set_timeout(_timeouts["steps"])
    try:
        yield
    finally:
        _set_timeout(_timeouts["setup"])


def build_mesh(env: DistEnv, hybrid_replicas: int) -> DeviceMesh:
    """1-D mesh for full sharding; 2-D (replicate, shard) mesh for hybrid sharding."""
    if hybrid_replicas == 1:
        mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    elif env.world_size % hybrid_replicas:
        raise ConfigError(f"config key 'fsdp.hybrid_replicas'={hybrid_replicas} must divide the world size "
                          f"{env.world_size}")
    else:
        mesh = init_device_mesh(env.device.type, (hybrid_replicas, env.world_size // hybrid_replicas),
                                mesh_dim_names=("replicate", "shard"))
    _set_timeout(_timeouts["now"])  # the sub-groups just made follow the phase's timeout, not torch's defaults
    return mesh


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def main_process_first(env: DistEnv):
    """Let rank 0 fill shared caches (datasets, downloads) before the others read them. The others wait for it
    under the set-up timeout (dist.setup_timeout_minutes), never the shorter step timeout; when rank 0 fails there
    (a bad data row), every rank raises its error instead of dying on the lost connection."""
    return _main_first(env.is_main)


@contextlib.contextmanager
def _main_first(is_main: bool):
    """Rank 0 runs the block first; the others enter it after, or raise the error rank 0 left it with."""
    if not is_main:
        error = broadcast_object(None)
        if error is not None:
            raise error
        yield
        return
    try:
        yield
    except Exception as e:
        broadcast_object(_shareable(e))
        raise
    broadcast_object(None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op at world size 1)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value`: how ranks agree on a decision any one of them may take (a stop signal,
    a pruned trial) in the same step. A CPU tensor: gloo, or the cpu:gloo half of the backend."""
    flag = torch.tensor([int(value)], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def all_gather_object(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's object on every rank (a decision one rank makes for all)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(is_main: bool, fn):
    """fn() run by rank 0 alone, its result on rank 0 (None elsewhere). When it raises, every rank raises the same
    error, instead of the others waiting in their next collective for a rank that has left."""
    with _main_first(is_main):
        return fn() if is_main else None


def _shareable(error: Exception) -> Exception:
    """`error`, or a RuntimeError saying the same when it does not survive pickling (custom constructors)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End of a run that every rank completed: wait for all ranks, then tear the process group down. A gloo
    rank that exits (or destroys its group) while a peer is still finishing its last transfers can abort in
    teardown ("terminate called without an active exception", seen after a successful 2-rank QLoRA run), which
    turns a finished run into a failed exit code."""
    barrier()
    shutdown()
