"""The committed tiny fixtures in tests/assets load and run (regenerate with tests/assets/make_assets.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent / "assets"
DATA = ASSETS / "data"
CAUSAL_LMS = ["tiny-llama", "tiny-llama-tied", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]
MODELS = CAUSAL_LMS + ["tiny-bert"]
LABELS = {"text", "files", "net"}
SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<|im_start|>": 4, "<|im_end|>": 5}
VOCAB_SIZE = 1024


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def samples() -> list[str]:
    return [row["text"] for row in read_jsonl(DATA / "tiny_text_eval.jsonl")[:2]]


@pytest.mark.parametrize(
    "name, n_rows, keys",
    [
        ("tiny_text_train.jsonl", 1500, {"text"}),
        ("tiny_text_eval.jsonl", 150, {"text"}),
        ("tiny_cls_train.jsonl", 900, {"text", "label"}),
        ("tiny_cls_eval.jsonl", 150, {"text", "label"}),
    ],
)
def test_jsonl_files_parse(name, n_rows, keys):
    rows = read_jsonl(DATA / name)
    assert len(rows) == n_rows
    for row in rows:
        assert set(row) == keys
        assert isinstance(row["text"], str) and 80 <= len(row["text"]) <= 600
    assert len({row["text"] for row in rows}) == n_rows  # no duplicates
    if "label" in keys:
        counts = {label: sum(row["label"] == label for row in rows) for label in LABELS}
        assert set(row["label"] for row in rows) == LABELS
        assert max(counts.values()) - min(counts.values()) <= n_rows // 10, counts  # roughly balanced


def test_text_splits_are_disjoint():
    train = {row["text"] for row in read_jsonl(DATA / "tiny_text_train.jsonl")}
    evals = {row["text"] for row in read_jsonl(DATA / "tiny_text_eval.jsonl")}
    assert not train & evals
    cls_train = {row["text"] for row in read_jsonl(DATA / "tiny_cls_train.jsonl")}
    cls_eval = {row["text"] for row in read_jsonl(DATA / "tiny_cls_eval.jsonl")}
    assert not cls_train & cls_eval


def test_tokenizer(samples):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == VOCAB_SIZE
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.model_max_length == 2048
    ids = tok(samples[0])["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == samples[0]  # byte-level BPE round-trips


def test_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    messages = [
        {"role": "user", "content": "What does a socket do?"},
        {"role": "assistant", "content": "It is an endpoint for sending data."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>user\nWhat does a socket do?<|im_end|>\n"
        "<|im_start|>assistant\nIt is an endpoint for sending data.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == SPECIAL_IDS["<|im_start|>"]
    answer = tok.decode([i for i, m in zip(ids, mask) if m])
    assert answer == "It is an endpoint for sending data.<|im_end|>"


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model(name, samples):
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    folder = ASSETS / name
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))  # config + tokenizer only
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.vocab_size == len(tok) == VOCAB_SIZE
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok(samples)["input_ids"] == AutoTokenizer.from_pretrained(ASSETS / "tokenizer")(samples)["input_ids"]
    if name == "tiny-llama-tied":
        assert cfg.tie_word_embeddings
    elif name in ("tiny-llama", "tiny-qwen2", "tiny-mistral"):
        assert not cfg.tie_word_embeddings

    batch = tok(samples, padding=True, truncation=True, max_length=64, return_tensors="pt")
    seq_len = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape[0] == 2 and seq_len > 8
    torch.manual_seed(0)
    if name in CAUSAL_LMS:
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            out = model(**batch, labels=batch["input_ids"])
        assert out.logits.shape == (2, seq_len, VOCAB_SIZE)
        assert torch.isfinite(out.logits).all()
        # random init: loss near ln(vocab)
        assert abs(out.loss.item() - math.log(VOCAB_SIZE)) < 1.0
        if cfg.tie_word_embeddings:
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder, num_labels=3)).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
