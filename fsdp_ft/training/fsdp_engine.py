"""engine=fsdp: the model sharded with FSDP2 (`parallel.fsdp`), checkpointed with DCP, trained by `Trainer`."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from fsdp_ft.checkpoint import dcp_checkpoint, run_identity
from fsdp_ft.checkpoint.export import export_final
from fsdp_ft.config import Config, dump_config
from fsdp_ft.errors import ConfigError
from fsdp_ft.model import adapters, placement, vocab
from fsdp_ft.model.build import build_meta_model, parameter_counts
from fsdp_ft.model.materialize import materialize, open_weight_source
from fsdp_ft.observability import memtrack
from fsdp_ft.observability.flops import FlopCounts
from fsdp_ft.observability.metrics import MetricsLogger, peak_host_rss_bytes
from fsdp_ft.parallel import fsdp
from fsdp_ft.quant import quantize
from fsdp_ft.runtime import distributed, precision, tf32
from fsdp_ft.training.optim import build_optimizer, build_scheduler, init_state, needs_loss_scaling
from fsdp_ft.training.run_setup import (TrainResult, build_meta, count_flops_or_none, load_data, log_main, open_run,
                                       rank_peak_flops, resumed_state)
from fsdp_ft.training.trainer import Trainer, TrainState


def build(cfg: Config, env: distributed.DistEnv):
    """Data, tokenizer and the sharded, materialised model."""
    model_dir, tokenizer, task, splits, plan, steps, labels = load_data(cfg, env)
    model, hf_config = build_meta(cfg, env, model_dir, tokenizer, labels)
    flop_counts = count_flops_or_none(env, model)  # what trains is settled; traced on fake tensors before sharding
    trainable, total = parameter_counts(model)
    replicas, replicas_why = fsdp.decide_replicas(model, cfg, env.world_size, env.device.type)
    mesh = distributed.build_mesh(env, replicas)
    shard_info = {**fsdp.parallelize(model, cfg, mesh), "replicas": replicas, "replicas_why": replicas_why}
    source = open_weight_source(cfg, model_dir, model)
    mat = materialize(model, source, cfg.train.seed, env.device, offload=cfg.fsdp.cpu_offload)
    info = {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1),
            **shard_info, "weights_loaded": mat["loaded"], "weights_initialised": len(mat["initialised"]),
            "dropped_rows": splits.dropped, "train_rows": len(splits.train),
            "eval_rows": len(splits.eval) if splits.eval is not None else 0, "labels": labels,
            "total_steps": steps, "plan": plan,
            "flop_counts": flop_counts.to_dict() if flop_counts else None,
            "flops_per_token": flop_counts.per_token_at(cfg.train.seq_len) if flop_counts else None}
    if hasattr(splits.train, "packs"):  # data.packing: train_rows counts packed rows
        info["packing"] = {"samples": len(splits.train.rows), "fill": splits.train.fill(cfg.train.seq_len)}
    if getattr(task, "needs_reference", False):  # DPO
        info["reference"] = _attach_reference(task, cfg, env, mesh, model_dir, hf_config, tokenizer, labels)
    if mat["initialised"] and source is not None:
        log_main(env, f"initialised (not in checkpoint): {', '.join(mat['initialised'][:8])}")
    return model, tokenizer, task, splits, info


def _attach_reference(task, cfg: Config, env: distributed.DistEnv, mesh, model_dir, hf_config, tokenizer,
                      labels) -> str:
    """DPO's reference is the starting model. PEFT runs use the policy with its adapters disabled (no copy);
    full and partial fine-tuning get a frozen copy built, sharded and loaded like the policy: 1/N of it per
    rank, no gradients or optimizer state, never checkpointed (rebuilt from model.path, so it cannot drift)."""
    if adapters.is_peft(cfg):
        task.reference = None
        return "policy with adapters disabled"
    reference = build_meta_model(cfg, hf_config, tokenizer, labels)
    reference.requires_grad_(False)
    fsdp.parallelize(reference, dataclasses.replace(cfg, activation_checkpointing="none"), mesh)
    materialize(reference, open_weight_source(cfg, model_dir, reference), cfg.train.seed, env.device,
                offload=cfg.fsdp.cpu_offload)
    task.reference = reference.eval()
    return "frozen sharded copy"


def train(cfg: Config, malloc: str) -> TrainResult:
    """engine=fsdp: set up, build, shard, load, resume, train, export. `malloc` is the host allocator's tuning,
    for the set-up row (`fsdp_ft.api.train` applies it before any engine starts)."""
    env = distributed.init_distributed(cfg.dist.setup_timeout_minutes, cfg.dist.timeout_minutes)
    cfg = precision.resolve_precision(cfg, env.device)  # before the fingerprint and config.yaml record it
    torch.manual_seed(cfg.train.seed)
    tf32_on = tf32.apply(cfg.train.tf32, env.device)  # before any matmul, and before the MFU peak is read
    out = Path(cfg.output_dir)
    run = open_run(cfg, env)
    t0 = time.perf_counter()
    model, tokenizer, task, splits, info = build(cfg, env)
    plan, steps = info.pop("plan"), info["total_steps"]
    optimizer = build_optimizer(model, cfg, env.device)
    init_state(optimizer)
    scheduler = build_scheduler(optimizer, steps, cfg)
    scaler = _grad_scaler(cfg, env)
    state = TrainState()
    torch.manual_seed(cfg.train.seed + env.rank)  # dropout; a resume restores the saved RNG state instead
    if run.resume_from is not None:
        saved = dcp_checkpoint.load_checkpoint(Path(run.resume_from), model, optimizer, env)
        scheduler.load_state_dict(saved.pop("scheduler"))
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        saved.pop("scaler", None)
        state = resumed_state(env, run, saved)
    info["placement_checked"] = _check_placement(cfg, env, model, task)
    state.run = run.record()
    state.extra = {"labels": info["labels"], "chat_tokens": vocab.added_chat_tokens(tokenizer)}
    if env.is_main:
        run_identity.record(out, run)
        dump_config(cfg, out / "config.yaml")
    peak, peak_source = rank_peak_flops(cfg, env)
    info.update(run_id=run.run_id, resumed_from=run.resume_from,
                setup_s=time.perf_counter() - t0, world_size=env.world_size, device=str(env.device),
                peak_flops=peak, tf32=tf32_on, peak_flops_source=peak_source, host_malloc=malloc,
                host_rss_after_setup_per_rank=distributed.all_gather_object(peak_host_rss_bytes()),
                quantized_bytes_per_rank=distributed.all_gather_object(quantize.quantized_bytes(model)))
    log_main(env, f"{info['trainable_params']:,} of {info['total_params']:,} parameters train "
              f"({100 * info['trainable_share']:.2f}%); {info['blocks']} x {info['block_class']} sharded over "
              f"{env.world_size} rank(s); {steps} steps")
    logger = MetricsLogger(out, env.is_main, steps, cfg.train.tensorboard, cfg.train.progress_bar, state.step)
    logger.log({"split": "setup", "step": state.step, **info})
    trainer = Trainer(cfg, env, model, task, optimizer, scheduler, scaler, splits.train, splits.eval, logger,
                      state, plan, steps, peak_flops=peak,
                      flop_counts=FlopCounts(**info["flop_counts"]) if info["flop_counts"] else None)
    trainer.saved_step = state.step if run.resumes_in_place(out) else None
    with memtrack.tracking(cfg.train.track_memory, model, optimizer) as trainer.mem_tracker, \
            distributed.step_timeout():  # set-up (above) and the final export (below) wait longer
        state = trainer.fit()
        if state.step >= steps:  # resumed at its end from another folder's checkpoint: output_dir gets its own
            trainer.save()
    if env.is_main and state.step >= steps:  # a run stopped early by a signal exports when it resumes and ends
        logger.log({"split": "final", "step": state.step, **export_final(out, tokenizer)})
    logger.close()
    distributed.barrier()
    return TrainResult(model=model, tokenizer=tokenizer, state=state, output_dir=out)


def _check_placement(cfg: Config, env: distributed.DistEnv, model, task) -> int:
    """The end of set-up (model, DPO reference, resumed weights): every tensor on its device, or one line naming
    the first that is not, before a device-mismatch error deep in the first forward. Returns the count checked."""
    checked = placement.check(model, env.device, cfg.fsdp.cpu_offload)
    if getattr(task, "reference", None) is not None:
        checked += placement.check(task.reference, env.device, cfg.fsdp.cpu_offload)
    return checked


def _grad_scaler(cfg: Config, env: distributed.DistEnv):
    """fp16 compute needs loss scaling; the sharded scaler agrees on inf/nan across ranks. It must be made for
    the rank's device: torch's default is CUDA, and on a CPU rank it would switch itself off (scale 1, overflowing
    steps applied)."""
    if not needs_loss_scaling(cfg):
        return None
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    scaler = ShardedGradScaler(device=env.device.type, init_scale=cfg.train.fp16_init_scale)
    if not scaler.is_enabled():
        raise ConfigError(f"fp16 loss scaling is not available on {env.device.type} with torch "
                          f"{torch.__version__}; use bf16 or fp32 (fsdp.mixed_precision, model.dtype)")
    return scaler


