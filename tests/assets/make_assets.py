#!/usr/bin/env python
"""Regenerate the tiny test fixtures under tests/assets/ (deterministic; no network).

    python tests/assets/make_assets.py          # writes data/, tokenizer/, tiny-*/
    python tests/assets/make_assets.py --check  # also builds every model and runs a forward pass

What it writes (all small enough to commit; ~1 MB in all):

* ``data/tiny_text_{train,eval}.jsonl``  rows ``{"text": ...}``: paragraphs of English prose taken from the
  docstrings of a fixed list of Python standard-library modules (PSF licence, see data/README.md).
* ``data/tiny_cls_{train,eval}.jsonl``   rows ``{"text": ..., "label": "text"|"files"|"net"}``: the same kind of
  paragraphs, labelled with the family of modules they came from (balanced 3-class sequence classification).
* ``tokenizer/``  a byte-level BPE (vocab 1024 incl. special tokens) trained on the train text, saved as a
  Hugging Face fast tokenizer: ``<s>`` is prepended to every encoding, ``<pad>``/``</s>``/``<unk>`` are set, and a
  ChatML chat template (``<|im_start|>``/``<|im_end|>``, with ``{% generation %}`` marks) is included.
* ``tiny-llama``, ``tiny-llama-tied``, ``tiny-qwen2``, ``tiny-mistral``, ``tiny-gpt2``, ``tiny-bert``: a
  ``config.json`` (saved by transformers) plus a copy of the tokenizer files, no weights. Build a model with
  ``AutoModelFor*.from_config(AutoConfig.from_pretrained(folder))``.

The output depends only on the docstrings of the listed modules, so it is stable across Python patch releases
(the committed files were generated with CPython 3.11 and the versions recorded in data/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
TOKENIZER_DIR = ROOT / "tokenizer"
SEED = 20261122

VOCAB_SIZE = 1024  # including the special tokens below
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0..5 in this order
MODEL_MAX_LENGTH = 2048

# Families of standard-library modules; the family name is the classification label.
# "str" is a pseudo-module: the methods of the built-in str type.
FAMILIES: dict[str, list[str]] = {
    "text": [
        "base64", "binascii", "codecs", "csv", "difflib", "gettext", "html", "html.parser", "json", "locale",
        "pprint", "re", "str", "string", "textwrap", "tokenize", "unicodedata", "xml.dom.minidom",
        "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.xmlreader",
    ],
    "files": [
        "filecmp", "fileinput", "fnmatch", "glob", "io", "os", "os.path", "pathlib", "shutil", "tarfile",
        "tempfile", "zipfile",
    ],
    "net": [
        "email.message", "email.utils", "ftplib", "http.client", "http.cookiejar", "http.server", "imaplib",
        "ipaddress", "poplib", "smtplib", "socket", "socketserver", "ssl", "urllib.parse", "urllib.request",
    ],
}
# Further modules that feed only the language-modelling text (not the classification set).
OTHER_MODULES = [
    "argparse", "bisect", "calendar", "collections", "configparser", "contextlib", "dataclasses", "datetime",
    "decimal", "enum", "fractions", "functools", "heapq", "itertools", "logging", "pickle", "queue", "random",
    "sched", "statistics", "subprocess", "threading", "unittest",
]

N_TEXT_TRAIN, N_TEXT_EVAL = 1500, 150
N_CLS_EVAL_PER_CLASS = 50
N_CLS_TRAIN_PER_CLASS = 300

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# --------------------------------------------------------------------------------------------- corpus


def _owned(obj, modname: str) -> bool:
    """True when obj is defined by modname (or its C accelerator / package, e.g. _socket, posix, json.decoder)."""
    owner = (getattr(obj, "__module__", None) or "").lstrip("_")
    top = modname.split(".")[0]
    return owner == modname or owner.startswith(top) or (top in ("os", "io") and owner in ("posix", "posixpath"))


def _docstrings(modname: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) for a module, its public classes/functions and their methods, sorted."""
    if modname == "str":
        mod = None
        members = [("str", str)]
    else:
        mod = importlib.import_module(modname)
        members = []
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name)
            if (inspect.isclass(obj) or inspect.isroutine(obj)) and _owned(obj, modname):
                members.append((name, obj))
    out = []
    if mod is not None and isinstance(mod.__doc__, str):
        out.append((modname, mod.__doc__))
    for name, obj in members:
        if isinstance(obj.__doc__, str) and obj is not str:
            out.append((f"{modname}.{name}", obj.__doc__))
        if inspect.isclass(obj):
            for attr, value in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if (inspect.isroutine(value) or isinstance(value, property)) and isinstance(value.__doc__, str):
                    out.append((f"{modname}.{name}.{attr}", value.__doc__))
    return out


def _paragraphs(doc: str):
    """Prose paragraphs of a docstring: split on blank lines, whitespace normalised, code and lists dropped."""
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        if ">>>" in block or "::" in block:
            continue
        text = " ".join(block.split())
        if not 80 <= len(text) <= 600:
            continue
        if sum(c.isalpha() or c == " " for c in text) / len(text) < 0.85:  # mostly symbols: code, tables
            continue
        if len(re.findall(r"[a-z]{2,}", text)) < 10:
            continue
        yield text


def collect() -> tuple[dict[str, list[str]], list[str]]:
    """Returns ({family: sorted paragraphs unique to that family}, sorted list of all unique paragraphs)."""
    origin: dict[str, set[str]] = {}
    groups = [(fam, mods) for fam, mods in FAMILIES.items()] + [("other", OTHER_MODULES)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family, modules in groups:
            for modname in modules:
                for _, doc in _docstrings(modname):
                    for para in _paragraphs(doc):
                        origin.setdefault(para, set()).add(family)
    by_family = {fam: sorted(p for p, fams in origin.items() if fams == {fam}) for fam in FAMILIES}
    return by_family, sorted(origin)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_data() -> list[str]:
    by_family, everything = collect()
    rng = random.Random(SEED)

    texts = list(everything)
    rng.shuffle(texts)
    need = N_TEXT_TRAIN + N_TEXT_EVAL
    if len(texts) < need:
        raise SystemExit(f"only {len(texts)} paragraphs, need {need}: add modules to OTHER_MODULES")
    text_eval, text_train = texts[:N_TEXT_EVAL], texts[N_TEXT_EVAL:need]
    write_jsonl(DATA / "tiny_text_train.jsonl", [{"text": t} for t in text_train])
    write_jsonl(DATA / "tiny_text_eval.jsonl", [{"text": t} for t in text_eval])

    cls_train, cls_eval = [], []
    for family in sorted(by_family):
        paras = list(by_family[family])
        rng.shuffle(paras)
        need = N_CLS_EVAL_PER_CLASS + N_CLS_TRAIN_PER_CLASS
        if len(paras) < need:
            raise SystemExit(f"family {family!r} has {len(paras)} paragraphs, need {need}")
        cls_eval += [{"text": t, "label": family} for t in paras[:N_CLS_EVAL_PER_CLASS]]
        cls_train += [{"text": t, "label": family} for t in paras[N_CLS_EVAL_PER_CLASS:need]]
    rng.shuffle(cls_train)
    rng.shuffle(cls_eval)
    write_jsonl(DATA / "tiny_cls_train.jsonl", cls_train)
    write_jsonl(DATA / "tiny_cls_eval.jsonl", cls_eval)
    per_family = ", ".join(f"{k}={len(v)}" for k, v in by_family.items())
    print(f"paragraphs: {len(everything)} unique; per family: {per_family}")
    return text_train


# --------------------------------------------------------------------------------------------- tokenizer


def make_tokenizer(train_texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}, ids
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", ids["<s>"])]
    )

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    if TOKENIZER_DIR.exists():
        shutil.rmtree(TOKENIZER_DIR)
    hf.save_pretrained(TOKENIZER_DIR)

    # Older transformers read special_tokens_map.json and chat_template from tokenizer_config.json; 5.x writes
    # neither by default. Write both so the folder loads the same way everywhere.
    cfg_path = TOKENIZER_DIR / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (TOKENIZER_DIR / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids, tok.get_vocab_size(with_added_tokens=True)


# --------------------------------------------------------------------------------------------- models


def model_configs(vocab_size: int, ids: dict[str, int]) -> dict:
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    # Dropout is 0 everywhere so that 1-process and N-rank runs can be compared step for step.
    special = dict(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    decoder = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **special,
    )
    return {
        "tiny-llama": LlamaConfig(**decoder, tie_word_embeddings=False),
        "tiny-llama-tied": LlamaConfig(**decoder, tie_word_embeddings=True),
        "tiny-qwen2": Qwen2Config(**decoder, tie_word_embeddings=False, max_window_layers=4),
        "tiny-mistral": MistralConfig(**decoder, tie_word_embeddings=False, sliding_window=None),
        "tiny-gpt2": GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=512,
            tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            **special,
        ),
        "tiny-bert": BertConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **special,
        ),
    }


def make_models(vocab_size: int, ids: dict[str, int]) -> list[str]:
    names = []
    for name, config in model_configs(vocab_size, ids).items():
        folder = ROOT / name
        if folder.exists():
            shutil.rmtree(folder)
        config.save_pretrained(folder)
        for fname in TOKENIZER_FILES:
            if (TOKENIZER_DIR / fname).exists():
                shutil.copy2(TOKENIZER_DIR / fname, folder / fname)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------- check


def check(model_names: list[str]) -> None:
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, PreTrainedTokenizerFast)

    samples = [json.loads(line)["text"] for line in (DATA / "tiny_text_eval.jsonl").read_text().splitlines()[:2]]
    base = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ref = base(samples)["input_ids"]
    for name in model_names:
        folder = ROOT / name
        tok = AutoTokenizer.from_pretrained(folder)
        cfg = AutoConfig.from_pretrained(folder)
        assert isinstance(tok, PreTrainedTokenizerFast), type(tok)
        assert tok(samples)["input_ids"] == ref, f"{name}: tokenizer differs from tokenizer/"
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id), name
        assert len(tok) == cfg.vocab_size, (name, len(tok), cfg.vocab_size)
        batch = tok(samples, padding=True, truncation=True, max_length=128, return_tensors="pt")
        torch.manual_seed(0)
        heads = [] if cfg.model_type == "bert" else [AutoModelForCausalLM]
        heads.append(AutoModelForSequenceClassification)
        for head in heads:
            kwargs = {"num_labels": 3} if head is AutoModelForSequenceClassification else {}
            model = head.from_config(AutoConfig.from_pretrained(folder, **kwargs))
            with torch.no_grad():
                logits = model(**batch).logits
            assert torch.isfinite(logits).all(), name
            n_params = sum(p.numel() for p in model.parameters())
            print(f"  {name:16s} {type(model).__name__:36s} params={n_params:>8d} logits={tuple(logits.shape)}")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="build every model and run a forward pass")
    args = parser.parse_args()

    train_texts = make_data()
    ids, vocab_size = make_tokenizer(train_texts)
    names = make_models(vocab_size, ids)
    print(f"tokenizer: vocab_size={vocab_size} special ids={ids}")
    for path in sorted(DATA.glob("*.jsonl")):
        n = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"  {path.relative_to(ROOT)}: {n} rows, {path.stat().st_size} bytes")
    for folder in [TOKENIZER_DIR] + [ROOT / n for n in names]:
        print(f"  {folder.name}/: {du(folder)} bytes")
    print(f"tests/assets total: {du(ROOT)} bytes (python {sys.version.split()[0]})")
    if args.check:
        check(names)


if __name__ == "__main__":
    main()
