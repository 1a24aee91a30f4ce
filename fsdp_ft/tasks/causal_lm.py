"""Causal language modelling and SFT: next-token loss on the completion tokens (or on every token).

Rows of any `data.format` (see `fsdp_ft.data.formats`) are tokenized once at load time, truncated by
`data.truncation`, and, with `data.packing`, packed into rows of train.seq_len (see `fsdp_ft.data.packing`).

Attention: a batch without padding reaches the model with no mask at all (`UNPADDED`, decided by collate on
the host), so SDPA runs causal attention with `is_causal` (flash, native GQA) and transformers' mask code never
reads a device tensor to find out there is no padding (a host sync per forward). Padded batches pass their mask;
packed rows pass position ids, from which transformers builds a block-diagonal mask (so no flash). Future work
for packing: `model.attn_implementation=flash_attention_2` (varlen kernels from the position ids; needs the
flash-attn package) or flex attention with a document mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fsdp_ft.config import Config
from fsdp_ft.data import formats
from fsdp_ft.data.packing import PackedRows, TokenRows
from fsdp_ft.data.splits import BadRow, Drops
from fsdp_ft.errors import DataError
from fsdp_ft.model import vocab
from fsdp_ft.tasks import head_loss
from fsdp_ft.tasks.head_loss import IGNORE

PADDING = {"labels": IGNORE, "attention_mask": 0, "position_ids": 0}
# batch key present (an empty tensor, so it pins and moves with the batch at no cost) when no row is padded
UNPADDED = "unpadded"


def pad_batch(rows: list[dict], pad_id: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Right-pad token lists to the longest row; labels pad with IGNORE, attention_mask and position_ids with 0."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in keys:
        fill = PADDING.get(key, pad_id)
        out[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)
    return out


def shift(labels: torch.Tensor) -> torch.Tensor:
    """Each position's next-token label. The labels move, not the logits: slicing the logits would copy them."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


class CausalLMTask:
    name = "causal_lm"
    count_unit = "tokens"

    def __init__(self, cfg: Config, tokenizer):
        self.cfg = cfg
        self.tok = tokenizer
        self.format = cfg.data.format
        self.chat_tokens: list[int] = []  # ChatML tokens added to a template-less tokenizer (their rows must train)
        if self.format in formats.CHAT_FORMATS:
            self.chat_tokens = vocab.ensure_chat_template(tokenizer)

    # ------------------------------------------------------------ data

    def resolve_format(self, column_names: list[str]) -> str:
        """data.format=auto: decide from the training file's columns (once); chat formats need a chat template."""
        if self.format == "auto":
            self.format = formats.detect_format(column_names, self.cfg.data)
            if self.format in formats.CHAT_FORMATS:
                self.chat_tokens = vocab.ensure_chat_template(self.tok)
        return self.format

    def columns(self) -> list[str]:
        fmt = self.format if self.format != "auto" else "text"
        return formats.required_columns(fmt, self.cfg.data)

    def labels(self, table) -> None:
        return None

    def sample(self, row: dict) -> formats.Sample | None:
        """A raw row as tokens with completion flags, truncated by data.truncation (None: dropped as too long)."""
        if self.format == "auto":
            self.resolve_format(list(row))
        sample = formats.row_to_sample(row, self.format, self.tok, self.cfg.data)
        return formats.truncate(sample, self.cfg.train.seq_len, self.cfg.data.truncation)

    def prepare(self, table, split: str):
        """Tokenize every row once: malformed rows fail (BadRow), rows with nothing to train on are dropped and
        counted. Training rows are packed when data.packing is on (eval rows never are: their loss is the same)."""
        drops = Drops(("empty_text", "too_long") if self.format == "text" else
                      ("empty_text", "empty_completion", "no_answer", "too_long"))
        rows = TokenRows()
        for i, row in enumerate(table):
            try:
                sample = self.sample(row)
            except formats.RowError as e:
                raise BadRow(i, str(e)) from None
            except formats.SkipRow as e:
                drops.add(e.reason, i, e.detail)
                continue
            if sample is None:
                drops.add("too_long", i, f"longer than train.seq_len={self.cfg.train.seq_len}")
                continue
            if len(sample) < 2 or not self._has_loss(sample):
                drops.add("empty_completion", i, "no token left to train on")
                continue
            rows.append(sample.ids, formats.labels_for(sample, self.cfg.data.loss_on, IGNORE))
        if split == "train" and self.cfg.data.packing and len(rows):
            return PackedRows.pack(rows, self.cfg.train.seq_len, self.cfg.train.seed), drops
        return rows, drops

    def _has_loss(self, sample: formats.Sample) -> bool:
        return self.cfg.data.loss_on == "all" or any(sample.completion[1:])

    def encode(self, row: dict) -> dict:
        """A prepared row (ids, labels, ...) as it is; a raw row is formatted and tokenized here."""
        if "input_ids" in row and "labels" in row:
            return row
        sample = self.sample(row)
        if sample is None:
            raise DataError(f"a row is longer than train.seq_len={self.cfg.train.seq_len} and "
                            "data.truncation=drop")
        ids = sample.ids
        return {"input_ids": ids, "labels": formats.labels_for(sample, self.cfg.data.loss_on, IGNORE),
                "attention_mask": [1] * len(ids)}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "labels", "attention_mask") + (("position_ids",) if "position_ids" in rows[0] else ())
        batch = pad_batch(rows, self.tok.pad_token_id, keys)
        if self.cfg.train.chunked_head_loss:  # made here, on the host, so the device never syncs to select them
            batch["loss_positions"] = head_loss.loss_positions(shift(batch["labels"]))
        if "position_ids" not in batch and bool(batch["attention_mask"].all()):  # a host tensor here: no sync
            batch[UNPADDED] = torch.empty(0, dtype=torch.bool)
        return batch

    # ------------------------------------------------------------ loss

    def count(self, batch: dict) -> torch.Tensor:
        """Tokens that carry loss: every label except the first of each row (nothing predicts it)."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        shift_labels = shift(batch["labels"])
        count = (shift_labels != IGNORE).sum()
        if self.cfg.train.chunked_head_loss and head_loss.supported(model):
            positions = batch.get("loss_positions")
            if positions is None:  # a batch not made by collate (the planner's synthetic one)
                positions = head_loss.loss_positions(shift_labels)
            with head_loss.head_loss(model, shift_labels, positions) as result:
                out = self._forward(model, batch)
            return {"loss": result["loss"] + router_aux_loss(model, out, count), "count": count}
        out = self._forward(model, batch)
        logits = out.logits[:, -batch["input_ids"].shape[1]:]  # prompt tuning prepends virtual-token positions
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), shift_labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return {"loss": loss + router_aux_loss(model, out, count), "count": count}

    @staticmethod
    def _forward(model, batch: dict):
        if "position_ids" in batch:  # packed: no 2-D mask, so transformers masks per sample from the position ids
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        if UNPADDED in batch:  # no mask: plain causal attention, with nothing for transformers to check
            return model(input_ids=batch["input_ids"], use_cache=False)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss"] / max(sums["count"], 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def router_aux_loss(model, out, count: torch.Tensor) -> torch.Tensor | float:
    """An MoE's load-balancing loss, when the model config asks for it (`output_router_logits: true`), as
    transformers adds it to its own training loss: `router_aux_loss_coef` x the forward's `aux_loss`, here per
    loss-carrying token (the step divides its loss sum by the step's token count), so a micro-batch's share is
    weighed by its tokens. Training only: eval loss and perplexity stay the plain cross-entropy."""
    aux = getattr(out, "aux_loss", None)
    if aux is None or not model.training:
        return 0.0
    coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0
    return coef * aux.float() * count
