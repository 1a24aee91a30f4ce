"""QLoRA of mixture-of-experts layers: the stacked expert tensors stored quantized, run one expert at a time.

transformers 5 holds a layer's experts as 3-D tensors (`gate_up_proj`: experts x 2*inner x hidden, `down_proj`:
experts x hidden x inner); in Mixtral or Qwen3-MoE they are nearly all of the model's weights, so QLoRA that
quantized only `nn.Linear` layers left most of the model in 16 bits. Here each such tensor is stored as the 2-D
quantized weight of its rows (experts x rows, columns): the format and FSDP2 sharding of every other QLoRA weight,
with scale blocks that never straddle a row (`scaler_block_size`), hence never an expert.

The experts' forward is replaced by the eager loop transformers itself ships (route, run each hit expert, add),
where each expert's matmul reads a view of its rows of the quantized weight through `F.linear`: the frozen-weight
matmul of `frozen_matmul`, which keeps only the quantized bytes for backward. LoRA of these tensors (peft's
`target_parameters`, and `all-linear` on peft >= 0.18) is peft's own `ParamWrapper` with its own weights and
saved format, but instead of folding `W + s * B @ A` into a full-size weight each forward (impossible on a
quantized W, and an expert stack's worth of memory), the wrapper lends its factors to the experts module for the
call, and each expert adds `s * (x A_e^T) B_e^T`: the same function, in the QLoRA paper's form.

Covered: the experts classes transformers marks with its experts-implementation decorator, in both of its
layouts: [experts, out, in] (Mixtral, Qwen-MoE, ...) and [experts, in, out] with biases (gpt-oss, whose experts
are ~90% of the model). Either way a stack is stored as the rows of its 3-D tensor, so an expert's weight is a
contiguous run of rows; the transposed layout multiplies `x @ W_e` instead of `x @ W_e^T`.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fsdp_ft.quant import frozen_matmul, int8_weight, nf4_linear
from fsdp_ft.quant.int8_weight import Int8Weight

SHAPES_ATTR = "fsdp_ft_expert_shapes"  # on a quantized experts module: {tensor name: its 3-D shape}
SIMULATE_ATTR = "fsdp_ft_simulate"  # on a quantized experts module: its forward with even routing (`simulate`)
_LORA_ATTR = "fsdp_ft_lent_lora"  # {tensor name: [(lhs, rhs, scaling)]} while a peft wrapper's forward runs
DOWN = "down_proj"


def stacked_experts(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(module name, experts module, names of its 3-D expert tensors) of every experts module QLoRA quantizes:
    transformers' decorated experts classes (they carry `has_gate` and `is_transposed`)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "is_transposed", None), bool) or not hasattr(module, "has_gate"):
            continue
        tensors = [_up(module), DOWN]
        quantized = getattr(module, SHAPES_ATTR, {})
        if all(n in quantized or (module._parameters.get(n) is not None and module._parameters[n].dim() == 3)
               for n in tensors):
            found.append((name, module, tensors))
    return found


def _up(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def logical_shape(module: nn.Module, name: str, t: torch.Tensor) -> torch.Size:
    """The shape a tensor has in the model and its checkpoint (3-D for quantized expert tensors)."""
    return torch.Size(getattr(module, SHAPES_ATTR, {}).get(name, t.shape))


def install(model: nn.Module, module: nn.Module, shapes: dict[str, torch.Size]) -> None:
    """Make `module` (whose expert tensors `shapes` are now quantized 2-D weights) run expert by expert, and the
    peft wrappers of its tensors lend their LoRA factors instead of folding them."""
    setattr(module, SHAPES_ATTR, dict(shapes))
    module.forward = partial(_forward, module)
    setattr(module, SIMULATE_ATTR, partial(simulate, module))
    for wrapper in model.modules():
        if is_param_wrapper(wrapper) and wrapper.get_base_layer() is module:
            wrapper._activate_lora = partial(_lend_lora, wrapper, module)


def is_param_wrapper(module: nn.Module) -> bool:
    """peft's LoRA of a parameter (`ParamWrapper`), known by what it offers rather than by import."""
    return type(module).__name__ == "ParamWrapper" and hasattr(module, "get_delta_factors")


@contextmanager
def _lend_lora(wrapper: nn.Module, experts: nn.Module, active_adapters: list[str]):
    """peft's `ParamWrapper._activate_lora` for a quantized tensor: its factors, per expert, for the call."""
    factors = [wrapper.get_delta_factors(a) for a in active_adapters if a in wrapper.lora_A]
    lent = experts.__dict__.setdefault(_LORA_ATTR, {})
    lent[wrapper.parameter_name] = factors
    try:
        yield
    finally:
        lent.pop(wrapper.parameter_name, None)


def expert_weight(weight: torch.Tensor, expert: int, rows: int) -> torch.Tensor:
    """Expert `expert`'s rows of a quantized stack (experts x `rows`, columns) as a quantized 2-D weight: views
    of the stored codes and scales, no copy, no dequantization."""
    lo, hi = expert * rows, (expert + 1) * rows
    if isinstance(weight, Int8Weight):
        return Int8Weight(weight.codes[lo:hi], weight.absmax[lo:hi], weight.dtype)
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    cols = weight.shape[1]
    blocks = rows * cols // weight.block_size  # whole scale blocks: they never straddle a row
    per_factor = blocks // weight.scaler_block_size
    parts = {"quantized_data": weight.quantized_data[lo * cols // 2:hi * cols // 2],
             "quantized_scalers": weight.quantized_scalers[expert * blocks:(expert + 1) * blocks],
             "quantization_factor": weight.quantization_factor[expert * per_factor:(expert + 1) * per_factor],
             "size": torch.Size((rows, cols)), "stride": (cols, 1), "n_blocks": blocks}
    return nf4_tensor.NF4Tensor(*nf4_tensor.construct_nf4_args(weight, parts))


def project(module: nn.Module, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's projection `name` of its tokens `x`: frozen quantized matmul, bias, lent LoRA."""
    rows = getattr(module, SHAPES_ATTR)[name][1]
    transposed = module.is_transposed  # W_e stored [in, out]: y = x @ W_e
    y = _frozen_matmul(x, expert_weight(getattr(module, name), expert, rows), transposed)
    if getattr(module, "has_bias", False):
        y = y + getattr(module, f"{name}_bias")[expert]
    # peft's delta is s * lhs @ rhs in the stored layout: [out, in] = B A, or [in, out] = A^T B^T
    for lhs, rhs, scaling in module.__dict__.get(_LORA_ATTR, {}).get(name, ()):
        lhs, rhs = lhs[expert].to(x.dtype), rhs[expert].to(x.dtype)
        y = y + (F.linear(F.linear(x, lhs.mT), rhs.mT) if transposed else F.linear(F.linear(x, rhs), lhs)) * scaling
    return y


def _frozen_matmul(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """`x @ W^T` (`x @ W` when `transposed`) with a quantized W: frozen_matmul's op, which keeps only the quantized
    bytes for backward."""
    int8 = isinstance(weight, Int8Weight)
    parts, sizes = weight.parts() if int8 else nf4_linear.parts(weight)
    fmt = int8_weight.FORMAT if int8 else nf4_linear.FORMAT
    return frozen_matmul.linear(x, parts, sizes, fmt, weight.dtype, transposed=transposed)


@torch.compiler.disable  # the routing is data-dependent (a host sync per layer), and dynamo's fake copies of
# the per-expert 4-bit views fail; under train.compile the rest of the block compiles, the experts run eagerly
def _forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop (`integrations.moe`), on quantized expert weights."""
    experts = getattr(module, SHAPES_ATTR)[DOWN][0]
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=experts).permute(2, 1, 0)  # expert x slot x token
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        routes = [(e, *torch.where(mask[e])) for e in hit]
    return _run(module, hidden_states, top_k_weights, routes)


def simulate(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:
    """The forward with slot s of every token sent to expert s instead of routed: the same matmuls, allocations
    and autograd graph as real routing (each token's k experts; gathered, run and added per expert), and no step
    that reads data, so it runs on fake tensors (the FLOP count and `fsdp-ft plan`'s simulated step)."""
    tokens, k = top_k_index.shape
    every = torch.arange(tokens, device=hidden_states.device)
    routes = [(s, torch.full_like(every, s), every) for s in range(k)]
    return _run(module, hidden_states, top_k_weights, routes)


def _run(module: nn.Module, hidden_states: torch.Tensor, top_k_weights: torch.Tensor,
         routes: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Each (expert, its slots, its tokens) of `routes` on its tokens, weighted and added up per token."""
    out = torch.zeros_like(hidden_states)
    for e, slot, token in routes:
        h = project(module, _up(module), hidden_states[token], e)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        h = project(module, DOWN, h, e)
        if getattr(module, "has_post_expert_norm", False):
            h = module.post_expert_norm(h)
        h = h * top_k_weights[token, slot, None]
        out.index_add_(0, token, h.to(out.dtype))
    return out
