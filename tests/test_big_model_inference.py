"""Big-model inference: `fsdp-ft eval / generate / predict --max-memory` spread a model that does not fit one
device over the devices, the CPU and the disk (accelerate's big-model loading through transformers'
`device_map`). Here a CPU cap smaller than a tiny Llama forces part of it onto disk; every output must equal the
plain HF model's own, computed in the test. The GPU variant (cuda + cpu) is in test_gpu.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ASSETS, REPO, cli
from fsdp_ft.cli import main

PROMPTS = ["Return the lowest index in the string", "Create a socket object and"]
LABELS = ["files", "net", "text"]


def _save(model, folder):
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(folder)
    return folder


def _cap(folder) -> str:
    """A CPU cap of 80% of the folder's weights: the first blocks stay in memory, the rest go to disk."""
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return f"cpu={int(size * 0.8)}"


def _placement(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "placement:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A random tiny Llama causal LM saved by transformers (peaked logits: varied greedy text)."""
    torch.manual_seed(3)
    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    config.update({"initializer_range": 0.2})
    return _save(AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp("big") / "lm")


@torch.no_grad()
def _greedy(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(model.device)
    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True)


def test_generate_with_part_of_the_model_on_disk_equals_hf(lm_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    proc = cli("generate", str(lm_folder), "--prompts-file", str(prompts), "--greedy", "--max-new-tokens", "10",
               "--max-memory", _cap(lm_folder))
    line = _placement(proc.stderr)
    assert "on cpu" in line and "on disk" in line and "max memory cpu=" in line, line
    got = [json.loads(r) for r in proc.stdout.splitlines()]
    model, tok = AutoModelForCausalLM.from_pretrained(lm_folder).eval(), AutoTokenizer.from_pretrained(lm_folder)
    want = [_greedy(model, tok, p, 10) for p in PROMPTS]
    assert [g["completion"] for g in got] == want and all(w.strip() for w in want) and want[0] != want[1]


@torch.no_grad()
def hf_loss(folder, rows: list[dict]) -> float:
    """The HF model's mean next-token loss over text rows, each its tokens + EOS (as the causal_lm task encodes a
    text row), in fp32 on the CPU."""
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    total = count = 0.0
    for r in rows:
        ids = torch.tensor([tok(r["text"])["input_ids"] + [tok.eos_token_id]])
        total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


def test_eval_with_part_of_the_model_on_disk_equals_hf_loss(lm_folder, tmp_path):
    """The loss over a text file equals HF's own; with no cap on a CPU-only machine the load is the plain one (no
    placement line). The chunked head loss would give NaN here (it replaces the head's forward, which accelerate's
    hooks own, and reads the offloaded head's `meta` weight)."""
    rows = [json.loads(line) for line in (ASSETS / "data" / "tiny_text_eval.jsonl").read_text().splitlines()][:6]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capped = cli("eval", str(lm_folder), "--data", str(data), "--max-memory", _cap(lm_folder))
    assert "on disk" in _placement(capped.stderr)
    got = json.loads(capped.stdout)
    assert got["rows"] == 6 and got["loss"] == pytest.approx(hf_loss(lm_folder, rows), rel=1e-5)
    if not torch.cuda.is_available():
        plain = cli("eval", str(lm_folder), "--data", str(data))
        assert "placement:" not in plain.stderr
        assert json.loads(plain.stdout)["loss"] == pytest.approx(got["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def cls_folder(tmp_path_factory):
    """A random tiny Llama classifier (3 named labels) saved by transformers."""
    torch.manual_seed(4)
    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama", num_labels=3, id2label=dict(enumerate(LABELS)),
                                        label2id={n: i for i, n in enumerate(LABELS)})
    config.update({"initializer_range": 0.2})
    return _save(AutoModelForSequenceClassification.from_config(config), tmp_path_factory.mktemp("big") / "cls")


def test_predict_with_a_classifier_partly_on_disk_equals_hf(cls_folder, tmp_path):
    folder = cls_folder
    texts = [json.loads(line)["text"] for line in
             (ASSETS / "data" / "tiny_cls_eval.jsonl").read_text().splitlines()[:8]]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    proc = cli("predict", str(folder), "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
               "--batch-size", "1", "--max-memory", _cap(folder))
    assert "on disk" in _placement(proc.stderr)
    got = torch.tensor([list(json.loads(line)["probabilities"].values())
                        for line in (tmp_path / "out.jsonl").read_text().splitlines()])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        want = torch.stack([torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1) for t in texts])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, want[:1].expand_as(want), atol=1e-4)  # the inputs matter


def test_peft_adapter_on_a_base_partly_on_disk_equals_peft(lm_folder, tmp_path):
    """An adapter folder: the base is spread (part on disk) and peft's adapter goes on top of it, re-dispatched
    with the same caps; its rewritten disk blocks go into the offload folder, not the working directory."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(5)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(lm_folder), lora).save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(lm_folder).save_pretrained(tmp_path / "adapter")
    work = tmp_path / "cwd"  # peft writes the disk blocks relative to the working directory: it must stay empty
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "generate", str(tmp_path / "adapter"), "--prompt",
                           PROMPTS[0], "--greedy", "--max-new-tokens", "10", "--max-memory", _cap(lm_folder),
                           "--offload-folder", "off"], cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on disk" in _placement(proc.stderr)
    assert [p.name for p in work.iterdir()] == ["off"] and not list((work / "off").iterdir())  # and cleaned up
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_folder), str(tmp_path / "adapter"))
    tok = AutoTokenizer.from_pretrained(lm_folder)
    want = _greedy(ref.eval(), tok, PROMPTS[0], 10)
    assert proc.stdout == want + "\n" and want != _greedy(AutoModelForCausalLM.from_pretrained(lm_folder).eval(),
                                                          tok, PROMPTS[0], 10)


def test_adapters_peft_cannot_spread_are_refused_in_one_line(cls_folder, lm_folder, tmp_path, capsys):
    """peft cannot put a module it saves in full (the classifier head) on disk, nor a prompt-learning adapter over
    an offloaded base: one line each, not a KeyError (at the first forward, or in peft's re-dispatch)."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    prompt = PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(lm_folder), prompt).save_pretrained(tmp_path / "prompt")
    AutoTokenizer.from_pretrained(lm_folder).save_pretrained(tmp_path / "prompt")
    code = main(["generate", str(tmp_path / "prompt"), "--prompt", "x", "--max-memory", _cap(lm_folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "prompt-learning adapter" in err[-1] and "disk" in err[-1], err

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    get_peft_model(AutoModelForSequenceClassification.from_pretrained(cls_folder), lora).save_pretrained(
        tmp_path / "adapter")
    AutoTokenizer.from_pretrained(cls_folder).save_pretrained(tmp_path / "adapter")
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "open the file"}\n')
    code = main(["predict", str(tmp_path / "adapter"), "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                 "--max-memory", _cap(cls_folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "score (saved in full by the adapter) would go to disk" in err[-1], err
    assert "Traceback" not in "".join(err) and not (tmp_path / "out.jsonl").exists()


def test_bad_max_memory_is_a_one_line_usage_error(lm_folder, capsys):
    proc = cli("generate", str(lm_folder), "--prompt", "x", "--max-memory", "cpu=lots", check=False)
    assert proc.returncode == 2 and "--max-memory 'cpu=lots': 'lots' is not a size" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    bad = ["cpu", "gpu=1GiB", "cpu=-5MiB", "disk=1GiB", f"{torch.cuda.device_count()}=1GiB", "cpu=1GiB,cpu=2GiB"]
    for value in bad:
        code = main(["eval", str(lm_folder), "--data", str(ASSETS / "data" / "tiny_text_eval.jsonl"),
                     "--max-memory", value])
        err = capsys.readouterr().err
        assert code == 2 and f"--max-memory '{value}'" in err and len(err.strip().splitlines()) == 1, (value, err)
