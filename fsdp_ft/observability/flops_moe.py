"""Mixture-of-experts layers in the FLOP count (see flops.py): top-k ACTIVE experts per token, traced densely.

Why a stand-in: transformers 5 keeps a layer's experts in one module (``*.mlp.experts``) holding 3-D parameters
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], or the transposed [E, in, out] layout of gpt-oss), and routes
each token to its top-k experts. Neither of its forwards traces on fake tensors: ``grouped_mm`` has no fake kernel
for fp32 (and wants real routing offsets), and the eager loop is data-dependent (``nonzero`` / ``torch.where`` on
the routing mask). For the count only the shapes matter, so while the model is traced each experts module's forward
is replaced by one that runs every token through k experts' matmuls as if all were expert 0 — the standard MoE
convention: per token ``2 * H * 2I * k`` (gate/up) + ``2 * I * H * k`` (down) forward, backward by flops.py's rules
(input gradient when something upstream trains, weight gradient when the expert weight used requires grad) — and
returns a correctly shaped output weighted by the routing weights. The router (``mlp.gate``, a weight [E, H]) and
shared experts (plain ``nn.Linear``) are ordinary ``F.linear`` calls and are counted by the recorder as they run.

LoRA of parameters (peft ``target_parameters``; peft >= 0.18 adds the router and the experts to ``"all-linear"``):
peft's ``ParamWrapper`` folds the low-rank factors into the parameter once per forward (``W + s * B @ A``, per
expert for 3-D weights) through ``torch.nn.utils.parametrize``, and the module then runs with that weight, which
requires grad: so each matmul with it pays its weight gradient per token (the gradient of the folded weight), and
the fold and its backward (the gradients of A and B) are paid once per forward call. ``register_parametrization``
mutates the real parameter (``set_``), which fake tensor mode refuses, so during the trace each wrapper's forward is
replaced by one that builds the same folded weight with peft's ``get_delta_weight`` inside
``recorder.materialising()`` (which files its matmul as per-call work) and lends it to the wrapped module in place of
the parameter for the call. (``register_parametrization`` also evaluates the fold once more as a check, every
forward, and discards it: wasted work, not counted, like recomputation.)

QLoRA's 4-bit expert stacks (``fsdp_ft.quant.experts``) are stored as 2-D weights and run per expert, with
their LoRA on the activations: such a module brings its own fake-tensor forward (slot s of every token to expert
s), which runs the real per-expert code, so its matmuls, LoRA included, are counted as they run.

Detected: any module holding, as its own parameters, 3-D tensors named ``gate_up_proj``, ``gate_proj``,
``up_proj`` or ``down_proj`` (whatever the class is called). Expert collections written as a ``ModuleList`` of MLPs
are not handled here.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from fsdp_ft.runtime import recompute

UP_NAMES = ("gate_up_proj", "gate_proj", "up_proj")  # applied to the token's hidden state
DOWN_NAME = "down_proj"  # applied to the intermediate state, back to the hidden size
# QLoRA's quantized expert stacks (fsdp_ft.quant.experts, a sibling package: duck-typed here) carry their 3-D
# shapes and their own fake-tensor forward, fn(hidden_states, top_k_index, top_k_weights), which deals the
# (token, expert) pairs out evenly and runs the real per-expert code on them
QUANTIZED_SHAPES, QUANTIZED_SIMULATE = "fsdp_ft_expert_shapes", "fsdp_ft_simulate"
# set on an experts module whose LoRA folds backward remakes instead of keeping (by fsdp_ft.model.lora_folds)
REMADE_FOLDS = "fsdp_ft_remade_folds"
_INDEX_KWARGS = ("top_k_index", "router_indices", "selected_experts", "expert_indices")
_WEIGHT_KWARGS = ("top_k_weights", "routing_weights", "router_scores", "expert_weights")


def expert_modules(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """(module, [its up-projection parameter names]) of every stacked-experts module of the model."""
    found = []
    for module in model.modules():
        shapes = _stack_shapes(module)
        ups = [n for n in UP_NAMES if n in shapes]
        if ups and DOWN_NAME in shapes:
            found.append((module, ups))
    return found


def _stack_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """The module's own 3-D expert tensors by name, with QLoRA's stacks stored as quantized 2-D weights (their
    3-D shapes in QUANTIZED_SHAPES)."""
    shapes = {name: p.shape for name, p in module.named_parameters(recurse=False) if p.dim() == 3}
    return {**shapes, **getattr(module, QUANTIZED_SHAPES, {})}


@contextmanager
def experts_traced_densely(model: nn.Module, recorder):
    """While open, every experts module of `model` runs the stand-in forward (see the module docstring)."""
    patched = []
    try:
        for module, ups in expert_modules(model):
            had = "forward" in module.__dict__
            patched.append((module, had, module.__dict__.get("forward")))
            module.forward = _stand_in(module, ups, recorder, _top_k(model, module))
        yield
    finally:
        for module, had, old in reversed(patched):
            if had:
                module.forward = old
            else:
                del module.forward


class _Unrecorded:
    """A recorder that records nothing: the stand-ins used only so that fake tensors can run the model."""

    def materialising(self):
        return nullcontext()


@contextmanager
def fake_traceable(model: nn.Module):
    """While open, the experts and peft's parameter LoRA run the stand-ins, recording nothing: `fsdp-ft plan`'s
    simulated step (planner.memsim) runs the model on fake tensors too. The stand-ins allocate what the real
    layers do per (token, expert) row: the inputs repeated k times, the up and down projections' outputs, and
    a full-size folded weight per LoRA-adapted tensor and forward."""
    recorder = _Unrecorded()
    with experts_traced_densely(model, recorder), peft_params_folded(model, recorder):
        yield


@contextmanager
def peft_params_folded(model: nn.Module, recorder):
    """While open, peft's ParamWrapper modules fold their LoRA into the parameter without parametrize (see above)."""
    wrappers = [m for m in model.modules()  # a quantized stack's wrapper lends its factors to the real projection
                if _is_param_wrapper(m) and not hasattr(m.get_base_layer(), QUANTIZED_SIMULATE)]
    try:
        for w in wrappers:
            w.forward = _folding_forward(w, recorder)
        yield
    finally:
        for w in wrappers:
            del w.forward


def _is_param_wrapper(module: nn.Module) -> bool:
    return (type(module).__name__ == "ParamWrapper" and isinstance(getattr(module, "parameter_name", None), str)
            and hasattr(module, "get_delta_weight") and hasattr(module, "get_base_layer"))


def _folding_forward(wrapper: nn.Module, recorder):
    def forward(*args, **kwargs):
        kwargs.pop("adapter_names", None)
        adapters = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if wrapper.disable_adapters or wrapper.merged or not adapters:
            return wrapper.base_layer(*args, **kwargs)
        target, name = wrapper.get_base_layer(), wrapper.parameter_name
        original = target._parameters[name]
        with recorder.materialising():
            delta = sum(wrapper.get_delta_weight(a) for a in adapters)
        del target._parameters[name]
        fold = original + delta  # what parametrize would return for `target.<name>`
        if getattr(target, REMADE_FOLDS, False):  # as in the real forward, backward remakes the fold
            recompute.mark(fold, lambda: original + sum(wrapper.get_delta_weight(a) for a in adapters))
        target.__dict__[name] = fold
        try:
            return wrapper.base_layer(*args, **kwargs)
        finally:
            del target.__dict__[name]
            target._parameters[name] = original

    return forward


def _top_k(model: nn.Module, module: nn.Module) -> int | None:
    for cfg in (getattr(module, "config", None), getattr(model, "config", None)):
        cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
        for key in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
            k = getattr(cfg, key, None)
            if isinstance(k, int) and k > 0:
                return k
    return None


def _stand_in(module: nn.Module, ups: list[str], recorder, k_config: int | None):
    def forward(hidden_states, *args, **kwargs):
        index = args[0] if args else next((kwargs[n] for n in _INDEX_KWARGS if n in kwargs), None)
        weights = args[1] if len(args) > 1 else next((kwargs[n] for n in _WEIGHT_KWARGS if n in kwargs), None)
        k = index.shape[-1] if isinstance(index, torch.Tensor) and index.dim() >= 1 else k_config
        if not k:
            raise RuntimeError(f"{type(module).__name__}: cannot tell how many experts each token uses")
        simulate = getattr(module, QUANTIZED_SIMULATE, None)
        if simulate is not None and isinstance(index, torch.Tensor):
            return simulate(hidden_states, index, weights)
        hidden = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, hidden)
        tokens = x.shape[0]
        x = x.unsqueeze(1).expand(tokens, k, hidden).reshape(tokens * k, hidden)  # one row per (token, expert)
        with recorder.materialising():  # peft's LoRA fold of the 3-D weights happens here, once per call
            up_weights = [getattr(module, name) for name in ups]
            down = getattr(module, DOWN_NAME)
        outs = [F.linear(x, _as_out_in(w, hidden, module), _bias(module, name)) for w, name in zip(up_weights, ups)]
        mid = outs[0] if len(outs) == 1 else outs[0] * outs[1]  # separate gate_proj and up_proj
        width = _in_width(down, hidden, module)  # the intermediate size the down projection reads
        if mid.shape[-1] == 2 * width:  # gate and up in one: the model's own gate (gpt-oss: clamped,
            # interleaved), as it saves for backward; else act(gate) * up
            own_gate = getattr(module, "has_gate", False) and hasattr(module, "_apply_gate")
            mid = module._apply_gate(mid) if own_gate else F.silu(mid[..., :width]) * mid[..., width:]
        else:
            mid = getattr(module, "act_fn", F.silu)(mid)
        y = F.linear(mid, _as_out_in(down, width, module), _bias(module, DOWN_NAME)).reshape(tokens, k, hidden)
        if isinstance(weights, torch.Tensor) and weights.shape == (tokens, k):
            y = y * weights.unsqueeze(-1).to(y.dtype)
        return y.sum(1).to(hidden_states.dtype).reshape(hidden_states.shape)

    return forward


def _bias(module: nn.Module, name: str) -> torch.Tensor | None:
    """Expert 0's bias of projection `name` (gpt-oss has them), the stand-in's every expert."""
    bias = getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None
    return bias[0] if isinstance(bias, torch.Tensor) else None


def _transposed(module: nn.Module, w: torch.Tensor, n_in: int) -> bool:
    """[E, in, out] (gpt-oss) rather than [E, out, in]: transformers' flag where it is set, else the shapes."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    return w.shape[1] == n_in and w.shape[2] != n_in


def _as_out_in(w: torch.Tensor, n_in: int, module: nn.Module) -> torch.Tensor:
    """One expert's weight as F.linear takes it, [out, in]."""
    one = w[0]
    return one.t() if _transposed(module, w, n_in) else one


def _in_width(down: torch.Tensor, hidden: int, module: nn.Module) -> int:
    """The input width of the down projection: [E, H, I] -> I, or [E, I, H] when transposed."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return down.shape[1] if flag else down.shape[2]
    return down.shape[2] if down.shape[1] == hidden else down.shape[1]
