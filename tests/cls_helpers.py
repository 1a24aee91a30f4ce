"""Helpers shared by test_seq_cls.py and test_inference.py: one cached 2-rank classifier run with best-checkpoint
selection, and a hand count of classification metrics from an exported model's own predictions."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import ASSETS, FAST, TINY, train_nproc

DATA = ASSETS / "data"
EVAL_FILE = DATA / "tiny_cls_eval.jsonl"
EVAL_ROWS = 48
SEQ_LEN = 64  # FAST's train.seq_len
# tiny-llama as a classifier learns within a few dozen steps (the random tiny BERT stays at chance for longer).
# Ranking by the *largest* eval loss makes the earliest eval the best (training lowers the loss), so every later
# checkpoint is worse: the case where the best must survive keep_last pruning and become final/.
CLS = [f"model.path={ASSETS / 'tiny-llama'}", "task=seq_cls", f"data.train={DATA / 'tiny_cls_train.jsonl'}",
       f"data.eval={EVAL_FILE}", f"data.max_eval_samples={EVAL_ROWS}", "optim.lr=3e-3", "optim.warmup_steps=2",
       "train.micro_batch_size=4", "train.max_steps=16", "train.eval_every=4", "train.keep_last=1",
       "train.best_metric=loss", "train.best_mode=max"]


def classifier_run(root: Path) -> Path:
    """A 2-rank seq_cls run (made once per session; both test modules get the same folder)."""
    out = root / "cls-best-2rank"
    if not (out / "final").is_dir():
        train_nproc(2, out, *CLS)
    return out


def train_here(out: Path, *overrides: str) -> Path:
    """A 1-process run in this process (`engine.train`, what `fsdp-ft train` calls): no interpreter start-up, so a
    run of a few steps costs a second or two instead of ~10 s."""
    from fsdp_ft.api import train
    from fsdp_ft.config import load_config

    train(load_config(TINY, [f"output_dir={out}", *FAST, *overrides]))
    return out


def export_step(run: Path, step: int, out: Path) -> Path:
    """`fsdp-ft export RUN --step N --out OUT`, in this process (the CLI's own function)."""
    from fsdp_ft.checkpoint.export import export_run

    return export_run(str(run), step, str(out))


def eval_file_rows(n: int = EVAL_ROWS) -> list[dict]:
    return [json.loads(line) for line in EVAL_FILE.read_text().splitlines()][:n]


@torch.no_grad()
def hf_probabilities(model_dir: Path, texts: list[str], max_length: int = SEQ_LEN):
    """Softmax of the HF model's own logits, one text at a time (no padding involved)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    probs = [torch.softmax(model(**tok(t, truncation=True, max_length=max_length, return_tensors="pt")).logits[0],
                           -1) for t in texts]
    return torch.stack(probs), model.config


def hand_metrics(model_dir: Path, rows: list[dict]) -> dict:
    """Accuracy, macro F1 (mean of 2PR/(P+R) over labels seen as truth or prediction) and the confusion matrix,
    counted from the exported model's predictions row by row."""
    probs, config = hf_probabilities(model_dir, [r["text"] for r in rows])
    names = [config.id2label[i] for i in range(config.num_labels)]
    pred = [names[i] for i in probs.argmax(-1).tolist()]
    truth = [r["label"] for r in rows]
    matrix = [[sum(1 for t, p in zip(truth, pred) if t == a and p == b) for b in names] for a in names]
    f1s = []
    for name in names:
        tp = sum(1 for t, p in zip(truth, pred) if t == p == name)
        n_pred, n_true = pred.count(name), truth.count(name)
        if n_pred == 0 and n_true == 0:
            continue
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    accuracy = sum(t == p for t, p in zip(truth, pred)) / len(rows)
    return {"accuracy": accuracy, "f1_macro": sum(f1s) / len(f1s), "labels": names, "matrix": matrix}
