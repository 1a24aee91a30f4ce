"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, find, resume, retention.

Each rank writes only its shards. A checkpoint is written into a hidden temporary folder and renamed to
`checkpoints/step-N` only after every rank has finished and `state.json` is on disk, so a crash mid-save never
leaves a newest checkpoint that cannot load; older checkpoints are pruned only after the new one is complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fsdp_ft.distributed import DistEnv, barrier
from fsdp_ft.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


DEEPSPEED_TAG = "deepspeed"  # engine deepspeed: DeepSpeed's own files sit in step-N/deepspeed/


def is_complete(path: Path) -> bool:
    shards = (path / ".metadata").is_file() or (path / DEEPSPEED_TAG).is_dir()
    return shards and (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return sorted(found)


def resolve_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: none, the newest complete one (auto), or an explicit path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if path.is_dir() and not is_complete(path) and list_checkpoints(path):
        return list_checkpoints(path)[-1][1]  # a run directory: take its newest checkpoint
    if not is_complete(path):
        raise CheckpointError(f"config key 'resume': '{resume}' is not a complete checkpoint "
                              f"(expected a checkpoints/step-N folder with .metadata and {STATE_FILE})")
    return path


def _options(trainable_only: bool) -> StateDictOptions:
    """PEFT runs save only what trains: the frozen base is reloaded from model.path on resume."""
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _model_and_optim_state(model, optimizer, trainable_only: bool) -> dict:
    options = _options(trainable_only)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optimizer, options=options)}


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, state: dict, env: DistEnv,
                    keep_last: int, trainable_only: bool = False, write_shards=None) -> Path:
    """Write checkpoints/step-N atomically (all ranks call this), then prune to the newest keep_last.

    `write_shards(folder)` writes model and optimizer state instead of DCP (engine deepspeed)."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step}"
    if is_complete(final):  # the same step is already saved (e.g. resumed at the end): nothing to add
        return final
    tmp = root / f".tmp-step-{step}"
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    if write_shards is not None:
        write_shards(tmp)
    else:
        dcp.save(_model_and_optim_state(model, optimizer, trainable_only), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-rank{env.rank}.pt")
    barrier()
    if env.is_main:
        meta = {"step": step, "world_size": env.world_size, "trainable_only": trainable_only}
        (tmp / STATE_FILE).write_text(json.dumps({**state, **meta}, indent=1))
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(output_dir, keep_last, protect={state.get("best", {}).get("step")})
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(output_dir: str | Path, keep_last: int, protect: set = frozenset()) -> None:
    """Delete all but the newest keep_last complete checkpoints (and the `protect` steps: the best one), and
    stale temporary folders."""
    found = list_checkpoints(output_dir)
    for step, path in found[:-keep_last]:
        if step not in protect:
            shutil.rmtree(path, ignore_errors=True)
    newest = found[-1][0] if found else -1
    for p in checkpoints_dir(output_dir).glob(".tmp-step-*"):
        if int(p.name.rsplit("-", 1)[1]) <= newest:
            shutil.rmtree(p, ignore_errors=True)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def final_checkpoint(output_dir: str | Path) -> tuple[Path, dict]:
    """The checkpoint `final/` comes from: the best one (train.best_metric) when the newest checkpoint's state
    names one that is still on disk, else the newest. Returns it with the best record ({} when none)."""
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"'{output_dir}' holds no complete checkpoint under checkpoints/")
    best = read_state(found[-1][1]).get("best") or {}
    by_step = dict(found)
    if best.get("step") in by_step:
        return by_step[best["step"]], best
    return found[-1][1], {}


def load_checkpoint(path: Path, model, optimizer, env: DistEnv) -> dict:
    """Load model and optimizer shards (DCP reshards if the world size changed); returns the trainer state."""
    state = read_state(path)
    if state.get("engine", "fsdp") != "fsdp":
        raise CheckpointError(f"checkpoint '{path}' was written by engine {state['engine']}; resume it with "
                              f"engine={state['engine']} (or start afresh with resume=none)")
    trainable_only = state.get("trainable_only", False)
    sd = _model_and_optim_state(model, optimizer, trainable_only)
    try:
        dcp.load(sd, checkpoint_id=str(path))
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer: "
                              f"{str(e).strip().splitlines()[0][:300]}") from None
    set_model_state_dict(model, sd["model"], options=_options(trainable_only))
    set_optimizer_state_dict(model, optimizer, sd["optim"], options=_options(trainable_only))
    restore_rng(path, state, env)
    return state


def restore_rng(path: Path, state: dict, env: DistEnv) -> None:
    """Each rank's saved RNG state (dropout), when the world size is the one that saved it."""
    rng_file = path / f"rng-rank{env.rank}.pt"
    if state.get("world_size") == env.world_size and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def iter_model_tensors(ckpt: Path):
    """(name, full tensor) of a checkpoint's model, whichever engine wrote it (for export, in one process)."""
    if read_state(ckpt).get("engine") == "deepspeed":
        from fsdp_ft.ds_checkpoint import iter_deepspeed_tensors
        return iter_deepspeed_tensors(ckpt)
    from fsdp_ft.weights_io import iter_dcp_tensors
    return iter_dcp_tensors(ckpt, prefix="model.")
