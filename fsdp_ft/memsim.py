"""One training step of a config, simulated on fake tensors in one process: per-rank memory without any memory.

The model is built exactly as `engine.build` builds it (meta device, PEFT / partial freezing, NF4 placeholders,
`parallel.parallelize` with activation checkpointing and FSDP2 over a mesh of the run's shape), but the process
group is torch's fake one (collectives do nothing) and the tensors are `FakeTensor`s (shapes only). torch's
`FSDPMemTracker` then counts the bytes of every live storage by category while a full-length micro-batch goes
through the task's own loss, backward, gradient clipping and the optimizer step. What comes out is what one rank
would hold, as `torch.cuda.max_memory_allocated` would count it.

FSDPMemTracker counts FSDP's own (sharded) parameters, the buffers and whatever an op allocates, but not the
parameters FSDP is told to leave alone: the quantized base on one rank and a frozen base kept whole
(fsdp.shard_frozen=false). Those are counted here, storage by storage (`memtrack.storage_bytes`), as the group
`whole`: they live through the whole step and stay on the device under CPU offload.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fsdp_ft import distributed, memtrack, parallel, quantize
from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError

# FSDPMemTracker's categories, grouped as the plan prints them
STATE_KEYS = {"Sharded Param": "params", "Buffer": "params", "Sharded Grad": "grads", "OptState": "optimizer"}
GATHER_KEYS = {"Unsharded Param": "gathered", "All Gather": "gathered", "Unsharded Grad": "gathered_grads",
               "Reduce Scatter": "gathered_grads"}
WORK_KEYS = {"Activation": "activations", "Temp": "activations", "Inputs": "activations"}
GROUPS = {**STATE_KEYS, **GATHER_KEYS, **WORK_KEYS}


@dataclass
class PhasePeaks:
    """Bytes by group at the peak of forward+backward and at the peak of the optimizer step (one rank)."""
    train: dict[str, int]
    step: dict[str, int]

    @staticmethod
    def total(groups: dict[str, int]) -> int:
        return sum(groups.values())


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake process group of `world_size` ranks in this process (we play rank 0)."""
    if dist.is_initialized():
        raise RuntimeError("the memory simulation needs a process without a process group")
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def with_layers(hf_config, layers: int):
    """A copy of the HF config with `layers` transformer blocks (per-layer lists cut to match)."""
    cfg = copy.deepcopy(hf_config)
    cfg.num_hidden_layers = layers
    for key in ("layer_types", "sliding_window_pattern_list"):
        value = getattr(cfg, key, None)
        if isinstance(value, list) and len(value) > layers:
            setattr(cfg, key, value[:layers])
    return cfg


def build_sharded_meta(cfg: Config, env: distributed.DistEnv, model_dir, hf_config, tokenizer, labels) -> nn.Module:
    """The training model as `engine.build` makes it, up to (not including) loading weights."""
    from fsdp_ft.engine import build_meta

    model, _ = build_meta(cfg, env, model_dir, tokenizer, labels, hf_config=hf_config)
    parallel.parallelize(model, cfg, distributed.build_mesh(env, cfg.fsdp.hybrid_replicas))
    return model


def resolve_auto(cfg: Config, model_dir, hf_config, tokenizer, world_size: int,
                 memory_per_rank: int | None) -> Config:
    """`cfg` with fsdp.shard_frozen=null and fsdp.hybrid_replicas=null replaced by what training would choose
    for the whole model (the simulation may build a shorter stack, whose sizes would decide differently)."""
    import dataclasses

    frozen = parallel.shard_frozen_without_model(cfg, world_size)
    replicas = parallel.replicas_without_model(cfg, world_size)
    if frozen is None or replicas is None:
        from fsdp_ft.engine import build_meta

        env = _fake_env(world_size)
        model, _ = build_meta(cfg, env, model_dir, tokenizer, _labels(cfg), hf_config=hf_config)
        frozen = parallel.decide_shard_frozen(model, cfg, world_size, "cpu", memory_per_rank)
        replicas = parallel.decide_replicas(model, cfg, world_size, "cpu", memory_per_rank)
    return dataclasses.replace(cfg, fsdp=dataclasses.replace(cfg.fsdp, shard_frozen=frozen[0],
                                                             hybrid_replicas=replicas[0]))


def _fake_env(world_size: int) -> distributed.DistEnv:
    return distributed.DistEnv(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"),
                               backend="fake")


def _labels(cfg: Config) -> list[str] | None:
    """Stand-in class names for a classifier (the planner reads no data)."""
    return [str(i) for i in range(cfg.model.num_labels or 2)] if cfg.task == "seq_cls" else None


def synthetic_batch(cfg: Config, task, vocab: int, num_labels: int) -> dict[str, torch.Tensor]:
    """A micro-batch in which every sample fills train.seq_len (the worst case the plan is for)."""
    b, s = cfg.train.micro_batch_size, cfg.train.seq_len
    if hasattr(task, "synthetic_batch"):
        return task.synthetic_batch(b, s)
    ids = torch.arange(b * s).remainder(vocab).reshape(b, s)
    batch = {"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long)}
    if cfg.task == "causal_lm":
        batch["labels"] = ids.clone()
        # every token but each row's last carries loss (what the collator's host-made positions would say)
        batch["loss_positions"] = torch.arange(b * s).reshape(b, s)[:, :-1].reshape(-1)
    elif cfg.task == "seq_cls":
        batch["labels"] = torch.arange(b).remainder(num_labels)
    else:
        raise ConfigError(f"fsdp-ft plan: task '{cfg.task}' has no synthetic batch; plan supports causal_lm, seq_cls")
    return batch


def _materialize_fake(model: nn.Module, device: torch.device) -> None:
    """Fake storage for every parameter; quantized weights get fake packed data of their real size, made the way
    `model.materialize` makes them."""
    from torch.distributed.tensor import DTensor

    model.to_empty(device=device)
    for mname, module in model.named_modules():
        for name, t in list(module._parameters.items()):
            if t is not None and quantize.is_quantized(t):
                local = t.to_local() if isinstance(t, DTensor) else t  # (local_shard's row offsets read data)
                full = torch.zeros(t.shape, dtype=local.dtype, device=device)
                parallel.assign_nf4_shard(model, module, f"{mname}.{name}".lstrip("."), name, t,
                                          quantize.quantize_like(full, like=local, module=module))


def unmanaged_bytes(model: nn.Module) -> int:
    """Bytes of the parameters FSDP does not manage (its `ignored_params`: every parameter it manages is a DTensor,
    even on one rank), less any storage they share with managed parameters or buffers."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    managed = [p for p in params if isinstance(p, DTensor)] + list(model.buffers())
    return memtrack.storage_bytes([p for p in params if not isinstance(p, DTensor)], skip=managed)


def _groups(snapshot: dict[str, int], whole: int = 0) -> dict[str, int]:
    out: dict[str, int] = {"whole": whole} if whole else {}
    for key, value in snapshot.items():
        if key in GROUPS:
            out[GROUPS[key]] = out.get(GROUPS[key], 0) + value
        elif key != "Total":
            out["other"] = out.get("other", 0) + value
    return out


def simulate_step(cfg: Config, model_dir, hf_config, tokenizer, world_size: int, target: str = "cpu") -> PhasePeaks:
    """Peak bytes of one rank over one steady-state optimizer step of `cfg` on `world_size` ranks.

    `target` ('cpu' or 'cuda') picks what differs by device: the AdamW kernel (fused on GPUs). The caller holds
    a `fake_world(world_size)`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from fsdp_ft.optim import build_optimizer, init_state
    from fsdp_ft.tasks import get_task

    device = torch.device("cpu")
    num_labels = cfg.model.num_labels or 2
    labels = _labels(cfg)
    env = _fake_env(world_size)
    model = build_sharded_meta(cfg, env, model_dir, hf_config, tokenizer, labels)
    task = get_task(cfg, tokenizer)
    micro_steps = min(cfg.train.grad_accum, 2)  # the second sees the first's unreduced gradients
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # torchao's NF4
        _materialize_fake(model, device)
        whole = unmanaged_bytes(model)
        optimizer = build_optimizer(model, cfg, torch.device(target))
        init_state(optimizer)  # as training does: the tracked step is a steady-state one
        batch = synthetic_batch(cfg, task, hf_config.vocab_size, num_labels)
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(tuple(batch.values()))
        model.train()
        with tracker:
            for i in range(micro_steps):
                parallel.start_micro_step(model, cfg, i == micro_steps - 1)
                task.loss_sums(model, batch)["loss"].backward()
                tracker.reset_mod_stats()  # each micro-step is a new forward of the root
        train_peak = tracker.get_tracker_snapshot("peak")[device]
        trainable = [p for p in model.parameters() if p.requires_grad]
        with tracker:  # entering again starts a new peak from what is live now
            parallel.clip_grad_norm(trainable, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_peak = tracker.get_tracker_snapshot("peak")[device]
    return PhasePeaks(train=_groups(train_peak, whole), step=_groups(step_peak, whole))
