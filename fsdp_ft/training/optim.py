"""AdamW with decay only on matrices, and a warmup-then-decay learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.runtime import precision


def _ndim(p: torch.Tensor) -> int:
    """Dimensions of the full parameter (DeepSpeed ZeRO-3 leaves an empty placeholder and keeps the shape in ds_shape)."""
    return len(getattr(p, "ds_shape", p.shape))


def needs_loss_scaling(cfg: Config) -> bool:
    """fp16 compute or storage: gradients need a loss scale to stay inside fp16's range."""
    return precision.compute_precision(cfg) == "fp16" or cfg.model.dtype == "fp16"


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights (1-D) get no weight decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if _ndim(p) >= 2]
    no_decay = [p for n, p in params if _ndim(p) < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    impl = cfg.optim.implementation
    if impl == "fused" and needs_loss_scaling(cfg):
        raise ConfigError("config key 'optim.implementation': fused AdamW fails under fp16 loss scaling (torch's "
                          "ShardedGradScaler passes it a found_inf of the wrong shape, pytorch#140514); use auto or "
                          "foreach")
    if impl == "auto":  # fused on CPU too: 5-7x faster than foreach there (0.25 s vs 1.6 s per step for 67M values)
        impl = "foreach" if needs_loss_scaling(cfg) else "fused"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, **kernel)


def init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (AdamW's two moments per parameter) at set-up, as the first step would.

    Made lazily, the state is the one big long-lived allocation that lands in the middle of a step, in the holes the
    first backward's activations left; on the host that fragments the heap (glibc), and the peak RSS creeps up over
    the next steps. Made first it sits below all of a step's buffers. A step with zero gradients at learning rate 0
    creates exactly the state the first real step would find (zero moments, step 0) and leaves the weights as they
    were (decoupled decay is scaled by the learning rate too)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]
    if not params:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if torch.is_tensor(g["lr"]) else 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in params:
        p.grad = None
        optimizer.state[p]["step"].zero_()  # torch's AdamW counts steps in a tensor (every implementation)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def lr_factor(step: int, total_steps: int, cfg: Config) -> float:
    """Multiplier of optim.lr at `step`: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, total_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: Config):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
