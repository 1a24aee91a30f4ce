"""Everything FSDP2: which modules are blocks, activation checkpointing, sharding, gradient-sync control.

`parallelize` is one ordered function — checkpointing first, then `fully_shard` per block, then the root —
because the order matters: the checkpointed region must sit inside FSDP's all-gather hooks.
"""
from __future__ import annotations

import functools
from collections import Counter

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.model import adapters, lora_folds
from fsdp_ft.parallel import gloo_reduce
from fsdp_ft.quant import quantize
from fsdp_ft.runtime import precision
from fsdp_ft.runtime.precision import DTYPE


def find_blocks(model: nn.Module, class_names: list[str] = ()) -> list[nn.Module]:
    """The repeated transformer blocks, discovered from the model for any architecture.

    Order of evidence: the config override; classes the model lists in `_no_split_modules` that sit in a
    `ModuleList`; else the longest `ModuleList` whose items share one class.
    """
    if class_names:
        blocks = [m for m in model.modules() if type(m).__name__ in set(class_names)]
        if not blocks:
            found = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"config key 'model.block_classes': none of {list(class_names)} occur in the model; "
                              f"its module classes are {found}")
        return blocks
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    in_lists = [b for ml in lists for b in ml if type(b).__name__ in no_split]
    if in_lists:
        return in_lists
    best: list[nn.Module] = []
    for ml in lists:
        name, count = Counter(type(b).__name__ for b in ml).most_common(1)[0]
        if count == len(ml) and len(ml) > len(best):
            best = list(ml)
    if not best:
        raise ConfigError("could not find the transformer blocks of this model; set model.block_classes")
    return best


def _checkpointed_forward(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(blocks: list[nn.Module], mode: str) -> list[nn.Module]:
    """Recompute the activations of every block (`full`) or every K-th block (`selective:K`) in backward; the
    blocks left alone still remake the one tensor that is both huge and cheap, the LoRA fold of an expert stack
    (`model.lora_folds`).

    The block's own forward is wrapped in place, so parameter names (and checkpoints) do not change.
    """
    every = {"none": 0, "full": 1}[mode] if ":" not in mode else int(mode.split(":")[1])
    checkpointed = [bool(every) and i % every == 0 for i in range(len(blocks))]
    chosen = [b for b, c in zip(blocks, checkpointed) if c]
    for block in chosen:
        block.forward = functools.partial(_checkpointed_forward, block.forward)
    lora_folds.install([b for b, c in zip(blocks, checkpointed) if not c])
    return chosen


def compile_blocks(blocks: list[nn.Module]) -> None:
    """train.compile: each block compiles in place (`Module.compile`, so parameter names do not change), around
    the checkpointed forward and inside FSDP's hooks, which dynamo leaves to run eagerly. Blocks share their
    class's code, so one compiled graph serves them all."""
    for block in blocks:
        block.compile()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (train.compile): 1-3 in a healthy run (training, the first
    varying row length, evaluation without grad); a count that keeps growing means recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def mixed_precision_policy(cfg: Config) -> MixedPrecisionPolicy:

    param = precision.compute_precision(cfg)
    reduce = cfg.fsdp.reduce_dtype or "fp32"
    return MixedPrecisionPolicy(param_dtype=DTYPE[param], reduce_dtype=DTYPE[reduce],
                                output_dtype=None, cast_forward_inputs=True)


def parallelize(model: nn.Module, cfg: Config, mesh: DeviceMesh) -> dict:
    """Checkpoint, then shard each block, then the root (embeddings, head and anything left)."""
    blocks = find_blocks(adapters.base_model(model), cfg.model.block_classes)
    block_class = type(blocks[0]).__name__
    checkpointed = apply_activation_checkpointing(blocks, cfg.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(blocks)
    kwargs = {
        "mesh": mesh,
        "mp_policy": mixed_precision_policy(cfg),
        "offload_policy": (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.fsdp.cpu_offload
                          else OffloadPolicy()),
    }
    ignored = set()
    replicated = gloo_reduce.replicate_group(mesh, cfg)  # every weight whole on gloo ranks: we all-reduce
    if replicated is not None:
        kwargs["mesh"] = mesh["shard"]
    if kwargs["mesh"].size() == 1:
        # FSDP2's world-size-1 shortcut mishandles tensor subclasses with several inner tensors (NF4); with one
        # rank there is nothing to shard, so FSDP leaves the quantized weights alone
        ignored |= {p for p in model.parameters() if quantize.is_quantized(p)}
    shard_frozen, why = decide_shard_frozen(model, cfg, mesh.size(), mesh.device_type)
    if not shard_frozen:
        ignored |= replicate_frozen(model, mixed_precision_policy(cfg).param_dtype)
    if ignored:
        kwargs["ignored_params"] = ignored
    keep = not cfg.fsdp.reshard_after_forward or cfg.fsdp.gather_once_per_step
    for block in blocks:
        fully_shard(block, reshard_after_forward=not keep, **kwargs)
    # the root's parameters (embeddings, head) are used again at once in backward: keep them gathered
    fully_shard(model, reshard_after_forward=False, **kwargs)
    set_prefetch(model, blocks, cfg.fsdp.prefetch, mesh.device_type)
    info = {"blocks": len(blocks), "block_class": block_class, "checkpointed": len(checkpointed),
            "compiled": len(blocks) if cfg.train.compile else 0,
            "shard_frozen": shard_frozen, "shard_frozen_why": why}
    if replicated is not None:
        deferred = gloo_reduce.install_replicated(model, [*blocks, model], kwargs["mp_policy"], replicated)
        info["gradient_reduce"] = "gloo all-reduce of whole gradients, " + ("overlapped" if deferred else "blocking")
    elif gloo_reduce.applies(mesh, cfg):
        deferred, sent = gloo_reduce.install(model, [*blocks, model], kwargs["mp_policy"], mesh.size())
        info["gradient_reduce"] = (f"gloo without copies, {str(sent).removeprefix('torch.')} exchange, "
                                   + ("overlapped" if deferred else "blocking"))
    return info


def set_prefetch(model: nn.Module, blocks: list[nn.Module], ahead: int, device_type: str) -> None:
    """Each block starts the all-gathers of the next `ahead` blocks (forward order, then backward order) when
    it starts, so they overlap its compute. On CUDA FSDP2's all-gather stream overlaps them; on CPU every
    all-gather is issued blocking unless FSDP2 is told to issue them asynchronously (its `_set_unshard_async_op`,
    meant for this: explicit prefetching without streams), and without that a CPU rank's forward and backward
    wait for every block's all-gather, and so for the slower rank, block by block."""
    if ahead < 1:
        return
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + ahead])
        block.set_modules_to_backward_prefetch(blocks[max(0, i - ahead):i][::-1])
    if device_type == "cpu":
        model._set_unshard_async_op(True)


PEFT_BASES = ("lora", "dora", "ia3", "prefix", "prompt", "p_tuning")  # methods whose frozen base may stay whole (auto)
REPLICATE_FROZEN_SHARE = 0.25  # auto: at most this share of a rank's device memory goes to whole frozen weights


def device_memory_per_rank(device_type: str) -> int:
    """A GPU's memory, or the host's memory split over this node's ranks: the smallest of all ranks, so that ranks
    on different GPUs (mixed models, MIG slices) make the same sharding decisions and build the same mesh."""
    if device_type == "cuda":
        own = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        import os

        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        own = host // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return _smallest_over_ranks(own)


def budget_per_rank(cfg: Config, device_type: str) -> int:
    """The memory the null shard_frozen / hybrid_replicas decide by: fsdp.memory_budget_gib when set (the same
    number activation_checkpointing=auto plans for), else the device's (`device_memory_per_rank`)."""
    if cfg.fsdp.memory_budget_gib:
        return int(cfg.fsdp.memory_budget_gib * 2 ** 30)
    return device_memory_per_rank(device_type)


def _smallest_over_ranks(value: int) -> int:
    """MIN over the default process group (a CPU tensor: the gloo half of cpu:gloo,cuda:nccl); as is without one."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return int(box.item())


def shard_frozen_without_model(cfg: Config, world_size: int) -> tuple[bool, str] | None:
    """The fsdp.shard_frozen choice where the model's size does not matter; None where it does."""
    if cfg.fsdp.shard_frozen is not None:
        return cfg.fsdp.shard_frozen, "config"
    if world_size == 1:
        return True, "auto: one rank, nothing to shard"
    if cfg.fsdp.cpu_offload:  # a whole base would be ignored by FSDP, so not offloaded: on the GPU, in full
        return True, "auto: fsdp.cpu_offload keeps the frozen base sharded in host memory"
    if cfg.finetune.method not in PEFT_BASES:
        return True, f"auto: finetune.method={cfg.finetune.method} shards every weight"
    return None


def decide_shard_frozen(model: nn.Module, cfg: Config, world_size: int, device_type: str,
                        memory_per_rank: int | None = None) -> tuple[bool, str]:
    """fsdp.shard_frozen, with null resolved: a PEFT method's frozen base stays whole on every rank (no
    all-gathers for it: the faster LoRA setting in docs/benchmarks.md) when it takes at most
    REPLICATE_FROZEN_SHARE of a rank's device memory (`memory_per_rank`, default this rank's device).
    Returns the choice and why."""
    decided = shard_frozen_without_model(cfg, world_size)
    if decided is not None:
        return decided
    dtype = mixed_precision_policy(cfg).param_dtype
    frozen = sum(p.numel() * (dtype.itemsize if dtype is not None and p.is_floating_point() else p.element_size())
                 for p in model.parameters()  # shared (tied) weights once
                 if not p.requires_grad and not quantize.is_quantized(p))
    budget = memory_per_rank or budget_per_rank(cfg, device_type)
    verdict = "at most" if frozen <= REPLICATE_FROZEN_SHARE * budget else "more than"
    why = (f"auto: the frozen base ({frozen / 2**30:.2f} GiB whole) is {verdict} {REPLICATE_FROZEN_SHARE:.0%} "
           f"of {budget / 2**30:.1f} GiB per rank")
    return verdict == "more than", why


REPLICATE_TRAINABLE_SHARE = 0.05  # auto: at most this share of a rank's device memory goes to whole trainable state
TRAINABLE_STATE_BYTES = 16  # per trainable parameter: fp32 weight, gradient and AdamW's two moments


def replicas_without_model(cfg: Config, world_size: int) -> tuple[int, str] | None:
    """The fsdp.hybrid_replicas choice where the model's size does not matter; None where it does."""
    if cfg.fsdp.hybrid_replicas is not None:
        return cfg.fsdp.hybrid_replicas, "config"
    if world_size == 1:
        return 1, "auto: one rank"
    if cfg.fsdp.cpu_offload:
        return 1, "auto: fsdp.cpu_offload keeps sharded state in host memory"
    if cfg.finetune.method == "qlora":
        return 1, "auto: a QLoRA base is sharded"
    frozen = shard_frozen_without_model(cfg, world_size)
    if frozen is not None and frozen[0]:
        return 1, "auto: the frozen weights are sharded (fsdp.shard_frozen)"
    return None


def decide_replicas(model: nn.Module, cfg: Config, world_size: int, device_type: str,
                    memory_per_rank: int | None = None) -> tuple[int, str]:
    """fsdp.hybrid_replicas, with null resolved: when the frozen base stays whole and the trainable state is
    small (LoRA), every rank holds every weight, so FSDP2 never gathers and reduces each block's gradients with
    one all-reduce, as DDP would (+6-8% tokens/s for LoRA in docs/performance.md). Returns the choice and why."""
    decided = replicas_without_model(cfg, world_size)
    if decided is not None:
        return decided
    if decide_shard_frozen(model, cfg, world_size, device_type, memory_per_rank)[0]:
        return 1, "auto: the frozen base is sharded (fsdp.shard_frozen)"
    trainable = TRAINABLE_STATE_BYTES * sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = memory_per_rank or budget_per_rank(cfg, device_type)
    small = trainable <= REPLICATE_TRAINABLE_SHARE * budget
    why = (f"auto: the trainable state ({trainable / 2**30:.2f} GiB whole) is {'at most' if small else 'more than'} "
           f"{REPLICATE_TRAINABLE_SHARE:.0%} of {budget / 2**30:.1f} GiB per rank")
    return (world_size if small else 1), why


def replicate_frozen(model: nn.Module, compute_dtype: torch.dtype | None) -> set[nn.Parameter]:
    """fsdp.shard_frozen=false: the frozen, unquantized parameters FSDP must leave whole on every rank. They are
    stored in the compute dtype, which is what FSDP's mixed precision would cast them to at every all-gather;
    a frozen weight never changes, so the values are the same. Tied weights stay tied."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.requires_grad or quantize.is_quantized(p):
                continue
            if id(p) not in replaced:
                dtype = compute_dtype if compute_dtype is not None and p.is_floating_point() else p.dtype
                replaced[id(p)] = p if p.dtype == dtype else nn.Parameter(p.detach().to(dtype), requires_grad=False)
            module._parameters[name] = replaced[id(p)]
    return set(replaced.values())


def start_micro_step(model: nn.Module, cfg: Config, last: bool) -> None:
    """Skip the reduce-scatter on non-final micro-steps of gradient accumulation; with
    fsdp.gather_once_per_step also keep the weights gathered until the last backward of the step."""
    model.set_requires_gradient_sync(last)
    if cfg.fsdp.gather_once_per_step:
        model.set_reshard_after_backward(last)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global gradient norm over all shards (and clip to max_norm); a tensor, so no host sync here."""
    from torch.distributed.tensor import DTensor

    grads = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else float("inf"),
                                          foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def sharded_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds for parameters, gradients and optimizer state (the part sharding divides)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    total = quantize.quantized_bytes(model)  # quantized weights: their stored bytes, not numel x element size
    for p in model.parameters():
        if quantize.is_quantized(p):
            continue
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += local(v).numel() * v.element_size()
    return total


def reshard_all(model: nn.Module) -> None:
    """Free the gathered parameters of a forward-only model (DPO's frozen reference): with no backward to
    reshard them, the root (kept gathered after forward) and ZeRO-2 blocks would otherwise stay whole."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
