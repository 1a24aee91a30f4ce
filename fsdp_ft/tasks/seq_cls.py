"""Sequence classification on a text (or text pair) column and a label column."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fsdp_ft.config import Config
from fsdp_ft.errors import DataError
from fsdp_ft.tasks.causal_lm import pad_batch


class SeqClsTask:
    name = "seq_cls"
    count_unit = "samples"

    def __init__(self, cfg: Config, tokenizer):
        self.cfg = cfg
        self.tok = tokenizer
        self.label2id: dict[str, int] = {}

    def columns(self) -> list[str]:
        d = self.cfg.data
        return [d.text_column, d.label_column] + ([d.text_pair_column] if d.text_pair_column else [])

    def labels(self, table) -> list[str]:
        """Label names from the training data: sorted numerically when all are integers, else by name."""
        values = set(table[self.cfg.data.label_column])
        if None in values:
            raise DataError(f"data.train: '{self.cfg.data.train}' column '{self.cfg.data.label_column}' has empty "
                            "labels; fill or drop those rows")
        names = sorted(values) if all(isinstance(v, int) for v in values) else sorted(str(v) for v in values)
        names = [str(v) for v in names]
        if self.cfg.model.num_labels is not None and self.cfg.model.num_labels != len(names):
            if all(isinstance(v, int) for v in values) and max(values) < self.cfg.model.num_labels:
                names = [str(i) for i in range(self.cfg.model.num_labels)]
            else:
                raise DataError(f"model.num_labels={self.cfg.model.num_labels} but data.train has "
                                f"{len(names)} labels: {names[:10]}")
        self.label2id = {n: i for i, n in enumerate(names)}
        return names

    def encode(self, row: dict) -> dict:
        d = self.cfg.data
        pair = row[d.text_pair_column] if d.text_pair_column else None
        enc = self.tok(row[d.text_column], pair, truncation=True, max_length=self.cfg.train.seq_len)
        label = str(row[d.label_column])
        if label not in self.label2id:
            raise DataError(f"data: label {label!r} (column '{d.label_column}') is not among the labels of "
                            f"data.train '{d.train}': {list(self.label2id)}")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "label": self.label2id[label]}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(rows, self.tok.pad_token_id, ("input_ids", "attention_mask"))
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return batch

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(batch["labels"].numel())

    def loss_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return {"loss": loss, "count": torch.tensor(batch["labels"].numel()), "correct": correct}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1)
        return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n}
