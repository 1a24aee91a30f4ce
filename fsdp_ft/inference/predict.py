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
from fsdp_ft.inference.loading import LoadedModel, read_jsonl, text_field


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


def check_output(input_path: str, output_path: str, input_option: str = "--input") -> None:
    """Refuse an --output that is the input file itself (a symlink or hard link to it included): the results
    would replace the rows they came from."""
    src, dst = Path(input_path), Path(output_path)
    same = os.path.realpath(src) == os.path.realpath(dst)
    if not same and src.exists() and dst.exists():
        same = os.path.samefile(src, dst)
    if same:
        raise ConfigError(f"--output '{output_path}' is the {input_option} file itself: writing it would replace "
                          "the input; give another file")


def write_lines(path: str | Path, lines) -> None:
    """Write text lines atomically: into a hidden temporary file beside `path`, renamed over it once complete, so
    a failure leaves the old file (or none), never a half-written one."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _max_length(loaded: LoadedModel, max_length: int | None) -> int:
    """--max-length, refused above the model's position table; by default the run's seq_len or the model's limit,
    capped to that table (RoBERTa-style models take 2 tokens fewer than max_position_embeddings says)."""
    from fsdp_ft.model import adapters
    from fsdp_ft.model.build import check_seq_len, position_limit

    hf_config = adapters.base_model(loaded.model).config
    if max_length is not None:
        if max_length < 1:
            raise ConfigError("--max-length must be >= 1")
        check_seq_len(loaded.cfg, hf_config, max_length, key="--max-length")
        return max_length
    limit = position_limit(hf_config)
    virtual = (loaded.cfg.finetune.prompt.num_virtual_tokens
               if loaded.cfg.finetune.method in ("prefix", "prompt", "p_tuning") else 0)
    return min(loaded.max_length, limit[0] - virtual) if limit else loaded.max_length


def predict_file(loaded: LoadedModel, input_path: str, output_path: str, text_column: str = "text",
                 pair_column: str | None = None, batch_size: int = 16, max_length: int | None = None) -> int:
    """Write one JSON line per input row: {"label", "score", "probabilities": {label: p}}. Returns the rows."""
    check_output(input_path, output_path)
    if loaded.task != "seq_cls":
        raise ConfigError(f"predict needs a sequence classifier; '{loaded.folder}' is a {loaded.task} model "
                          "(use fsdp-ft generate)")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    length = _max_length(loaded, max_length)
    texts, pairs = _texts(input_path, text_column, pair_column)
    probs = class_probabilities(loaded, texts, pairs, batch_size, length)
    write_lines(output_path, (_line(loaded.labels, p) for p in probs.tolist()))
    return len(texts)


def _line(labels: list[str], p: list[float]) -> str:
    best = max(range(len(p)), key=p.__getitem__)
    return json.dumps({"label": labels[best], "score": p[best], "probabilities": dict(zip(labels, p))}) + "\n"
