"""Causal language modelling on a text column: next-token loss on every real token."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fsdp_ft.config import Config

IGNORE = -100


def pad_batch(rows: list[dict], pad_id: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Right-pad token lists to the longest row; labels pad with IGNORE, attention_mask with 0."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in keys:
        fill = {"labels": IGNORE, "attention_mask": 0}.get(key, pad_id)
        out[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)
    return out


class CausalLMTask:
    name = "causal_lm"
    count_unit = "tokens"

    def __init__(self, cfg: Config, tokenizer):
        self.cfg = cfg
        self.tok = tokenizer

    def columns(self) -> list[str]:
        return [self.cfg.data.text_column]

    def labels(self, table) -> None:
        return None

    def encode(self, row: dict) -> dict:
        """Tokenize with the tokenizer's special tokens, end with EOS, truncate to train.seq_len (keep the start)."""
        ids = self.tok(row[self.cfg.data.text_column], add_special_tokens=True)["input_ids"]
        if self.tok.eos_token_id is not None and (not ids or ids[-1] != self.tok.eos_token_id):
            ids = ids + [self.tok.eos_token_id]
        ids = ids[: self.cfg.train.seq_len]
        return {"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, self.tok.pad_token_id, ("input_ids", "labels", "attention_mask"))

    def count(self, batch: dict) -> torch.Tensor:
        """Tokens that carry loss: every label except the first of each row (nothing predicts it)."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits[:, -batch["input_ids"].shape[1]:]  # prompt tuning prepends virtual-token positions
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return {"loss": loss, "count": (shift_labels != IGNORE).sum()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss"] / max(sums["count"], 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
