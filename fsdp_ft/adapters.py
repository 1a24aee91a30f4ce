"""PEFT methods through `peft`: wrap the meta model, name mapping to the base checkpoint, adapter init rules.

peft wraps the model while it is still on the meta device, so adapters are sharded with their blocks and
given storage by `model.materialize` like every other tensor. Their initial values follow peft's own rules
(LoRA A: kaiming-uniform, LoRA B: zeros, IA3: ones, DoRA magnitude: row norms of the base weight), seeded per
module so that they do not depend on the number of ranks.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError

PEFT_METHODS = ("lora", "qlora", "dora", "ia3", "prefix", "prompt", "p_tuning")
LORA_METHODS = ("lora", "qlora", "dora")
ADAPTER = re.compile(r"(^|\.)(lora_A|lora_B|lora_magnitude_vector|ia3_l|prompt_encoder)(\.|$)")


def is_peft(cfg: Config) -> bool:
    return cfg.finetune.method in PEFT_METHODS


def peft_config(cfg: Config):
    """The peft config object for cfg.finetune."""
    import peft

    task_type = "SEQ_CLS" if cfg.task == "seq_cls" else "CAUSAL_LM"
    ft, method = cfg.finetune, cfg.finetune.method
    if method in LORA_METHODS:
        lo = ft.lora
        return peft.LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, bias=lo.bias,
                               target_modules=lo.target_modules or "all-linear",
                               modules_to_save=lo.modules_to_save or None, use_rslora=lo.rslora,
                               use_dora=method == "dora", task_type=task_type)
    if method == "ia3":
        targets = ft.lora.target_modules or None
        return peft.IA3Config(task_type=task_type, target_modules=targets,
                              feedforward_modules=[] if targets else None)
    n = ft.prompt.num_virtual_tokens
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=n)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=n)
    return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=n,
                                    encoder_hidden_size=ft.prompt.encoder_hidden_size)


def wrap(model: nn.Module, cfg: Config) -> nn.Module:
    """peft.get_peft_model on the meta model (adapters are created on meta too: no memory yet)."""
    import peft

    try:
        with torch.device("meta"):
            wrapped = peft.get_peft_model(model, peft_config(cfg))
    except ValueError as e:  # e.g. target modules that do not exist, IA3 on an architecture peft has no default for
        raise ConfigError(f"config key 'finetune': peft rejects {cfg.finetune.method} on this model: "
                          f"{str(e).splitlines()[0]}") from None
    # prompt learning keeps its virtual token ids in a plain dict, which the meta context left without data
    for name, ids in getattr(wrapped, "prompt_tokens", {}).items():
        if ids.is_meta:
            wrapped.prompt_tokens[name] = torch.arange(ids.numel(), dtype=torch.long)
    return wrapped


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpoint_name(name: str) -> str:
    """A module path inside a PeftModel -> the same tensor's name in the base model's checkpoint."""
    name = re.sub(r"^base_model\.model\.", "", name)
    for wrapper in (".base_layer", ".original_module", ".modules_to_save.default"):
        name = name.replace(wrapper, "")
    return name


def is_adapter(module_name: str) -> bool:
    return bool(ADAPTER.search(module_name))


def init_adapter(module_name: str, module: nn.Module) -> None:
    """peft's initial values for an adapter module (a full-size CPU stand-in); DoRA magnitudes come later."""
    if ".lora_B" in module_name:
        for p in module.parameters(recurse=False):
            nn.init.zeros_(p)
    elif ".ia3_l" in module_name:
        for p in module.parameters(recurse=False):
            nn.init.ones_(p)
    elif hasattr(module, "reset_parameters"):  # lora_A (kaiming-uniform as in peft), prompt encoders
        module.reset_parameters()


def dora_magnitude_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Module]]:
    """(magnitude parameter, its LoRA layer's base linear) for every DoRA layer."""
    pairs = []
    for module in model.modules():
        mags = getattr(module, "lora_magnitude_vector", None)
        if isinstance(mags, nn.ModuleDict):
            for dora in mags.values():
                pairs.append((dora.weight, module.get_base_layer()))
    return pairs
