"""`engine: deepspeed`: DeepSpeed ZeRO-2/3 behind the same config, data, tasks, loop, metrics, checkpoints and export.

Only the model wrapper differs from the FSDP engine. The batch plan, tasks, AdamW and schedule of optim.*, the
Trainer's loop (its micro-step, save and memory count swapped for DeepSpeed's), the run directory and the export
are the FSDP engine's own, so the two engines train the same samples from the same initial weights with the same
optimizer, and their losses can be compared step by step. For users who bring DeepSpeed set-ups, a DeepSpeed
JSON (deepspeed.config) is merged over the config built from our keys (see deepspeed_config.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from fsdp_ft.checkpoint import deepspeed_checkpoint
from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.model import adapters, placement
from fsdp_ft.model.build import parameter_counts
from fsdp_ft.model.materialize import fill_tensors, open_weight_source
from fsdp_ft.parallel import fsdp
from fsdp_ft.runtime.deepspeed_import import import_deepspeed
from fsdp_ft.runtime.distributed import DistEnv
from fsdp_ft.runtime.precision import DTYPE
from fsdp_ft.training import scaffold
from fsdp_ft.training.deepspeed_config import build_ds_config, precision_of
from fsdp_ft.training.optim import build_optimizer
from fsdp_ft.training.run_setup import (build_meta, count_flops_or_none, load_data, log_initialised,
                                       note_unquantized_experts, setup_info, start_process, trains_line)
from fsdp_ft.training.scaffold import Built, TrainResult
from fsdp_ft.training.trainer import Trainer


# ---------------------------------------------------------------- model

def _allocate(module: nn.Module, storage: dict, device: torch.device) -> None:
    """Give this module's own meta tensors CPU storage (buffers: `device`), keeping tied tensors tied."""
    for registry in (module._parameters, module._buffers):
        for key, t in registry.items():
            if t is None or not t.is_meta:
                continue
            if id(t) not in storage:  # keep the meta tensor alive so its id is not reused
                where = device if registry is module._buffers else torch.device("cpu")
                real = torch.empty_like(t, device=where)
                storage[id(t)] = (t, nn.Parameter(real, requires_grad=t.requires_grad)
                                  if isinstance(t, nn.Parameter) else real)
            registry[key] = storage[id(t)][1]


def materialize_for_zero(model: nn.Module, blocks: list[nn.Module], cfg: Config, model_dir, ds: dict, env,
                         deepspeed) -> dict:
    """Real weights with the FSDP engine's values (checkpoint rows or the same seeded init).

    ZeRO-2 keeps whole parameters on every rank. ZeRO-3 partitions each block as soon as it is filled
    (`deepspeed.zero.Init(module=...)`), so a rank holds its 1/N share plus one block, never the whole model.
    """
    source = open_weight_source(cfg, model_dir, model)
    stage3 = ds["zero_optimization"]["stage"] == 3
    precision = precision_of(ds)
    storage, seen, done = {}, set(), set()
    result = {"loaded": 0, "initialised": []}
    for group in (blocks + [model] if stage3 else [model]):
        members = {id(m) for m in group.modules()} - done
        modules = [(n, m) for n, m in model.named_modules() if id(m) in members]  # the model's order
        done |= members
        for _, m in modules:
            _allocate(m, storage, env.device)
        got = fill_tensors(model, modules, source, cfg.train.seed, seen)
        result["loaded"] += got["loaded"]
        result["initialised"] += got["initialised"]
        _init_unpartitioned_dora_magnitudes(group)
        if stage3:
            _partition(group, ds, precision, deepspeed)
    if source is not None:
        source.close()
    return result


@torch.no_grad()
def _init_unpartitioned_dora_magnitudes(group: nn.Module) -> None:
    """DoRA starts with magnitude = row norm of the base weight (layers of earlier groups are partitioned already)."""
    for magnitude, base in adapters.dora_magnitude_pairs(group):
        if not hasattr(magnitude, "ds_id"):
            magnitude.copy_(torch.linalg.norm(base.weight.float(), dim=1).to(magnitude.dtype))


def _partition(group: nn.Module, ds: dict, precision: str, deepspeed) -> None:
    """ZeRO-3: cast to the training dtype (DeepSpeed expects partitioned weights in it) and partition."""
    if precision != "fp32":
        for p in group.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(DTYPE[precision])
    deepspeed.zero.Init(module=group, config_dict_or_path=ds)


# ---------------------------------------------------------------- loop

class _LossScale:
    """fp16: the Trainer logs `loss_scale` from DeepSpeed's own dynamic scaler."""

    def __init__(self, engine):
        self.engine = engine

    def get_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "cur_scale", getattr(self.engine.optimizer, "loss_scale", 0.0)))


class DeepSpeedTrainer(Trainer):
    """The FSDP engine's loop; `model` is the DeepSpeed engine, `optimizer` the AdamW it wraps."""

    def micro_step(self, batch: dict, count: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
        engine = self.model
        engine.set_gradient_accumulation_boundary(last)
        sums = self.task.loss_sums(engine, batch)
        # DeepSpeed averages gradients over ranks, as FSDP does: the same scaling turns that into the global sum;
        # scale_wrt_gas=False because the global count already covers every micro-batch of the step
        engine.backward(sums["loss"] * self.env.world_size / count, scale_wrt_gas=False)
        engine.step()  # reduces, clips and steps AdamW at the boundary (the last micro-batch) only
        return sums

    def optimizer_step(self) -> tuple[torch.Tensor, float]:
        """DeepSpeed stepped in the last micro_step; the scheduler has not moved yet, so the lr is this step's."""
        norm = self.model.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm)), self.optimizer.param_groups[0]["lr"]

    def write_checkpoint(self, state: dict) -> None:
        state["scaler"] = None  # DeepSpeed keeps its loss scale in its own files
        deepspeed_checkpoint.save(self.model, self.cfg.output_dir, self.cfg.train.keep_last, state, self.env,
                           trainable_only=adapters.is_peft(self.cfg))

    def state_bytes(self) -> int:
        """This rank's bytes of model weights (its ZeRO-3 partition), fp32 masters and AdamW moments."""
        total = 0
        for p in self.model.module.parameters():
            local = getattr(p, "ds_tensor", p)
            total += local.numel() * local.element_size()
        zero = self.model.optimizer  # ZeRO keeps the fp32 masters of this rank's partition itself
        masters = {id(t): t for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")
                   for t in getattr(zero, name, None) or []}
        total += sum(t.numel() * t.element_size() for t in masters.values())
        for st in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
        return total


# ---------------------------------------------------------------- entry

def _check_precision(ds: dict, deepspeed) -> None:
    accelerator = deepspeed.get_accelerator()
    if precision_of(ds) == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(f"config key 'fsdp.mixed_precision': DeepSpeed has no fp16 on this device "
                          f"({accelerator.device_name()}); use bf16")


def build(cfg: Config, env, ds: dict, deepspeed) -> Built:
    """Data, tokenizer and the DeepSpeed engine around the materialised (ZeRO-3: partitioned) model."""
    data = load_data(cfg, env)
    if getattr(data.task, "needs_reference", False):  # DPO: the reference is the policy with its adapters off
        if not adapters.is_peft(cfg):
            raise ConfigError(f"task {cfg.task} with finetune.method={cfg.finetune.method} needs a frozen reference "
                              "copy, which engine deepspeed does not build; use a PEFT method or engine=fsdp")
        data.task.reference = None
    model, _ = build_meta(cfg, env, data.model_dir, data.tokenizer, data.labels)
    note_unquantized_experts(env, cfg, model)
    trainable, total = parameter_counts(model)
    flop_counts = count_flops_or_none(env, model)  # the FSDP engine's count: what trains is settled, nothing placed
    blocks = fsdp.find_blocks(adapters.base_model(model), cfg.model.block_classes)
    checkpointed = fsdp.apply_activation_checkpointing(blocks, cfg.activation_checkpointing)
    mat = materialize_for_zero(model, blocks, cfg, data.model_dir, ds, env, deepspeed)
    log_initialised(env, cfg, model, mat["initialised"])
    optimizer = build_optimizer(model, cfg, env.device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    offload_param = (ds["zero_optimization"].get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    checked = placement.check_deepspeed(engine.module, env.device, offload_param)  # fail fast, as engine fsdp
    info = {"engine": "deepspeed", "zero_stage": ds["zero_optimization"]["stage"], "precision": precision_of(ds),
            **setup_info(cfg, data, trainable, total, mat, flop_counts),
            "blocks": len(blocks), "block_class": type(blocks[0]).__name__, "checkpointed": len(checkpointed),
            "placement_checked": checked}
    summary = (f"{trains_line(info)}; DeepSpeed ZeRO-{info['zero_stage']} over {env.world_size} rank(s), "
               f"{info['precision']}; {data.steps} steps")
    return Built(model=engine, optimizer=optimizer, scaler=_LossScale(engine) if info["precision"] == "fp16" else None,
                 data=data, info=info, summary=summary, extra_state={"labels": data.labels},
                 files={"deepspeed_config.json": json.dumps(ds, indent=1)})


class DeepSpeedEngine:
    """engine=deepspeed for `scaffold.run`."""
    trainer_class, tracks_memory = DeepSpeedTrainer, False

    def __init__(self):
        self.deepspeed = import_deepspeed()
        self.ds: dict = {}

    def start(self, cfg: Config) -> tuple[Config, DistEnv, bool]:
        # ZeRO-3 gathers the head's weight around its forward and again for its backward; the chunked head loss
        # makes the weight's gradient inside forward, which that scheme does not expect: plain logits here
        cfg, env, tf32_on = start_process(
            dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, chunked_head_loss=False)))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed reads it; a plain process has none
        self.deepspeed.init_distributed("nccl" if env.device.type == "cuda" else "gloo")  # adopts our group
        return cfg, env, tf32_on

    def build(self, cfg: Config, env: DistEnv) -> Built:
        self.ds = build_ds_config(cfg, env.world_size, env.device.type == "cuda")
        _check_precision(self.ds, self.deepspeed)
        return build(cfg, env, self.ds, self.deepspeed)

    def load(self, path: Path, built: Built, env: DistEnv) -> dict:
        return deepspeed_checkpoint.load(path, built.model, env)

    def after_setup(self, cfg: Config, env: DistEnv, built: Built) -> dict:
        return {}


def train(cfg: Config, auto: dict | None = None) -> TrainResult:
    """engine=deepspeed: set up, build, partition, resume, train, export. `auto`: the notes of the auto settings
    `fsdp_ft.api.train` resolved, for the set-up row."""
    return scaffold.run(cfg, DeepSpeedEngine(), auto)
