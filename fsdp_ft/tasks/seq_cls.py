"""Sequence classification on a text (or text pair) column and a label column.

Eval metrics (accuracy, macro F1, confusion matrix) are built from per-cell confusion counts: the trainer
sums scalar counts over batches and ranks, so every metric is exact for any number of ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fsdp_ft.config import Config
from fsdp_ft.errors import DataError
from fsdp_ft.tasks.causal_lm import pad_batch


def samples(labels: torch.Tensor) -> torch.Tensor:
    """The number of samples, made on the batch's device: a host-made count would be copied to the GPU with a
    wait for the stream every step."""
    return torch.full((), labels.numel(), dtype=torch.long, device=labels.device)


class SeqClsTask:
    name = "seq_cls"
    count_unit = "samples"
    eval_metrics = ("loss", "accuracy", "f1_macro")  # the numeric ones train.best_metric may name

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
        return samples(batch["labels"])

    def loss_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return {"loss": loss, "count": samples(batch["labels"]), "correct": correct}

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """loss_sums plus one count per confusion-matrix cell (`cm.TRUE.PRED`), so ranks can sum them."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        k = logits.shape[-1]
        cells = torch.bincount(labels * k + logits.argmax(-1), minlength=k * k)
        sums = {"loss": F.cross_entropy(logits, labels, reduction="sum"), "count": samples(labels)}
        sums.update({f"cm.{t}.{p}": cells[t * k + p] for t in range(k) for p in range(k)})
        return sums

    def metrics(self, sums: dict[str, float]) -> dict:
        n = max(sums["count"], 1)
        out = {"loss": sums["loss"] / n}
        if "correct" in sums:  # sums from loss_sums (no confusion counts)
            return {**out, "accuracy": sums["correct"] / n}
        names = list(self.label2id)
        matrix = confusion_from_sums(sums, len(names))
        return {**out, **classification_metrics(matrix), "confusion_matrix": {"labels": names, "matrix": matrix}}


def confusion_from_sums(sums: dict[str, float], num_labels: int) -> list[list[int]]:
    """Rows are true labels, columns predicted labels, both in label-id order."""
    return [[int(round(sums[f"cm.{t}.{p}"])) for p in range(num_labels)] for t in range(num_labels)]


def classification_metrics(matrix: list[list[int]]) -> dict[str, float]:
    """Accuracy and macro F1 from a confusion matrix (rows true, columns predicted).

    Macro F1 averages F1 = 2TP / (2TP + FP + FN) over the labels that occur as truth or prediction, as
    scikit-learn's f1_score(average="macro") does; a label absent from both would otherwise count as 0.
    """
    k = len(matrix)
    total = sum(map(sum, matrix))
    tp = [matrix[i][i] for i in range(k)]
    true_counts = [sum(row) for row in matrix]
    pred_counts = [sum(matrix[t][p] for t in range(k)) for p in range(k)]
    f1 = [2 * tp[i] / (true_counts[i] + pred_counts[i]) for i in range(k) if true_counts[i] + pred_counts[i]]
    return {"accuracy": sum(tp) / max(total, 1), "f1_macro": sum(f1) / len(f1) if f1 else 0.0}
