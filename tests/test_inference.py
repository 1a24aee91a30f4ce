"""`fsdp-ft eval`, `generate` and `predict` (one process, no FSDP) and exported classifiers in transformers'
text-classification pipeline: each compared with the training run's own numbers or the HF model's output."""
from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from cls_helpers import (EVAL_FILE, EVAL_ROWS, SEQ_LEN, classifier_run, eval_file_rows, hf_probabilities,
                         train_here)
from conftest import ASSETS, eval_rows
from fsdp_ft.cli import main
from fsdp_ft.observability.metrics import read_metrics

PROMPTS = ["Return the lowest index in the string", "Create a socket object and"]


@pytest.fixture(scope="module")
def run(session_tmp):
    return classifier_run(session_tmp)


def fsdp_ft(capsys, *args: str) -> tuple[int, str, str]:
    """The `fsdp-ft` entry point in this process (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _eval_row(run, step):
    return next(r for r in eval_rows(run) if r["step"] == step)


def _same_metrics(got: dict, want: dict) -> None:
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert got["accuracy"] == want["accuracy"] and got["f1_macro"] == pytest.approx(want["f1_macro"], abs=1e-12)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)  # 2 ranks sum in another order


# ---------------------------------------------------------------- classifiers

def test_pipeline_scores_equal_our_probabilities(run):
    """final/ works in transformers.pipeline('text-classification') with the label names from the data."""
    from transformers import pipeline

    texts = [r["text"] for r in eval_file_rows(6)]
    probs, config = hf_probabilities(run / "final", texts)
    names = [config.id2label[i] for i in range(config.num_labels)]
    assert names == ["files", "net", "text"]
    clf = pipeline("text-classification", model=str(run / "final"), device="cpu")
    got = clf(texts, top_k=None, truncation=True, max_length=SEQ_LEN)
    for row, want in zip(got, probs):
        scores = {d["label"]: d["score"] for d in row}
        assert sorted(scores) == names
        torch.testing.assert_close(torch.tensor([scores[n] for n in names]), want, rtol=1e-5, atol=1e-6)


def test_predict_equals_softmax_of_hf_logits(run, tmp_path, capsys):
    rows = eval_file_rows(20)
    src = tmp_path / "in.jsonl"  # another text column name, and a blank line (skipped)
    src.write_text("\n".join(json.dumps({"review": r["text"], "gold": r["label"]}) for r in rows) + "\n\n")
    code, out, _ = fsdp_ft(capsys, "predict", run, "--input", src, "--output", tmp_path / "out.jsonl",
                           "--text-column", "review", "--batch-size", "7")
    assert code == 0 and "wrote 20 predictions" in out
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want, config = hf_probabilities(run / "final", [r["text"] for r in rows])  # the run's seq_len truncates both
    names = [config.id2label[i] for i in range(config.num_labels)]
    assert len(got) == len(rows)
    for g, w in zip(got, want):
        assert list(g["probabilities"]) == names
        torch.testing.assert_close(torch.tensor(list(g["probabilities"].values())), w, rtol=1e-5, atol=1e-6)
        assert g["label"] == names[int(w.argmax())] and g["score"] == pytest.approx(float(w.max()), rel=1e-5)


def test_eval_command_gives_the_training_runs_eval_numbers(run, tmp_path, capsys):
    """final/ (the best step) reproduces that step's eval row; a run dir without final/ uses its newest checkpoint
    and reproduces the last eval row."""
    final_step = [r for r in read_metrics(run) if r.get("split") == "final"][-1]["final_from_step"]
    code, out, _ = fsdp_ft(capsys, "eval", run, "--data", EVAL_FILE, "--max-samples", EVAL_ROWS)
    assert code == 0
    got = json.loads(out)
    assert got["rows"] == EVAL_ROWS
    _same_metrics(got, _eval_row(run, final_step))

    bare = tmp_path / "no-final"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("final"))
    code, out, err = fsdp_ft(capsys, "eval", bare, "--data", EVAL_FILE, "--max-samples", EVAL_ROWS)
    assert code == 0 and "newest checkpoint" in err
    last = eval_rows(run)[-1]
    assert last["step"] != final_step
    _same_metrics(json.loads(out), last)


def test_classifier_bad_input_one_line_errors(run, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    cases = {
        "missing.jsonl": (None, "does not exist"),
        "badjson.jsonl": ('{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        "nocolumn.jsonl": ('{"text": "ok"}\n\n{"body": "x"}\n', "line 3 has no column 'text'"),
        "empty.jsonl": ('{"text": "ok"}\n{"text": "  "}\n', "line 2 has no text in column 'text'"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        code, _, err = fsdp_ft(capsys, "predict", run, "--input", tmp_path / name, "--output", out)
        assert code == 2 and message in err and name in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing half-written
    (tmp_path / "labels.jsonl").write_text('{"text": "a", "label": "net"}\n{"text": "b", "label": "music"}\n')
    code, _, err = fsdp_ft(capsys, "eval", run, "--data", tmp_path / "labels.jsonl")
    assert code == 2 and "row 2" in err and "'music'" in err and "labels.jsonl" in err
    code, _, err = fsdp_ft(capsys, "eval", run, "--data", tmp_path / "nope.jsonl")
    assert code == 2 and "nope.jsonl" in err and "does not exist" in err
    code, _, err = fsdp_ft(capsys, "generate", run, "--prompt", "hi")
    assert code == 2 and "causal LM" in err
    code, _, err = fsdp_ft(capsys, "predict", tmp_path / "no-model", "--input", tmp_path / "empty.jsonl",
                           "--output", out)
    assert code == 2 and "no-model" in err and "does not exist" in err


@pytest.fixture(scope="module")
def lora_classifier(session_tmp, pretrained_q256):
    """A LoRA classifier on a saved 'pretrained' Llama: final/ is a PEFT adapter folder (base + adapter)."""
    return train_here(session_tmp / "lora-cls", f"model.path={pretrained_q256}", "model.random_init=false",
                      "task=seq_cls", "finetune.method=lora", "train.max_steps=3", "optim.lr=1e-2",
                      f"data.train={ASSETS / 'data' / 'tiny_cls_train.jsonl'}", f"data.eval={EVAL_FILE}",
                      "train.micro_batch_size=4")


def test_predict_with_peft_adapter_folder(lora_classifier, pretrained_q256, tmp_path, capsys):
    """An adapter folder (base from adapter_config.json + adapter) and the run dir (adapters merged into the
    base) predict the same probabilities as peft's own PeftModel."""
    from peft import PeftModel

    run = lora_classifier
    assert (run / "final" / "adapter_config.json").is_file()
    rows = eval_file_rows(8)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    got = {}
    for name, model in (("adapter", run / "final"), ("run", run)):
        code, _, _ = fsdp_ft(capsys, "predict", model, "--input", src, "--output", tmp_path / f"{name}.jsonl",
                             "--max-length", SEQ_LEN)
        assert code == 0
        got[name] = torch.tensor([list(json.loads(line)["probabilities"].values())
                                  for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()])
    base = AutoModelForSequenceClassification.from_pretrained(pretrained_q256, num_labels=3)
    ref = PeftModel.from_pretrained(base, str(run / "final")).eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    with torch.no_grad():
        want = torch.stack([torch.softmax(ref(**tok(r["text"], truncation=True, max_length=SEQ_LEN,
                                                     return_tensors="pt")).logits[0], -1) for r in rows])
    torch.testing.assert_close(got["adapter"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["run"], want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want, want[:1].expand_as(want), atol=1e-4)  # the inputs matter


# ---------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """An HF causal LM folder (random tiny Llama saved by transformers, with the tiny tokenizer and its
    chat template)."""
    out = tmp_path_factory.mktemp("lm") / "tiny-llama-hf"
    torch.manual_seed(3)
    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    config.update({"initializer_range": 0.2})  # peaked next-token distributions: varied greedy text
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(out)
    return out


@functools.lru_cache(maxsize=2)
def _hf_lm(folder):
    """The HF model and tokenizer of a folder, loaded once (generation does not change them)."""
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _hf_generate(folder, ids, **kwargs) -> str:
    model, tok = _hf_lm(str(folder))
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id,
                             **kwargs)[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True)


def _greedy_rows_equal_hf(lm_folder, tok, out: str, max_new_tokens: int) -> list[dict]:
    """generate's JSON lines: the PROMPTS in order, each completion what model.generate gives greedily."""
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["prompt"] for g in got] == PROMPTS
    for g in got:
        want = _hf_generate(lm_folder, tok(g["prompt"], return_tensors="pt")["input_ids"], do_sample=False,
                            max_new_tokens=max_new_tokens)
        assert g["completion"] == want and want.strip()
    return got


def test_generate_greedy_and_chat_equal_hf_generate(lm_folder, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(lm_folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code, out, _ = fsdp_ft(capsys, "generate", lm_folder, "--prompts-file", prompts, "--greedy",
                           "--max-new-tokens", 12)
    assert code == 0
    got = _greedy_rows_equal_hf(lm_folder, tok, out, 12)

    code, out, _ = fsdp_ft(capsys, "generate", lm_folder, "--prompt", PROMPTS[0], "--chat", "--greedy",
                           "--max-new-tokens", 12)
    chat_ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    want = _hf_generate(lm_folder, chat_ids, do_sample=False, max_new_tokens=12)
    assert code == 0 and out == want + "\n"
    assert want != got[0]["completion"]  # the template changed the input


def test_generate_sampling_equals_hf_generate_with_the_same_seed(lm_folder, capsys):
    tok = AutoTokenizer.from_pretrained(lm_folder)
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    options = ["--temperature", 0.9, "--top-p", 0.95, "--top-k", 40, "--max-new-tokens", 12]
    outs = {}
    for seed in (1, 2):
        code, out, _ = fsdp_ft(capsys, "generate", lm_folder, "--prompt", PROMPTS[1], "--seed", seed, *options)
        torch.manual_seed(seed)
        want = _hf_generate(lm_folder, ids, do_sample=True, temperature=0.9, top_p=0.95, top_k=40,
                            max_new_tokens=12)
        assert code == 0 and out == want + "\n"
        outs[seed] = out
    assert outs[1] != outs[2]


def test_generate_prompts_from_a_jsonl_column_equal_hf_generate(lm_folder, tmp_path, capsys):
    """--prompts-file x.jsonl --prompt-column C: the texts of column C, in file order (other columns and blank
    lines ignored), each completed as model.generate completes it; a column of message lists with --chat (the
    README's SmolLM2 command) renders each conversation through the chat template."""
    tok = AutoTokenizer.from_pretrained(lm_folder)
    src = tmp_path / "questions.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "prompt": "not this one", "question": p})
                             for i, p in enumerate(PROMPTS)) + "\n\n")
    code, out, _ = fsdp_ft(capsys, "generate", lm_folder, "--prompts-file", src, "--prompt-column", "question",
                           "--greedy", "--max-new-tokens", 8)
    assert code == 0
    got = _greedy_rows_equal_hf(lm_folder, tok, out, 8)
    assert got[0]["completion"] != got[1]["completion"]

    conversations = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": p}]
                     for p in PROMPTS[:1]]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    code, out, _ = fsdp_ft(capsys, "generate", lm_folder, "--prompts-file", src, "--prompt-column", "messages",
                           "--chat", "--greedy", "--max-new-tokens", 8)
    assert code == 0
    chats = [json.loads(line) for line in out.splitlines()]
    assert [c["prompt"] for c in chats] == conversations
    for c, plain in zip(chats, got):
        ids = tok.apply_chat_template(c["prompt"], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        want = _hf_generate(lm_folder, ids, do_sample=False, max_new_tokens=8)
        assert c["completion"] == want and want != plain["completion"]


def test_generate_bad_options(lm_folder, tmp_path, capsys):
    for args, message in ((["--temperature", 0], "--temperature"), (["--top-p", 1.5], "--top-p"),
                          (["--max-new-tokens", 0], "--max-new-tokens")):
        code, _, err = fsdp_ft(capsys, "generate", lm_folder, "--prompt", "x", *args)
        assert code == 2 and message in err
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"question": "b"}\n')
    code, _, err = fsdp_ft(capsys, "generate", lm_folder, "--prompts-file", tmp_path / "p.jsonl")
    assert code == 2 and "p.jsonl" in err and "line 2 has no column 'prompt'" in err


# ---------------------------------------------------------------- causal LM eval

@pytest.fixture(scope="module")
def lm_run(session_tmp):
    """A causal LM run (fp32) with eval rows and checkpoints at steps 2 and 4 (final/ is step 4)."""
    return train_here(session_tmp / "lm-eval-fp32", "train.max_steps=4", "train.eval_every=2", "train.save_every=2",
                      "train.keep_last=2")


def test_eval_command_on_a_causal_lm_gives_the_runs_eval_numbers(lm_run, tmp_path, capsys):
    """`fsdp-ft eval RUN --data F` on a causal LM: the loss and perplexity of the run's own eval row for the same
    rows (data.max_eval_samples=16 of FAST), from final/ (step 4), from the newest checkpoint of a copy without
    final/ (step 4, not step 2), and from one without final/ and step-4 (step 2); the two steps' numbers differ,
    so each match is the right weights."""
    data = ASSETS / "data" / "tiny_text_eval.jsonl"
    rows = {r["step"]: r for r in eval_rows(lm_run)}
    assert sorted(rows) == [2, 4] and rows[2]["loss"] != pytest.approx(rows[4]["loss"], rel=1e-4)
    code, out, _ = fsdp_ft(capsys, "eval", lm_run, "--data", data, "--max-samples", 16)
    assert code == 0
    got = json.loads(out)
    assert got["rows"] == 16
    assert got["loss"] == pytest.approx(rows[4]["loss"], rel=1e-6)
    assert got["perplexity"] == pytest.approx(rows[4]["perplexity"], rel=1e-6)

    for name, ignore, step in (("no-final", ("final",), 4), ("step-2-only", ("final", "step-4"), 2)):
        copy = tmp_path / name
        shutil.copytree(lm_run, copy, ignore=shutil.ignore_patterns(*ignore))
        code, out, err = fsdp_ft(capsys, "eval", copy, "--data", data, "--max-samples", 16)
        assert code == 0 and f"newest checkpoint step-{step}" in err, err
        got = json.loads(out)
        assert got["loss"] == pytest.approx(rows[step]["loss"], rel=1e-6), name
        assert got["perplexity"] == pytest.approx(rows[step]["perplexity"], rel=1e-6), name


# ---------------------------------------------------------------- compute dtype

@pytest.fixture(scope="module")
def bf16_run(session_tmp):
    """A causal LM trained with bf16 mixed precision (fp32 weights, bf16 compute): its eval rows are bf16 numbers."""
    return train_here(session_tmp / "lm-bf16", "fsdp.mixed_precision=bf16", "train.max_steps=4")


def test_eval_of_a_bf16_run_computes_in_bf16_as_its_eval_rows(bf16_run, capsys):
    """`fsdp-ft eval` loads the run in its compute dtype, so it gives the run's own (bf16) eval numbers; the same
    weights evaluated in fp32 differ by far more than the tolerance, so the comparison tells the two apart."""
    from fsdp_ft.inference.loading import load_model

    assert load_model(str(bf16_run)).model.dtype == torch.bfloat16
    assert load_model(str(bf16_run), ["fsdp.mixed_precision=fp32"]).model.dtype == torch.float32
    data = ASSETS / "data" / "tiny_text_eval.jsonl"
    want = eval_rows(bf16_run)[-1]
    got = {}
    for precision in ("bf16", "fp32"):
        code, out, _ = fsdp_ft(capsys, "eval", bf16_run, "--data", data, "--max-samples", 16,
                               f"fsdp.mixed_precision={precision}")
        assert code == 0
        got[precision] = json.loads(out)
    assert got["bf16"]["rows"] == 16
    assert got["bf16"]["loss"] == pytest.approx(want["loss"], rel=1e-7)  # bit for bit here: the same kernels
    assert got["fp32"]["loss"] != pytest.approx(want["loss"], rel=1e-6)  # 7e-6 apart: fp32 would not have matched
    code, out, _ = fsdp_ft(capsys, "eval", bf16_run, "--data", data, "--max-samples", 16)
    assert code == 0 and json.loads(out)["loss"] == got["bf16"]["loss"]  # the run's config decides by default


def test_fp32_runs_and_bare_folders_stay_fp32_on_the_cpu(run, lm_folder):
    from fsdp_ft.inference.loading import load_model

    assert load_model(str(run)).model.dtype == torch.float32  # the classifier run: default precision, fp32
    assert load_model(str(lm_folder)).model.dtype == torch.float32
    assert load_model(str(lm_folder), ["fsdp.mixed_precision=auto"]).model.dtype == torch.float32  # auto on a CPU
    assert load_model(str(lm_folder), ["fsdp.mixed_precision=bf16"]).model.dtype == torch.bfloat16
