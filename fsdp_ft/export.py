"""Export a sharded DCP checkpoint to a Hugging Face folder that `from_pretrained` loads.

Runs in one process with no process group, streaming tensors out of the checkpoint group by group into
size-capped safetensors shards, so peak memory is about one group, not the whole model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fsdp_ft import checkpoint
from fsdp_ft.config import config_from_dict
from fsdp_ft.errors import CheckpointError
from fsdp_ft.weights_io import atomic_dir, iter_dcp_tensors, write_safetensors_shards


def _unique_state_names(model: torch.nn.Module) -> list[str]:
    """State-dict names with tied duplicates removed (the first name of a shared tensor wins, as in HF)."""
    seen, names = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def _load_run_config(run_dir: Path):
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    found = dict(checkpoint.list_checkpoints(run_dir))
    if not found:
        raise CheckpointError(f"'{run_dir}' holds no complete checkpoint under checkpoints/")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise CheckpointError(f"'{run_dir}' has no checkpoint for step {step} (it has steps {sorted(found)})")
    return found[step]


def export_checkpoint(run_dir: Path, ckpt: Path, out: Path, tokenizer=None,
                      max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write config, tokenizer and safetensors weights of checkpoint `ckpt` of run `run_dir` into `out`."""
    from fsdp_ft.model import build_meta_model, load_hf_config, load_tokenizer, resolve_model_dir

    cfg = _load_run_config(run_dir)
    labels = checkpoint.read_state(ckpt).get("extra", {}).get("labels")
    model_dir = resolve_model_dir(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg, model_dir)
    hf_config = load_hf_config(cfg, model_dir)
    model = build_meta_model(cfg, hf_config, tokenizer, labels)
    keep = set(_unique_state_names(model))
    stream = ((k, v) for k, v in iter_dcp_tensors(ckpt, prefix="model.") if k in keep)
    with atomic_dir(out) as tmp:
        write_safetensors_shards(stream, Path(tmp) / "weights", max_shard_bytes=max_shard_bytes)
        for f in (Path(tmp) / "weights").iterdir():
            f.rename(Path(tmp) / f.name)
        (Path(tmp) / "weights").rmdir()
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def export_run(run_dir: str, step: int | None, out: str) -> Path:
    """`fsdp-ft export RUN_DIR [--step N] --out DIR`."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    return export_checkpoint(run, pick_checkpoint(run, step), Path(out))
