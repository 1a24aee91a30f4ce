"""`train(cfg)`: the one entry every launcher ends in — set up, build, shard, load, resume, train, export."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdp_ft import (adapters, best, checkpoint, distributed, durable, host_malloc, memtrack, parallel, placement,
                     precision, quantize, run_identity, tf32, vocab)
from fsdp_ft.config import Config, dump_config
from fsdp_ft.data import BatchPlan, load_splits
from fsdp_ft.errors import ConfigError, DataError
from fsdp_ft.finetune import apply_finetune
from fsdp_ft.flops import FlopCounts, count_flops, peak_flops
from fsdp_ft.metrics import MetricsLogger, peak_host_rss_bytes
from fsdp_ft.model import (build_meta_model, load_hf_config, load_tokenizer, materialize, open_weight_source,
                           parameter_counts, resolve_model_dir)
from fsdp_ft.optim import build_optimizer, build_scheduler, init_state, needs_loss_scaling
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


def open_run(cfg: Config, env: distributed.DistEnv) -> run_identity.RunStart:
    """Check output_dir and decide what this run is (new, or which checkpoint it continues): rank 0 decides, and
    every rank gets the same decision or raises the same error."""
    prepare_output_dir(cfg, env)
    decision = None
    if env.is_main:
        try:
            decision = run_identity.decide(cfg, env.world_size)
        except Exception as e:  # every rank must leave with it, not wait for a decision that never comes
            decision = e
    decision = distributed.broadcast_object(decision)
    if isinstance(decision, Exception):
        raise decision
    for note in decision.notes:
        _log(env, f"warning: {note}")
    return decision


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


def load_data(cfg: Config, env: distributed.DistEnv):
    """Tokenizer, task, splits, batch plan, step count and labels: all checked before any model is built."""
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer(cfg, model_dir)
    task = get_task(cfg, tokenizer)
    best.check_metric(cfg, task)
    with distributed.main_process_first(env):
        splits = load_splits(cfg, task)  # may give the tokenizer ChatML tokens (data.format chat, no template)
    plan = _plan(cfg, env, len(splits.train))
    steps = total_steps(cfg, plan)  # too little data fails here, before the model is built
    labels = task.labels(splits.train)
    return model_dir, tokenizer, task, splits, plan, steps, labels


def build_meta(cfg: Config, env: distributed.DistEnv, model_dir, tokenizer, labels, hf_config=None):
    """The model on the meta device, PEFT-wrapped (QLoRA base quantized) or with its frozen parts marked.
    `hf_config` replaces model.path's config (`fsdp-ft plan` simulates shorter stacks of blocks)."""
    hf_config = hf_config if hf_config is not None else load_hf_config(cfg, model_dir)
    model = build_meta_model(cfg, hf_config, tokenizer, labels)
    if adapters.is_peft(cfg):
        model = adapters.wrap(model, cfg, vocab.added_chat_tokens(tokenizer), device=env.device)
        if cfg.finetune.method == "qlora":
            replicas, _ = parallel.replicas_without_model(cfg, env.world_size)  # a QLoRA base is sharded
            quantize.quantize_meta_model(model, cfg, shards=env.world_size // replicas)
    else:
        apply_finetune(model, cfg, parallel.find_blocks(model, cfg.model.block_classes))
        vocab.check_rows_train(model, cfg.finetune.method, vocab.added_chat_tokens(tokenizer))
    return model, hf_config


def _count_flops(env, model) -> FlopCounts | None:
    """FLOPs for MFU; a model whose forward cannot run on fake tensors (data-dependent control flow, as in
    GPT-2's mask code) trains without an MFU column rather than not at all."""
    try:
        return count_flops(model)
    except Exception as e:  # the tracer's failure is not the user's: say so once and go on
        _log(env, f"MFU not reported: counting this model's FLOPs on fake tensors failed ({type(e).__name__})")
        return None


def build(cfg: Config, env: distributed.DistEnv):
    """Data, tokenizer and the sharded, materialised model."""
    model_dir, tokenizer, task, splits, plan, steps, labels = load_data(cfg, env)
    model, hf_config = build_meta(cfg, env, model_dir, tokenizer, labels)
    flop_counts = _count_flops(env, model)  # what trains is settled; traced on fake tensors before sharding
    trainable, total = parameter_counts(model)
    replicas, replicas_why = parallel.decide_replicas(model, cfg, env.world_size, env.device.type)
    mesh = distributed.build_mesh(env, replicas)
    shard_info = {**parallel.parallelize(model, cfg, mesh), "replicas": replicas, "replicas_why": replicas_why}
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
        _log(env, f"initialised (not in checkpoint): {', '.join(mat['initialised'][:8])}")
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
    parallel.parallelize(reference, dataclasses.replace(cfg, activation_checkpointing="none"), mesh)
    materialize(reference, open_weight_source(cfg, model_dir, reference), cfg.train.seed, env.device,
                offload=cfg.fsdp.cpu_offload)
    task.reference = reference.eval()
    return "frozen sharded copy"


def train(cfg: Config) -> TrainResult:
    malloc = host_malloc.tune() if cfg.train.tune_host_malloc else "default (train.tune_host_malloc=false)"
    if cfg.engine == "deepspeed":
        from fsdp_ft.engine_deepspeed import train as train_deepspeed
        return train_deepspeed(cfg)
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
        saved = checkpoint.load_checkpoint(Path(run.resume_from), model, optimizer, env)
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
    peak, peak_source = _peak_flops(cfg, env)
    info.update(run_id=run.run_id, resumed_from=run.resume_from,
                setup_s=time.perf_counter() - t0, world_size=env.world_size, device=str(env.device),
                peak_flops=peak, tf32=tf32_on, peak_flops_source=peak_source, host_malloc=malloc,
                host_rss_after_setup_per_rank=distributed.all_gather_object(peak_host_rss_bytes()),
                quantized_bytes_per_rank=distributed.all_gather_object(quantize.quantized_bytes(model)))
    _log(env, f"{info['trainable_params']:,} of {info['total_params']:,} parameters train "
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


def _peak_flops(cfg: Config, env: distributed.DistEnv) -> tuple[float, str]:
    """One rank's peak FLOP/s in the compute dtype, for MFU: train.peak_flops, the GPU's table entry, or measured."""
    if cfg.train.peak_flops:
        return cfg.train.peak_flops, "config: train.peak_flops"
    from fsdp_ft.model import DTYPE
    return peak_flops(env.device, DTYPE[precision.compute_precision(cfg)])


def resumed_state(env: distributed.DistEnv, run: run_identity.RunStart, saved: dict) -> TrainState:
    """The trainer state a checkpoint recorded (its other entries are the loader's)."""
    state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
    _log(env, f"run {run.run_id}: resumed from {run.resume_from} at step {state.step}")
    return state


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


def export_final(out: Path, tokenizer) -> dict:
    """Write output_dir/final (an HF folder) from the best checkpoint (train.best_metric) or else the newest,
    replacing an older final/ only at the end. Returns which step it came from, for the log."""
    from fsdp_ft.export import export_checkpoint

    source, best_record = checkpoint.final_checkpoint(out)
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
    exported = checkpoint.read_state(source)["step"]
    if best_record:
        print(f"[fsdp_ft] final/ is step {exported}, the best by {best_record['metric']} "
              f"({best_record['value']:.6g})", file=sys.stderr, flush=True)
        return {"final_from_step": exported, "best_metric": best_record["metric"], "best_value": best_record["value"]}
    return {"final_from_step": exported}
