"""DeepSpeed checkpoints in the run directory's own layout: checkpoints/step-N/{state.json, rng-rank*.pt, deepspeed/}.

The folder is written into a temporary name and renamed by `dcp_checkpoint.save_checkpoint`, exactly as for the FSDP
engine; only the shard files inside `deepspeed/` are DeepSpeed's (its save_checkpoint / load_checkpoint with that
tag). ZeRO partitions are cut for the number of ranks that wrote them, so a resume needs the same world size.
Export reads a checkpoint in one process with DeepSpeed's zero_to_fp32, which reassembles the fp32 weights.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from fsdp_ft.checkpoint import dcp_checkpoint
from fsdp_ft.errors import CheckpointError
from fsdp_ft.runtime.distributed import DistEnv


def save(engine, output_dir: str | Path, keep_last: int, state: dict, env: DistEnv, trainable_only: bool) -> Path:
    """Write checkpoints/step-N (all ranks call this). PEFT runs leave the frozen base out, as the FSDP engine does."""
    def write_shards(folder: Path) -> None:
        engine.save_checkpoint(str(folder), tag=dcp_checkpoint.DEEPSPEED_TAG, save_latest=False,
                               exclude_frozen_parameters=trainable_only)

    state = {**state, "engine": "deepspeed", "zero_stage": engine.zero_optimization_stage()}
    return dcp_checkpoint.save_checkpoint(output_dir, state["step"], None, None, state, env, keep_last,
                                      trainable_only=trainable_only, write_shards=write_shards)


def load(path: Path, engine, env: DistEnv) -> dict:
    """Load model, optimizer (fp32 masters and moments) and loss scale into the engine; returns the trainer state."""
    state = dcp_checkpoint.read_state(path)
    if state.get("engine", "fsdp") != "deepspeed":
        raise CheckpointError(f"checkpoint '{path}' was written by engine {state.get('engine', 'fsdp')}; resume it "
                              "with that engine (or start afresh with resume=none)")
    if state.get("world_size") != env.world_size:
        raise CheckpointError(f"checkpoint '{path}' holds ZeRO partitions for {state.get('world_size')} ranks; "
                              f"resume it with {state.get('world_size')} ranks, not {env.world_size}")
    if state.get("zero_stage") != engine.zero_optimization_stage():
        raise CheckpointError(f"checkpoint '{path}' was written with ZeRO stage {state.get('zero_stage')}; "
                              f"resume it with deepspeed.stage={state.get('zero_stage')}")
    try:
        loaded, _ = engine.load_checkpoint(str(path), tag=dcp_checkpoint.DEEPSPEED_TAG,
                                           load_module_strict=not state.get("trainable_only", False),
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
    except Exception as e:  # DeepSpeed raises assorted errors for a checkpoint that does not fit
        raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None
    if loaded is None:
        raise CheckpointError(f"checkpoint '{path}': DeepSpeed found no '{dcp_checkpoint.DEEPSPEED_TAG}' state in it")
    dcp_checkpoint.restore_rng(path, state, env)
    return state


def iter_deepspeed_tensors(ckpt: Path):
    """(name, full fp32 tensor) of the model in a DeepSpeed checkpoint, one tensor in memory at a time.

    Trainable weights come from the fp32 master partitions of every rank (the weights the optimizer steps),
    frozen ones from the model files (absent for PEFT runs, whose base is rebuilt from model.path)."""
    from fsdp_ft.runtime.deepspeed_import import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trainable_only = dcp_checkpoint.read_state(ckpt).get("trainable_only", False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress prints
        kwargs = {"tag": dcp_checkpoint.DEEPSPEED_TAG, "exclude_frozen_parameters": trainable_only}
        try:
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), lazy_mode=True, **kwargs)
        except TypeError:  # DeepSpeed before lazy_mode: the whole state dict at once
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), **kwargs)
    for name, tensor in lazy.items():
        yield name, tensor.contiguous()
