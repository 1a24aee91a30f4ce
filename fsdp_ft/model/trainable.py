"""What trains: full fine-tuning, or partial (frozen embeddings, first N blocks, regexes, head only).

Applied on the meta model before sharding; FSDP2 shards frozen parameters but keeps no gradients or optimizer
state for them.
"""
from __future__ import annotations

import re

from torch import nn

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError


def _names_under(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _embedding_modules(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Token, position and type embeddings: every nn.Embedding outside the blocks, except a tied output head."""
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in in_blocks and m is not head]


def _head_names(model: nn.Module) -> set[str]:
    """The output head: the LM head for causal LMs, whatever sits outside the base model for classifiers."""
    prefix = getattr(model, "base_model_prefix", "")
    outside_base = {n for n, _ in model.named_parameters() if prefix and not n.startswith(prefix + ".")}
    if outside_base:
        return outside_base
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _names_under(model, [head]) if head is not None else set()


def trainable_names(model: nn.Module, cfg: Config, blocks: list[nn.Module]) -> set[str]:
    """The parameter names that train under cfg.finetune (all of them for `full`)."""
    ft = cfg.finetune
    names = {n for n, _ in model.named_parameters()}
    if ft.method == "full":
        return names
    if ft.head_only:
        names = _head_names(model)
    if ft.trainable_regex:
        names = {n for n in names if any(re.search(r, n) for r in ft.trainable_regex)}
    if ft.frozen_regex:
        names = {n for n in names if not any(re.search(r, n) for r in ft.frozen_regex)}
    if ft.freeze_embeddings:
        names -= _names_under(model, _embedding_modules(model, blocks))
    if ft.freeze_first_n_blocks:
        if ft.freeze_first_n_blocks > len(blocks):
            raise ConfigError(f"config key 'finetune.freeze_first_n_blocks'={ft.freeze_first_n_blocks} exceeds the "
                              f"model's {len(blocks)} blocks")
        names -= _names_under(model, blocks[: ft.freeze_first_n_blocks])
    if not names:
        raise ConfigError("config key 'finetune': these partial settings leave no parameter to train")
    return names


def apply_finetune(model: nn.Module, cfg: Config, blocks: list[nn.Module]) -> None:
    """Set requires_grad from the fine-tuning method."""
    keep = trainable_names(model, cfg, blocks)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
