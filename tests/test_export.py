"""`fsdp-ft export` and output_dir/final: HF folders that from_pretrained loads, with the trained model's logits."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ASSETS, FAST, TINY, cli, eval_rows
from fsdp_ft.api import train
from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints
from fsdp_ft.checkpoint.export import export_checkpoint
from fsdp_ft.config import load_config

SAMPLE = ["Create a new directory and all missing parents.", "Send the data to the socket."]


def test_final_export_reproduces_trained_logits(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=3"])
    result = train(cfg)
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    batch = tok(SAMPLE, return_tensors="pt", padding=True)
    result.model.eval()
    with torch.no_grad():
        want = result.model(**batch, use_cache=False).logits
        got = hf(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model_type"] == "llama"
    # the export is the trained model, not the initial one: the same seeded build, untrained, gives other logits
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import fsdp_engine
    initial_model = fsdp_engine.build(cfg, distributed.init_distributed()).model.eval()
    with torch.no_grad():
        initial = initial_model(**batch, use_cache=False).logits
    assert (got - initial).abs().max() > 1e-3
    # ... and it scores the run's own eval: the token-weighted next-token loss over the eval rows, computed here
    # row by row with the exported model (text rows: the tokenizer's BOS, the text, EOS, at most train.seq_len)
    seq = int(next(o for o in FAST if o.startswith("train.seq_len=")).split("=")[1])
    n_eval = int(next(o for o in FAST if o.startswith("data.max_eval_samples=")).split("=")[1])
    rows = (ASSETS / "data" / "tiny_text_eval.jsonl").read_text().splitlines()[:n_eval]
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for line in rows:
            ids = tok(json.loads(line)["text"])["input_ids"]
            ids = (ids + [tok.eos_token_id] if ids[-1] != tok.eos_token_id else ids)[:seq]
            logits = hf(input_ids=torch.tensor([ids])).logits[0]
            loss_sum += torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]),
                                                          reduction="sum").item()
            count += len(ids) - 1
    logged = eval_rows(tmp_path / "run")[-1]
    assert logged["step"] == 3 and logged["loss"] == pytest.approx(loss_sum / count, rel=1e-5)

    # size-capped shards: several files plus an index, same weights
    ckpt = list_checkpoints(tmp_path / "run")[-1][1]
    sharded = export_checkpoint(tmp_path / "run", ckpt, tmp_path / "sharded", max_shard_bytes=200_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    again = AutoModelForCausalLM.from_pretrained(sharded).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, want, rtol=1e-6, atol=1e-6)


def test_cli_export_picks_the_step(tmp_path):
    """Export of step 1 of a 2-step run equals the final model of a 1-step run (constant lr, same seed)."""
    common = [*FAST, "optim.schedule=constant"]
    cli("train", str(TINY), f"output_dir={tmp_path / 'two'}", *common, "train.max_steps=2", "train.save_every=1",
        "train.keep_last=5")
    cli("train", str(TINY), f"output_dir={tmp_path / 'one'}", *common, "train.max_steps=1")
    out = cli("export", str(tmp_path / "two"), "--step", "1", "--out", str(tmp_path / "exp1"))
    assert "exported" in out.stdout
    tok = AutoTokenizer.from_pretrained(tmp_path / "exp1")
    batch = tok(SAMPLE, return_tensors="pt", padding=True)
    with torch.no_grad():
        step1 = AutoModelForCausalLM.from_pretrained(tmp_path / "exp1")(**batch).logits
        one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")(**batch).logits
        two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")(**batch).logits
    torch.testing.assert_close(step1, one, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(step1, two)
    # an existing folder is never overwritten
    again = cli("export", str(tmp_path / "two"), "--out", str(tmp_path / "exp1"), check=False)
    assert again.returncode != 0 and "exp1" in again.stderr and "Traceback" not in again.stderr
    missing = cli("export", str(tmp_path / "two"), "--step", "7", "--out", str(tmp_path / "x"), check=False)
    assert missing.returncode == 2 and "step 7" in missing.stderr


def test_classifier_export_accuracy_matches_logged_eval(tmp_path):
    """The logged eval accuracy equals a hand count with the exported model on the eval file."""
    data = ASSETS / "data"
    run = tmp_path / "cls"
    cli("train", str(TINY), f"output_dir={run}", *FAST, "task=seq_cls", f"model.path={ASSETS / 'tiny-bert'}",
        f"data.train={data / 'tiny_cls_train.jsonl'}", f"data.eval={data / 'tiny_cls_eval.jsonl'}",
        "data.max_eval_samples=40", "train.max_steps=15", "optim.lr=5e-3", "train.micro_batch_size=8")
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    rows = [json.loads(line) for line in (data / "tiny_cls_eval.jsonl").read_text().splitlines()][:40]
    correct = 0
    for row in rows:
        enc = tok(row["text"], truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            pred = model(**enc).logits.argmax(-1).item()
        correct += model.config.id2label[pred] == row["label"]
    logged = eval_rows(run)[-1]
    assert logged["accuracy"] == pytest.approx(correct / len(rows))
    assert set(model.config.label2id) == {"files", "net", "text"}
