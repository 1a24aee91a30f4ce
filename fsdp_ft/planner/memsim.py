"""One training step of a config, simulated on fake tensors in one process: per-rank memory without any memory.

The model is built exactly as `engine.build` builds it (meta device, PEFT / partial freezing, NF4 placeholders,
`fsdp.parallelize` with activation checkpointing and FSDP2 over a mesh of the run's shape), but the process
group is torch's fake one (collectives do nothing) and the tensors are `FakeTensor`s (shapes only). torch's
`FSDPMemTracker` then counts the bytes of every live storage by category while a full-length micro-batch goes
through the task's own loss, backward, gradient clipping and the optimizer step. What comes out is what one rank
would hold, as `torch.cuda.max_memory_allocated` would count it.

FSDPMemTracker counts FSDP's own (sharded) parameters, the buffers and whatever an op allocates, but not the
parameters FSDP is told to leave alone: the quantized base on one rank and a frozen base kept whole
(fsdp.shard_frozen=false). Those are counted here, storage by storage (`memtrack.storage_bytes`), as the group
`whole`: they live through the whole step and stay on the device under CPU offload. (They are also made known to
the tracker before the step, so that it does not count them a second time as activations.)

On CPU ranks over gloo the run takes FSDP's communication buffers from a pool that keeps them
(`fsdp_ft.parallel.host_buffers`, `gloo_reduce.install`); the simulation installs the same all-gather and reduce-scatter on
the fake group and fills the pool before the tracked step, so the pool's buffers are counted as the run holds them.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.observability import flops_moe, memtrack
from fsdp_ft.model.materialize import assign_nf4_shard
from fsdp_ft.parallel import fsdp, gloo_reduce
from fsdp_ft.quant import quantize
from fsdp_ft.runtime import distributed

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
    from fsdp_ft.training.run_setup import build_meta

    model, _ = build_meta(cfg, env, model_dir, tokenizer, labels, hf_config=hf_config)
    fsdp.parallelize(model, cfg, distributed.build_mesh(env, cfg.fsdp.hybrid_replicas))
    return model


def resolve_auto(cfg: Config, model_dir, hf_config, tokenizer, world_size: int,
                 memory_per_rank: int | None) -> Config:
    """`cfg` with fsdp.shard_frozen=null and fsdp.hybrid_replicas=null replaced by what training would choose
    for the whole model (the simulation may build a shorter stack, whose sizes would decide differently)."""
    import dataclasses

    frozen = fsdp.shard_frozen_without_model(cfg, world_size)
    replicas = fsdp.replicas_without_model(cfg, world_size)
    if frozen is None or replicas is None:
        from fsdp_ft.training.run_setup import build_meta

        env = _fake_env(world_size)
        model, _ = build_meta(cfg, env, model_dir, tokenizer, _labels(cfg), hf_config=hf_config)
        frozen = fsdp.decide_shard_frozen(model, cfg, world_size, "cpu", memory_per_rank)
        replicas = fsdp.decide_replicas(model, cfg, world_size, "cpu", memory_per_rank)
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
                assign_nf4_shard(model, module, f"{mname}.{name}".lstrip("."), name, t,
                                          quantize.quantize_like(full, like=local, module=module))


def unmanaged_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters FSDP does not manage (its `ignored_params`: every parameter it manages is a DTensor, even on
    one rank), and the managed parameters and buffers."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    managed = [p for p in params if isinstance(p, DTensor)] + list(model.buffers())
    return [p for p in params if not isinstance(p, DTensor)], managed


def _groups(snapshot: dict[str, int], whole: int = 0) -> dict[str, int]:
    """The tracker's categories as the plan's groups. `whole`: the unmanaged weights, which `simulate_step`
    registers with the tracker as inputs (alive all step, so in every snapshot's "Inputs"): moved to their row."""
    out: dict[str, int] = {"whole": whole} if whole else {}
    for key, value in snapshot.items():
        if key == "Inputs":
            value -= whole
        if key in GROUPS:
            out[GROUPS[key]] = out.get(GROUPS[key], 0) + value
        elif key != "Total":
            out["other"] = out.get("other", 0) + value
    return out


def pooled_comm(cfg: Config, world_size: int, target: str) -> bool:
    """Whether the run's ranks take FSDP's communication buffers from fsdp_ft.parallel.host_buffers' pool (the gloo
    all-gather and reduce-scatter of `gloo_reduce.install`): CPU ranks talk over gloo, GPUs over NCCL. The fake
    process group is neither, so `fsdp.parallelize` does not install them in the simulation; `simulate_step`
    does."""
    replicas = cfg.fsdp.hybrid_replicas or 1
    return target == "cpu" and gloo_reduce.enabled_for(cfg, replicas, world_size // replicas)


def pool_depth(cfg: Config, world_size: int, target: str) -> int:
    """How many blocks' communication buffers the pool may hand out at once (0 without the pool): the reductions
    in flight (gloo_reduce.MAX_IN_FLIGHT, plus the one being issued) and the all-gathers ahead (fsdp.prefetch; at
    least FSDP2's own one-block prefetch in backward). The pool keeps that many blocks' buffers whatever the depth,
    so only stacks at least this deep grow by the same bytes per block (simulated on the tiny Llama, 2 ranks:
    the per-block growth is constant from 4 blocks on with prefetch 0 and 1, from 5 with prefetch 2)."""
    if not pooled_comm(cfg, world_size, target):
        return 0
    return gloo_reduce.MAX_IN_FLIGHT + 1 + max(cfg.fsdp.prefetch, 1)


def _install_pooled_comm(model: nn.Module, cfg: Config, world_size: int) -> None:
    """What `fsdp.parallelize` does on gloo ranks, on the fake group: the pool's buffers are then allocated
    (fake) and held as in the run. Its swaps and in-place all-reduces run on the fake group and move nothing."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    gloo_reduce.install(model, modules, fsdp.mixed_precision_policy(cfg), world_size)


def simulate_step(cfg: Config, model_dir, hf_config, tokenizer, world_size: int, target: str = "cpu") -> PhasePeaks:
    """Peak bytes of one rank over one steady-state optimizer step of `cfg` on `world_size` ranks.

    `target` ('cpu' or 'cuda') picks what differs by device: the AdamW kernel (fused on GPUs). The caller holds
    a `fake_world(world_size)`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from fsdp_ft.tasks import get_task
    from fsdp_ft.training.optim import build_optimizer, init_state

    device = torch.device("cpu")
    num_labels = cfg.model.num_labels or 2
    labels = _labels(cfg)
    env = _fake_env(world_size)
    model = build_sharded_meta(cfg, env, model_dir, hf_config, tokenizer, labels)
    pooled = pooled_comm(cfg, world_size, target)
    if pooled:
        _install_pooled_comm(model, cfg, world_size)
    task = get_task(cfg, tokenizer)
    micro_steps = min(cfg.train.grad_accum, 2)  # the second sees the first's unreduced gradients
    # MoE experts and peft's LoRA of tensors have no fake-tensor form of their own: stand-ins of the same size
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings(), flops_moe.fake_traceable(model):
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # torchao's NF4
        _materialize_fake(model, device)
        unmanaged, managed = unmanaged_params(model)
        whole = memtrack.storage_bytes(unmanaged, skip=managed)
        optimizer = build_optimizer(model, cfg, torch.device(target))
        init_state(optimizer)  # as training does: the tracked step is a steady-state one
        batch = synthetic_batch(cfg, task, hf_config.vocab_size, num_labels)
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(tuple(batch.values()))
        # The unmanaged weights are made before tracking starts, and FSDPMemTracker does not know them: the first
        # view of one inside the step (F.linear's `t()` of a frozen weight kept whole) would make the tracker count
        # its storage as a new activation, on top of `whole` (measured: LoRA kept whole, 2 ranks, the head and every
        # block's base weights, 0.85 of the 0.88 MB over-prediction). Known to the tracker from the start, they are
        # never counted twice; `_groups` moves them from "Inputs" to their own row.
        tracker.track_inputs(tuple(unmanaged))
        model.train()
        if pooled:
            # The pool hands its buffers out again but never frees them, so from the second step on it holds all
            # that the busiest moment of a step needed (the reduce-scatter's buffers included, alive through the
            # next forward): one synchronizing micro-step fills it, as the run's first step does, before the
            # tracked step (entering the tracker again starts the peak afresh from what is alive).
            with tracker:
                fsdp.start_micro_step(model, cfg, True)
                task.loss_sums(model, batch)["loss"].backward()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        with tracker:
            for i in range(micro_steps):
                fsdp.start_micro_step(model, cfg, i == micro_steps - 1)
                task.loss_sums(model, batch)["loss"].backward()
                tracker.reset_mod_stats()  # each micro-step is a new forward of the root
        train_peak = tracker.get_tracker_snapshot("peak")[device]
        trainable = [p for p in model.parameters() if p.requires_grad]
        with tracker:  # entering again starts a new peak from what is live now
            fsdp.clip_grad_norm(trainable, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_peak = tracker.get_tracker_snapshot("peak")[device]
    return PhasePeaks(train=_groups(train_peak, whole), step=_groups(step_peak, whole))
