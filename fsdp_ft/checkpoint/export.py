"""Export a sharded DCP checkpoint to a Hugging Face folder that `from_pretrained` loads.

Runs in one process with no process group, streaming tensors out of the checkpoint group by group into
size-capped safetensors shards, so peak memory is about one group, not the whole model.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from fsdp_ft.checkpoint import dcp_checkpoint
from fsdp_ft.config import config_from_dict, require_extras
from fsdp_ft.errors import CheckpointError, UserError
from fsdp_ft.model import adapters, checkpoint_layout, vocab
from fsdp_ft.quant import quantize
from fsdp_ft.storage import durable
from fsdp_ft.storage.weights_io import atomic_dir, write_safetensors_shards


def _unique_state_names(model: torch.nn.Module) -> list[str]:
    """State-dict names with tied duplicates removed (the first name of a shared tensor wins, as in HF)."""
    seen, names = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def _load_run_config(run_dir: Path, trust_remote_code: bool | None = None):
    """The run's config; `trust_remote_code` (unless None) replaces the run's model.trust_remote_code."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a run directory (no config.yaml)")
    cfg = config_from_dict(yaml.safe_load(path.read_text()))
    if trust_remote_code is not None:
        cfg.model.trust_remote_code = trust_remote_code
    return cfg


def run_wants_remote_code(run: Path) -> bool:
    """Whether the run's own config.yaml sets model.trust_remote_code (which alone does not switch it on)."""
    import yaml

    tree = yaml.safe_load((run / "config.yaml").read_text()) or {}
    model = tree.get("model") if isinstance(tree, dict) else None
    return isinstance(model, dict) and model.get("trust_remote_code") is True


def needs_remote_code(e: Exception) -> bool:
    """Whether a load failed for want of custom code (transformers' refusal names it)."""
    text = str(e)
    return "custom code" in text or "trust_remote_code" in text


def remote_code_hint(run: Path, e: Exception) -> str:
    """The one-line error of a run whose config.yaml wanted custom code that this command did not allow."""
    return (f"{e} (the run's config.yaml asks for model.trust_remote_code, which a run folder cannot switch on by "
            f"itself: pass --trust-remote-code if you trust '{run}')")


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    """Checkpoint `step`, else the newest valid one. A damaged checkpoint (a lost shard, a planted .metadata) is
    never exported: asked for by step, or when no valid one is left, it fails naming its problems; newer damaged
    ones passed over for an older valid one are named on stderr."""
    scanned = dcp_checkpoint.scan(run_dir)
    valid = {s: p for s, p, problems in scanned if not problems}
    damaged = {s: (p, problems) for s, p, problems in scanned if problems}
    if step in damaged or (step is None and damaged and not valid):
        path, problems = damaged[max(damaged) if step is None else step]
        raise CheckpointError(f"checkpoint '{path}' is damaged: {'; '.join(problems[:3])}")
    if not valid:
        raise CheckpointError(f"'{run_dir}' holds no complete checkpoint under checkpoints/")
    if step is None:
        for s in sorted(damaged):
            if s > max(valid):
                print(f"[fsdp_ft] checkpoint '{damaged[s][0]}' is damaged and skipped: "
                      f"{'; '.join(damaged[s][1][:3])}", file=sys.stderr)
        return valid[max(valid)]
    if step not in valid:
        raise CheckpointError(f"'{run_dir}' has no checkpoint for step {step} (it has steps {sorted(valid)})")
    return valid[step]


def export_checkpoint(run_dir: Path, ckpt: Path, out: Path, tokenizer=None, max_shard_bytes: int = 2 * 1024**3,
                      merge_adapters: bool = False, trust_remote_code: bool | None = None) -> Path:
    """Write checkpoint `ckpt` of run `run_dir` into `out`: an HF model folder, or for PEFT runs a PEFT adapter
    folder (`merge_adapters`: the base with the adapters merged in, as a plain HF model).

    `trust_remote_code`: None keeps the run's own setting (training writing its own final/); commands given a
    folder pass what their command line asked for, since a run folder may come from someone else."""
    from fsdp_ft.model.build import build_meta_model, load_hf_config, load_tokenizer, resolve_model_dir

    cfg = _load_run_config(run_dir, trust_remote_code)
    require_extras(cfg, "export")  # the base model's config (and a merge's weights) come from model.path
    extra = dcp_checkpoint.read_state(ckpt).get("extra", {})
    labels = extra.get("labels")
    model_dir = resolve_model_dir(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg, model_dir)
    if extra.get("chat_tokens"):  # training gave the template-less tokenizer ChatML (and the model its rows)
        vocab.ensure_chat_template(tokenizer)
    model = build_meta_model(cfg, load_hf_config(cfg, model_dir, check_positions=False), tokenizer, labels)
    if adapters.is_peft(cfg):
        model = adapters.wrap(model, cfg, vocab.added_chat_tokens(tokenizer))
        if not merge_adapters:
            return _write_adapter(cfg, model, ckpt, out, tokenizer)
        model = _merged_model(cfg, model_dir, model, ckpt)
        stream = ((n, t) for n, t in model.state_dict().items() if n in set(_unique_state_names(model)))
    else:
        keep = set(_unique_state_names(model))
        stream = ((k, v) for k, v in iter_model_tensors(ckpt) if k in keep)
    stream = checkpoint_layout.original_layout(stream, model)  # e.g. MoE experts one matrix each again
    with atomic_dir(out) as tmp:
        write_safetensors_shards(stream, Path(tmp) / "weights", max_shard_bytes=max_shard_bytes)
        for f in (Path(tmp) / "weights").iterdir():
            f.rename(Path(tmp) / f.name)
        (Path(tmp) / "weights").rmdir()
        # the class that was trained (a base checkpoint may name BertModel for a classifier): pipelines and
        # `fsdp-ft eval/predict` of the bare folder read the task from it
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _write_adapter(cfg, model, ckpt: Path, out: Path, tokenizer) -> Path:
    """PEFT format: adapter_config.json + adapter_model.safetensors, loadable by PeftModel.from_pretrained."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    # adapters are small: give the meta model their trained values (the frozen base stays meta) and let peft
    # pick and name what it saves (prompt learning saves the encoder's output, not its weights)
    model.load_state_dict(dict(iter_model_tensors(ckpt)), strict=False, assign=True)
    # new chat tokens' rows are in the trainable tokens; the base embedding is not saved (it stays meta here)
    adapter_sd = get_peft_model_state_dict(model, save_embedding_layers=False)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in adapter_sd.items()}, str(Path(tmp) / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        peft_cfg = model.peft_config["default"]
        peft_cfg.base_model_name_or_path = cfg.model.path
        peft_cfg.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _merged_model(cfg, model_dir: Path, model: torch.nn.Module, ckpt: Path) -> torch.nn.Module:
    """Base (dequantized for QLoRA) + trained adapters, merged into plain weights on the CPU."""
    from fsdp_ft.model.materialize import materialize, open_weight_source

    materialize(model, open_weight_source(cfg, model_dir, model), cfg.train.seed, torch.device("cpu"))
    quantize.round_trip_base(model, cfg)
    trained = dict(iter_model_tensors(ckpt))
    result = model.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"checkpoint '{ckpt}' holds tensors this model lacks: {result.unexpected_keys[:3]}")
    return model.merge_and_unload()


def export_run(run_dir: str, step: int | None, out: str, merge_adapters: bool = False,
               trust_remote_code: bool = False) -> Path:
    """`fsdp-ft export RUN_DIR [--step N] --out DIR [--merge-adapters] [--trust-remote-code]`."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    ckpt = pick_checkpoint(run, step)
    try:
        return export_checkpoint(run, ckpt, Path(out), merge_adapters=merge_adapters,
                                 trust_remote_code=trust_remote_code)
    except UserError as e:
        if not trust_remote_code and needs_remote_code(e) and run_wants_remote_code(run):
            raise type(e)(remote_code_hint(run, e)) from None
        raise


def iter_model_tensors(ckpt: Path):
    """(name, full tensor) of a checkpoint's model, whichever engine wrote it (for export, in one process)."""
    if dcp_checkpoint.read_state(ckpt).get("engine") == "deepspeed":
        from fsdp_ft.checkpoint.deepspeed_checkpoint import iter_deepspeed_tensors
        return iter_deepspeed_tensors(ckpt)
    from fsdp_ft.storage.weights_io import iter_dcp_tensors
    return iter_dcp_tensors(ckpt, prefix="model.")


def export_final(out: Path, tokenizer) -> dict:
    """Write output_dir/final (an HF folder) from the best checkpoint (train.best_metric) or else the newest,
    replacing an older final/ only at the end. Returns which step it came from, for the log."""
    source, best_record = dcp_checkpoint.final_checkpoint(out)
    final, staging, old = out / "final", out / ".final-new", out / ".final-old"
    for leftover in out.glob(".final-new*"):  # an export that did not finish (and atomic_dir's temp folders)
        shutil.rmtree(leftover)
    if old.exists():  # a crash between the two renames below: the previous final/ waits there
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    export_checkpoint(out, source, staging, tokenizer=tokenizer)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    durable.fsync_path(out)
    shutil.rmtree(old, ignore_errors=True)
    exported = dcp_checkpoint.read_state(source)["step"]
    if best_record:
        print(f"[fsdp_ft] final/ is step {exported}, the best by {best_record['metric']} "
              f"({best_record['value']:.6g})", file=sys.stderr, flush=True)
        return {"final_from_step": exported, "best_metric": best_record["metric"], "best_value": best_record["value"]}
    return {"final_from_step": exported}
