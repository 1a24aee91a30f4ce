"""engine=fsdp: the model sharded with FSDP2 (`parallel.fsdp`), checkpointed with DCP, trained by `Trainer`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fsdp_ft.checkpoint import dcp_checkpoint
from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.model import adapters, placement, vocab
from fsdp_ft.model.build import build_meta_model, parameter_counts
from fsdp_ft.model.materialize import materialize, open_weight_source
from fsdp_ft.parallel import fsdp
from fsdp_ft.quant import quantize
from fsdp_ft.runtime import distributed
from fsdp_ft.training import scaffold
from fsdp_ft.training.optim import build_optimizer, init_state, needs_loss_scaling
from fsdp_ft.training.run_setup import (build_meta, count_flops_or_none, load_data, log_initialised,
                                       note_unquantized_experts, setup_info, start_process, trains_line)
from fsdp_ft.training.scaffold import Built, TrainResult
from fsdp_ft.training.trainer import Trainer


def build(cfg: Config, env: distributed.DistEnv) -> Built:
    """Data, tokenizer, the sharded and materialised model (and DPO's reference), and the optimizer."""
    data = load_data(cfg, env)
    model, hf_config = build_meta(cfg, env, data.model_dir, data.tokenizer, data.labels)
    note_unquantized_experts(env, cfg, model)
    flop_counts = count_flops_or_none(env, model)  # what trains is settled; traced on fake tensors before sharding
    trainable, total = parameter_counts(model)
    replicas, replicas_why = fsdp.decide_replicas(model, cfg, env.world_size, env.device.type)
    mesh = distributed.build_mesh(env, replicas)
    shard_info = {**fsdp.parallelize(model, cfg, mesh), "replicas": replicas, "replicas_why": replicas_why}
    source = open_weight_source(cfg, data.model_dir, model)
    mat = materialize(model, source, cfg.train.seed, env.device, offload=cfg.fsdp.cpu_offload)
    splits = data.splits
    info = {**setup_info(cfg, data, trainable, total, mat, flop_counts), **shard_info}
    if hasattr(splits.train, "packs"):  # data.packing: train_rows counts packed rows
        info["packing"] = {"samples": len(splits.train.rows), "fill": splits.train.fill(cfg.train.seq_len)}
    if getattr(data.task, "needs_reference", False):  # DPO
        info["reference"] = _attach_reference(data.task, cfg, env, mesh, data.model_dir, hf_config, data.tokenizer,
                                              data.labels)
    log_initialised(env, cfg, model, mat["initialised"])
    optimizer = build_optimizer(model, cfg, env.device)
    init_state(optimizer)
    summary = (f"{trains_line(info)}; {info['blocks']} x {info['block_class']} sharded over {env.world_size} "
               f"rank(s); {data.steps} steps")
    return Built(model=model, optimizer=optimizer, scaler=_grad_scaler(cfg, env), data=data, info=info,
                 summary=summary,
                 extra_state={"labels": data.labels, "chat_tokens": vocab.added_chat_tokens(data.tokenizer)})


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


class FSDPEngine:
    """engine=fsdp for `scaffold.run`."""
    trainer_class, tracks_memory = Trainer, True

    def __init__(self, malloc: str):
        self.malloc = malloc  # the host allocator's tuning, for the set-up row

    start, build = staticmethod(start_process), staticmethod(build)

    def load(self, path: Path, built: Built, env: distributed.DistEnv) -> dict:
        return dcp_checkpoint.load_checkpoint(path, built.model, built.optimizer, env)

    def after_setup(self, cfg: Config, env: distributed.DistEnv, built: Built) -> dict:
        return {"placement_checked": _check_placement(cfg, env, built.model, built.data.task),
                "host_malloc": self.malloc,
                "quantized_bytes_per_rank": distributed.all_gather_object(quantize.quantized_bytes(built.model))}


def train(cfg: Config, malloc: str, auto: dict | None = None) -> TrainResult:
    """engine=fsdp: set up, build, shard, load, resume, train, export. `malloc` is the host allocator's tuning and
    `auto` the notes of the auto settings, for the set-up row (`fsdp_ft.api.train` makes both before any engine
    starts)."""
    return scaffold.run(cfg, FSDPEngine(malloc), auto)


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


