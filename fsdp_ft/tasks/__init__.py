"""Per-task pieces: how a row becomes a batch, and how a batch becomes loss sums and eval metrics.

Losses are returned as sums with their count (tokens or samples), so the trainer can normalise by the
global count of the whole step: the loss is then the same for any split of the batch over ranks and
micro-steps.
"""
from __future__ import annotations

from fsdp_ft.config import Config


def get_task(cfg: Config, tokenizer):
    if cfg.task == "causal_lm":
        from fsdp_ft.tasks.causal_lm import CausalLMTask
        return CausalLMTask(cfg, tokenizer)
    if cfg.task in ("dpo", "orpo", "simpo"):
        from fsdp_ft.tasks.preference import DPOTask, ORPOTask, SimPOTask
        return {"dpo": DPOTask, "orpo": ORPOTask, "simpo": SimPOTask}[cfg.task](cfg, tokenizer)
    if cfg.task == "reward":
        from fsdp_ft.tasks.reward import RewardTask
        return RewardTask(cfg, tokenizer)
    from fsdp_ft.tasks.seq_cls import SeqClsTask
    return SeqClsTask(cfg, tokenizer)
