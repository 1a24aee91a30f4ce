"""Causal LM SFT data: every format's tokens and loss flags (checked token by token against hand-built references),
truncation, row validation with drop counts, and ChatML added to a template-less tokenizer with new embedding rows
that train under LoRA (1 and 2 ranks) and survive export."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import ASSETS, FAST, TINY, assert_losses_close, losses, train_nproc
from fsdp_ft.config import load_config
from fsdp_ft.data import formats
from fsdp_ft.data.splits import load_splits
from fsdp_ft.errors import DataError
from fsdp_ft.model import vocab
from fsdp_ft.tasks.causal_lm import IGNORE, CausalLMTask

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Yes, again."}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int, offset: int = 0) -> list[dict]:
    """Real prose split in two: the user gives the first half, the assistant continues with the second."""
    paras = [json.loads(line)["text"] for line in (ASSETS / "data/tiny_text_train.jsonl").read_text().splitlines()]
    rows = []
    for p in paras[offset:offset + n]:
        words = p.split()
        half = len(words) // 2
        rows.append({"messages": [{"role": "system", "content": "Continue the text."},
                                  {"role": "user", "content": " ".join(words[:half])},
                                  {"role": "assistant", "content": " ".join(words[half:])}]})
    return rows


def template_less_base(out: Path) -> Path:
    """A pretrained tiny Llama whose tokenizer has no chat template and no ChatML tokens (ids 4 and 5 renamed)."""
    out.mkdir(parents=True)
    src = ASSETS / "tiny-llama"
    tok = json.loads((src / "tokenizer.json").read_text())
    rename = {"<|im_start|>": "<|reserved_0|>", "<|im_end|>": "<|reserved_1|>"}
    for t in tok["added_tokens"]:
        t["content"] = rename.get(t["content"], t["content"])
    tok["model"]["vocab"] = {rename.get(k, k): v for k, v in tok["model"]["vocab"].items()}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((src / "tokenizer_config.json").read_text())
    del config["chat_template"], config["extra_special_tokens"]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    return out


def cfg_for(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={tmp_path / 'run'}", *FAST, *overrides])


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def pieces(tok, parts: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Reference tokens: each text piece tokenized alone (the pieces are split where the byte-level BPE of the
    test tokenizer never merges: at special tokens and around newlines), with its hand-given flag."""
    ids, flags = [], []
    for text, flag in parts:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        flags += [flag] * len(piece)
    return ids, flags


def chatml_reference(tok, messages) -> tuple[list[int], list[bool]]:
    parts = []
    for m in messages:
        answer = m["role"] == "assistant"
        parts += [("<|im_start|>", False), (m["role"], False), ("\n", False), (m["content"], answer),
                  ("<|im_end|>", answer), ("\n", False)]
    return pieces(tok, parts)


# ---------------------------------------------------------------- formats, token by token

@pytest.mark.parametrize("marks", ["generation marks", "prefix rendering"])
def test_chat_loss_only_on_assistant_tokens(tok, marks, tmp_path):
    """Every system/user/template token has label -100; every assistant token, its <|im_end|> included, is its own
    label; both ways of finding assistant tokens (the template's {% generation %} marks, prefix rendering)."""
    if marks == "prefix rendering":
        tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
        tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        assert not formats.has_generation_marks(tok)
    want_ids, want_flags = chatml_reference(tok, CHAT)
    sample = formats.render_chat(tok, CHAT)
    assert sample.ids == want_ids and sample.completion == want_flags
    assert sum(want_flags) == len(tok("Hello!Yes, again.", add_special_tokens=False)["input_ids"]) + 2

    task = CausalLMTask(cfg_for(tmp_path, "train.seq_len=512"), tok)
    enc = task.encode({"messages": CHAT})
    assert enc["input_ids"] == want_ids
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for token, label, flag in zip(enc["input_ids"], enc["labels"], want_flags):
        assert label == (token if flag else IGNORE)
    trained_ends = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == im_end]
    assert len(trained_ends) == 2  # both assistant turns' end-of-turn tokens; not the system's or user's
    every = CausalLMTask(cfg_for(tmp_path, "train.seq_len=512", "data.loss_on=all"), tok).encode({"messages": CHAT})
    assert every["labels"] == want_ids


def test_prompt_completion_and_truncation(tok, tmp_path):
    row = {"prompt": "Translate the word house:", "completion": " maison"}
    prompt_ids = tok(row["prompt"])["input_ids"]  # BOS first, as a prompt gets at inference
    answer_ids = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    enc = CausalLMTask(cfg_for(tmp_path, "data.format=prompt_completion"), tok).encode(row)
    assert prompt_ids[0] == tok.bos_token_id
    assert enc["input_ids"] == prompt_ids + answer_ids
    assert enc["labels"] == [IGNORE] * len(prompt_ids) + answer_ids

    limit = len(answer_ids) + 3  # room for the answer, BOS and two more prompt tokens
    cut = CausalLMTask(cfg_for(tmp_path, f"train.seq_len={limit}"), tok).encode(row)
    assert cut["input_ids"] == prompt_ids[:1] + prompt_ids[-2:] + answer_ids  # the prompt's start went, BOS stayed
    start = CausalLMTask(cfg_for(tmp_path, f"train.seq_len={limit}", "data.truncation=keep_start"), tok).encode(row)
    assert start["input_ids"] == (prompt_ids + answer_ids)[:limit]
    long_answer = formats.Sample(list(range(10)), [False] * 3 + [True] * 7)
    assert formats.truncate(long_answer, 5, "keep_completion").ids == [0, 3, 4, 5, 6]  # answer's end goes last
    assert formats.truncate(long_answer, 5, "drop") is None
    text = CausalLMTask(cfg_for(tmp_path, "train.seq_len=8"), tok).encode({"text": "a long line " * 20})
    assert text["input_ids"] == (tok("a long line " * 20)["input_ids"])[:8] == text["labels"]  # text keeps its start


def test_alpaca_and_sharegpt_are_chats(tok, tmp_path):
    task = CausalLMTask(cfg_for(tmp_path, "train.seq_len=512"), tok)
    alpaca = {"instruction": "Name a colour.", "input": "Not red.", "output": "Blue."}
    want = formats.render_chat(tok, [{"role": "user", "content": "Name a colour.\n\nNot red."},
                                     {"role": "assistant", "content": "Blue."}])
    task.format = "alpaca"
    assert task.encode(alpaca)["input_ids"] == want.ids
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CHAT]}
    task.format = "sharegpt"
    assert task.encode(sharegpt)["input_ids"] == formats.render_chat(tok, CHAT).ids


def test_auto_detects_the_format(tmp_path):
    d = cfg_for(tmp_path).data
    assert formats.detect_format(["messages", "set"], d) == "chat"
    assert formats.detect_format(["conversations"], d) == "sharegpt"
    assert formats.detect_format(["instruction", "input", "output"], d) == "alpaca"
    assert formats.detect_format(["prompt", "completion"], d) == "prompt_completion"
    assert formats.detect_format(["text"], d) == "text"


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    """A template that renders an assistant turn differently once it is not the last cannot be split safely."""
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
                         "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(formats.RowError, match="generation"):
        formats.render_chat(tok, CHAT)


# ---------------------------------------------------------------- validation: drop and count, or fail naming the row

def test_drops_are_counted_and_too_many_fail(tmp_path):
    rows = chat_rows(40)
    rows[3] = {"messages": [{"role": "user", "content": "a question nobody answers"}]}
    rows[7]["messages"][2]["content"] = "   "
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = cfg_for(tmp_path, f"data.train={train}", "data.eval=null", "data.max_drop_share=0.1")
    splits = load_splits(cfg, CausalLMTask(cfg, AutoTokenizer.from_pretrained(ASSETS / "tokenizer")))
    assert len(splits.train) == 38 and splits.dropped["train_no_answer"] == 2

    cfg = cfg_for(tmp_path, f"data.train={train}", "data.eval=null", "data.max_drop_share=0.02")
    with pytest.raises(DataError) as err:
        load_splits(cfg, CausalLMTask(cfg, AutoTokenizer.from_pretrained(ASSETS / "tokenizer")))
    msg = str(err.value)
    assert str(train) in msg and "no_answer 2" in msg and "first: row 4" in msg and "\n" not in msg

    # over-long rows under truncation=drop count against the same share
    cfg = cfg_for(tmp_path, f"data.train={train}", "data.eval=null", "data.truncation=drop", "train.seq_len=40")
    with pytest.raises(DataError, match=r"too_long \d+ \(first: row \d+: longer than train.seq_len=40\)"):
        load_splits(cfg, CausalLMTask(cfg, AutoTokenizer.from_pretrained(ASSETS / "tokenizer")))


@pytest.mark.parametrize("bad,expect", [
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 1 has unknown role 'bot'"),
    ({"messages": [{"from": "human", "value": "hi"}]}, "set data.format=sharegpt"),
    ({"messages": "just text"}, "expected a non-empty list"),
])
def test_malformed_chat_row_fails_naming_file_and_row(tmp_path, bad, expect):
    rows = chat_rows(10)
    rows[5] = bad
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = cfg_for(tmp_path, f"data.train={train}", "data.eval=null", "data.format=chat")
    with pytest.raises(DataError) as err:
        load_splits(cfg, CausalLMTask(cfg, AutoTokenizer.from_pretrained(ASSETS / "tokenizer")))
    assert f"data.train: file '{train}' row 6: " in str(err.value) and expect in str(err.value)


def test_missing_column_names_file_and_key(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "answer": "a"}] * 4)
    cfg = cfg_for(tmp_path, f"data.train={train}", "data.eval=null", "data.format=prompt_completion")
    with pytest.raises(DataError, match=r"no column 'completion'.*data.completion_column"):
        load_splits(cfg, CausalLMTask(cfg, AutoTokenizer.from_pretrained(ASSETS / "tokenizer")))


def test_unknown_eval_label_is_dropped_and_counted(tmp_path):
    """seq_cls: an eval row whose label training never shows has no class id; a few are dropped, not fatal."""
    from fsdp_ft.tasks.seq_cls import SeqClsTask

    rows = [json.loads(line) for line in (ASSETS / "data/tiny_cls_eval.jsonl").read_text().splitlines()[:60]]
    rows[9]["label"] = "gizmo"
    ev = write_jsonl(tmp_path / "eval.jsonl", rows)
    cfg = cfg_for(tmp_path, "task=seq_cls", f"data.train={ASSETS / 'data/tiny_cls_train.jsonl'}", f"data.eval={ev}",
                  "data.max_eval_samples=null")
    splits = load_splits(cfg, SeqClsTask(cfg, AutoTokenizer.from_pretrained(ASSETS / "tokenizer")))
    assert len(splits.eval) == 59 and splits.dropped["eval_unknown_label"] == 1
    assert "gizmo" not in splits.eval["label"]


# ---------------------------------------------------------------- ChatML for a template-less tokenizer; new rows

def test_chatml_tokens_and_mean_rows(tmp_path):
    """ChatML is added as two new tokens; the grown source serves pretrained rows as they are, new rows as the mean."""
    from fsdp_ft.storage.weights_io import SafetensorsReader

    base = template_less_base(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    assert not tok.chat_template and len(tok) == 1024
    assert vocab.ensure_chat_template(tok) == [1024, 1025] == vocab.ensure_chat_template(tok)  # idempotent
    sample = formats.render_chat(tok, CHAT)
    assert sample.ids == chatml_reference(tok, CHAT)[0] and 1024 in sample.ids

    reader = SafetensorsReader(base)
    full = reader.read("model.embed_tokens.weight")
    grown = vocab.GrownVocabSource(reader, {"model.embed_tokens.weight": 1024})
    rows = grown.read_rows("model.embed_tokens.weight", 1000, 1026)
    torch.testing.assert_close(rows[:24], full[1000:])
    torch.testing.assert_close(rows[24:], full.double().mean(0).float().expand(2, -1))


@pytest.fixture(scope="module")
def grown_runs(tmp_path_factory):
    """LoRA SFT on chat data with a template-less base: one process in this process (its model gives the trained
    logits), two ranks through the launcher."""
    from fsdp_ft.api import train

    d = tmp_path_factory.mktemp("grown")
    base = template_less_base(d / "base")
    data = [f"data.train={write_jsonl(d / 'train.jsonl', chat_rows(64))}",
            f"data.eval={write_jsonl(d / 'eval.jsonl', chat_rows(16, 1000))}"]
    args = [f"model.path={base}", "model.random_init=false", "finetune.method=lora", "optim.lr=1e-2",
            "train.max_steps=6", "train.micro_batch_size=2", "train.grad_accum=2", *data]
    result = train(load_config(TINY, [f"output_dir={d / 'one'}", *FAST, *args]))
    result.model.eval()
    batch = result.tokenizer.apply_chat_template([CHAT], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = result.model(input_ids=batch["input_ids"], use_cache=False).logits
    return {"dir": d, "base": base, "args": args, "result": result, "ids": batch["input_ids"], "logits": logits}


def _delta(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "trainable_tokens" in k}


def test_new_rows_train_under_lora_and_export_reloads(grown_runs):
    """final/ is a PEFT folder whose tokenizer has ChatML: on the base resized to it, it gives the trained logits;
    --merge-adapters writes a plain model with the grown vocabulary and the same logits."""
    from peft import PeftModel

    from conftest import cli

    r = grown_runs
    final = r["result"].output_dir / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert len(tok) == 1026 and tok.convert_tokens_to_ids("<|im_end|>") == 1025 and tok.chat_template
    assert 1024 in r["ids"][0].tolist() and 1025 in r["ids"][0].tolist()

    base = AutoModelForCausalLM.from_pretrained(r["base"])
    mean_embed = base.model.embed_tokens.weight.detach().double().mean(0).float()
    mean_head = base.lm_head.weight.detach().double().mean(0).float()
    delta = _delta(final)
    assert sorted(k.split(".")[-3] for k in delta) == ["embed_tokens", "lm_head"]
    for key, mean in (("embed_tokens", mean_embed), ("lm_head", mean_head)):
        (rows,) = [v for k, v in delta.items() if key in k]
        assert rows.shape == (2, 64)
        change = (rows - mean).abs().max().item()
        assert change > 1e-3, f"{key}: the new rows did not train (max change {change})"

    base.resize_token_embeddings(len(tok))
    peft_model = PeftModel.from_pretrained(base, final).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=r["ids"]).logits, r["logits"], rtol=1e-5, atol=1e-5)

    cli("export", str(r["result"].output_dir), "--merge-adapters", "--out", str(r["dir"] / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(r["dir"] / "merged").eval()
    assert merged.config.vocab_size == 1026
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=r["ids"]).logits, r["logits"], rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(r["dir"] / "merged").chat_template


@pytest.mark.distributed
def test_new_rows_two_ranks_equal_one_process(grown_runs):
    r = grown_runs
    two = train_nproc(2, r["dir"] / "two", *r["args"], "train.grad_accum=1")
    assert_losses_close(losses(two), losses(r["result"].output_dir), rtol=1e-5)
    for (k1, v1), (k2, v2) in zip(sorted(_delta(two / "final").items()),
                                  sorted(_delta(r["result"].output_dir / "final").items())):
        assert k1 == k2
        torch.testing.assert_close(v2, v1, rtol=1e-4, atol=1e-6)


def test_new_rows_train_under_full_finetuning(tmp_path):
    """Full fine-tuning: the grown embedding and head rows are ordinary trainable rows; the export has them."""
    from safetensors.torch import load_file

    from conftest import cli

    base = template_less_base(tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "run"
    cli("train", str(TINY), f"output_dir={out}", *FAST, f"model.path={base}", "model.random_init=false",
        f"data.train={train}", "data.eval=null", "train.max_steps=2", "optim.lr=1e-2", "optim.warmup_steps=0")
    setup = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["split"] == "setup" and setup["dropped_rows"]["train_no_answer"] == 0
    trained = load_file(out / "final" / "model.safetensors")
    start = load_file(base / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert trained[name].shape == (1026, 64)
        mean = start[name].double().mean(0).float()
        assert (trained[name][1024:] - mean).abs().max() > 1e-3, name
    shutil.rmtree(base)


def test_frozen_new_rows_are_refused(tmp_path):
    """New chat tokens whose rows could not train (frozen embeddings, IA3 / prompt learning) stop the run."""
    from fsdp_ft.errors import ConfigError
    from fsdp_ft.model import adapters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny-llama"))
    vocab.check_rows_train(model, "partial", [])  # nothing added: nothing to check
    model.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        vocab.check_rows_train(model, "partial", [1024, 1025])
    with pytest.raises(ConfigError, match="finetune.method=ia3"):
        adapters.peft_config(cfg_for(tmp_path, "finetune.method=ia3"), [1024, 1025])
