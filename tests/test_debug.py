"""`fsdp-ft train --debug`: one process, deterministic, anomaly detection, per-step rows, the first batch dumped
(text and which tokens carry loss) — and the same losses as a normal run; the Colab QLoRA recipe parses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ASSETS, FAST, REPO, TINY, assert_losses_close, cli, losses, train_1proc


def test_debug_run_dumps_the_first_batch_and_trains_like_a_normal_run(tmp_path):
    res = cli("train", str(TINY), "--debug", f"output_dir={tmp_path}", *FAST)
    out = tmp_path / "debug"
    dump = (out / "first_batch.txt").read_text()
    samples = dump.split("--- sample ")[1:]
    assert dump.startswith("first batch: 4 samples x") and len(samples) == 4  # micro_batch_size of tiny.yaml
    train_text = {json.loads(line)["text"] for line in (ASSETS / "data" / "tiny_text_train.jsonl").open()}
    for sample in samples:
        head, text, tokens = sample.splitlines()[:3]
        n, carry = int(head.split(": ")[1].split()[0]), int(head.split(", ")[1].split()[0])
        assert carry == n - 1  # causal LM: every token but the first carries loss
        assert tokens.startswith("tokens: «<s>» ") and tokens.count("«") == 1
        body = text.removeprefix("text: <s>").removesuffix("</s>")
        assert any(row.startswith(body) for row in train_text), body  # decoded text is a real training row
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "split" not in r] == [1, 2, 3, 4, 5]  # few steps, each logged
    assert "[train] step=5" in res.stdout
    ref = train_1proc(tmp_path / "normal", "train.max_steps=5")
    assert_losses_close(losses(out), losses(ref), 1e-6)  # deterministic algorithms change no number on CPU
    assert not (tmp_path / "checkpoints").exists()  # a debug run never touches the real run's checkpoints


def test_debug_refuses_several_ranks(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    res = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "train", str(TINY), "--debug", f"output_dir={tmp_path}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--debug runs one process" in res.stderr, res.stderr


@pytest.mark.gpu
def test_debug_runs_on_cuda(tmp_path):
    cli("train", str(TINY), "--debug", f"output_dir={tmp_path}", *FAST)
    setup = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").open()][0]
    assert setup["device"] == "cuda:0"


@pytest.mark.gpu
def test_run_one_rank_with_nccl(tmp_path):
    from conftest import train_nproc
    out = train_nproc(1, tmp_path)
    setup = [json.loads(line) for line in (out / "metrics.jsonl").open()][0]
    assert setup["device"] == "cuda:0" and len(losses(out)) == 8


def test_colab_qlora_recipe_parses():
    from fsdp_ft.config import load_config
    cfg = load_config(REPO / "configs" / "qlora_7b_colab.yaml")
    lora = cfg.finetune.lora
    assert (cfg.finetune.method, lora.r, lora.alpha, lora.dropout, cfg.finetune.quant.type) == ("qlora", 64, 16, 0.1, "nf4")
    assert (cfg.fsdp.mixed_precision, cfg.train.micro_batch_size, cfg.optim.lr) == ("fp16", 4, 2e-4)
