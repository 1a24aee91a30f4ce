"""LoRA of MoE expert stacks without a full-size fold kept for backward.

peft adapts a 3-D expert tensor (`target_parameters`; `all-linear` on peft >= 0.18) with its `ParamWrapper`, which
on every forward folds `W + s * B @ A` into a full-size tensor through `torch.nn.utils.parametrize`. The experts
forward (transformers' grouped matmul, or its eager loop) reads that tensor, and autograd keeps it for the input
gradient: a whole expert stack per adapted tensor and layer, alive from forward to backward, on every rank (FSDP
gathers the stack whole). For Mixtral-8x7B in bf16 that is 2.8 GB a layer, 90 GB for its 32 layers.

Here each fold is marked (`runtime.recompute`) to be remade in backward by the parametrization that made it. Its
inputs, the frozen stack and the LoRA factors, are kept until then anyway: FSDP gathers the stack again for the
block's backward, and autograd keeps the factors for their own gradients. Remaking costs one fold per adapted tensor
and layer, 2·r·E·in·out FLOPs, against 3·2·T·k·in·out for its T tokens' expert matmuls forward and backward: at
rank 16, 8 experts and top-2 routing, about 1% at 2k tokens a micro-batch. transformers' experts forward runs
unchanged (grouped matmul on GPUs).

Installed on the blocks that activation checkpointing leaves alone; a checkpointed block keeps nothing of its forward
already. Under `train.compile` the compiled graph decides what it saves, and this stays out of its way.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn
from torch.nn.utils import parametrize

from fsdp_ft.observability.flops_moe import REMADE_FOLDS as INSTALLED_ATTR  # the planner's stand-in reads it
from fsdp_ft.quant.experts import is_param_wrapper
from fsdp_ft.runtime import recompute

_OPEN_ATTR = "fsdp_ft_folds_open"  # the contexts a forward opened, closed when it returns


def install(blocks: list[nn.Module]) -> int:
    """Have backward remake the LoRA folds of the expert stacks inside `blocks` (peft-wrapped, not yet sharded);
    returns how many experts modules that covers."""
    modules = {}
    for block in blocks:
        for wrapper in block.modules():
            if not is_param_wrapper(wrapper):
                continue
            target = wrapper.get_base_layer()
            param = target._parameters.get(wrapper.parameter_name)
            if param is not None and param.dim() == 3 and not hasattr(target, INSTALLED_ATTR):
                modules[id(target)] = target
    for module in modules.values():
        setattr(module, INSTALLED_ATTR, True)
        module.register_forward_pre_hook(_open)
        module.register_forward_hook(_close, always_call=True)
    return len(modules)


def _open(module: nn.Module, args) -> None:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    stack = ExitStack()
    # parametrize then hands the experts forward the very tensor marked here (peft opens `cached()` too)
    stack.enter_context(parametrize.cached())
    for name, folding in getattr(module, "parametrizations", {}).items():
        fold = getattr(module, name)
        if fold.requires_grad:
            recompute.mark(fold, folding)
    stack.enter_context(recompute.dropping_marked())
    module.__dict__[_OPEN_ATTR] = stack


def _close(module: nn.Module, args, output) -> None:
    if torch.compiler.is_compiling():
        return
    stack = module.__dict__.pop(_OPEN_ATTR, None)
    if stack is not None:
        stack.close()
