"""`fsdp-ft predict`: label and class probabilities for each row of a JSON Lines file, from a classifier.

Every input row gets exactly one output line, in order; a row that cannot be classified (no such column, no
text) stops the command with its line number rather than being skipped, so outputs always line up with inputs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fsdp_ft.errors import ConfigError
from fsdp_ft.inference import LoadedModel, read_jsonl, text_field


def _texts(path: str, text_column: str, pair_column: str | None):
    rows = read_jsonl(path, "--input")
    texts = [text_field(r, text_column, path, n, "--input", "--text-column") for n, r in rows]
    pairs = ([text_field(r, pair_column, path, n, "--input", "--text-pair-column") for n, r in rows]
             if pair_column else None)
    return texts, pairs


@torch.no_grad()
def class_probabilities(loaded: LoadedModel, texts: list[str], pairs: list[str] | None, batch_size: int,
                        max_length: int) -> torch.Tensor:
    """Softmax of the classifier's logits, one row per text (rows x labels, float32, on the CPU)."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = loaded.tokenizer(texts[start:start + batch_size],
                               pairs[start:start + batch_size] if pairs else None,
                               truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc = {k: v.to(loaded.device) for k, v in enc.items()}
        out.append(torch.softmax(loaded.model(**enc).logits.float(), dim=-1).cpu())
    return torch.cat(out)


def predict_file(loaded: LoadedModel, input_path: str, output_path: str, text_column: str = "text",
                 pair_column: str | None = None, batch_size: int = 16, max_length: int | None = None) -> int:
    """Write one JSON line per input row: {"label", "score", "probabilities": {label: p}}. Returns the rows."""
    if loaded.task != "seq_cls":
        raise ConfigError(f"predict needs a sequence classifier; '{loaded.folder}' is a {loaded.task} model "
                          "(use fsdp-ft generate)")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    texts, pairs = _texts(input_path, text_column, pair_column)
    probs = class_probabilities(loaded, texts, pairs, batch_size, max_length or loaded.max_length)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for p in probs.tolist():
            best = max(range(len(p)), key=p.__getitem__)
            fh.write(json.dumps({"label": loaded.labels[best], "score": p[best],
                                 "probabilities": dict(zip(loaded.labels, p))}) + "\n")
    os.replace(tmp, out)  # a failed run never leaves a half-written output
    return len(texts)
