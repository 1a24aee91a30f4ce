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


def peft_config(cfg: Config, trainable_tokens=None):
    """The peft config object for cfg.finetune. `trainable_tokens`: embedding rows that train in full beside the
    adapters (peft's trainable_token_indices: new chat tokens), as a list or {layer name: ids}."""
    import peft

    task_type = "SEQ_CLS" if cfg.task in ("seq_cls", "reward") else "CAUSAL_LM"
    ft, method = cfg.finetune, cfg.finetune.method
    if method in LORA_METHODS:
        lo = ft.lora
        return peft.LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, bias=lo.bias,
                               target_modules=lo.target_modules or "all-linear",
                               target_parameters=lo.target_parameters or None,
                               modules_to_save=lo.modules_to_save or None, use_rslora=lo.rslora,
                               use_dora=method == "dora", task_type=task_type,
                               trainable_token_indices=trainable_tokens or None)
    if trainable_tokens:
        raise ConfigError(f"finetune.method={method}: the tokenizer has no chat template, so ChatML tokens were added "
                          "whose embedding rows must train; that needs finetune.method lora, qlora, dora, full or "
                          "partial (or a model whose tokenizer has a chat template)")
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


def wrap(model: nn.Module, cfg: Config, new_tokens: list[int] = (), device: torch.device | None = None) -> nn.Module:
    """peft.get_peft_model on the meta model (adapters are created on meta too: no memory yet).

    `new_tokens` (ids of added chat tokens) train as peft trainable tokens: only their rows of the embedding (and
    of an untied LM head) train and are saved with the adapter, which replaces those rows of the base.
    `device`: the rank's device, where prompt learning's virtual token ids are made (peft copies them to the
    embedding's device in every forward otherwise: a host-to-device copy per step)."""
    import peft

    try:
        with torch.device("meta"):
            wrapped = peft.get_peft_model(model, peft_config(cfg, _token_indices(model, new_tokens)))
    except ValueError as e:  # e.g. target modules that do not exist, IA3 on an architecture peft has no default for
        raise ConfigError(f"config key 'finetune': peft rejects {cfg.finetune.method} on this model: "
                          f"{str(e).splitlines()[0]}") from None
    # prompt learning keeps its virtual token ids in a plain dict, which the meta context left without data
    for name, ids in getattr(wrapped, "prompt_tokens", {}).items():
        if ids.is_meta:
            wrapped.prompt_tokens[name] = torch.arange(ids.numel(), dtype=torch.long, device=device)
    return wrapped


def _token_indices(model: nn.Module, ids: list[int]):
    """peft's trainable_token_indices for `ids`: a list when the LM head is tied to the embedding (peft ties the
    head's rows itself), else the same ids for the embedding and the head, by their module names."""
    if not ids:
        return None
    if getattr(model.config, "tie_word_embeddings", False) or model.get_output_embeddings() is None:
        return list(ids)
    names = {id(m): n.rpartition(".")[2] for n, m in model.named_modules()}
    return {names[id(model.get_input_embeddings())]: list(ids), names[id(model.get_output_embeddings())]: list(ids)}


def trainable_token_rows(model: nn.Module, module_name: str) -> tuple[str, list[int]] | None:
    """For peft's trainable-token tensors (`...token_adapter.trainable_tokens_delta` / `..._original`): the name of
    the base layer whose rows they replace, and the token ids; they start as those rows."""
    m = re.fullmatch(r"(.*\.token_adapter)\.trainable_tokens_(delta|original)", module_name)
    if m is None:
        return None
    return f"{m.group(1)}.base_layer", list(model.get_submodule(m.group(1)).token_indices["default"])


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpoint_name(name: str) -> str:
    """A module path inside a PeftModel -> the same tensor's name in the base model's checkpoint."""
    name = re.sub(r"^base_model\.(model\.)?", "", name)  # LoRA: base_model.model.NAME; prompt learning: base_model.NAME
    for wrapper in (".base_layer", ".original_module", ".modules_to_save.default", ".token_adapter"):
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
