"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, verify, find, resume, retention.

Each rank writes only its shards. A checkpoint is written into a hidden temporary folder; once every rank is done,
rank 0 fsyncs every file, writes `state.json` last (with the size of every file: the manifest a later resume
verifies), and renames the folder to `checkpoints/step-N`. A crash mid-save therefore never leaves a `step-N`
that looks valid and is not; a damaged one (a lost shard, a torn `state.json`) is detected, and `resume=auto` falls
back to the newest valid checkpoint. Older checkpoints are pruned only after the new one is complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fsdp_ft.errors import CheckpointError
from fsdp_ft.runtime.distributed import DistEnv, barrier
from fsdp_ft.storage import durable, safe_dcp

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
DEEPSPEED_TAG = "deepspeed"  # engine deepspeed: DeepSpeed's own files sit in step-N/deepspeed/


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


# ---------------------------------------------------------------- verification

def read_state(path: Path) -> dict:
    """A checkpoint's state.json; a missing or damaged one is a CheckpointError naming the file."""
    f = Path(path) / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' has no {STATE_FILE} (a save that did not finish)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{f}' is damaged ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"'{f}' is damaged (it records no step)")
    return state


def problems(path: Path) -> list[str]:
    """What makes a checkpoint unusable, found without loading its tensors ([] when it is valid): a missing or
    damaged state.json, a file of the manifest missing or of another size, shards that DCP's index lists but that
    are missing or short; without a manifest (an older fsdp_ft), an RNG file that does not load."""
    try:
        state = read_state(path)
    except CheckpointError as e:
        return [str(e)]
    found = []
    m = STEP_DIR.match(Path(path).name)
    if m and int(m.group(1)) != state["step"]:
        found.append(f"{STATE_FILE} records step {state['step']}")
    manifest = state.get("files")  # checkpoints before manifests have none
    for rel, size in (manifest or {}).items():
        f = Path(path) / rel
        if not f.is_file():
            found.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            found.append(f"{rel} holds {f.stat().st_size} bytes, {size} were written")
    if state.get("engine", "fsdp") == "deepspeed":
        if not (Path(path) / DEEPSPEED_TAG).is_dir():
            found.append(f"{DEEPSPEED_TAG}/ is missing")
    else:  # also names what a refused .metadata holds, when its size was made to match
        found += safe_dcp.verify_files(path)
    for rng in [] if manifest else sorted(Path(path).glob("rng-rank*.pt")):  # the manifest covers their sizes
        try:
            torch.load(rng, weights_only=True)
        except Exception as e:  # a torn or foreign file: not a state to restore
            found.append(f"{rng.name} does not load ({type(e).__name__})")
    return found


def scan(output_dir: str | Path) -> list[tuple[int, Path, list[str]]]:
    """Every checkpoints/step-N folder with its problems, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [(step, p, problems(p)) for step, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Valid checkpoints, oldest first."""
    return [(step, p) for step, p, found in scan(output_dir) if not found]


def newest_valid(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The checkpoint resume=auto continues from, and a warning for each newer one that is damaged."""
    notes = []
    for _step, path, found in reversed(scan(output_dir)):
        if not found:
            return path, notes
        notes.append(f"checkpoint '{path}' is damaged and skipped: {'; '.join(found[:3])}")
    if notes:
        notes.append("no valid checkpoint is left: the run starts again from step 0")
    return None, notes


def resolve_explicit(resume: str) -> Path:
    """resume=PATH: a checkpoint folder (it must be valid), or a run directory (its newest valid checkpoint)."""
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"config key 'resume': '{resume}' " +
                              ("is not a folder" if path.exists() else "does not exist"))
    if STEP_DIR.match(path.name) or (path / STATE_FILE).exists() or (path / ".metadata").exists():
        found = problems(path)
        if found:
            raise CheckpointError(f"config key 'resume': checkpoint '{path}' is damaged: {'; '.join(found[:3])}")
        return path
    valid = list_checkpoints(path)
    if not valid:
        raise CheckpointError(f"config key 'resume': '{resume}' is neither a checkpoint (checkpoints/step-N) nor a "
                              "run directory holding a valid one")
    return valid[-1][1]


def _options(trainable_only: bool) -> StateDictOptions:
    """PEFT runs save only what trains: the frozen base is reloaded from model.path on resume."""
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


# module names that wrappers put in parameter names and that state-dict keys leave out
_WRAPPER_NAMES = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}


def _trainable_keys(model) -> set[str]:
    """State-dict keys of the parameters that train, under every name a parameter is registered by. torch's
    `ignore_frozen_params` misses a frozen parameter registered twice: peft's prompt-learning models hold the
    input embedding also as `word_embeddings`, which a PEFT checkpoint then saved whole."""
    return {".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)
            for name, param in model.named_parameters(remove_duplicate=False) if param.requires_grad}


def _model_and_optim_state(model, optimizer, trainable_only: bool) -> dict:
    options = _options(trainable_only)
    weights = get_model_state_dict(model, options=options)
    if trainable_only:
        keep = _trainable_keys(model)
        weights = {k: v for k, v in weights.items() if k in keep}
    return {"model": weights, "optim": get_optimizer_state_dict(model, optimizer, options=options)}


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, state: dict, env: DistEnv,
                    keep_last: int, trainable_only: bool = False, write_shards=None) -> Path:
    """Write checkpoints/step-N atomically (all ranks call this), then prune to the newest keep_last.

    A step-N already on disk (a damaged leftover, or the same step of this run trained again after a fall-back)
    is replaced only once the new one is complete. `write_shards(folder)` writes model and optimizer state
    instead of DCP (engine deepspeed)."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step}"
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
    rng_file = tmp / f"rng-rank{env.rank}.pt"
    torch.save(_rng_state(), rng_file)
    durable.fsync_path(rng_file)
    barrier()
    if env.is_main:
        files = durable.fsync_tree(tmp)  # every rank's files are on disk before the folder can count as complete
        meta = {"step": step, "world_size": env.world_size, "trainable_only": trainable_only, "files": files}
        durable.write_text(tmp / STATE_FILE, json.dumps({**state, **meta}, indent=1))
        durable.fsync_path(tmp)
        _publish(tmp, final)
        prune(output_dir, keep_last, protect={state.get("best", {}).get("step")})
    barrier()
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final is moved out of the way first and deleted only afterwards."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    durable.fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def prune(output_dir: str | Path, keep_last: int, protect: set = frozenset()) -> None:
    """Delete all but the newest keep_last valid checkpoints (and the `protect` steps: the best one), and
    leftovers of saves that did not finish. Damaged step folders are left for the user to inspect."""
    found = list_checkpoints(output_dir)
    for step, path in found[:-keep_last]:
        if step not in protect:
            shutil.rmtree(path, ignore_errors=True)
    newest = found[-1][0] if found else -1
    for p in checkpoints_dir(output_dir).glob(".tmp-step-*"):
        if p.name.rsplit("-", 1)[1].isdigit() and int(p.name.rsplit("-", 1)[1]) <= newest:
            shutil.rmtree(p, ignore_errors=True)
    for p in checkpoints_dir(output_dir).glob(".old-step-*"):
        shutil.rmtree(p, ignore_errors=True)


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
        safe_dcp.load(sd, path)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's own error is a BaseException
        raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer: {_first_line(e)}") from None
    set_model_state_dict(model, sd["model"], options=_options(trainable_only))
    set_optimizer_state_dict(model, optimizer, sd["optim"], options=_options(trainable_only))
    restore_rng(path, state, env)
    return state


def _first_line(e: BaseException) -> str:
    """The useful line of an error; DCP's CheckpointException wraps each rank's failure in a long repr."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]  # (exception, traceback) of the first failing rank
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def restore_rng(path: Path, state: dict, env: DistEnv) -> None:
    """Each rank's saved RNG state (dropout), when the world size is the one that saved it."""
    rng_file = path / f"rng-rank{env.rank}.pt"
    if state.get("world_size") == env.world_size and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
