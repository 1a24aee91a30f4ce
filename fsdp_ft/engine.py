"""`train(cfg)`: the one entry every launcher ends in — set up, build, shard, load, resume, train, export."""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdp_ft import adapters, checkpoint, distributed, parallel, quantize
from fsdp_ft.config import Config, dump_config
from fsdp_ft.data import BatchPlan, load_splits
from fsdp_ft.errors import ConfigError, DataError
from fsdp_ft.finetune import apply_finetune
from fsdp_ft.metrics import MetricsLogger, peak_host_rss_bytes
from fsdp_ft.model import (build_meta_model, load_hf_config, load_tokenizer, materialize, open_weight_source,
                           parameter_counts, resolve_model_dir)
from fsdp_ft.optim import build_optimizer, build_scheduler
from fsdp_ft.tasks import get_task
from fsdp_ft.trainer import Trainer, TrainState


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    state: TrainState
    output_dir: Path


def prepare_output_dir(cfg: Config, env: distributed.DistEnv) -> Path:
    """Create output_dir and check it is writable before any expensive work."""
    out = Path(cfg.output_dir)
    if env.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"config key 'output_dir': cannot write to '{out}': {e.strerror or e}") from None
    distributed.barrier()
    return out


def _log(env, msg: str) -> None:
    if env.is_main:
        print(f"[fsdp_ft] {msg}", file=sys.stderr, flush=True)


def total_steps(cfg: Config, plan: BatchPlan) -> int:
    if plan.steps_per_epoch == 0:
        raise DataError(f"data.train: '{cfg.data.train}' has {plan.num_samples} usable rows, fewer than one global "
                        f"batch of {plan.global_batch} (train.micro_batch_size={cfg.train.micro_batch_size} x "
                        f"train.grad_accum={cfg.train.grad_accum} x {plan.world_size} ranks)")
    return cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch


def _plan(cfg: Config, env: distributed.DistEnv, num_samples: int) -> BatchPlan:
    return BatchPlan(num_samples, cfg.train.micro_batch_size, cfg.train.grad_accum, env.world_size, env.rank,
                     cfg.train.seed)


def build(cfg: Config, env: distributed.DistEnv):
    """Data, tokenizer and the sharded, materialised model."""
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer(cfg, model_dir)
    task = get_task(cfg, tokenizer)
    with distributed.main_process_first(env):
        splits = load_splits(cfg, task.columns())
    plan = _plan(cfg, env, len(splits.train))
    steps = total_steps(cfg, plan)  # too little data fails here, before the model is built
    labels = task.labels(splits.train)
    hf_config = load_hf_config(cfg, model_dir)
    model = build_meta_model(cfg, hf_config, tokenizer, labels)
    if adapters.is_peft(cfg):
        model = adapters.wrap(model, cfg)
        if cfg.finetune.method == "qlora":
            quantize.quantize_meta_model(model, cfg, shards=env.world_size // cfg.fsdp.hybrid_replicas)
    else:
        apply_finetune(model, cfg, parallel.find_blocks(model, cfg.model.block_classes))
    trainable, total = parameter_counts(model)
    mesh = distributed.build_mesh(env, cfg.fsdp.hybrid_replicas)
    shard_info = parallel.parallelize(model, cfg, mesh)
    source = open_weight_source(cfg, model_dir, model)
    mat = materialize(model, source, cfg.train.seed, torch.device("cpu") if cfg.fsdp.cpu_offload else env.device)
    info = {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1),
            **shard_info, "weights_loaded": mat["loaded"], "weights_initialised": len(mat["initialised"]),
            "dropped_rows": splits.dropped, "train_rows": len(splits.train),
            "eval_rows": len(splits.eval) if splits.eval is not None else 0, "labels": labels,
            "total_steps": steps, "plan": plan}
    if mat["initialised"] and source is not None:
        _log(env, f"initialised (not in checkpoint): {', '.join(mat['initialised'][:8])}")
    return model, tokenizer, task, splits, info


def train(cfg: Config) -> TrainResult:
    env = distributed.init_distributed()
    torch.manual_seed(cfg.train.seed)
    out = prepare_output_dir(cfg, env)
    resume_from = checkpoint.resolve_checkpoint(out, cfg.resume)
    t0 = time.perf_counter()
    model, tokenizer, task, splits, info = build(cfg, env)
    plan, steps = info.pop("plan"), info["total_steps"]
    optimizer = build_optimizer(model, cfg, env.device)
    scheduler = build_scheduler(optimizer, steps, cfg)
    scaler = _grad_scaler(cfg)
    state = TrainState()
    torch.manual_seed(cfg.train.seed + env.rank)  # dropout; a resume restores the saved RNG state instead
    if resume_from is not None:
        saved = checkpoint.load_checkpoint(resume_from, model, optimizer, env)
        scheduler.load_state_dict(saved.pop("scheduler"))
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        saved.pop("scaler", None)
        state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
        _log(env, f"resumed from {resume_from} at step {state.step}")
    state.extra = {"labels": info["labels"]}
    if env.is_main:
        dump_config(cfg, out / "config.yaml")
    info.update(setup_s=time.perf_counter() - t0, world_size=env.world_size, device=str(env.device),
                host_rss_after_setup_per_rank=distributed.all_gather_object(peak_host_rss_bytes()),
                quantized_bytes_per_rank=distributed.all_gather_object(quantize.quantized_bytes(model)))
    _log(env, f"{info['trainable_params']:,} of {info['total_params']:,} parameters train "
              f"({100 * info['trainable_share']:.2f}%); {info['blocks']} x {info['block_class']} sharded over "
              f"{env.world_size} rank(s); {steps} steps")
    logger = MetricsLogger(out, env.is_main, steps, cfg.train.tensorboard, cfg.train.progress_bar, state.step)
    logger.log({"split": "setup", "step": state.step, **info})
    trainer = Trainer(cfg, env, model, task, optimizer, scheduler, scaler, splits.train, splits.eval, logger,
                      state, plan, steps)
    state = trainer.fit()
    logger.close()
    if env.is_main and state.step >= steps:  # a run stopped early by a signal exports when it resumes and ends
        export_final(out, tokenizer)
    distributed.barrier()
    return TrainResult(model=model, tokenizer=tokenizer, state=state, output_dir=out)


def _grad_scaler(cfg: Config):
    """fp16 compute needs loss scaling; the sharded scaler agrees on inf/nan across ranks."""
    if (cfg.fsdp.param_dtype or cfg.fsdp.mixed_precision) != "fp16" and cfg.model.dtype != "fp16":
        return None
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    return ShardedGradScaler()


def export_final(out: Path, tokenizer) -> None:
    """Write output_dir/final (an HF folder) from the newest checkpoint, replacing an older final/ only at the end."""
    from fsdp_ft.export import export_checkpoint

    newest = checkpoint.list_checkpoints(out)[-1][1]
    staging = out / ".final-new"
    if staging.exists():
        shutil.rmtree(staging)
    export_checkpoint(out, newest, staging, tokenizer=tokenizer)
    old = out / ".final-old"
    if (out / "final").exists():
        os.replace(out / "final", old)
    os.replace(staging, out / "final")
    shutil.rmtree(old, ignore_errors=True)
